"""The rollout engine: static and dynamic KV caches sample the same episodes, shapes are bucketed, a compile
failure falls back to the dynamic cache, and running out of device memory ends with an error naming the fix."""

import warnings

import numpy as np
import pytest
import torch as th
from torch._dynamo.exc import BackendCompilerFailed

from sb3_rlhf import NLPO, RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.cli import USER_ERRORS
from sb3_rlhf.common.checkpoints import TrainingCheckpointCallback
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.memory import DeviceMemoryError
from sb3_rlhf.common.rollout_engine import Generation, RolloutEngine, left_pad
from sb3_rlhf.common.sequences import response_mask_until_stop
from sb3_rlhf.common.tiny import tiny_causal_lm
from sb3_rlhf.envs.masks import ActionMask, AllowedTokens, TopPMask
from tests.helpers import make_model, make_prompts, rule_env


def _policy(tokenizer, **kwargs):
    env = TokenGenerationEnv(make_prompts(8), tokenizer, 8, 6, stop_token_ids=kwargs.pop("stop_token_ids", None))
    config = tiny_causal_lm(len(tokenizer), "llama", seed=0).config.to_dict()
    policy = TransformerActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, model_config=config, **kwargs
    )
    return policy, env


def _sample(engine, policy, env, seed, **kwargs):
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(np.arange(8)))
    th.manual_seed(seed)
    return engine.generate(
        policy, prompt_ids, prompt_mask, env.max_new_tokens, env.stop_token_ids, env.pad_token_id, **kwargs
    )


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled", "greedy"])
@pytest.mark.parametrize("setting", ["plain", "top_k_p", "action_mask", "stop_tokens"])
def test_static_and_dynamic_caches_sample_the_same_episodes(tokenizer, deterministic, setting):
    kwargs = {"top_k": 12, "top_p": 0.9} if setting == "top_k_p" else {}
    if setting == "stop_tokens":  # "the" (a frequent word) also ends a response
        kwargs["stop_token_ids"] = [tokenizer.convert_tokens_to_ids("the")]
    policy, env = _policy(tokenizer, **kwargs)
    if setting == "action_mask":
        policy.action_mask = ActionMask(
            [TopPMask(tiny_causal_lm(len(tokenizer), "llama", seed=3), 0.5), AllowedTokens(range(4, 20))],
            len(tokenizer),
            [tokenizer.eos_token_id],
        )
    static, dynamic = RolloutEngine("static", prompt_multiple=16), RolloutEngine("dynamic")
    assert static.cache_for(th.device("cpu")) == "static" and dynamic.cache_for(th.device("cpu")) == "dynamic"
    outputs = {}
    for name, engine in (("static", static), ("dynamic", dynamic)):
        outputs[name] = _sample(
            engine, policy, env, seed=5, deterministic=deterministic, output_logprobs=True,
            output_action_masks=setting == "action_mask",
        )  # fmt: skip
    a, b = outputs["static"], outputs["dynamic"]
    assert a.responses.shape == b.responses.shape == (8, a.responses.shape[1])
    assert th.equal(a.responses, b.responses)
    real = ~th.isin(a.responses, th.tensor([env.pad_token_id]))
    assert th.allclose(a.logprobs[real], b.logprobs[real], atol=1e-5)
    if setting == "action_mask":
        assert th.equal(a.action_masks, b.action_masks)
    if setting == "stop_tokens":
        assert th.isin(a.responses, th.tensor(env.stop_token_ids)).any()  # the stops were exercised


def test_the_static_cache_fills_a_smaller_batch_and_pads_prompts_to_its_buckets(tokenizer, monkeypatch):
    policy, env = _policy(tokenizer)
    engine = RolloutEngine("static", batch_size=8, prompt_multiple=32)
    shapes = []
    generate = policy.actor.generate

    def spy(**kwargs):
        shapes.append((tuple(kwargs["input_ids"].shape), kwargs["generation_config"].cache_implementation))
        return generate(**kwargs)

    monkeypatch.setattr(policy.actor, "generate", spy)
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(np.arange(3)))
    out = engine.generate(policy, prompt_ids, prompt_mask, 4, env.stop_token_ids, env.pad_token_id, deterministic=True)
    assert shapes == [((8, 32), "static")]  # one compiled shape whatever the batch and the prompts
    assert out.responses.shape[0] == 3 and out.logprobs is None and out.scores is None
    # the bucketed batch's first rows are the batch's own greedy responses
    alone = RolloutEngine("dynamic").generate(
        policy, prompt_ids, prompt_mask, 4, env.stop_token_ids, env.pad_token_id, deterministic=True
    )
    assert th.equal(out.responses, alone.responses)


def test_left_pad_adds_padding_columns_only():
    ids, mask = th.tensor([[5, 6], [0, 7]]), th.tensor([[1, 1], [0, 1]])
    padded_ids, padded_mask = left_pad(ids, mask, 4, pad_token_id=0)
    assert padded_ids.tolist() == [[0, 0, 5, 6], [0, 0, 0, 7]]
    assert padded_mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert left_pad(ids, mask, 2, 0)[0] is ids


def test_auto_is_static_on_cuda_only_and_bad_settings_are_refused(tokenizer, model_path):
    engine = RolloutEngine()
    assert engine.cache_for(th.device("cuda")) == "static" and engine.cache_for(th.device("cpu")) == "dynamic"
    with pytest.raises(ValueError, match="generation_cache must be one of"):
        RolloutEngine("paged")
    with pytest.raises(ValueError, match="prompt_multiple must be a positive integer"):
        RolloutEngine(prompt_multiple=0)
    with pytest.raises(ValueError, match="generation_cache must be one of"):
        make_model(rule_env(tokenizer), model_path, generation_cache="Static")  # refused where it is read
    model = make_model(rule_env(tokenizer), model_path, generation_cache="static", generation_batch_size=16)
    assert model.rollout_engine.cache == "static" and model.rollout_engine.batch_size == 16


def _failing_compile(policy, monkeypatch, inner: Exception):
    """Make the static cache's generate() fail as torch.compile does (BackendCompilerFailed around ``inner``);
    return the list of the caches asked for."""
    generate = policy.actor.generate
    caches = []

    def failing(**kwargs):
        caches.append(kwargs["generation_config"].cache_implementation)
        if kwargs["generation_config"].cache_implementation == "static":
            try:
                raise inner
            except Exception as error:
                raise BackendCompilerFailed(lambda *a: None, error, None) from error
        return generate(**kwargs)

    monkeypatch.setattr(policy.actor, "generate", failing)
    return caches


def test_a_compile_failure_falls_back_to_the_dynamic_cache_with_a_warning(tokenizer, monkeypatch):
    policy, env = _policy(tokenizer)
    caches = _failing_compile(policy, monkeypatch, RuntimeError("inductor could not lower an op"))
    engine = RolloutEngine("static", batch_size=16)
    with pytest.warns(UserWarning, match="dynamic cache from now on"):
        first = _sample(engine, policy, env, seed=1, output_logprobs=True)
    assert engine.compile_failed and caches == ["static", None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not at every rollout
        second = _sample(engine, policy, env, seed=1, output_logprobs=True)
    assert caches == ["static", None, None]
    # the fallback is the dynamic cache's generation of the caller's own prompts (not the bucketed ones)
    dynamic = _sample(RolloutEngine("dynamic"), policy, env, seed=1, output_logprobs=True)
    for out in (first, second):
        assert isinstance(out, Generation) and out.responses.shape[0] == 8
        assert th.equal(out.responses, dynamic.responses) and th.equal(out.logprobs, dynamic.logprobs)


def test_out_of_memory_while_compiling_is_reported_as_out_of_memory(tokenizer, monkeypatch):
    policy, env = _policy(tokenizer)
    _failing_compile(policy, monkeypatch, th.OutOfMemoryError("CUDA out of memory while autotuning"))
    engine = RolloutEngine("static")
    with pytest.raises(DeviceMemoryError, match="set generation_batch_size below 8"):
        _sample(engine, policy, env, seed=0)
    assert not engine.compile_failed  # the static cache is not given up for a lack of memory


def test_the_static_buckets_never_exceed_the_envs_prompt_width(tokenizer, monkeypatch):
    policy, env = _policy(tokenizer)  # max_prompt_tokens=8
    widths = []
    generate = policy.actor.generate

    def spy(**kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return generate(**kwargs)

    monkeypatch.setattr(policy.actor, "generate", spy)
    RolloutEngine("static", prompt_multiple=64).sample_episodes(policy, env, [0, 1, 2], with_values=False)
    assert widths == [env.max_prompt_tokens]  # not 64


def test_other_errors_in_generation_are_not_taken_for_a_compile_failure(tokenizer, monkeypatch):
    policy, env = _policy(tokenizer)

    def broken(**kwargs):
        raise RuntimeError("a bug in the model")

    monkeypatch.setattr(policy.actor, "generate", broken)
    engine = RolloutEngine("static")
    with pytest.raises(RuntimeError, match="a bug in the model"):
        _sample(engine, policy, env, seed=0)
    assert not engine.compile_failed


def _out_of_memory(*args, **kwargs):
    raise th.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_in_generation_names_the_setting_and_the_last_checkpoint_loads(
    tokenizer, model_path, tmp_path, monkeypatch
):
    env = rule_env(tokenizer)
    model = make_model(env, model_path, n_episodes=8, batch_size=8, n_epochs=1)
    model.learn(48, callback=TrainingCheckpointCallback(save_freq=1, save_path=str(tmp_path)))
    monkeypatch.setattr(model.policy.actor, "generate", _out_of_memory)
    with pytest.raises(DeviceMemoryError, match="set generation_batch_size below 8") as error:
        model.learn(48, reset_num_timesteps=False)
    assert "\n" not in str(error.value) and isinstance(error.value, USER_ERRORS)  # one line from sb3-rlhf
    assert isinstance(error.value, th.OutOfMemoryError)  # still what code catching a CUDA OOM expects
    resumed = RLHFPPO.load_checkpoint(str(tmp_path), env=env)
    assert resumed.num_timesteps == model.num_timesteps > 0


@pytest.mark.parametrize("where", ["teacher_forced", "update"])
def test_out_of_memory_in_a_forward_names_the_setting_to_lower(tokenizer, model_path, monkeypatch, where):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8, batch_size=8, n_epochs=1)
    evaluate = model.policy.evaluate_sequences

    def failing(*args, **kwargs):
        # the rollout's pass runs without gradients, the update's with
        if (where == "update") == th.is_grad_enabled():
            _out_of_memory()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(model.policy, "evaluate_sequences", failing)
    expected = "set micro_batch_tokens to a lower number" if where == "update" else "set generation_batch_size below 8"
    with pytest.raises(DeviceMemoryError, match=expected):
        model.learn(48)


def test_out_of_memory_scoring_the_rollout_names_the_generation_batch(tokenizer, model_path, monkeypatch):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8, batch_size=8, n_epochs=1)
    monkeypatch.setattr(model.reward_wrappers[0], "batch_rewards", _out_of_memory)
    with pytest.raises(DeviceMemoryError, match="set generation_batch_size below 8"):
        model.learn(48)


def test_continuous_batching_samples_the_policy_and_records_its_logprobs(tokenizer):
    """generation_cache='continuous' (transformers' generate_batch, each response leaving the batch when it ends):
    the log-probs it records are the policy's at its temperature; torch's own random streams are left as they were
    (transformers reseeds them); the rollout keeps the teacher-forced log-probs as the old ones."""
    policy, env = _policy(tokenizer, temperature=0.7)
    engine = RolloutEngine("continuous")
    assert engine.cache_for(th.device("cpu")) == "continuous"
    th.manual_seed(0)
    recorded = _sample(engine, policy, env, seed=0, output_logprobs=True)
    after = th.rand(4)
    th.manual_seed(0)
    th.randint(2**31 - 1, ())  # the engine's one draw: the batch's seed
    assert th.equal(after, th.rand(4))
    responses = recorded.responses
    real, _ = response_mask_until_stop(responses, env.stop_token_ids)
    assert responses.shape[0] == 8 and real.sum() > 8
    assert (responses[~real] == env.pad_token_id).all()  # padding after the stop token, as generate() pads
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(np.arange(8)))
    batch = GenerationBatch.from_generation(env, np.arange(8), prompt_ids, prompt_mask, responses)
    with th.no_grad():
        forced, _, _ = policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
    assert th.allclose(recorded.logprobs[real], forced[real], atol=1e-5)
    th.manual_seed(1)
    episodes, _ = engine.sample_episodes(policy, env, np.arange(8), with_values=False)
    with th.no_grad():
        forced, _, _ = policy.evaluate_sequences(episodes.input_ids, episodes.attention_mask, episodes.response_length)
    assert th.equal(episodes.logprobs[episodes.response_mask], forced[episodes.response_mask])  # recomputed
    # what it cannot sample exactly is refused, naming the caches that can
    for kwargs in ({"top_k": 5}, {"top_p": 0.9}, {"mixed_precision": "bf16"}):
        other, _ = _policy(tokenizer, **kwargs)
        with pytest.raises(ValueError, match="continuous' samples with transformers' own temperature only"):
            engine.sample_episodes(other, env, np.arange(2), with_values=False)
    with pytest.raises(ValueError, match="no greedy decoding"):
        _sample(engine, policy, env, seed=0, deterministic=True)
    policy.action_mask = ActionMask([AllowedTokens(range(4, 20))], len(tokenizer), [tokenizer.eos_token_id])
    with pytest.raises(ValueError, match="an action mask"):
        engine.sample_episodes(policy, env, np.arange(2), with_values=False)


def test_algorithms_refuse_continuous_batching_for_a_policy_it_cannot_sample_when_built(tokenizer, model_path):
    with pytest.raises(ValueError, match="not with top_k/top_p"):
        RLHFPPO(
            TransformerActorCriticPolicy,
            rule_env(tokenizer),
            policy_kwargs=dict(model_name_or_path=model_path, top_k=5),
            generation_cache="continuous",
        )
    with pytest.raises(ValueError, match="not with an action mask"):  # NLPO's nucleus, bound after the policy
        NLPO(
            TransformerActorCriticPolicy,
            rule_env(tokenizer),
            policy_kwargs=dict(model_name_or_path=model_path),
            generation_cache="continuous",
        )
