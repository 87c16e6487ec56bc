"""The GPU path (bf16 backbone, CUDA generation); skipped on machines without CUDA, such as CI."""

import pytest
import torch as th

from sb3_rlhf import RLHFPPO, TransformerActorCriticPolicy
from sb3_rlhf.common.callbacks import RolloutHistoryCallback
from sb3_rlhf.common.rollout_engine import RolloutEngine
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


def test_the_static_cache_compiles_and_samples_as_the_dynamic_one_on_cuda(tokenizer, model_path):
    """On CUDA generation_cache='auto' is the static cache, which transformers compiles (CUDA graphs): it must not
    fall back, and greedy responses equal the dynamic cache's (the same model, shapes bucketed)."""
    env = rule_env(tokenizer)
    model = RLHFPPO(
        TransformerActorCriticPolicy,
        env,
        n_episodes=16,
        batch_size=8,
        policy_kwargs=dict(model_name_or_path=model_path),
        device="cuda",
        seed=0,
    )
    engine = model.rollout_engine
    assert engine.cache_for(th.device("cuda")) == "static"
    model.learn(total_timesteps=200)
    assert not engine.compile_failed
    assert getattr(model.policy.actor, "_compiled_call", None) is not None  # transformers compiled the decoding step
    gen_env = env.unwrapped
    ids, mask = (th.as_tensor(a, device="cuda") for a in gen_env.prompt_batch(range(16)))
    args = (ids, mask, gen_env.max_new_tokens, gen_env.stop_token_ids, gen_env.pad_token_id)
    static = engine.generate(model.policy, *args, deterministic=True)
    dynamic = RolloutEngine("dynamic").generate(model.policy, *args, deterministic=True)
    assert th.equal(static.responses, dynamic.responses)
    # the log-probs recorded by the compiled sampling loop (a float32 critic-free rollout keeps them as the old
    # log-probs) agree with the teacher-forced pass the update computes
    th.manual_seed(0)
    batch, _ = engine.sample_episodes(model.policy, gen_env, list(range(16)), with_values=False)
    with th.no_grad():
        forced, _, _ = model.policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
    real = batch.response_mask
    assert th.allclose(batch.logprobs[real], forced[real], atol=1e-4), (batch.logprobs[real] - forced[real]).abs().max()
