"""RewardModelWrapper: a learned scalar reward model scores each finished response."""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import torch as th
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.models import check_device, freeze, load_tokenizer, resolve_model_path
from sb3_rlhf.common.tokenizers import encode_keep_end, pad_right
from sb3_rlhf.reward_modeling.model import RewardModel, load_reward_model, saved_max_length
from sb3_rlhf.rewards.base import SequenceRewardWrapper

if TYPE_CHECKING:
    from sb3_rlhf.policies import TransformerActorCriticPolicy

#: ``max_length`` of a reward model saved without one (not by :class:`~sb3_rlhf.reward_modeling.RewardModelTrainer`)
DEFAULT_MAX_LENGTH = 512
#: what a classifier's logits become (see :class:`RewardModelWrapper`)
SCORES = ("logit", "probability", "logit_margin")


class RewardModelWrapper(SequenceRewardWrapper):
    """Score ``prompt + completion`` with a frozen model: a scalar reward model (``num_labels=1``, e.g. a
    :class:`~sb3_rlhf.reward_modeling.RewardModel`) or a classifier whose ``label`` is rewarded (e.g. a hub
    sentiment classifier with ``label="POSITIVE"``); the score lands on the last real token.

    Two ways to feed it:

    * ``reward_tokenizer`` given (or found beside a model path): each episode decoded as one text (prompt
      and response; the env's plain ``reward_prompts`` in place of chat-templated prompts) is re-tokenized
      with the reward model's own tokenizer, cut from the left to ``max_length`` (as the reward-model trainer
      does: the answer at the end is what is judged).
    * ``reward_tokenizer=None`` with a model object: the reward model shares the policy's vocabulary and reads
      the policy's token ids directly (no decode/re-encode). The model's ``config.pad_token_id`` is set to
      the env's pad id while it scores (decoder classifiers find the last token through it) and restored after.

    :param env: the environment to wrap.
    :param reward_model: a model (an ``AutoModelForSequenceClassification`` or a
        :class:`~sb3_rlhf.reward_modeling.RewardModel`), or a local folder, packaged model name or hub id of one
        (see :func:`~sb3_rlhf.common.models.resolve_model_path`); frozen, never trained. Its tokenizer is found
        beside the resolved folder (a hub snapshot holds the tokenizer files).
    :param reward_tokenizer: its tokenizer (object, folder or hub id); ``None`` shares the policy's token ids
        unless the model, given by name, has a tokenizer beside it.
    :param max_length: longest reward-model input in tokens (text path). ``None`` (default): the length the
        model was trained on when it was saved with it (``RewardModelTrainer.save``), else 512.
    :param batch_size: episodes scored per forward pass.
    :param device: where the reward model runs. ``None`` (default): where it already is, which must be the
        policy's device (checked when the algorithm binds). Given: the model is moved there and inputs follow.
    :param name: key of the term in ``info["reward_terms"]`` and the logs.
    :param label: the class to reward: a name from the classifier's ``id2label``/``label2id`` (exact match first,
        then a unique case-insensitive one) or an index. Required when the model has more than one label; ``None``
        or 0 for a one-output reward model.
    :param score: what the label's logits become: ``"logit"`` (raw logit, the default: a one-output reward
        model's score), ``"probability"`` (its softmax probability) or ``"logit_margin"`` (its log-odds: its logit
        minus the log-sum-exp of the other labels' logits; for two labels the usual positive-minus-negative
        sentiment reward). Multi-label classifiers (``problem_type="multi_label_classification"``) and one-output
        models treat each label on its own: sigmoid probability, the logit as its log-odds.
    :param revision: branch, tag or commit when ``reward_model`` is a hub id.
    """

    def __init__(
        self,
        env: gym.Env,
        reward_model: th.nn.Module | str,
        reward_tokenizer: PreTrainedTokenizerBase | str | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        device: th.device | str | None = None,
        name: str = "reward_model",
        label: str | int | None = None,
        score: str = "logit",
        revision: str | None = None,
    ) -> None:
        super().__init__(env, name)
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        described = f"reward model {type(reward_model).__name__}"
        # the length it was trained on: a RewardModel from from_pretrained carries it, a folder holds it
        trained_length = reward_model.max_length if isinstance(reward_model, RewardModel) else None
        if isinstance(reward_model, (str, os.PathLike)):
            described = f"reward model {os.fspath(reward_model)}" + (f"@{revision}" if revision else "")
            # a folder, packaged name or hub id (at `revision`) -> a local folder; a hub snapshot has the tokenizer files
            folder = resolve_model_path(reward_model, revision, "reward model")
            reward_model = load_reward_model(folder)
            trained_length = saved_max_length(folder)
            if reward_tokenizer is None and os.path.exists(os.path.join(folder, "tokenizer_config.json")):
                reward_tokenizer = folder
        elif revision is not None:
            raise ValueError(f"revision={revision!r} applies to a reward model given by hub id, not to a model object")
        if not isinstance(reward_model, th.nn.Module):
            raise TypeError(f"reward_model must be a transformers model or a path, got {type(reward_model).__name__}")
        if isinstance(reward_tokenizer, (str, os.PathLike)):
            reward_tokenizer = load_tokenizer(os.fspath(reward_tokenizer))
        num_labels = reward_model.config.num_labels if isinstance(reward_model, PreTrainedModel) else 1
        assert num_labels is not None  # a classifier's config has its labels
        self.label_index = classifier_label_index(reward_model.config, num_labels, label)
        self.score_kind = score
        # one-output models and multi-label classifiers score each label on its own (sigmoid), others by softmax
        self.independent_labels = (
            num_labels == 1 or getattr(reward_model.config, "problem_type", None) == "multi_label_classification"
        )
        self.source = described if num_labels == 1 else f"{described} (label {label!r}, {score})"
        # a transformers classifier or a RewardModel: both carry .config and get_input_embeddings()
        model: Any = freeze(reward_model)
        self.reward_model = model
        self.reward_tokenizer = reward_tokenizer
        if reward_tokenizer is not None and reward_tokenizer.pad_token is None:
            raise ValueError("the reward tokenizer has no pad token: set reward_tokenizer.pad_token before wrapping")
        if reward_tokenizer is not None and getattr(self.reward_model.config, "pad_token_id", None) is None:
            # Decoder reward models find the last token through pad_token_id.
            self.reward_model.config.pad_token_id = reward_tokenizer.pad_token_id
        if reward_tokenizer is None:
            vocab = self.reward_model.get_input_embeddings().num_embeddings
            if vocab < self.generation_env.n_actions:
                raise ValueError(
                    f"the reward model's vocabulary ({vocab}) is smaller than the policy tokenizer's "
                    f"({self.generation_env.n_actions}): pass reward_tokenizer= to score decoded text instead"
                )
        # cut texts as the model was trained to read them, unless told otherwise (a task's [reward] max_length)
        max_length = max_length if max_length is not None else trained_length or DEFAULT_MAX_LENGTH
        if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length!r}")
        # annotated: mypy may check bind() and score() before this __init__ (an import cycle defers it)
        self.max_length: int = int(max_length)
        self.batch_size: int = int(batch_size)
        self.explicit_device: bool = device is not None
        if device is not None:
            self.reward_model.to(check_device(device, allow_auto=False))

    @property
    def device(self) -> th.device:
        return next(self.reward_model.parameters()).device

    def frozen_models(self) -> list[th.nn.Module]:
        return [self.reward_model]

    def bind(self, policy: TransformerActorCriticPolicy) -> None:
        if not self.explicit_device and self.device != policy.device:
            raise ValueError(
                f"the reward model is on {self.device} but the policy runs on {policy.device}: move it with "
                f"reward_model.to('{policy.device}') or pass device='{self.device}' to RewardModelWrapper to keep it there"
            )

    def _model_inputs(self, batch: GenerationBatch) -> dict[str, Any]:
        if self.reward_tokenizer is None:
            # Same vocabulary: read the policy's ids, right-padded (encoders read the first token, decoders the last).
            input_ids, attention_mask = batch.right_padded()
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        # reward_texts: plain text even when the policy's prompts are chat-templated
        rows = encode_keep_end(self.reward_tokenizer, batch.reward_texts, self.max_length)
        input_ids, attention_mask = pad_right(rows, self.reward_tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    @contextlib.contextmanager
    def _policy_pad_token_id(self) -> Iterator[None]:
        """With shared token ids, the model's ``config.pad_token_id`` is the env's pad id while it scores.

        Decoder classifiers (``LlamaForSequenceClassification``, ...) pool the last token that is not
        ``config.pad_token_id``; a model keeping its own pad id would read a policy pad position. The user's
        config is restored afterwards, so the model object is unchanged outside :meth:`score`.
        """
        if self.reward_tokenizer is not None:
            yield
            return
        config = self.reward_model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        saved = getattr(config, "pad_token_id", None)
        config.pad_token_id = self.generation_env.pad_token_id
        try:
            yield
        finally:
            config.pad_token_id = saved

    @th.no_grad()
    def score(self, batch: GenerationBatch) -> th.Tensor:
        inputs = self._model_inputs(batch)
        scores = []
        for start in range(0, batch.batch_size, self.batch_size):
            chunk = {k: v[start : start + self.batch_size].to(self.device) for k, v in inputs.items()}
            with self._policy_pad_token_id():
                logits = self.reward_model(**chunk).logits
            scores.append(self.label_score(logits.reshape(logits.shape[0], -1).float()))
        return th.cat(scores).to(batch.device)

    def label_score(self, logits: th.Tensor) -> th.Tensor:
        """The reward of each row from the model's logits.

        :param logits: ``(batch, num_labels)`` float32.
        :return: ``(batch,)`` float32.
        """
        k = self.label_index
        z_k = logits[:, k]
        if self.score_kind == "logit":
            return z_k
        if self.independent_labels:
            # each label is its own binary classifier: p_k = σ(z_k), and its log-odds log(p_k / (1 − p_k)) = z_k
            return th.sigmoid(z_k) if self.score_kind == "probability" else z_k
        if self.score_kind == "probability":
            # p_k = softmax(z)_k = exp(z_k) / Σ_j exp(z_j)
            return th.softmax(logits, dim=-1)[:, k]
        # logit margin = log(p_k / (1 − p_k)) = z_k − log Σ_{j≠k} exp(z_j); two labels: z_k − z_other
        others = logits.clone()
        others[:, k] = -float("inf")
        return z_k - th.logsumexp(others, dim=-1)


def classifier_label_index(config: Any, num_labels: int, label: str | int | None) -> int:
    """The logit index of ``label`` (a name from the config's label maps, or an index) in a classifier's output."""
    if num_labels == 1:
        if label not in (None, 0) or isinstance(label, bool):
            raise ValueError(
                f"the reward model outputs one score (num_labels=1): leave label unset, got label={label!r}"
            )
        return 0
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label.get(i, f"LABEL_{i}")) for i in range(num_labels)]
    if label is None:
        raise ValueError(
            f"the reward model is a classifier with {num_labels} labels {names}: pass label= naming the class to "
            "reward (a name or an index)"
        )
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise TypeError(f"label must be a label name (str) or an index (int), got {type(label).__name__}")
    if isinstance(label, int):
        if not 0 <= label < num_labels:
            raise ValueError(f"label index {label} is out of range: the reward model has {num_labels} labels {names}")
        return label
    # names as the classifier reports them (id2label, as pipelines do), then label2id's own keys
    ids = {name: i for i, name in enumerate(names)}
    for name, i in (getattr(config, "label2id", None) or {}).items():
        ids.setdefault(str(name), int(i))
    if label in ids:
        return ids[label]
    folded = [name for name in ids if name.lower() == label.lower()]
    if len(folded) == 1:
        return ids[folded[0]]
    why = f"matches {folded} only up to case" if folded else "is not one of them"
    raise ValueError(f"the reward model has labels {names}; label {label!r} {why}: pass one of those names or an index")
