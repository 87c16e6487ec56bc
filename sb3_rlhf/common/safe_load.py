"""Loading SB3 zips without running code from them.

SB3 loads a zip's tensors with ``torch.load(weights_only=True)``, but the hyperparameters it could not write
as JSON (schedules, spaces, the policy class, episode buffers) sit in the zip's ``data`` as cloudpickle, and
``cloudpickle.loads`` runs whatever a crafted file asks. :func:`safe_custom_objects` unpickles those entries
with an allowlist instead (SB3's and Gymnasium's value types, NumPy arrays, transformers configurations,
this library's classes) and hands
them to SB3's ``load`` as ``custom_objects``, so SB3 never unpickles anything itself. A zip that needs anything
else (a lambda schedule, a policy class of your own) is refused with the name of what it asked for.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import zipfile
from typing import Any

#: (module, name) pairs an SB3 zip of this library may reference: value types only, nothing that runs a command
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("collections", "deque"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"),
    ("numpy.random._pickle", "__randomstate_ctor"),
    ("numpy.random.bit_generator", "SeedSequence"),
    ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
    ("stable_baselines3.common.utils", "ConstantSchedule"),
    ("stable_baselines3.common.utils", "FloatSchedule"),
    ("stable_baselines3.common.utils", "LinearSchedule"),
}
for _core in ("numpy.core", "numpy._core"):  # NumPy 1 and 2 spell the array helpers' module differently
    _ALLOWED_GLOBALS |= {
        (f"{_core}.numeric", "_frombuffer"),
        (f"{_core}.multiarray", "_reconstruct"),
        (f"{_core}.multiarray", "scalar"),
    }
_BIT_GENERATORS = {"MT19937", "PCG64", "PCG64DXSM", "Philox", "SFC64"}


class UnsafeZipError(pickle.UnpicklingError):
    """The zip's pickled data references something outside the allowlist."""


class _AllowlistUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module, name) in _ALLOWED_GLOBALS
            or module == "numpy.dtypes"
            or (module.startswith("numpy.random._") and name in _BIT_GENERATORS)
            or module.startswith("gymnasium.spaces.")
            or module.startswith("sb3_rlhf.")
        )
        if module.startswith("transformers.") and name.endswith("Config"):
            # a model_config in policy_kwargs: a transformers configuration class, which only holds values
            from transformers import PretrainedConfig

            found = super().find_class(module, name)
            if isinstance(found, type) and issubclass(found, PretrainedConfig):
                return found
        if allowed:
            found = super().find_class(module, name)
            # from the libraries' own modules, classes only: no function that could touch files or processes
            if module.startswith(("gymnasium.", "sb3_rlhf.")) and not isinstance(found, type):
                allowed = False
        if not allowed:
            raise UnsafeZipError(f"{module}.{name}")
        return found


def safe_custom_objects(
    path: str | os.PathLike | io.BufferedIOBase, given: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every cloudpickled entry of the SB3 zip at ``path``, unpickled with the allowlist; the entries in ``given``
    (the caller's own ``custom_objects``) are taken from there and never unpickled.

    :raises UnsafeZipError: an entry references a global outside the allowlist; the message names the entry,
        the global and the way to load the zip anyway if you trust it.
    """
    if isinstance(path, (str, os.PathLike)):
        source: Any = str(path) if os.path.exists(path) else f"{path}.zip"  # SB3 adds the suffix the same way
        if not os.path.isfile(source):
            raise FileNotFoundError(f"no model zip at {str(path)!r}: pass the path that model.save() wrote")
    else:
        source, start = path, path.tell()  # a file object: read it, then rewind it for SB3
    try:
        with zipfile.ZipFile(source) as archive:
            data = json.loads(archive.read("data"))
    except (zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{path!r} is not a model zip written by model.save() ({error})") from None
    if not isinstance(path, (str, os.PathLike)):
        path.seek(start)
    objects = dict(given or {})
    for key, value in data.items():
        if key in objects or not (isinstance(value, dict) and ":serialized:" in value):
            continue
        try:
            objects[key] = _AllowlistUnpickler(io.BytesIO(base64.b64decode(value[":serialized:"]))).load()
        except UnsafeZipError as error:
            raise UnsafeZipError(
                f"{path}: the pickled entry {key!r} references {error}, which a safe load refuses (pickled data can "
                "run code). If you trust the file, load it with trust_pickled_objects=True (SB3's own behaviour), "
                "or pass the object yourself in custom_objects={" + repr(key) + ": ...}"
            ) from None
    return objects
