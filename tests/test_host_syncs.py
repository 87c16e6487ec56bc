"""The update reads the device (a host sync on a GPU) once per minibatch: whether its step is taken. Its
diagnostics stay on the device and are read once per update. Counted on CPU by ``benchmarks/host_reads.py``, which
wraps every method that hands a tensor's value to Python and keeps the calls made from the library's own code
(transformers' and torch's own reads are theirs; reads inside torch on the library's behalf, ``nonzero`` or
boolean-mask indexing, escape it: a GPU run can check with ``torch.cuda.set_sync_debug_mode``)."""

import os

import pytest

from sb3_rlhf import GRPO, P3O, RLHFPPO, RLOO
from tests.helpers import rule_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "algorithm, kwargs",
    [(RLHFPPO, {}), (GRPO, {"samples_per_prompt": 2}), (RLOO, {"samples_per_prompt": 2}), (P3O, {})],
)
def test_one_device_read_per_minibatch(tokenizer, model_path, monkeypatch, algorithm, kwargs):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    from host_reads import library_reads, trained_once

    env = rule_env(tokenizer, estimator="k3") if algorithm is GRPO else rule_env(tokenizer)  # GRPO: KL in the loss
    totals = {}
    for batch_size in (4, 2):  # 2 epochs of 2 minibatches, then of 4
        model = trained_once(algorithm, env, model_path, batch_size, **kwargs)
        reads = library_reads(model)
        totals[batch_size] = sum(reads.values())
        minibatches = 2 * 8 // batch_size
        every_minibatch = {line: n for line, n in reads.items() if n >= minibatches}
        assert sum(every_minibatch.values()) == minibatches, reads  # one line, once each: the step decision
        assert model.logger.name_to_value["train/clip_fraction"] >= 0  # the diagnostics were read and logged
    assert totals[2] - totals[4] == 4, totals  # 4 more minibatches, 4 more reads
