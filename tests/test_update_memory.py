"""The update in bounded memory: micro-batches that add up to the minibatch's step, log-probs and entropy over the
vocabulary in chunks, the ``"auto"`` token budget, the fused optimizer."""

import pytest
import torch as th

from sb3_rlhf.buffers import SequenceBatch, split_minibatch
from sb3_rlhf.common import memory
from sb3_rlhf.common.memory import activation_bytes_per_token, check_micro_batch_tokens, micro_batch_tokens_for
from sb3_rlhf.common.sequences import entropy_from_logits, logprobs_and_entropy, logprobs_of_tokens
from sb3_rlhf.grpo import GRPO
from sb3_rlhf.p3o import P3O
from sb3_rlhf.ppo import RLHFPPO
from sb3_rlhf.rloo import RLOO
from tests.helpers import make_model, rule_env


def _batch(prompt_lengths, response_lengths, width_p=6, width_t=5):
    rows = len(prompt_lengths)
    attention = th.zeros(rows, width_p + width_t, dtype=th.long)
    response_mask = th.zeros(rows, width_t, dtype=th.bool)
    for i, (p, t) in enumerate(zip(prompt_lengths, response_lengths)):
        attention[i, width_p - p : width_p + t] = 1
        response_mask[i, :t] = True
    ids = th.arange(rows * (width_p + width_t)).view(rows, -1)
    per_token = th.arange(rows * width_t, dtype=th.float32).view(rows, width_t)
    return SequenceBatch(ids, attention, response_mask, per_token, None, per_token + 1, per_token + 2)


def test_split_minibatch_keeps_units_whole_and_within_the_budget():
    batch = _batch([2, 6, 3, 3, 1, 2], [5, 1, 2, 2, 4, 1])
    assert split_minibatch(batch, 66) == [batch]  # 6 rows × 11 tokens fit: no split, the same object
    pieces = split_minibatch(batch, 16, unit=2)
    # groups of two rows, each (rows × (longest prompt + longest response)) within 16 tokens unless alone
    assert [p.input_ids.shape for p in pieces] == [(2, 11), (2, 5), (2, 6)]
    assert th.equal(th.cat([p.input_ids[:, -p.response_mask.shape[1] :][p.response_mask] for p in pieces]),
                    batch.input_ids[:, -5:][batch.response_mask])  # fmt: skip
    # each piece trimmed to its own longest prompt (left) and response (right), every real token kept
    for piece, rows in zip(pieces, ([0, 1], [2, 3], [4, 5])):
        assert th.equal(piece.old_logprobs, batch.old_logprobs[rows, : piece.response_mask.shape[1]])
        assert piece.attention_mask.sum() == batch.attention_mask[rows].sum()
    singles = split_minibatch(batch, 1)  # a budget below one row: each row alone
    assert len(singles) == 6 and all(p.input_ids.shape[0] == 1 for p in singles)


ALGORITHMS = [
    (RLHFPPO, {"ent_coef": 0.05}),
    (RLHFPPO, {"policy_kwargs": {"value_head": "separate"}, "ent_coef": 0.05}),
    (GRPO, {"samples_per_prompt": 4, "estimator": "k3", "ent_coef": 0.5}),
    (RLOO, {"samples_per_prompt": 4, "loss_aggregation": "sequence", "ent_coef": 0.5}),
    (P3O, {"clipping": "joint", "ent_coef": 0.5}),
    (P3O, {"clipping": "separate", "ent_coef": 0.5}),
]
ALGORITHM_IDS = ["ppo", "ppo-separate", "grpo-sequence-mean", "rloo-sequence-mean", "p3o-joint", "p3o-separate"]


def _algorithm(cls, kwargs, tokenizer, model_path, **settings):
    """One of :data:`ALGORITHMS` on the rule task (an entropy bonus on: a per-token mean beside the per-sequence
    ones of the critic-free losses)."""
    settings = {**dict(learning_rate=1e-3, n_episodes=16, batch_size=8, n_epochs=2, seed=0), **settings}
    policy_kwargs = {"model_name_or_path": model_path, **kwargs.get("policy_kwargs", {})}
    extra = {k: v for k, v in kwargs.items() if k not in ("policy_kwargs", "estimator")}
    env = rule_env(tokenizer, estimator=kwargs.get("estimator", "k1"))
    return cls("TransformerActorCriticPolicy", env, policy_kwargs=policy_kwargs, **settings, **extra)


@pytest.mark.parametrize("cls,kwargs", ALGORITHMS, ids=ALGORITHM_IDS)
def test_micro_batches_add_up_to_the_minibatch_gradient_loss_and_diagnostics(tokenizer, model_path, cls, kwargs):
    """The gradient, the loss and every diagnostic (approx_kl, which the early stop reads, among them) of a
    minibatch split into micro-batches equal those of the whole minibatch, for every algorithm's mix of per-token
    and per-sequence (or per-pair) means."""
    model = _algorithm(cls, kwargs, tokenizer, model_path)
    model.learn(16)  # one rollout and its update: the buffer holds a rollout with advantages
    model.policy.set_training_mode(True)
    batch = next(model.rollout_buffer.get(8))
    micro_batches = split_minibatch(batch, 24, model.rollout_buffer._unit)
    assert len(micro_batches) > 1
    results = []
    for split in (False, True):
        model.policy.optimizer.zero_grad()
        if split:
            loss, metrics = model._accumulate_gradients(batch, micro_batches, 0.2)
        else:
            loss, metrics = model._minibatch_loss(batch, 0.2)
            loss.backward()
        grads = [p.grad.clone() for p in model.policy.parameters() if p.grad is not None]
        results.append((loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert th.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-7)
    assert metrics_a.keys() == metrics_b.keys() and "approx_kl" in metrics_a
    for key in metrics_a:
        assert th.allclose(metrics_a[key], metrics_b[key], rtol=1e-5, atol=1e-7), key
    assert len(grads_a) == len(grads_b) and any(g.abs().sum() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        assert th.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("cls,kwargs", ALGORITHMS[::2], ids=ALGORITHM_IDS[::2])
def test_micro_batches_take_the_minibatch_step(tokenizer, model_path, cls, kwargs):
    """End to end: the same weights after an update with and without the split (AdamW, clipping, two epochs)."""
    weights = []
    for micro_batch_tokens in (None, 24):
        model = _algorithm(cls, kwargs, tokenizer, model_path, micro_batch_tokens=micro_batch_tokens)
        splits = []
        accumulate = model._accumulate_gradients

        def counting(batch, micro_batches, clip_range):
            splits.append(len(micro_batches))
            return accumulate(batch, micro_batches, clip_range)

        model._accumulate_gradients = counting
        model.learn(16)  # one rollout, one update
        assert (bool(splits) and min(splits) > 1) == (micro_batch_tokens is not None)  # the split really happened
        weights.append({k: v.clone() for k, v in model.policy.state_dict().items()})
    before = make_model(rule_env(tokenizer), model_path).policy.actor.state_dict()
    assert any(not th.equal(before[k], weights[0]["actor." + k]) for k in before)  # the update moved the weights
    for name, tensor in weights[0].items():
        assert th.allclose(tensor, weights[1][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [th.float32, th.bfloat16])
def test_chunked_logprobs_and_entropy_equal_the_whole_computation(temperature, dtype):
    g = th.Generator().manual_seed(0)
    logits = (3 * th.randn(3, 7, 50, generator=g)).to(dtype).requires_grad_()
    tokens = th.randint(0, 50, (3, 7), generator=g)
    weights_lp, weights_ent = th.randn(3, 7, generator=g), th.randn(3, 7, generator=g)
    results = []
    for chunk_bytes in (None, 3 * 50 * 4 * 2):  # the default (one piece) and two positions per chunk
        logits.grad = None
        logprobs, entropy = logprobs_and_entropy(logits, tokens, temperature, chunk_bytes=chunk_bytes)
        ((logprobs * weights_lp).sum() + (entropy * weights_ent).sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), logits.grad.clone()))
    scaled = logits.detach().float() / temperature
    assert th.allclose(results[0][0], logprobs_of_tokens(scaled, tokens), atol=1e-6)
    assert th.allclose(results[0][1], entropy_from_logits(scaled), atol=1e-5)
    for whole, chunked in zip(results[0], results[1]):
        assert whole.dtype == chunked.dtype and th.allclose(whole, chunked, atol=1e-6)
    # no entropy gradient asked (ent_coef 0): entropy still computed, outside the graph; the log-probs' gradient alone
    grads = []
    for chunk_bytes in (None, 600):
        logits.grad = None
        logprobs, entropy = logprobs_and_entropy(
            logits, tokens, temperature, entropy_grad=False, chunk_bytes=chunk_bytes
        )
        assert logprobs.requires_grad and not entropy.requires_grad
        assert th.allclose(entropy, results[0][1], atol=1e-6)
        (logprobs * weights_lp).sum().backward()
        grads.append(logits.grad.clone())
    assert th.allclose(*grads, atol=1e-6) and not th.allclose(grads[0], results[0][2], atol=1e-3)


def test_the_chunked_update_is_the_whole_update(tokenizer, model_path):
    model = make_model(rule_env(tokenizer), model_path, n_episodes=8, batch_size=8, n_epochs=1, ent_coef=0.01)
    model.learn(8)
    policy = model.policy
    batch = next(model.rollout_buffer.get(8))
    grads = []
    for chunk_bytes in (None, 64):  # 64 bytes: one position per chunk
        policy.logits_chunk_bytes = chunk_bytes
        policy.optimizer.zero_grad()
        logprobs, values, entropy = policy.evaluate_sequences(batch.input_ids, batch.attention_mask, 6)
        (logprobs.sum() + entropy.sum() + values.sum()).backward()
        grads.append([p.grad.clone() for p in policy.parameters() if p.grad is not None])
    assert all(th.allclose(a, b, atol=1e-5) for a, b in zip(*grads))


def test_the_auto_budget_reads_free_gpu_memory(monkeypatch):
    per_token = activation_bytes_per_token(30, 576, 49152, th.bfloat16, 1536)
    # SmolLM2-135M in bf16: 30 × (16·576 + 2·1536) × 2 bytes per layer, and 49152 × (2 + 8) for the logits
    assert per_token == 30 * (16 * 576 + 2 * 1536) * 2 + 49152 * 10
    assert micro_batch_tokens_for(th.device("cpu"), per_token) is None
    monkeypatch.setattr(memory.th.cuda, "mem_get_info", lambda device: (40 * 2**30, 80 * 2**30))
    monkeypatch.setattr(memory.th.cuda, "memory_reserved", lambda device: 12 * 2**30)
    monkeypatch.setattr(memory.th.cuda, "memory_allocated", lambda device: 8 * 2**30)
    budget = micro_batch_tokens_for(th.device("cuda"), per_token)
    # free memory and what the caching allocator holds unused (12 - 8 GiB) are both available
    assert budget == int(44 * 2**30 * memory.AUTO_MEMORY_SHARE / per_token) and 20_000 < budget < 40_000
    # memory still to be allocated (gradients and Adam's moments before the first step) is not
    assert micro_batch_tokens_for(th.device("cuda"), per_token, reserved_bytes=4 * 2**30) == int(
        40 * 2**30 * memory.AUTO_MEMORY_SHARE / per_token
    )


def test_micro_batch_tokens_is_checked_where_it_is_read(tokenizer, model_path):
    assert check_micro_batch_tokens("auto") == "auto" and check_micro_batch_tokens(None) is None
    for bad in (0, -5, "256", 1.5, True):
        with pytest.raises(ValueError, match="micro_batch_tokens must be a positive integer, 'auto'"):
            make_model(rule_env(tokenizer), model_path, micro_batch_tokens=bad)
    model = make_model(rule_env(tokenizer), model_path)
    assert model.micro_batch_tokens == "auto" and model._micro_batch_token_budget() is None  # no split on a CPU


def test_fused_adamw_replaces_a_fresh_optimizer_only(tokenizer, model_path):
    model = make_model(rule_env(tokenizer), model_path)
    policy = model.policy
    params = [p for group in policy.optimizer.param_groups for p in group["params"]]
    assert policy.use_fused_optimizer()
    assert policy.optimizer.defaults["fused"] and [p for p in policy.optimizer.param_groups[0]["params"]] == params
    assert policy.optimizer.param_groups[0]["lr"] == 1e-3
    chosen = make_model(rule_env(tokenizer), model_path)
    chosen.policy.optimizer_kwargs = {"foreach": False}  # the user's own choice stays
    assert not chosen.policy.use_fused_optimizer() and not chosen.policy.optimizer.defaults.get("fused")


def test_mixed_precision_keeps_float32_weights_and_computes_in_bf16(tokenizer, model_path, tmp_path):
    env = rule_env(tokenizer)
    settings = dict(learning_rate=1e-3, n_episodes=8, batch_size=8, n_epochs=1, seed=0)
    mixed = RLHFPPO(
        "TransformerActorCriticPolicy",
        env,
        policy_kwargs=dict(model_name_or_path=model_path, mixed_precision="bf16"),
        **settings,
    )
    plain = make_model(rule_env(tokenizer), model_path, **settings)
    batch, _ = mixed.rollout_engine.sample_episodes(mixed.policy, env.unwrapped, list(range(8)), with_values=False)
    real = batch.response_mask
    with th.no_grad():
        bf16, _, _ = mixed.policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
        fp32, _, _ = plain.policy.evaluate_sequences(batch.input_ids, batch.attention_mask, batch.response_length)
    # computed in bf16 (not the float32 numbers), close to them, and the old log-probs are the teacher-forced
    # bf16 ones (not generate()'s KV-cached pass)
    assert not th.equal(bf16[real], fp32[real]) and th.allclose(bf16[real], fp32[real], atol=0.1)
    assert th.equal(batch.logprobs[real], bf16[real])
    mixed.learn(16)
    assert all(p.dtype == th.float32 for p in mixed.policy.parameters())  # the master weights
    assert th.isfinite(th.tensor(mixed.logger.name_to_value["train/loss"]))
    mixed.save(tmp_path / "mixed.zip")
    assert RLHFPPO.load(tmp_path / "mixed.zip", env=env).policy.mixed_precision == "bf16"


def test_mixed_precision_is_checked_where_it_is_read(tokenizer, model_path):
    with pytest.raises(ValueError, match="mixed_precision must be 'bf16' or None"):
        RLHFPPO(
            "TransformerActorCriticPolicy",
            rule_env(tokenizer),
            policy_kwargs=dict(model_name_or_path=model_path, mixed_precision="fp16"),
        )
    with pytest.raises(ValueError, match="leave dtype unset"):
        RLHFPPO(
            "TransformerActorCriticPolicy",
            rule_env(tokenizer),
            policy_kwargs=dict(model_name_or_path=model_path, mixed_precision="bf16", dtype="bfloat16"),
        )
