"""DPOTrainer: align a causal LM directly on preference pairs (DPO or IPO), no reward model, no sampling."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch as th
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sb3_rlhf.common.data import PreferencePair
from sb3_rlhf.common.io import atomic_directory
from sb3_rlhf.common.models import disable_dropout, freeze, load_causal_lm, load_tokenizer, with_lora
from sb3_rlhf.common.progress import without_transformers_bars
from sb3_rlhf.common.sequences import position_ids_from_mask
from sb3_rlhf.common.tokenizers import (
    check_vocabulary,
    collate_right_padded,
    encode_prompt_response,
    labelled_token_logprobs,
)
from sb3_rlhf.common.trainer import SupervisedTrainer
from sb3_rlhf.dpo.losses import DPO_LOSS_TYPES, dpo_loss

CONFIG_NAME = "dpo_config.json"


class _EncodedPair(NamedTuple):
    chosen: tuple[list[int], list[int]]
    rejected: tuple[list[int], list[int]]
    ref_chosen: float | None
    ref_rejected: float | None


class DPOTrainer(SupervisedTrainer):
    """Direct Preference Optimization (Rafailov et al. 2023), SB3-style: ``DPOTrainer(...).learn()``.

    Minimises :func:`~sb3_rlhf.dpo.losses.dpo_loss` (``"sigmoid"``: DPO; ``"ipo"``: IPO) on the log-probabilities
    of each pair's chosen and rejected responses under the policy and a frozen reference. The reference is, in
    this order: ``ref_model`` if given; under LoRA the same backbone with the adapter disabled (no copy);
    else the initial model. With ``precompute_ref_logprobs`` (default) the reference log-probs of every pair
    are computed once before training and the reference is then not kept in memory.

    Logs ``train/loss`` and ``train/rewards/{chosen,rejected,accuracies,margins}`` (the implicit rewards
    β·log π/π_ref, TRL's names), ``train/logps/{chosen,rejected}``, and the same under ``eval/`` on the held-out
    pairs after each epoch.

    :param model: a causal LM, or its folder, packaged name or hub id.
    :param tokenizer: its tokenizer (object or folder; default: the model folder's); it needs a pad token.
    :param train_pairs: the training comparisons (:class:`~sb3_rlhf.common.data.PreferencePair`).
    :param eval_pairs: held-out comparisons (optional).
    :param beta: β > 0, the strength of the implicit KL constraint to the reference.
    :param loss_type: ``"sigmoid"`` (DPO) or ``"ipo"`` (IPO, on log-probs averaged over response tokens).
    :param label_smoothing: probability that a label is flipped (conservative DPO; sigmoid only).
    :param ref_model: the reference (model or local folder); see above for the default.
    :param precompute_ref_logprobs: compute the reference log-probs once, before training.
    :param lora: LoRA through peft (``peft.LoraConfig`` arguments); only the adapter trains and :meth:`save`
        exports the merged model.
    :param learning_rate: AdamW learning rate.
    :param batch_size: pairs per step.
    :param n_epochs: passes per :meth:`learn`.
    :param max_length: tokens per prompt + response (the prompt is cut from the left).
    :param chat_template: ``None`` uses the tokenizer's template when it has one; ``True`` requires it; ``False`` never.
    :param add_eos: end each response with EOS (turn off for responses that were cut at a length limit).
    :param eval_batch_size: pairs per forward pass when evaluating or precomputing.
    :param weight_decay: AdamW weight decay.
    :param max_grad_norm: gradient clipping norm.
    :param log_interval: log training metrics every this many optimizer steps.
    :param tensorboard_log: TensorBoard folder (``None``: no TensorBoard).
    :param verbose: 0 silent, 1 prints the logged tables.
    :param seed: seeds Python, NumPy and torch (data order, initialisation of new heads).
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    name = "dpo"

    def __init__(
        self,
        model: PreTrainedModel | str,
        tokenizer: PreTrainedTokenizerBase | str | None,
        train_pairs: Sequence[PreferencePair],
        eval_pairs: Sequence[PreferencePair] | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        ref_model: PreTrainedModel | str | None = None,
        precompute_ref_logprobs: bool = True,
        lora: dict[str, Any] | None = None,
        learning_rate: float = 5e-6,
        batch_size: int = 8,
        n_epochs: int = 1,
        max_length: int = 512,
        chat_template: bool | None = None,
        add_eos: bool = True,
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
        self.check_loss_settings(beta, loss_type, label_smoothing)
        _check_pairs(train_pairs, "train_pairs")
        if eval_pairs:
            _check_pairs(eval_pairs, "eval_pairs")
        self.model_path: str | None = None
        if isinstance(model, (str, os.PathLike)):
            self.model_path = os.fspath(model)
            tokenizer = tokenizer if tokenizer is not None else self.model_path
            model = load_causal_lm(self.model_path)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is None or tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: add one with sb3_rlhf.add_pad_token(tokenizer, model)")
        check_vocabulary(model, len(tokenizer))
        if add_eos and tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no EOS token: set tokenizer.eos_token")
        if chat_template and not tokenizer.chat_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        disable_dropout(model)
        self.reference_path = ref_model if isinstance(ref_model, str) else None
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = load_causal_lm(os.fspath(ref_model))
        if ref_model is None and lora is None and not precompute_ref_logprobs:
            ref_model = copy.deepcopy(model)  # the initial policy, kept because it is needed at every step
        if ref_model is None and self.model_path is not None:
            self.reference_path = self.model_path  # the initial model (the base, under LoRA)
        # transformers wraps Module.to with functools.wraps, which mypy reads as the unbound function
        self.model = (with_lora(model, lora) if lora is not None else model).to(self.device)  # type: ignore[arg-type]
        self.ref_model = None if ref_model is None else freeze(ref_model).to(self.device)
        self.tokenizer = tokenizer
        self.beta = float(beta)
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.lora = lora
        self.max_length = max_length
        self.add_eos = add_eos
        self.eval_batch_size = eval_batch_size
        self.use_chat_template = bool(tokenizer.chat_template) if chat_template is None else chat_template
        self.train_examples = [self._encode(p) for p in train_pairs]
        self.eval_examples = [self._encode(p) for p in eval_pairs or []]
        self.precompute_ref_logprobs = precompute_ref_logprobs
        if precompute_ref_logprobs:
            self.train_examples = self._with_reference(self.train_examples)
            self.eval_examples = self._with_reference(self.eval_examples)
            self.ref_model = None  # no longer needed: free its memory

    @staticmethod
    def check_loss_settings(beta: float, loss_type: str, label_smoothing: float) -> None:
        """The loss's settings, each in its range (without a model: ``sb3-rlhf train --dry-run`` checks them too)."""
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}: it scales the implicit KL constraint")
        if loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")

    # ------------------------------------------------------------------ data
    def _encode(self, pair: PreferencePair) -> _EncodedPair:
        def encode(response: str) -> tuple[list[int], list[int]]:
            return encode_prompt_response(
                self.tokenizer, pair.prompt, response, self.max_length, self.use_chat_template, self.add_eos
            )

        return _EncodedPair(encode(pair.chosen), encode(pair.rejected), None, None)

    def _collate(self, pairs: Sequence[_EncodedPair]) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Chosen rows first, then rejected rows, one batch of ``2 · len(pairs)``."""
        examples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        input_ids, attention_mask, labels = collate_right_padded(examples, self.tokenizer.pad_token_id)
        return input_ids.to(self.device), attention_mask.to(self.device), labels.to(self.device)

    def _sequence_logps(self, model: Any, pairs: Sequence[_EncodedPair]) -> tuple[th.Tensor, th.Tensor]:
        """log π(chosen|x), log π(rejected|x): ``(batch,)`` each; averaged over tokens for IPO."""
        input_ids, attention_mask, labels = self._collate(pairs)
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).logits
        sums, counts = labelled_token_logprobs(logits, labels)
        logps = sums / counts.clamp(min=1) if self.loss_type == "ipo" else sums
        return logps[: len(pairs)], logps[len(pairs) :]

    @th.no_grad()
    def _reference_logps(self, pairs: Sequence[_EncodedPair]) -> tuple[th.Tensor, th.Tensor]:
        if pairs[0].ref_chosen is not None:
            return (
                th.tensor([p.ref_chosen for p in pairs], device=self.device),
                th.tensor([p.ref_rejected for p in pairs], device=self.device),
            )
        was_training = self.model.training
        self.model.eval()
        if self.ref_model is not None:
            logps = self._sequence_logps(self.ref_model, pairs)
        elif self.lora is not None:
            with self.model.disable_adapter():
                logps = self._sequence_logps(self.model, pairs)
        else:  # precomputing before the first update: the model is still the reference
            logps = self._sequence_logps(self.model, pairs)
        self.model.train(was_training)
        return logps

    def _with_reference(self, examples: list[_EncodedPair]) -> list[_EncodedPair]:
        filled = []
        for start in range(0, len(examples), self.eval_batch_size):
            chunk = examples[start : start + self.eval_batch_size]
            ref_chosen, ref_rejected = self._reference_logps(chunk)
            filled += [
                p._replace(ref_chosen=c, ref_rejected=r)
                for p, c, r in zip(chunk, ref_chosen.tolist(), ref_rejected.tolist())
            ]
        return filled

    # ------------------------------------------------------------------ SupervisedTrainer hooks
    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def set_training_mode(self, mode: bool) -> None:
        self.model.train(mode)

    def training_examples(self) -> Sequence[_EncodedPair]:
        return self.train_examples

    def _loss_and_metrics(self, pairs: Sequence[_EncodedPair]) -> tuple[th.Tensor, dict[str, float]]:
        ref_chosen, ref_rejected = self._reference_logps(pairs)
        chosen, rejected = self._sequence_logps(self.model, pairs)
        losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing)
        margins = losses.chosen_rewards - losses.rejected_rewards
        return losses.loss, {
            "rewards/chosen": losses.chosen_rewards.mean().item(),
            "rewards/rejected": losses.rejected_rewards.mean().item(),
            "rewards/accuracies": (margins > 0).float().mean().item(),
            "rewards/margins": margins.mean().item(),
            "logps/chosen": chosen.detach().mean().item(),
            "logps/rejected": rejected.detach().mean().item(),
        }

    def training_loss(self, batch: list[_EncodedPair]) -> tuple[th.Tensor, dict[str, float], int]:
        loss, metrics = self._loss_and_metrics(batch)
        return loss, metrics, len(batch)

    @th.no_grad()
    def evaluate(self, pairs: Sequence[PreferencePair] | None = None) -> dict[str, float]:
        """Loss and implicit-reward metrics on ``pairs`` (default: the held-out pairs), averaged over pairs."""
        examples = self.eval_examples if pairs is None else [self._encode(p) for p in pairs]
        if not examples:
            return {}
        if examples[0].ref_chosen is None and self.ref_model is None and self.lora is None:
            raise ValueError(
                "the reference of these pairs is gone (precomputed for the training data only): "
                "pass eval_pairs to the constructor, or ref_model="
            )
        was_training = self.model.training
        self.model.eval()
        totals: dict[str, float] = {}
        for start in range(0, len(examples), self.eval_batch_size):
            chunk = examples[start : start + self.eval_batch_size]
            loss, metrics = self._loss_and_metrics(chunk)
            for key, value in {"loss": loss.item(), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * len(chunk)
        self.model.train(was_training)
        return {key: value / len(examples) for key, value in totals.items()}

    # ------------------------------------------------------------------ export
    @without_transformers_bars
    def save(self, path: str, merge_lora: bool = True) -> None:
        """Export the policy and tokenizer (``save_pretrained`` layout, atomically) with ``dpo_config.json``.

        Under LoRA the adapter is merged into a copy of the base weights (``merge_lora=False`` writes the peft
        adapter instead). The folder loads in plain transformers, serves as an RLHFPPO policy
        (``policy_kwargs=dict(model_name_or_path=path)``), and :meth:`load` continues from it.
        """
        model = self.model
        if self.lora is not None and merge_lora:
            model = copy.deepcopy(self.model).merge_and_unload()
        config = {
            "beta": self.beta,
            "loss_type": self.loss_type,
            "label_smoothing": self.label_smoothing,
            "reference": self.reference_path,
            "num_steps": self.num_steps,
            "num_examples": self.num_examples,
            "epochs_done": self.epochs_done,
        }
        with atomic_directory(path) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump(config, f, indent=2)

    @classmethod
    def load(cls, path: str, train_pairs: Sequence[PreferencePair], **kwargs: Any) -> DPOTrainer:
        """Continue DPO from a folder written by :meth:`save`: β, the loss and the reference (when it was a
        folder) come from ``dpo_config.json`` unless given in ``kwargs``."""
        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: it was not written by DPOTrainer.save()")
        with open(config_path) as f:
            config = json.load(f)
        for key in ("beta", "loss_type", "label_smoothing"):
            kwargs.setdefault(key, config[key])
        if config.get("reference") and "ref_model" not in kwargs:
            kwargs["ref_model"] = config["reference"]
        trainer = cls(path, None, train_pairs, **kwargs)
        trainer.num_steps, trainer.num_examples = config["num_steps"], config["num_examples"]
        trainer.epochs_done = config["epochs_done"]
        return trainer


def _check_pairs(pairs: Sequence[PreferencePair], name: str) -> None:
    if not pairs:
        raise ValueError(f"{name} is empty: give at least one PreferencePair (see sb3_rlhf.common.data)")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PreferencePair):
            raise TypeError(
                f"{name}[{i}] is a {type(pair).__name__}, not a PreferencePair: load pairs with "
                "sb3_rlhf.common.data.load_preference_pairs()"
            )
        if (
            not isinstance(pair.chosen, str)
            or not isinstance(pair.rejected, str)
            or not pair.chosen
            or not pair.rejected
        ):
            raise ValueError(f"{name}[{i}] has an empty or missing chosen/rejected text")
        if not isinstance(pair.prompt, str):
            raise ValueError(f"{name}[{i}].prompt must be a string (may be empty), got {type(pair.prompt).__name__}")
