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

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sb3_rlhf  # noqa: E402
from sb3_rlhf import GRPO, RLHFPPO, TransformerActorCriticPolicy  # noqa: E402
from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer  # noqa: E402
from tests.helpers import WORDS, rule_env  # noqa: E402

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
PACKAGE = os.path.dirname(sb3_rlhf.__file__)


def reads_in_train(model: object) -> int:
    count = [0]
    originals = {name: getattr(th.Tensor, name) for name in READS}

    def counted(original):  # type: ignore[no-untyped-def]
        def read(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                count[0] += 1
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(th.Tensor, name, counted(original))
    try:
        model.train()  # type: ignore[attr-defined]
    finally:
        for name, original in originals.items():
            setattr(th.Tensor, name, original)
    return count[0]


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
        counts = []
        for batch_size in (4, 2):
            model = algorithm(
                TransformerActorCriticPolicy,
                env,
                n_episodes=8,
                batch_size=batch_size,
                n_epochs=2,
                policy_kwargs={"model_name_or_path": folder},
                seed=0,
                **kwargs,
            )
            model.learn(1)
            counts.append(reads_in_train(model))
        print(
            f"{algorithm.__name__}: {counts[0]} reads at 4 minibatches, {counts[1]} at 8: "
            f"{(counts[1] - counts[0]) / 4:.2f} per minibatch"
        )


if __name__ == "__main__":
    main()
