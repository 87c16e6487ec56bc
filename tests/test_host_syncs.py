"""The update reads the device (a host sync on a GPU) once per minibatch: whether its step is taken. Its
diagnostics stay on the device and are read once per update. Counted on CPU by wrapping every method that hands
a tensor's value to Python and keeping the calls made from the library's own code (transformers' and torch's
own reads are theirs)."""

import os
import sys
from collections import Counter

import pytest
import torch as th

import sb3_rlhf
from sb3_rlhf import GRPO, P3O, RLHFPPO, RLOO, TransformerActorCriticPolicy
from tests.helpers import rule_env

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
PACKAGE = os.path.dirname(sb3_rlhf.__file__)


def library_reads_in_one_update(model, monkeypatch) -> Counter:
    """Each library line that read a tensor's value during ``model.train()``, with its count."""
    reads: Counter = Counter()
    with monkeypatch.context() as patch:
        for name in READS:

            def counted(self, *args, _original=getattr(th.Tensor, name), _name=name, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PACKAGE):
                    reads[(_name, os.path.relpath(caller, PACKAGE), sys._getframe(1).f_lineno)] += 1
                return _original(self, *args, **kwargs)

            patch.setattr(th.Tensor, name, counted)
        model.train()
    return reads


@pytest.mark.parametrize(
    "algorithm, kwargs",
    [(RLHFPPO, {}), (GRPO, {"samples_per_prompt": 2}), (RLOO, {"samples_per_prompt": 2}), (P3O, {})],
)
def test_one_device_read_per_minibatch(tokenizer, model_path, monkeypatch, algorithm, kwargs):
    env = rule_env(tokenizer, estimator="k3") if algorithm is GRPO else rule_env(tokenizer)  # GRPO: KL in the loss
    totals = {}
    for batch_size in (4, 2):  # 2 epochs of 2 minibatches, then of 4
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
        reads = library_reads_in_one_update(model, monkeypatch)
        totals[batch_size] = sum(reads.values())
        minibatches = 2 * 8 // batch_size
        every_minibatch = {line: n for line, n in reads.items() if n >= minibatches}
        assert sum(every_minibatch.values()) == minibatches, reads  # one line, once each: the step decision
        assert model.logger.name_to_value["train/clip_fraction"] >= 0  # the diagnostics were read and logged
    assert totals[2] - totals[4] == 4, totals  # 4 more minibatches, 4 more reads
