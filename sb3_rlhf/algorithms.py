"""The algorithms by name, as task files and the CLI select them."""

from __future__ import annotations

import inspect
from typing import Any

from sb3_rlhf.common.on_policy_algorithm import RLHFOnPolicyAlgorithm
from sb3_rlhf.dpo import DPOTrainer
from sb3_rlhf.grpo import GRPO
from sb3_rlhf.nlpo import NLPO
from sb3_rlhf.p3o import P3O
from sb3_rlhf.ppo import RLHFPPO
from sb3_rlhf.rloo import RLOO

#: Online algorithms: they sample from the policy and learn from the env's reward wrappers.
ONLINE_ALGORITHMS: dict[str, type[RLHFOnPolicyAlgorithm]] = {
    "ppo": RLHFPPO,
    "rloo": RLOO,
    "grpo": GRPO,
    "p3o": P3O,
    "nlpo": NLPO,
}
#: Offline algorithms: they learn from preference pairs.
OFFLINE_ALGORITHMS = {"dpo": DPOTrainer}
ALGORITHM_NAMES = (*ONLINE_ALGORITHMS, *OFFLINE_ALGORITHMS)


def algorithm_class(name: str) -> type:
    """The class of an algorithm name (``ppo``, ``rloo``, ``grpo``, ``p3o``, ``nlpo``, ``dpo``)."""
    classes = {**ONLINE_ALGORITHMS, **OFFLINE_ALGORITHMS}
    if name not in classes:
        raise ValueError(f"unknown algorithm {name!r}: choose one of {list(ALGORITHM_NAMES)}")
    return classes[name]


def accepted_arguments(cls: type) -> set[str]:
    """Every keyword argument ``cls(...)`` accepts (each algorithm declares its own, explicitly)."""
    parameters = inspect.signature(cls).parameters
    return {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def argument_defaults(cls: type) -> dict[str, Any]:
    """The default of every keyword argument ``cls(...)`` takes, following ``**kwargs`` up the class hierarchy."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters
        for name, parameter in parameters.items():
            if parameter.default is not parameter.empty:
                defaults.setdefault(name, parameter.default)
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            break
    return defaults
