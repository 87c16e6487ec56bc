"""Padding-free packing of the teacher-forced passes: the episodes of a batch run as one row without their padding,
the attention kept within each episode by the position ids; the same log-probs, values, entropies and gradients as
the padded batch."""

import pytest
import torch as th

from sb3_rlhf import RLHFPPO, TransformerActorCriticPolicy
from sb3_rlhf.common.forward import VARLEN_ATTENTION, packed_layout
from tests.helpers import generate_batch, make_model, make_policy, rule_env


def test_packed_layout_drops_padding_and_maps_the_last_columns():
    # row 0: prompt of 2 (left-padded by 1), response of 2 then padding; row 1: prompt of 3, response of 3
    mask = th.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    positions, index = packed_layout(mask, 4)
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]  # restarting at 0: two sequences
    # the last 4 columns: row 0's are its tokens 1..3 and, for the padding after them, its last token (3)
    assert index.tolist() == [[1, 2, 3, 3], [6, 7, 8, 9]]


@pytest.mark.parametrize(
    "model,kwargs",
    [
        ("llama", {}),
        ("llama", {"value_head": "separate"}),
        ("llama", {"lora": {"r": 4}}),
        ("llama", {"temperature": 0.7, "top_k": 6}),
        ("llama", {"attn_implementation": "eager", "value_head": "separate"}),
        ("gpt2", {}),
    ],
    ids=["llama", "llama-separate-critic", "llama-lora", "llama-top-k", "llama-eager", "gpt2"],
)
def test_packed_passes_equal_the_padded_ones(env, model_path, gpt2_path, model, kwargs):
    path = model_path if model == "llama" else gpt2_path
    results = []
    batch = None
    for pack in (False, True):
        th.manual_seed(0)
        policy = make_policy(env, path, pack_sequences=pack, **kwargs)
        for p in policy.parameters():  # LoRA's B starts at 0: make the adapter count
            if p.requires_grad and not p.any():
                th.nn.init.normal_(p, std=0.1)
        assert policy.packed == pack
        if batch is None:
            batch = generate_batch(policy, env, list(range(8)))
            lengths = batch.lengths
            assert lengths.min() < lengths.max() or (~batch.prompt_mask.bool()).any()  # there is padding to drop
        policy.optimizer.zero_grad()
        logprobs, values, entropy = policy.evaluate_sequences(
            batch.input_ids, batch.attention_mask, batch.response_length
        )
        real = batch.response_mask
        states = th.cat([th.ones_like(real[:, :1]), real], dim=1)  # V(s_0)..V(s_T) of the real states
        (logprobs[real].sum() + entropy[real].sum() + values[states].sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((logprobs[real], entropy[real], values[states], grads))
    (lp_a, ent_a, val_a, grads_a), (lp_b, ent_b, val_b, grads_b) = results
    assert th.allclose(lp_a, lp_b, atol=1e-5) and th.allclose(ent_a, ent_b, atol=1e-5)
    assert th.allclose(val_a, val_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:  # float rounding relative to each gradient's size (the losses are sums, not means)
        error = (grads_a[name] - grads_b[name]).norm() / grads_a[name].norm().clamp(min=1e-12)
        assert error < 1e-5, (name, error)


def test_without_position_ids_the_packed_rows_would_mix(env, model_path):
    """The equality above is not vacuous: packed rows attend to each other unless the position ids restart."""
    policy = make_policy(env, model_path)
    batch = generate_batch(policy, env, list(range(4)))
    mask = batch.attention_mask.bool()
    packed = batch.input_ids[mask].unsqueeze(0)
    with th.no_grad():
        continuous = policy.actor(input_ids=packed, attention_mask=None).logits[0]
        padded = policy.actor(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
    second_row = slice(int(mask[0].sum()), int(mask[:2].sum()))
    assert not th.allclose(continuous[second_row], padded[second_row], atol=1e-3)


def test_a_packed_update_takes_the_padded_step(tokenizer, model_path):
    weights = []
    for pack in (False, True):
        model = RLHFPPO(
            TransformerActorCriticPolicy,
            rule_env(tokenizer),
            learning_rate=1e-3,
            n_episodes=16,
            batch_size=8,
            n_epochs=2,
            seed=0,
            policy_kwargs=dict(model_name_or_path=model_path, pack_sequences=pack),
        )
        model.learn(16)
        weights.append({k: v.clone() for k, v in model.policy.state_dict().items()})
    moved = make_model(rule_env(tokenizer), model_path).policy.state_dict()
    assert any(not th.equal(moved[k], weights[0][k]) for k in moved if "value_head" not in k)
    for name, tensor in weights[0].items():
        assert th.allclose(tensor, weights[1][name], rtol=1e-4, atol=1e-6), name


def test_auto_packs_with_variable_length_kernels_only(env, model_path, monkeypatch):
    from sb3_rlhf import policies

    policy = make_policy(env, model_path)
    assert policy.pack_sequences == "auto" and not policy.packed  # sdpa: a block-diagonal mask would cost L²
    # as if the actor ran flash-attention (not installed here): the probe itself still runs the model's sdpa
    monkeypatch.setattr(policies, "attention_implementation", lambda model: VARLEN_ATTENTION[0])
    assert policy.packed
    with pytest.raises(ValueError, match="pack_sequences must be True, False or 'auto'"):
        make_policy(env, model_path, pack_sequences="yes")


def test_models_that_mix_packed_rows_are_found_and_refused(env, model_path, gpt2_path, tokenizer, monkeypatch):
    """OPT builds its attention mask without the position ids: packed episodes would attend to each other. The
    probe finds it (and finds Llama and GPT-2 sound); pack_sequences=True then refuses it with the fix, and "auto"
    does not pack it even with a variable-length kernel."""
    from transformers import OPTConfig, OPTForCausalLM

    from sb3_rlhf.common.forward import _rows_stay_apart, packing_supported

    opt_config = OPTConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
        max_position_embeddings=64, word_embed_proj_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )  # fmt: skip
    assert not _rows_stay_apart(OPTForCausalLM(opt_config).eval())
    assert packing_supported(make_policy(env, model_path).actor)
    assert packing_supported(make_policy(env, gpt2_path).actor)
    with pytest.raises(ValueError, match="does not keep packed episodes apart.*set pack_sequences=False"):
        TransformerActorCriticPolicy(
            env.observation_space, env.action_space, lambda _: 1e-3, model_config=opt_config.to_dict(),
            pack_sequences=True,
        )  # fmt: skip
    policy = TransformerActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 1e-3, model_config=opt_config.to_dict()
    )
    from sb3_rlhf import policies

    # as if OPT ran a variable-length kernel: "auto" still does not pack a model that mixes the rows
    monkeypatch.setattr(policies, "attention_implementation", lambda model: VARLEN_ATTENTION[0])
    assert not policy.packed


def test_the_attention_implementation_reaches_every_model_and_the_zip(tokenizer, model_path, tmp_path):
    env = rule_env(tokenizer)
    model = RLHFPPO(
        TransformerActorCriticPolicy,
        env,
        n_episodes=8,
        batch_size=8,
        policy_kwargs=dict(model_name_or_path=model_path, value_head="separate", attn_implementation="eager"),
    )
    policy = model.policy
    reference = policy.make_reference_model()
    for built in (policy.actor, policy.critic, reference):
        assert built.config._attn_implementation == "eager"
    model.save(tmp_path / "eager.zip")
    loaded = RLHFPPO.load(tmp_path / "eager.zip", env=env)
    assert loaded.policy.actor.config._attn_implementation == "eager"
