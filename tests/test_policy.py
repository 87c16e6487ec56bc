import numpy as np
import pytest
import torch as th
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sb3_rlhf import TokenGenerationEnv
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.common.tiny import tiny_config
from tests.helpers import generate_batch, make_policy


def test_pretrained_weights_untouched(env, model_path):
    policy = make_policy(env, model_path)
    saved = load_file(f"{model_path}/model.safetensors")
    state = policy.actor.state_dict()
    for name, tensor in saved.items():
        assert th.equal(state[name], tensor), name


def test_predict_returns_a_token_as_sb3_expects(env, model_path):
    policy = make_policy(env, model_path)
    obs, _ = env.reset(seed=0)
    action, state = policy.predict(obs)
    assert state is None and env.action_space.contains(int(action))
    stacked = {k: np.stack([v, v]) for k, v in obs.items()}
    actions, _ = policy.predict(stacked, deterministic=True)
    assert actions.shape == (2,) and actions[0] == actions[1]
    env.step(int(action))


def test_logprobs_match_the_sampling_distribution(env, gpt2_path):
    """Teacher-forced log-probs equal those of the distribution generate() sampled from (temperature,
    vocabulary beyond the tokenizer masked), and the per-step path gives the same numbers."""
    policy = make_policy(env, gpt2_path, temperature=0.7)
    indices = list(range(6))
    batch = generate_batch(policy, env, indices)
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(indices))
    th.manual_seed(0)
    out = policy.actor.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=0.7,
        top_k=0,
        top_p=1.0,
        max_new_tokens=env.max_new_tokens,
        eos_token_id=list(env.stop_token_ids),
        pad_token_id=env.pad_token_id,
        logits_processor=[
            lambda ids, scores: scores.index_fill(1, th.arange(env.n_actions, scores.shape[1]), -float("inf"))
        ],
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert th.equal(
        out.sequences[:, prompt_ids.shape[1] :][batch.response_mask], batch.response_ids[batch.response_mask]
    )
    sampled = th.stack(out.scores, 1).log_softmax(-1)  # processed scores: what was sampled from
    expected = sampled.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    th.testing.assert_close(batch.logprobs[batch.response_mask], expected[batch.response_mask], atol=1e-4, rtol=0)
    assert (batch.response_ids < env.n_actions).all()

    # per-step path: the same log-prob for each token from the env's observation window
    row = 0
    env.reset(options={"prompt_index": indices[row]})
    obs = env.reset(options={"prompt_index": indices[row]})[0]
    for t in range(int(batch.lengths[row])):
        token = batch.response_ids[row, t]
        obs_t = {k: th.as_tensor(v).unsqueeze(0) for k, v in obs.items()}
        step_logprob = policy.action_log_prob(obs_t, token.unsqueeze(0))
        assert step_logprob.item() == pytest.approx(batch.logprobs[row, t].item(), abs=1e-4)
        obs, *_ = env.step(int(token))


def test_values_shared_head_and_per_step_agree(env, model_path):
    policy = make_policy(env, model_path)
    batch = generate_batch(policy, env, [0, 1, 2])
    with th.no_grad():
        _, values, entropy = policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
    assert values.shape == (3, batch.response_length + 1) and values.dtype == th.float32
    obs, _ = env.reset(options={"prompt_index": 1})
    for t in range(int(batch.lengths[1])):
        obs_t = {k: th.as_tensor(v).unsqueeze(0) for k, v in obs.items()}
        with th.no_grad():
            v_step, logp, ent = policy.evaluate_actions(obs_t, batch.response_ids[1, t : t + 1])
        assert v_step.item() == pytest.approx(values[1, t].item(), abs=1e-5)
        assert ent.item() == pytest.approx(entropy[1, t].item(), abs=1e-4)
        obs, *_ = env.step(int(batch.response_ids[1, t]))


def test_separate_critic(env, model_path):
    policy = make_policy(env, model_path, value_head="separate")
    assert policy.critic is not None
    batch = generate_batch(policy, env, [0, 1])
    _, values, _ = policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
    values.sum().backward()
    assert policy.critic.get_input_embeddings().weight.grad is not None
    assert policy.actor.get_input_embeddings().weight.grad is None


def test_dropout_is_off_so_ratio_starts_at_one(env, gpt2_path):
    policy = make_policy(env, gpt2_path)
    batch = generate_batch(policy, env, [0, 1, 2, 3])
    policy.set_training_mode(True)
    logprobs, _, _ = policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
    th.testing.assert_close(logprobs * batch.response_mask, batch.logprobs, atol=1e-6, rtol=0)


def test_save_pretrained_loads_in_plain_transformers(env, model_path, tokenizer, tmp_path):
    policy = make_policy(env, model_path)
    with th.no_grad():
        policy.actor.get_input_embeddings().weight.add_(1.0)
    policy.save_pretrained(str(tmp_path / "export"), tokenizer=tokenizer)
    policy.save_pretrained(str(tmp_path / "export"), tokenizer=tokenizer)  # replaces an existing export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    for name, tensor in loaded.state_dict().items():
        assert th.equal(tensor, policy.actor.state_dict()[name]), name
    assert (tmp_path / "export" / "model.safetensors").exists()
    assert (tmp_path / "export" / "tokenizer_config.json").exists()


def test_generated_batch_layout(env, model_path):
    policy = make_policy(env, model_path)
    batch = generate_batch(policy, env, list(range(8)))
    assert batch.input_ids.shape[1] == batch.attention_mask.shape[1]
    for row in range(batch.batch_size):
        n = int(batch.lengths[row])
        response = batch.response_ids[row]
        stops = [i for i, tok in enumerate(response[:n].tolist()) if tok in env.stop_token_ids]
        assert stops in ([], [n - 1])
        assert bool(batch.terminated[row]) == (stops == [n - 1])
        assert (response[n:] == env.pad_token_id).all()


def test_policy_argument_errors(env, model_path, tokenizer):
    with pytest.raises(ValueError, match="exactly one of"):
        make_policy(env, None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_policy(env, "/no/such/model")
    with pytest.raises(ValueError, match="value_head"):
        make_policy(env, model_path, value_head="tied")
    small = tiny_config(len(tokenizer) - 3).to_dict()
    with pytest.raises(ValueError, match="resize"):
        from sb3_rlhf import TransformerActorCriticPolicy

        TransformerActorCriticPolicy(env.observation_space, env.action_space, lambda _: 1e-4, model_config=small)
    with pytest.raises(ValueError, match="no tokens"):
        GenerationBatch.from_generation(
            env, [0], th.ones(1, 2, dtype=th.long), th.ones(1, 2, dtype=th.long), th.zeros(1, 0, dtype=th.long)
        )


def test_entropy_without_a_bonus_stays_out_of_the_autograd_graph(env, model_path):
    policy = make_policy(env, model_path)
    batch = generate_batch(policy, env, [0, 1, 2])
    args = (batch.input_ids, batch.attention_mask, batch.response_length)
    logprobs, _, with_graph = policy.evaluate_sequences(*args)
    _, _, detached = policy.evaluate_sequences(*args, entropy_grad=False)
    assert logprobs.requires_grad and with_graph.requires_grad and not detached.requires_grad
    assert th.allclose(with_graph, detached)


@pytest.mark.parametrize("lora", [None, {"r": 4}])
def test_gradient_checkpointing_gives_the_same_gradients(env, model_path, lora):
    """Activation checkpointing recomputes the forward in the backward pass: same gradients, less memory
    (with LoRA too, where the frozen embeddings give the checkpointed blocks no input that needs a gradient)."""
    gradients = []
    for checkpointing in (False, True):
        th.manual_seed(0)  # the value head and the LoRA A matrices start random
        policy = make_policy(env, model_path, gradient_checkpointing=checkpointing, lora=lora)
        policy.set_training_mode(True)
        batch = generate_batch(policy, env, [0, 1, 2])
        logprobs, values, entropy = policy.evaluate_sequences(
            batch.input_ids, batch.attention_mask, batch.response_length
        )
        (logprobs.sum() + values.sum() + entropy.sum()).backward()
        gradients.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
        actor = policy.actor.get_base_model() if lora else policy.actor
        assert actor.is_activation_checkpointing == checkpointing
    plain, checkpointed = gradients
    assert set(plain) == set(checkpointed)
    assert all(grad is not None for grad in checkpointed.values())
    assert sum(grad.abs().sum() for grad in checkpointed.values()) > 0
    for name, grad in plain.items():
        th.testing.assert_close(checkpointed[name], grad, msg=name)


@pytest.fixture
def opinionated_checkpoint(model_path, tokenizer, tmp_path) -> str:
    """The tiny Llama saved with a generation_config.json full of logits-changing defaults, as many hub models
    ship (repetition penalty, minimum length, suppressed and banned tokens, top-k, a sequence bias)."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    the, cat, good, dog = tokenizer.convert_tokens_to_ids(["the", "cat", "good", "dog"])
    model.generation_config.update(
        do_sample=True,
        temperature=0.5,
        top_k=4,
        repetition_penalty=1.3,
        min_new_tokens=3,
        no_repeat_ngram_size=2,
        suppress_tokens=[the, cat],
        bad_words_ids=[[good]],
        sequence_bias=[[[dog], 4.0]],  # the JSON-safe form
    )
    model.save_pretrained(tmp_path / "opinionated")
    return str(tmp_path / "opinionated")


def _generated_and_recomputed_logprobs(policy, env, indices):
    """generate()'s own log-probs of the tokens it drew (log_softmax of its scores) and the policy's teacher-forced
    log-probs of the same sequences, on the real response tokens: two ``(n_tokens,)`` tensors, and the batch."""
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(indices))
    th.manual_seed(0)
    response, _, scores, _ = RolloutEngine().generate(
        policy, prompt_ids, prompt_mask, env.max_new_tokens, env.stop_token_ids, env.pad_token_id, output_scores=True
    )
    assert scores.shape == (*response.shape, env.n_actions)
    batch = GenerationBatch.from_generation(env, indices, prompt_ids, prompt_mask, response)
    with th.no_grad():
        logprobs, _, entropy = policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
    sampled = scores.log_softmax(-1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask
    return sampled[mask], logprobs[mask], scores, entropy, batch


def test_sampling_ignores_the_checkpoints_generation_config(env, opinionated_checkpoint):
    """generate() samples from exactly the distribution whose log-probs PPO uses: none of the checkpoint's
    generation defaults (repetition penalty, min_new_tokens, suppress_tokens, ...) leak into sampling."""
    policy = make_policy(env, opinionated_checkpoint, temperature=0.7)
    sampled, recomputed, _, _, _ = _generated_and_recomputed_logprobs(policy, env, list(range(8)))
    assert th.isfinite(sampled).all()
    th.testing.assert_close(recomputed, sampled, atol=1e-5, rtol=0)
    # the checkpoint keeps its own defaults (what save_pretrained exports)
    assert policy.actor.generation_config.repetition_penalty == 1.3
    assert policy.actor.generation_config.min_new_tokens == 3


def test_top_k_and_top_p_are_the_policy(env, opinionated_checkpoint, tmp_path):
    """With top_k/top_p the policy is the truncated, renormalised distribution: in generate(), in the teacher-forced
    log-probs and entropy, in the per-step SB3 methods, and recorded when the policy is saved."""
    from sb3_rlhf import RLHFPPO, TransformerActorCriticPolicy
    from tests.helpers import rule_env

    policy = make_policy(env, opinionated_checkpoint, temperature=0.7, top_k=6, top_p=0.6)
    sampled, recomputed, scores, entropy, batch = _generated_and_recomputed_logprobs(policy, env, list(range(8)))
    th.testing.assert_close(recomputed, sampled, atol=1e-5, rtol=0)
    kept = th.isfinite(scores).sum(-1)[batch.response_mask]
    assert kept.max() <= 6 and kept.min() >= 1 and (kept < 6).any()  # top_p truncated some steps further
    # the entropy is the truncated distribution's, finite
    probs = scores.softmax(-1)
    expected_entropy = -(probs * scores.log_softmax(-1).nan_to_num(neginf=0.0)).sum(-1)
    th.testing.assert_close(entropy[batch.response_mask], expected_entropy[batch.response_mask], atol=1e-5, rtol=0)

    # per-step SB3 API: the same log-probs and entropies from the env's observations, and predict() stays inside
    row = 1
    obs, _ = env.reset(options={"prompt_index": row})
    for t in range(int(batch.lengths[row])):
        token = batch.response_ids[row, t : t + 1]
        obs_t = {k: th.as_tensor(v).unsqueeze(0) for k, v in obs.items()}
        with th.no_grad():
            _, logprob, step_entropy = policy.evaluate_actions(obs_t, token)
            allowed = th.isfinite(policy.get_distribution(obs_t).distribution.logits[0])
        assert logprob.item() == pytest.approx(recomputed_at(batch, policy, row, t), abs=1e-5)
        assert step_entropy.item() == pytest.approx(entropy[row, t].item(), abs=1e-5)
        th.testing.assert_close(allowed, th.isfinite(scores[row, t]), atol=0, rtol=0)
        assert allowed[int(policy.predict(obs)[0])]
        obs, *_ = env.step(int(token))

    # PPO trains on it (finite ratios, KL against the untruncated reference), and the SB3 zip records the options
    model = RLHFPPO(
        TransformerActorCriticPolicy,
        rule_env(env.tokenizer),
        n_episodes=8,
        batch_size=8,
        n_epochs=2,
        seed=0,
        policy_kwargs=dict(model_name_or_path=opinionated_checkpoint, top_k=6, top_p=0.6),
    )
    model.learn(total_timesteps=48)
    assert all(th.isfinite(p).all() for p in model.policy.parameters())
    model.save(tmp_path / "ppo.zip")
    loaded = RLHFPPO.load(tmp_path / "ppo.zip", env=model.env)
    assert (loaded.policy.top_k, loaded.policy.top_p) == (6, 0.6)
    assert policy._get_constructor_parameters()["top_p"] == 0.6


def recomputed_at(batch, policy, row, t) -> float:
    with th.no_grad():
        logprobs, _, _ = policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
    return logprobs[row, t].item()


def test_sampling_option_errors(env, model_path):
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        make_policy(env, model_path, top_k=-1)
    with pytest.raises(ValueError, match=r"top_p must be a probability in \(0, 1\]"):
        make_policy(env, model_path, top_p=0.0)


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7), (8, 0.5), (0, 0.05)])
def test_truncation_is_transformers_top_k_then_top_p(top_k, top_p):
    """``truncate_logits`` keeps exactly the tokens transformers' own top-k and top-p warpers keep, in that order."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from sb3_rlhf.policies import truncate_logits

    generator = th.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    logits = th.randn(64, 40, generator=generator) * 3
    logits[:4, :10] = 1.0  # ties at the top
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    ours = truncate_logits(logits, top_k, top_p)
    assert th.equal(th.isinf(ours), th.isinf(expected))
    assert th.equal(ours[~th.isinf(ours)], logits[~th.isinf(ours)])  # kept logits are untouched
    assert (~th.isinf(ours)).sum(-1).min() >= 1


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_last_hidden_state_from_the_lm_head_input_equals_the_models_own(architecture):
    from sb3_rlhf.common.forward import forward_last_positions
    from sb3_rlhf.common.sequences import position_ids_from_mask
    from sb3_rlhf.common.tiny import tiny_causal_lm

    model = tiny_causal_lm(40, architecture, seed=0).eval()
    g = th.Generator().manual_seed(0)
    input_ids = th.randint(2, 40, (3, 9), generator=g)
    attention_mask = th.ones_like(input_ids)
    attention_mask[0, :3] = 0  # a left-padded prompt
    logits, hidden = forward_last_positions(model, input_ids, attention_mask, 4, output_hidden_states=True)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        output_hidden_states=True,
        use_cache=False,
    )
    assert hidden is not None and hidden.shape == (3, 4, model.config.hidden_size)
    assert th.equal(hidden, out.hidden_states[-1][:, -4:])
    assert th.equal(logits, out.logits[:, -4:])
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone


def count_teacher_forced_passes(policy):
    """Count the policy's teacher-forced passes from now on: ``(calls, the unwrapped method)``."""
    calls = []
    teacher_forced = policy.evaluate_sequences
    policy.evaluate_sequences = lambda *a, **k: calls.append(1) or teacher_forced(*a, **k)
    return calls, teacher_forced


@pytest.mark.parametrize(
    "checkpoint, sampling",
    [("model_path", {}), ("gpt2_path", {"temperature": 0.7}), ("model_path", {"top_k": 6, "top_p": 0.8})],
)
def test_old_logprobs_recorded_in_generate_equal_the_teacher_forced_pass(
    request, prompts, tokenizer, checkpoint, sampling
):
    """Without values the rollout keeps the log-probs generate() sampled with instead of a teacher-forced pass:
    the same numbers (float rounding apart), 0 after a stop token, for the same seed the same tokens."""
    stops = tokenizer.convert_tokens_to_ids(list(tokenizer.get_vocab())[:40])  # responses that end early too
    stops = [t for t in stops if t != tokenizer.pad_token_id]
    env = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=6, stop_token_ids=stops)
    policy = make_policy(env, request.getfixturevalue(checkpoint), **sampling)
    calls, teacher_forced = count_teacher_forced_passes(policy)
    indices = list(range(len(prompts))) * 2
    th.manual_seed(0)
    recorded, values = RolloutEngine().sample_episodes(policy, env, indices, with_values=False)
    assert values is None and not calls  # no teacher-forced pass
    th.manual_seed(0)
    forced, _ = RolloutEngine().sample_episodes(policy, env, indices, with_values=True)
    assert calls
    assert th.equal(recorded.response_ids, forced.response_ids)
    assert recorded.terminated.any() and (recorded.lengths < env.max_new_tokens).any()  # padding is covered
    th.testing.assert_close(recorded.logprobs, forced.logprobs, atol=1e-5, rtol=0)
    assert (recorded.logprobs[~recorded.response_mask] == 0).all() and (
        recorded.logprobs[recorded.response_mask] <= 0
    ).all()


def test_half_precision_rollouts_keep_the_teacher_forced_pass(env, model_path):
    """In bfloat16 the KV-cached and the teacher-forced forwards can differ by more than float32 rounding: the
    old log-probs still come from the teacher-forced pass there."""
    policy = make_policy(env, model_path, dtype="bfloat16")
    calls, teacher_forced = count_teacher_forced_passes(policy)
    RolloutEngine().sample_episodes(policy, env, [0, 1], with_values=False)
    assert calls


def test_generate_refuses_scores_and_logprobs_together(env, model_path):
    policy = make_policy(env, model_path)
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch([0]))
    with pytest.raises(ValueError, match="output_scores or output_logprobs"):
        RolloutEngine().generate(
            policy, prompt_ids, prompt_mask, 3, env.stop_token_ids, env.pad_token_id, True, True, True
        )


def test_a_separate_critic_rollout_runs_the_critic_alone(env, model_path):
    """With a separate critic the actor's teacher-forced pass is spared too: the old log-probs come from
    generate(), the values from the critic's forward, both equal to the full pass's."""
    policy = make_policy(env, model_path, value_head="separate")
    calls, teacher_forced = count_teacher_forced_passes(policy)
    th.manual_seed(0)
    batch, values = RolloutEngine().sample_episodes(policy, env, list(range(6)), with_values=True)
    assert not calls
    with th.no_grad():
        logprobs, expected_values, _ = teacher_forced(batch.input_ids, batch.attention_mask, batch.response_length)
    th.testing.assert_close(values, expected_values)
    th.testing.assert_close(batch.logprobs, logprobs * batch.response_mask, atol=1e-5, rtol=0)
