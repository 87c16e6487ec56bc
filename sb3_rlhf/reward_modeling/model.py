"""RewardModel: a pretrained backbone (encoder or causal LM) with a scalar head."""

from __future__ import annotations

import json
import os
from typing import Any, cast

import torch as th
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForSequenceClassification, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED_LM_NAMES

from sb3_rlhf.common.io import atomic_directory
from sb3_rlhf.common.models import _resolve_dtype, resolve_model_path
from sb3_rlhf.common.progress import without_transformers_bars

CONFIG_NAME = "reward_model.json"
HEAD_NAME = "reward_head.safetensors"
#: beside a sequence classifier saved by the trainer: its training settings (``max_length``)
SETTINGS_NAME = "reward_settings.json"
POOLINGS = ("mean", "last", "first")


def _default_pooling(backbone: PreTrainedModel) -> str:
    config = backbone.config
    architectures = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or config.is_decoder
    # decoder-only families: a causal-LM class and no masked-LM class
    causal = causal or (config.model_type in CAUSAL_LM_NAMES and config.model_type not in MASKED_LM_NAMES)
    return "last" if causal else "mean"


class RewardModel(th.nn.Module):
    """r(x, y) = w·pool(h(x ⊕ y)) + b: a backbone's last hidden states pooled into one score.

    * ``pooling="mean"``: masked mean over tokens (sentence encoders such as all-MiniLM-L6-v2 are trained so).
    * ``pooling="last"``: the last real token (causal LMs: it has read the whole text).
    * ``pooling="first"``: the first token (BERT's [CLS]).

    Saved as the backbone's own ``save_pretrained`` folder plus ``reward_head.safetensors`` and
    ``reward_model.json``; :func:`load_reward_model` (and so ``RewardModelWrapper``) loads it by path.
    ``forward`` returns ``.logits`` of shape ``(batch, 1)`` like ``AutoModelForSequenceClassification``.

    :param backbone: the transformer without its LM head (``AutoModel``).
    :param pooling: ``"mean"``, ``"last"``, ``"first"`` or ``"auto"`` (last for causal LMs, mean otherwise).
    """

    def __init__(self, backbone: PreTrainedModel, pooling: str = "auto") -> None:
        super().__init__()
        pooling = _default_pooling(backbone) if pooling == "auto" else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS} or 'auto', got {pooling!r}")
        self.backbone = backbone
        self.pooling = pooling
        hidden_size = cast(th.nn.Embedding, backbone.get_input_embeddings()).embedding_dim
        self.head = th.nn.Linear(hidden_size, 1)
        #: the input length (tokens) it was trained on, saved with it; ``None``: unknown
        self.max_length: int | None = None

    @property
    def config(self) -> Any:
        """The backbone's config (``pad_token_id``, vocabulary size)."""
        return self.backbone.config

    def get_input_embeddings(self) -> th.nn.Module:
        return self.backbone.get_input_embeddings()

    @classmethod
    @without_transformers_bars
    def from_backbone(
        cls,
        name_or_path: str | PreTrainedModel,
        pooling: str = "auto",
        dtype: str | th.dtype | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> RewardModel:
        """A new reward model on a pretrained backbone (a model object, or a folder, packaged name or hub id);
        the head starts random."""
        if isinstance(name_or_path, PreTrainedModel):
            backbone = getattr(name_or_path, name_or_path.base_model_prefix, name_or_path)
        else:
            path = resolve_model_path(name_or_path, revision, "reward-model backbone", trust_remote_code)
            backbone = AutoModel.from_pretrained(
                path, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code, local_files_only=True
            )
        return cls(backbone, pooling)

    def pool(self, input_ids: th.Tensor, attention_mask: th.Tensor | None = None, **kwargs: Any) -> th.Tensor:
        """The pooled last hidden states: ``(batch, hidden)`` float32 (the head's input)."""
        if attention_mask is None:
            attention_mask = th.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state.float()
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).float()
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        positions = th.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        real = attention_mask.bool()
        if self.pooling == "last":
            index = th.where(real, positions, -1).max(dim=1).values
        else:
            index = th.where(real, positions, input_ids.shape[1]).min(dim=1).values
        return hidden[th.arange(hidden.shape[0], device=hidden.device), index]

    def forward(
        self, input_ids: th.Tensor, attention_mask: th.Tensor | None = None, **kwargs: Any
    ) -> SequenceClassifierOutput:
        """:param input_ids: ``(batch, seq_len)`` int64; :param attention_mask: ``(batch, seq_len)``.
        :return: ``logits (batch, 1)`` float32."""
        return SequenceClassifierOutput(logits=self.head(self.pool(input_ids, attention_mask, **kwargs)))

    @without_transformers_bars
    def save_pretrained(self, path: str, tokenizer: Any = None, max_length: int | None = None) -> None:
        """Write the backbone, head and pooling (and ``tokenizer``) into ``path``, atomically.

        :param max_length: the input length it was trained on (default: :attr:`max_length`), saved in
            ``reward_model.json`` so that ``RewardModelWrapper`` cuts texts the same way.
        """
        max_length = self.max_length if max_length is None else max_length
        with atomic_directory(path) as tmp:
            self.backbone.save_pretrained(tmp, safe_serialization=True)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                os.path.join(tmp, HEAD_NAME),
            )
            with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                json.dump({"pooling": self.pooling, "max_length": max_length, "format_version": 1}, f)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        dtype: str | th.dtype | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
    ) -> RewardModel:
        """Load what :meth:`save_pretrained` wrote (safetensors only): a folder or a hub id."""
        path = resolve_model_path(path, revision, "reward model", trust_remote_code)
        with open(os.path.join(path, CONFIG_NAME)) as f:
            settings = json.load(f)
        model = cls.from_backbone(path, pooling=settings["pooling"], dtype=dtype, trust_remote_code=trust_remote_code)
        model.head.load_state_dict(load_file(os.path.join(path, HEAD_NAME)))
        model.max_length = settings.get("max_length")
        return model.eval()


def save_reward_settings(folder: str, max_length: int) -> None:
    """Write ``reward_settings.json`` (the training ``max_length``) beside a saved sequence classifier."""
    with open(os.path.join(folder, SETTINGS_NAME), "w") as f:
        json.dump({"max_length": int(max_length)}, f)


def saved_max_length(folder: str) -> int | None:
    """The input length a reward model in ``folder`` was trained on, if it was saved with it: from
    ``reward_model.json`` (:class:`RewardModel`) or ``reward_settings.json`` (a sequence classifier)."""
    for name in (CONFIG_NAME, SETTINGS_NAME):
        file = os.path.join(folder, name)
        if os.path.exists(file):
            with open(file) as f:
                value = json.load(f).get("max_length")
            if value is not None:
                return int(value)
    return None


@without_transformers_bars
def load_reward_model(path: str, trust_remote_code: bool = False, revision: str | None = None) -> th.nn.Module:
    """A reward model by folder or hub id: a :class:`RewardModel`, or any ``AutoModelForSequenceClassification``."""
    path = resolve_model_path(path, revision, "reward model", trust_remote_code)
    if os.path.exists(os.path.join(path, CONFIG_NAME)):
        return RewardModel.from_pretrained(path, trust_remote_code=trust_remote_code)
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=True, output_loading_info=True
    )
    # the head's weights (outside the backbone): initialised at random they would score by chance and train the
    # policy on it; a missing backbone key is transformers' own warning
    prefix = f"{model.base_model_prefix}."
    head_missing = sorted(k for k in info["missing_keys"] if not k.startswith(prefix))
    if head_missing:
        raise ValueError(
            f"{path} holds no trained sequence-classification head (missing from its weights: {head_missing[:3]}): "
            "it is not a reward model or classifier; train one with `sb3-rlhf reward-model` (or "
            "RewardModelTrainer), or name a model trained for sequence classification"
        )
    return model.eval()
