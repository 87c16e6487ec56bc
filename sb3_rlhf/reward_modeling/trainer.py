"""RewardModelTrainer: learn r(x, y) from human comparisons with the Bradley–Terry loss."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch as th
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sb3_rlhf.common.data import PreferencePair
from sb3_rlhf.common.io import atomic_directory
from sb3_rlhf.common.models import load_tokenizer, resolve_model_path
from sb3_rlhf.common.progress import without_transformers_bars
from sb3_rlhf.common.tokenizers import encode_keep_end, pad_right
from sb3_rlhf.common.trainer import SupervisedTrainer
from sb3_rlhf.reward_modeling.model import RewardModel, load_reward_model, save_reward_settings


def bradley_terry_loss(
    chosen_rewards: th.Tensor,
    rejected_rewards: th.Tensor,
    margins: th.Tensor | None = None,
    center_coef: float = 0.0,
) -> th.Tensor:
    """Bradley–Terry negative log-likelihood of the human preferences (Ouyang et al. 2022, eq. 1):

        L = −E[ log σ(r(x, y_w) − r(x, y_l) − m) ] + c · E[ (r(x, y_w) + r(x, y_l))² ]

    ``m`` is an optional per-pair margin (Touvron et al. 2023); the second term (Eisenstein et al. 2023)
    centres the rewards at 0, which PPO's value function likes.

    :param chosen_rewards: ``(batch,)`` r(x, y_w).
    :param rejected_rewards: ``(batch,)`` r(x, y_l).
    :param margins: ``(batch,)`` or ``None``.
    :param center_coef: ``c``.
    """
    difference = chosen_rewards - rejected_rewards
    if margins is not None:
        difference = difference - margins
    loss = -F.logsigmoid(difference).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def _fit_probe(differences: th.Tensor, l2: float, max_iter: int = 200) -> th.Tensor:
    """argmin_w mean(−log σ(differences·w)) + l2·|w|² by full-batch L-BFGS."""
    weight = th.zeros(differences.shape[1], requires_grad=True)
    optimizer = th.optim.LBFGS([weight], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> th.Tensor:
        optimizer.zero_grad()
        loss = -F.logsigmoid(differences @ weight).mean() + l2 * (weight**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach()


class RewardModelTrainer(SupervisedTrainer):
    """Train a reward model on preference pairs, SB3-style: ``RewardModelTrainer(...).learn()``.

    Logs ``train/loss``, ``train/accuracy`` and, after each epoch on the held-out pairs, ``eval/accuracy``
    (share of pairs with r(chosen) > r(rejected)), ``eval/loss``, ``eval/mean``, ``eval/std`` and
    ``eval/margin`` (mean r(chosen) − r(rejected)) to stdout and TensorBoard.

    :param model: a :class:`RewardModel` (or any one-label sequence classifier), or a backbone folder to
        build a :class:`RewardModel` on.
    :param tokenizer: its tokenizer (object or folder; default: the model folder's). It needs a pad token.
    :param train_pairs: the training comparisons.
    :param eval_pairs: held-out comparisons for accuracy (optional).
    :param learning_rate: AdamW learning rate.
    :param batch_size: pairs per step.
    :param n_epochs: passes over ``train_pairs`` per :meth:`learn`.
    :param max_length: tokens per text, cut from the left (the final answer is kept); saved with the model, it is
        the length ``RewardModelWrapper`` cuts texts to by default.
    :param use_margins: subtract each pair's ``margin`` inside the loss where it has one.
    :param center_coef: weight of the reward-centering term.
    :param pooling: for a backbone folder: ``"auto"``, ``"mean"``, ``"last"`` or ``"first"``.
    :param head_learning_rate: learning rate of a :class:`RewardModel`'s new scalar head (``None``: as the
        backbone); a new head learns faster than the pretrained weights should move.
    :param eval_batch_size: texts per forward pass when scoring.
    :param weight_decay: AdamW weight decay.
    :param max_grad_norm: gradient clipping norm.
    :param log_interval: log training metrics every this many optimizer steps.
    :param tensorboard_log: TensorBoard folder (``None``: no TensorBoard).
    :param verbose: 0 silent, 1 prints the logged tables.
    :param seed: seeds Python, NumPy and torch (data order, initialisation of new heads).
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    name = "reward_model"

    def __init__(
        self,
        model: th.nn.Module | str,
        tokenizer: PreTrainedTokenizerBase | str | None,
        train_pairs: Sequence[PreferencePair],
        eval_pairs: Sequence[PreferencePair] | None = None,
        learning_rate: float = 2e-5,
        batch_size: int = 16,
        n_epochs: int = 1,
        max_length: int = 256,
        use_margins: bool = True,
        center_coef: float = 0.0,
        pooling: str = "auto",
        head_learning_rate: float | None = None,
        eval_batch_size: int = 64,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        log_interval: int = 10,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int = 0,
        device: th.device | str = "auto",
    ) -> None:
        super().__init__(
            learning_rate=learning_rate,
            batch_size=batch_size,
            n_epochs=n_epochs,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            log_interval=log_interval,
            tensorboard_log=tensorboard_log,
            verbose=verbose,
            seed=seed,
            device=device,
        )
        if isinstance(model, (str, os.PathLike)):
            path = resolve_model_path(model, what="reward model or backbone")
            model = (
                load_reward_model(path)
                if os.path.exists(os.path.join(path, "reward_model.json"))
                else RewardModel.from_backbone(path, pooling)
            )
            tokenizer = tokenizer if tokenizer is not None else path
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise ValueError(
                "the reward model's tokenizer needs a pad token: set tokenizer.pad_token (e.g. to its EOS or [PAD])"
            )
        if isinstance(model, PreTrainedModel):
            if model.config.num_labels != 1:
                raise ValueError(f"a reward model outputs one score: num_labels is {model.config.num_labels}")
            model.config.pad_token_id = tokenizer.pad_token_id
        if not train_pairs:
            raise ValueError("train_pairs is empty: give at least one PreferencePair")
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.train_pairs = list(train_pairs)
        self.eval_pairs = list(eval_pairs) if eval_pairs else []
        self.max_length = max_length
        self.use_margins = use_margins
        self.center_coef = center_coef
        self.head_learning_rate = head_learning_rate
        self.eval_batch_size = eval_batch_size

    def parameter_groups(self) -> list[dict[str, Any]]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not isinstance(self.model, RewardModel) or self.head_learning_rate is None:
            return [{"params": params}]
        head = {id(p) for p in self.model.head.parameters()}
        return [
            {"params": [p for p in params if id(p) not in head]},
            {"params": [p for p in params if id(p) in head], "lr": self.head_learning_rate},
        ]

    def set_training_mode(self, mode: bool) -> None:
        self.model.train(mode)

    def _encode(self, pairs: Sequence[PreferencePair]) -> tuple[th.Tensor, th.Tensor]:
        """Chosen texts then rejected texts, one right-padded batch of ``2 * len(pairs)`` rows."""
        texts = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
        return pad_right(
            encode_keep_end(self.tokenizer, texts, self.max_length), self.tokenizer.pad_token_id, self.device
        )

    def _rewards(self, input_ids: th.Tensor, attention_mask: th.Tensor) -> th.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.reshape(logits.shape[0], -1)[:, 0].float()

    def training_examples(self) -> Sequence[PreferencePair]:
        return self.train_pairs

    def training_loss(self, batch: list[PreferencePair]) -> tuple[th.Tensor, dict[str, float], int]:
        rewards = self._rewards(*self._encode(batch))
        chosen, rejected = rewards[: len(batch)], rewards[len(batch) :]
        loss = bradley_terry_loss(chosen, rejected, self._margins(batch), self.center_coef)
        return loss, {"accuracy": (chosen > rejected).float().mean().item()}, len(batch)

    def _margins(self, pairs: Sequence[PreferencePair]) -> th.Tensor | None:
        if not self.use_margins or all(p.margin is None for p in pairs):
            return None
        return th.tensor([p.margin or 0.0 for p in pairs], dtype=th.float32, device=self.device)

    @th.no_grad()
    def score_pairs(self, pairs: Sequence[PreferencePair]) -> tuple[th.Tensor, th.Tensor]:
        """Rewards of the chosen and rejected responses: two ``(n_pairs,)`` float32 CPU tensors."""
        was_training = self.model.training
        self.model.eval()
        chosen, rejected = [], []
        step = max(1, self.eval_batch_size // 2)
        for start in range(0, len(pairs), step):
            batch = pairs[start : start + step]
            rewards = self._rewards(*self._encode(batch)).cpu()
            chosen.append(rewards[: len(batch)])
            rejected.append(rewards[len(batch) :])
        self.model.train(was_training)
        return th.cat(chosen), th.cat(rejected)

    @th.no_grad()
    def pooled_differences(self, pairs: Sequence[PreferencePair]) -> th.Tensor:
        """pool(chosen) − pool(rejected) of a :class:`RewardModel`: ``(n_pairs, hidden)`` float32 on CPU."""
        if not isinstance(self.model, RewardModel):
            raise TypeError("pooled features need a RewardModel (backbone + pooling + head)")
        was_training = self.model.training
        self.model.eval()
        differences = []
        step = max(1, self.eval_batch_size // 2)
        for start in range(0, len(pairs), step):
            batch = pairs[start : start + step]
            features = self.model.pool(*self._encode(batch)).cpu()
            differences.append(features[: len(batch)] - features[len(batch) :])
        self.model.train(was_training)
        return th.cat(differences)

    def fit_linear_probe(
        self, l2_candidates: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1), validation_fraction: float = 0.2
    ) -> dict[str, float]:
        """Fit the head alone on the frozen backbone's pooled features (a Bradley–Terry linear probe), in place.

        w minimises mean(−log σ(w·(f(x⊕y_w) − f(x⊕y_l)))) + λ|w|², λ chosen on a validation split of the
        training pairs, then refitted on all of them. Fine-tuning afterwards is linear-probe-then-fine-tune
        (Kumar et al. 2022), which keeps the pretrained features from being distorted by a random head.

        :return: the chosen ``l2`` and the probe's ``train_accuracy``.
        """
        differences = self.pooled_differences(self.train_pairs)
        assert isinstance(self.model, RewardModel)  # pooled_differences raised otherwise
        order = th.as_tensor(self.rng.permutation(len(differences)))
        n_val = max(1, int(len(differences) * validation_fraction))
        val, fit = differences[order[:n_val]], differences[order[n_val:]]
        l2 = max(l2_candidates, key=lambda lam: (val @ _fit_probe(fit, lam) > 0).float().mean().item())
        weight = _fit_probe(differences, l2)
        with th.no_grad():
            self.model.head.weight.copy_(weight.unsqueeze(0).to(self.model.head.weight))
            self.model.head.bias.zero_()
        return {"l2": l2, "train_accuracy": (differences @ weight > 0).float().mean().item()}

    def evaluate(self, pairs: Sequence[PreferencePair] | None = None) -> dict[str, float]:
        """Pairwise accuracy, loss and score statistics on ``pairs`` (default: the held-out pairs)."""
        pairs = self.eval_pairs if pairs is None else list(pairs)
        if not pairs:
            return {}
        chosen, rejected = self.score_pairs(pairs)
        scores = th.cat([chosen, rejected])
        return {
            "accuracy": (chosen > rejected).float().mean().item(),
            "loss": bradley_terry_loss(chosen, rejected).item(),
            "mean": scores.mean().item(),
            "std": scores.std().item() if len(scores) > 1 else 0.0,
            "margin": (chosen - rejected).mean().item(),
        }

    @without_transformers_bars
    def save(self, path: str) -> None:
        """Save the model and tokenizer so that ``RewardModelWrapper(env, path)`` loads them, with ``max_length``
        (``reward_model.json`` or ``reward_settings.json``), the length the wrapper then cuts texts to."""
        if isinstance(self.model, RewardModel):
            self.model.save_pretrained(path, tokenizer=self.tokenizer, max_length=self.max_length)
        else:
            classifier: Any = self.model  # a transformers sequence classifier, typed as the nn.Module it also is
            with atomic_directory(path) as tmp:
                classifier.save_pretrained(tmp, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                save_reward_settings(tmp, self.max_length)

    @classmethod
    def load(cls, path: str, train_pairs: Sequence[PreferencePair], **kwargs: Any) -> RewardModelTrainer:
        """Continue training a saved reward model."""
        return cls(load_reward_model(path), path, train_pairs, **kwargs)
