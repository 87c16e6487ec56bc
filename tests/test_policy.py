import numpy as np
import pytest
import torch as th
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sb3_rlhf.common.generation import GenerationBatch
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
