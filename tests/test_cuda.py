"""The GPU path (bf16 backbone, CUDA generation); skipped on machines without CUDA, such as CI."""

import pytest
import torch as th

from sb3_rlhf import RLHFPPO, TransformerActorCriticPolicy
from sb3_rlhf.common.callbacks import RolloutHistoryCallback
from tests.helpers import rule_env

pytestmark = pytest.mark.skipif(not th.cuda.is_available(), reason="needs a CUDA GPU")


def test_learn_on_cuda_in_bfloat16(tokenizer, model_path, tmp_path):
    env = rule_env(tokenizer)
    model = RLHFPPO(
        TransformerActorCriticPolicy,
        env,
        learning_rate=1e-3,
        n_episodes=32,
        batch_size=8,
        policy_kwargs=dict(model_name_or_path=model_path, dtype="bfloat16"),
        device="cuda",
        seed=0,
    )
    assert model.policy.actor.dtype == th.bfloat16 and model.policy.value_head.weight.dtype == th.float32
    kl_wrapper = model.reward_wrappers[0]
    assert kl_wrapper.ref_model.device.type == "cuda"
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=2_000, callback=history)
    assert model.rollout_buffer.prompt_ids.device.type == "cuda"
    assert all(th.isfinite(th.tensor([row["kl"] for row in history.history])))
    model.save(tmp_path / "gpu.zip")
    loaded = RLHFPPO.load(tmp_path / "gpu.zip", env=env, device="cuda")
    assert next(loaded.policy.parameters()).device.type == "cuda"
