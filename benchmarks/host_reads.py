"""Benchmark: how often an update reads a tensor's value on the host (a device sync on a GPU), per minibatch.

    python benchmarks/host_reads.py
    PYTHONPATH=/path/to/another/checkout python benchmarks/host_reads.py   # the same count for other code

Counts the calls of ``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``cpu`` and
``numpy`` made from the package's own lines during ``model.train()`` (tiny random Llama, the rule-reward task,
2 epochs of 8 episodes), at 2 and at 4 minibatches per epoch: the difference over the 4 extra minibatches is the
count per minibatch. ``tests/test_host_syncs.py`` asserts it is 1. A benchmark reports: it fails on nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sb3_rlhf  # noqa: E402
from sb3_rlhf import GRPO, RLHFPPO, TransformerActorCriticPolicy  # noqa: E402
from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from tests.helpers import WORDS, rule_env  # noqa: E402

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
PACKAGE = os.path.dirname(sb3_rlhf.__file__)


def library_reads(model: Any) -> Counter:
    """Each line of the package that read a tensor's value during ``model.train()``, with its count."""
    reads: Counter = Counter()
    originals = {name: getattr(th.Tensor, name) for name in READS}

    def counted(original: Callable, name: str) -> Callable:
        def read(self: th.Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(PACKAGE):
                reads[(name, os.path.relpath(caller.f_code.co_filename, PACKAGE), caller.f_lineno)] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(th.Tensor, name, counted(original, name))
    try:
        model.train()
    finally:
        for name, original in originals.items():
            setattr(th.Tensor, name, original)
    return reads


def trained_once(algorithm: type, env: Any, model_path: str, batch_size: int, **kwargs: Any) -> Any:
    """``algorithm`` on ``env`` after one rollout and update: 2 epochs of 8 episodes in minibatches of
    ``batch_size``; its next ``train()`` is what :func:`library_reads` counts."""
    model = algorithm(
        TransformerActorCriticPolicy,
        env,
        n_episodes=8,
        batch_size=batch_size,
        n_epochs=2,
        policy_kwargs={"model_name_or_path": model_path},
        seed=0,
        **kwargs,
    )
    model.learn(1)
    return model


def main() -> None:
    th.set_num_threads(1)
    tokenizer = tiny_tokenizer(WORDS)
    folder = tempfile.mkdtemp()
    tiny_causal_lm(len(tokenizer), "llama", seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"package: {PACKAGE}")
    for algorithm, kwargs, env in [
        (RLHFPPO, {}, rule_env(tokenizer)),
        (GRPO, {"samples_per_prompt": 2}, rule_env(tokenizer, estimator="k3")),
    ]:
        counts = [
            sum(library_reads(trained_once(algorithm, env, folder, batch_size, **kwargs)).values())
            for batch_size in (4, 2)
        ]
        print(
            f"{algorithm.__name__}: {counts[0]} reads at 4 minibatches, {counts[1]} at 8: "
            f"{(counts[1] - counts[0]) / 4:.2f} per minibatch"
        )


if __name__ == "__main__":
    main()
