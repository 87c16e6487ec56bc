"""SFTTrainer: supervised fine-tuning of a causal LM on demonstrations, loss on response tokens only."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import torch as th
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sb3_rlhf.common.data import Demonstration
from sb3_rlhf.common.io import atomic_directory
from sb3_rlhf.common.models import load_causal_lm, load_tokenizer
from sb3_rlhf.common.progress import without_transformers_bars
from sb3_rlhf.common.sequences import position_ids_from_mask
from sb3_rlhf.common.tokenizers import IGNORE_INDEX, check_vocabulary, collate_right_padded, encode_prompt_response
from sb3_rlhf.common.trainer import SupervisedTrainer


class SFTTrainer(SupervisedTrainer):
    """Fine-tune a causal LM to imitate demonstrations, SB3-style: ``SFTTrainer(...).learn()``.

    Each demonstration becomes ``prompt tokens + response tokens + EOS``; the cross-entropy counts only the
    response and EOS (the model is not taught to write prompts). When the tokenizer has a chat template (and
    ``chat_template`` is not False) the prompt is a user turn followed by the assistant header. Logs
    ``train/loss`` and, after each epoch on the held-out demonstrations, ``eval/loss`` (mean NLL per
    response token) and ``eval/perplexity``; writes a checkpoint folder per epoch when ``checkpoint_dir`` is set.

    :param model: a causal LM, or its folder, packaged name or hub id.
    :param tokenizer: its tokenizer (object or folder; default: the model folder's); it needs an EOS and a pad token.
    :param train_demos: the training demonstrations.
    :param eval_demos: held-out demonstrations for perplexity (optional).
    :param learning_rate: AdamW learning rate.
    :param batch_size: demonstrations per step.
    :param n_epochs: passes per :meth:`learn`.
    :param max_length: tokens per example; the response is kept (up to ``max_length - 1``) and the prompt
        cut from the left to fit.
    :param chat_template: ``None`` uses the tokenizer's template when it has one; ``True`` requires it; ``False`` never.
    :param checkpoint_dir: write ``checkpoint-<step>`` folders here after each epoch.
    :param keep_checkpoints: how many of those to keep (oldest removed first).
    :param eval_batch_size: demonstrations per forward pass when evaluating.
    :param weight_decay: AdamW weight decay.
    :param max_grad_norm: gradient clipping norm.
    :param log_interval: log training metrics every this many optimizer steps.
    :param tensorboard_log: TensorBoard folder (``None``: no TensorBoard).
    :param verbose: 0 silent, 1 prints the logged tables.
    :param seed: seeds Python, NumPy and torch (data order, initialisation of new heads).
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    name = "sft"

    def __init__(
        self,
        model: PreTrainedModel | str,
        tokenizer: PreTrainedTokenizerBase | str | None,
        train_demos: Sequence[Demonstration],
        eval_demos: Sequence[Demonstration] | None = None,
        learning_rate: float = 5e-5,
        batch_size: int = 8,
        n_epochs: int = 1,
        max_length: int = 512,
        chat_template: bool | None = None,
        checkpoint_dir: str | None = None,
        keep_checkpoints: int = 2,
        eval_batch_size: int = 16,
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
            tokenizer = tokenizer if tokenizer is not None else os.fspath(model)
            model = load_causal_lm(os.fspath(model))
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an EOS token: set tokenizer.eos_token so responses can end")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: add one with sb3_rlhf.add_pad_token(tokenizer, model)")
        check_vocabulary(model, len(tokenizer))
        if chat_template and not tokenizer.chat_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        if not train_demos:
            raise ValueError("train_demos is empty: give at least one Demonstration")
        for name, demos in (("train_demos", train_demos), ("eval_demos", eval_demos or [])):
            for i, demo in enumerate(demos):
                if not (
                    isinstance(demo, Demonstration) and isinstance(demo.prompt, str) and isinstance(demo.response, str)
                ):
                    raise TypeError(
                        f"{name}[{i}] is a {type(demo).__name__}, not a Demonstration(prompt, response) of two "
                        "strings: load demonstrations with sb3_rlhf.common.data.load_demonstrations()"
                    )
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        # transformers wraps Module.to with functools.wraps, which mypy reads as the unbound function
        self.model = model.to(self.device)  # type: ignore[arg-type]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat_template = bool(tokenizer.chat_template) if chat_template is None else chat_template
        self.train_examples = [self.encode(d) for d in train_demos]
        self.eval_examples = [self.encode(d) for d in eval_demos or []]
        self.checkpoint_dir = checkpoint_dir
        self.keep_checkpoints = keep_checkpoints
        self.eval_batch_size = eval_batch_size

    def encode(self, demo: Demonstration) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one demonstration; labels are ``-100`` on the prompt."""
        return encode_prompt_response(
            self.tokenizer, demo.prompt, demo.response, self.max_length, self.use_chat_template
        )

    def _collate(self, examples: Sequence[tuple[list[int], list[int]]]) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        input_ids, attention_mask, labels = collate_right_padded(list(examples), self.tokenizer.pad_token_id)
        return input_ids.to(self.device), attention_mask.to(self.device), labels.to(self.device)

    def _nll(self, input_ids: th.Tensor, attention_mask: th.Tensor, labels: th.Tensor) -> tuple[th.Tensor, int]:
        """Summed negative log-likelihood of the labelled tokens, and their count."""
        logits = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).logits
        # token t is predicted from position t − 1
        targets = labels[:, 1:]
        nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return nll, int((targets != IGNORE_INDEX).sum())

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def set_training_mode(self, mode: bool) -> None:
        self.model.train(mode)

    def training_examples(self) -> Sequence[tuple[list[int], list[int]]]:
        return self.train_examples

    def training_loss(self, batch: list[tuple[list[int], list[int]]]) -> tuple[th.Tensor, dict[str, float], int]:
        nll, n_tokens = self._nll(*self._collate(batch))
        return nll / max(n_tokens, 1), {"response_tokens": float(n_tokens)}, len(batch)

    @th.no_grad()
    def evaluate(self, demos: Sequence[Demonstration] | None = None) -> dict[str, float]:
        """Mean NLL per response token and perplexity on ``demos`` (default: the held-out demonstrations)."""
        examples = self.eval_examples if demos is None else [self.encode(d) for d in demos]
        if not examples:
            return {}
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, len(examples), self.eval_batch_size):
            nll, n_tokens = self._nll(*self._collate(examples[start : start + self.eval_batch_size]))
            total, count = total + nll.item(), count + n_tokens
        self.model.train(was_training)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": float(th.exp(th.tensor(loss)))}

    def on_epoch_end(self) -> None:
        if self.checkpoint_dir is None:
            return
        self.save(os.path.join(self.checkpoint_dir, f"checkpoint-{self.num_steps}"))
        checkpoints = sorted(
            (d for d in os.listdir(self.checkpoint_dir) if d.startswith("checkpoint-")),
            key=lambda d: int(d.split("-")[1]),
        )
        for old in checkpoints[: -self.keep_checkpoints]:
            shutil.rmtree(os.path.join(self.checkpoint_dir, old))

    @without_transformers_bars
    def save(self, path: str) -> None:
        """Export the model and tokenizer (``save_pretrained`` layout, atomically): plain transformers loads
        it, and it serves as the policy of RLHFPPO (``policy_kwargs=dict(model_name_or_path=path)``)."""
        with atomic_directory(path) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

    @classmethod
    def load(cls, path: str, train_demos: Sequence[Demonstration], **kwargs: Any) -> SFTTrainer:
        """Continue fine-tuning a saved model (with its tokenizer)."""
        return cls(path, None, train_demos, **kwargs)
