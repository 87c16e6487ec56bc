import pytest
import torch as th
from transformers import AutoModelForCausalLM

from sb3_rlhf import RLHFPPO
from sb3_rlhf.common.forward import response_logprobs
from sb3_rlhf.common.models import load_causal_lm
from sb3_rlhf.rewards import KLPenaltyWrapper
from tests.helpers import generate_batch, make_policy, rule_env

pytest.importorskip("peft")


def test_lora_trains_only_the_adapter_and_the_reference_is_the_base(tokenizer, model_path, tmp_path):
    env = rule_env(tokenizer)
    model = RLHFPPO(
        "TransformerActorCriticPolicy",
        env,
        learning_rate=3e-3,
        n_episodes=32,
        batch_size=8,
        seed=0,
        policy_kwargs=dict(model_name_or_path=model_path, lora=dict(r=4)),
    )
    policy = model.policy
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("value_head") for name in trainable)
    kl = model.reward_wrappers[0]
    assert isinstance(kl, KLPenaltyWrapper)
    assert not list(kl.ref_model.parameters())  # no second copy of the weights
    initial = load_causal_lm(model_path)
    base_before = {k: v.clone() for k, v in policy.actor.get_base_model().state_dict().items() if "lora_" not in k}

    model.learn(total_timesteps=1_500)

    # base weights untouched, adapter moved
    for name, tensor in policy.actor.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert th.equal(tensor, base_before[name]), name
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    # the reference log-probs are the initial policy's, and the trained policy differs from them
    batch = generate_batch(policy, env, list(range(8)))
    gen_env = env.unwrapped
    with th.no_grad():
        ref = response_logprobs(
            kl.ref_model, batch.input_ids, batch.attention_mask, batch.response_length, 1.0, gen_env.n_actions
        )
        init = response_logprobs(
            initial, batch.input_ids, batch.attention_mask, batch.response_length, 1.0, gen_env.n_actions
        )
    mask = batch.response_mask
    th.testing.assert_close(ref[mask], init[mask], atol=1e-5, rtol=0)
    assert (batch.logprobs[mask] - init[mask]).abs().max() > 1e-3

    # the merged export loads in plain transformers and computes what the LoRA actor computes
    policy.save_pretrained(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with th.no_grad():
        merged_logprobs = response_logprobs(
            merged, batch.input_ids, batch.attention_mask, batch.response_length, 1.0, gen_env.n_actions
        )
    th.testing.assert_close(merged_logprobs[mask], batch.logprobs[mask], atol=1e-4, rtol=0)

    # SB3 save/load keeps the adapter
    model.save(tmp_path / "lora.zip")
    loaded = RLHFPPO.load(tmp_path / "lora.zip", env=env)
    for name, tensor in policy.state_dict().items():
        assert th.equal(tensor, loaded.policy.state_dict()[name]), name


def test_lora_dropout_is_off_so_ratio_starts_at_one(env, model_path):
    """peft puts an nn.Dropout in every adapted layer when lora_dropout > 0: the policy switches it off too, so
    that two passes in training mode agree and π/π_old is exactly 1 on the first PPO step."""
    th.manual_seed(0)
    policy = make_policy(env, model_path, lora=dict(r=4, lora_dropout=0.5))
    with th.no_grad():  # peft starts lora_B at zero, which would hide any dropout on the adapter's input
        for name, parameter in policy.actor.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    assert any(isinstance(m, th.nn.Dropout) for m in policy.actor.modules())  # peft's lora_dropout modules
    assert all(m.p == 0.0 for m in policy.actor.modules() if isinstance(m, th.nn.Dropout))
    batch = generate_batch(policy, env, [0, 1, 2, 3])
    policy.set_training_mode(True)
    args = (batch.input_ids, batch.attention_mask, batch.response_length)
    first, _, _ = policy.evaluate_sequences(*args)
    second, _, _ = policy.evaluate_sequences(*args)
    assert th.equal(first, second)
    ratio = th.exp(first - batch.logprobs)[batch.response_mask]
    th.testing.assert_close(ratio, th.ones_like(ratio), atol=1e-6, rtol=0)


def test_lora_actor_and_reference_run_the_lm_head_over_the_response_only(tokenizer, model_path, monkeypatch):
    from sb3_rlhf.common import forward

    policy = make_policy(rule_env(tokenizer), model_path, lora=dict(r=4))
    env = rule_env(tokenizer)
    batch = generate_batch(policy, env, [0, 1, 2, 3])
    positions: list[int] = []
    head = policy.actor.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[1]))
    reference = policy.make_reference_model()
    args = (batch.input_ids, batch.attention_mask, batch.response_length)
    logprobs, _, _ = policy.evaluate_sequences(*args)
    ref_logprobs = response_logprobs(reference, *args, 1.0, policy.n_actions)
    # the LM head saw the T + 1 last positions, not the prompt: peft passes logits_to_keep through
    assert positions == [batch.response_length + 1] * 2 and batch.input_ids.shape[1] > batch.response_length + 1
    # and the log-probs are those of the full forward
    monkeypatch.setattr(forward, "accepts_logits_to_keep", lambda model: False)
    full, _, _ = policy.evaluate_sequences(*args)
    full_ref = response_logprobs(reference, *args, 1.0, policy.n_actions)
    hook.remove()
    assert positions[2:] == [batch.input_ids.shape[1]] * 2
    th.testing.assert_close(logprobs, full, rtol=0, atol=1e-5)
    th.testing.assert_close(ref_logprobs, full_ref, rtol=0, atol=1e-5)
