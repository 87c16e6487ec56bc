"""Behaviour fingerprints: the weights after a short seeded run of every algorithm on the tiny task.

The values in ``tests/fingerprints.json`` were recorded before the on-policy base was split out of RLHFPPO (issue
13) and must not move: a refactoring that changes what any algorithm computes (a default, the order of random
draws, a loss term, the minibatch split) changes them. On the CPU kind they were recorded on (same torch build,
same vector instructions) the weights must match bit for bit (``sha256``); elsewhere float rounding may differ in
the last bits, so two float64 summaries are compared at a tolerance far below what any change of behaviour moves
them: ``update_norm`` = ||θ_T − θ_0|| and ``projection`` = <θ_T − θ_0, r> for a fixed random direction r.

To record them again (only when a change of behaviour is intended, and say so in the commit):
``python -m tests.test_fingerprints --write``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch as th

from sb3_rlhf import GRPO, P3O, RLHFPPO, RLOO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.data import train_test_split
from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer
from sb3_rlhf.dpo import DPOTrainer
from sb3_rlhf.reward_modeling import RewardModel, RewardModelTrainer
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
from sb3_rlhf.rewards.rules import share_of_good
from sb3_rlhf.sft import SFTTrainer
from tests.helpers import WORDS, make_prompts, tiny_bert, toy_demos, toy_dpo_pairs, toy_reward_pairs

FINGERPRINTS = os.path.join(os.path.dirname(__file__), "fingerprints.json")


def _state(module: th.nn.Module) -> dict[str, th.Tensor]:
    return {k: v.detach().to(th.float64).clone() for k, v in sorted(module.state_dict().items())}


def _fingerprint(before: dict[str, th.Tensor], module: th.nn.Module) -> dict[str, object]:
    after = {k: v.detach() for k, v in sorted(module.state_dict().items())}
    digest = hashlib.sha256()
    for name, tensor in after.items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().cpu().numpy().tobytes())
    delta = th.cat([(after[k].to(th.float64) - before[k]).reshape(-1) for k in after])
    direction = th.from_numpy(np.random.default_rng(0).standard_normal(delta.numel()))
    return {
        "sha256": digest.hexdigest(),
        "update_norm": float(delta.norm()),
        "projection": float(delta @ direction),
    }


def _rule_env(tokenizer, **kl_kwargs) -> KLPenaltyWrapper:
    env = TokenGenerationEnv(make_prompts(), tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    return KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), **kl_kwargs)


def _online(algorithm: type, kl: dict, policy: dict | None = None, **settings) -> Callable[[str], tuple]:
    def run(model_path: str) -> tuple:
        tokenizer = tiny_tokenizer(WORDS)
        env = _rule_env(tokenizer, **kl)
        model = algorithm(
            TransformerActorCriticPolicy,
            env,
            policy_kwargs={"model_name_or_path": model_path, **(policy or {})},
            learning_rate=1e-3,
            seed=0,
            **settings,
        )
        before = _state(model.policy)
        model.learn(200)
        return before, model.policy

    return run


def _supervised(build: Callable[[str], object]) -> Callable[[str], tuple]:
    def run(model_path: str) -> tuple:
        th.manual_seed(0)
        trainer = build(model_path)
        module = trainer.model  # type: ignore[attr-defined]
        before = _state(module)
        trainer.learn()  # type: ignore[attr-defined]
        return before, module

    return run


def _reward_model(model_path: str) -> object:
    tokenizer = tiny_tokenizer(WORDS)
    train, test = train_test_split(toy_reward_pairs(64), 16, seed=0)
    return RewardModelTrainer(
        RewardModel(tiny_bert(len(tokenizer))),
        tokenizer,
        train,
        test,
        learning_rate=3e-3,
        batch_size=16,
        n_epochs=2,
        max_length=32,
        seed=0,
    )


RUNS: dict[str, Callable[[str], tuple]] = {
    "ppo": _online(RLHFPPO, {"coef": 0.02}, n_episodes=16, batch_size=8, n_epochs=2),
    "ppo_separate_critic_adaptive_kl": _online(
        RLHFPPO,
        {"coef": 0.05, "target": 1.0, "horizon": 100},
        {"value_head": "separate"},
        n_episodes=16,
        batch_size=4,
        n_epochs=2,
        ent_coef=0.01,
        max_batch_tokens=40,
    ),
    "rloo": _online(RLOO, {"coef": 0.02}, n_episodes=16, samples_per_prompt=4, batch_size=8, n_epochs=2),
    "grpo": _online(GRPO, {"coef": 0.04, "estimator": "k3"}, n_episodes=16, samples_per_prompt=4, batch_size=8),
    "p3o_separate": _online(P3O, {"coef": 0.02}, n_episodes=16, batch_size=8, n_epochs=2, clipping="separate"),
    "p3o_joint": _online(P3O, {"coef": 0.02}, n_episodes=16, batch_size=8, n_epochs=2, clipping="joint"),
    "dpo": _supervised(
        lambda path: DPOTrainer(path, None, toy_dpo_pairs(32), learning_rate=1e-3, batch_size=8, n_epochs=1, seed=0)
    ),
    "sft": _supervised(lambda path: SFTTrainer(path, None, toy_demos(32), learning_rate=1e-3, batch_size=8, seed=0)),
    "reward_model": _supervised(_reward_model),
}


def fingerprint(name: str, model_path: str) -> dict[str, object]:
    th.set_num_threads(2)
    before, module = RUNS[name](model_path)
    return _fingerprint(before, module)


def _cpu_capability() -> str:
    return th.backends.cpu.get_cpu_capability()


@pytest.fixture(scope="module")
def fingerprint_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("fingerprint_llama")
    tokenizer = tiny_tokenizer(WORDS)
    tiny_causal_lm(len(tokenizer), "llama", seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("name", list(RUNS))
def test_fingerprint_unchanged(name, fingerprint_model):
    with open(FINGERPRINTS) as f:
        recorded = json.load(f)
    expected = recorded["runs"][name]
    got = fingerprint(name, fingerprint_model)
    assert got["update_norm"] > 0  # the run trained
    assert got["update_norm"] == pytest.approx(expected["update_norm"], rel=1e-4)
    assert got["projection"] == pytest.approx(expected["projection"], rel=1e-3, abs=1e-4 * expected["update_norm"])
    if recorded["torch"] == th.__version__ and recorded["cpu_capability"] == _cpu_capability():
        assert got["sha256"] == expected["sha256"]


def _write(model_path: str) -> None:
    runs = {name: fingerprint(name, model_path) for name in RUNS}
    with open(FINGERPRINTS, "w") as f:
        json.dump({"torch": th.__version__, "cpu_capability": _cpu_capability(), "runs": runs}, f, indent=1)
        f.write("\n")
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_fingerprints --write")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = tiny_tokenizer(WORDS)
        tiny_causal_lm(len(tokenizer), "llama", seed=0).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _write(folder)
