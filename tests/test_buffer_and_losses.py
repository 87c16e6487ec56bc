import math

import pytest
import torch as th
from gymnasium import spaces

from sb3_rlhf.buffers import GroupRolloutBuffer, SequenceRolloutBuffer
from sb3_rlhf.common.sequences import masked_mean, masked_whiten, response_mask_until_stop
from sb3_rlhf.ppo.losses import ppo_losses


def filled_buffer(bootstrap_truncated: bool, garbage: float | None = None) -> SequenceRolloutBuffer:
    """Two episodes; with ``garbage``, episode B comes padded to width 3 with that value where it has no token."""
    space = spaces.Dict({"input_ids": spaces.Box(0, 9, (4,), dtype=int)})
    buffer = SequenceRolloutBuffer(
        2, space, spaces.Discrete(10), device="cpu", gamma=0.9, gae_lambda=0.8, bootstrap_truncated=bootstrap_truncated
    )
    # episode A: prompt of 2, 3 response tokens ending in EOS (terminated)
    buffer.add(
        prompt_ids=th.tensor([[5, 6]]),
        prompt_mask=th.tensor([[1, 1]]),
        response_ids=th.tensor([[7, 8, 1]]),
        response_mask=th.tensor([[True, True, True]]),
        logprobs=th.tensor([[-1.0, -1.0, -1.0]]),
        values=th.tensor([[0.5, 0.6, 0.7, 0.9]]),
        rewards=th.tensor([[0.0, 0.0, 1.0]]),
        terminated=th.tensor([True]),
    )
    # episode B, another chunk with other widths: prompt of 1, 2 response tokens, cut off (truncated)
    pad = [] if garbage is None else [garbage]
    buffer.add(
        prompt_ids=th.tensor([[4]]),
        prompt_mask=th.tensor([[1]]),
        response_ids=th.tensor([[3, 3] + [0] * len(pad)]),
        response_mask=th.tensor([[True, True] + [False] * len(pad)]),
        logprobs=th.tensor([[-2.0, -2.0] + pad]),
        values=th.tensor([[0.1, 0.2, 0.4] + pad]),  # V(s_2) = 0.4 is real: the bootstrap value
        rewards=th.tensor([[0.5, -0.2] + pad]),
        terminated=th.tensor([False]),
    )
    return buffer


def test_gae_against_hand_computed_example():
    buffer = filled_buffer(bootstrap_truncated=False)
    buffer.compute_returns_and_advantage(normalize_advantage=False)
    # A: δ2 = 1 − 0.7 = 0.3; δ1 = 0.9·0.7 − 0.6 = 0.03; δ0 = 0.9·0.6 − 0.5 = 0.04; γλ = 0.72
    a2 = 0.3
    a1 = 0.03 + 0.72 * a2
    a0 = 0.04 + 0.72 * a1
    # B (truncated, no bootstrap): δ1 = −0.2 − 0.2; δ0 = 0.5 + 0.9·0.2 − 0.1
    b1 = -0.4
    b0 = 0.58 + 0.72 * b1
    expected = th.tensor([[a0, a1, a2], [b0, b1, 0.0]])
    th.testing.assert_close(buffer.advantages, expected)
    th.testing.assert_close(
        buffer.returns, (expected + th.tensor([[0.5, 0.6, 0.7], [0.1, 0.2, 0.0]])) * buffer.response_mask
    )
    # merged layout: prompts left-padded, responses right-padded
    assert buffer.prompt_ids.tolist() == [[5, 6], [0, 4]]
    assert buffer.response_mask.tolist() == [[True, True, True], [True, True, False]]


def test_gae_bootstraps_truncated_only_when_asked():
    buffer = filled_buffer(bootstrap_truncated=True)
    buffer.compute_returns_and_advantage(normalize_advantage=False)
    b1 = -0.2 + 0.9 * 0.4 - 0.2
    b0 = 0.58 + 0.72 * b1
    th.testing.assert_close(buffer.advantages[1, :2], th.tensor([b0, b1]))
    # the terminated episode is unaffected: V(s_T) after EOS never counts
    assert buffer.advantages[0, 2].item() == pytest.approx(0.3)


def test_whitening_and_minibatches_ignore_padding():
    buffer = filled_buffer(bootstrap_truncated=False)
    buffer.compute_returns_and_advantage(normalize_advantage=True)
    mask = buffer.response_mask
    assert masked_mean(buffer.advantages, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_mean(buffer.advantages**2, mask).item() == pytest.approx(1.0, abs=1e-5)
    assert buffer.advantages[1, 2].item() == 0.0
    th.manual_seed(0)
    batches = list(buffer.get(batch_size=1))
    assert len(batches) == 2
    by_length = sorted(batches, key=lambda b: b.response_mask.shape[1])
    short = by_length[0]
    # the short episode's minibatch is trimmed to its own prompt and response
    assert short.input_ids.tolist() == [[4, 3, 3]]
    assert short.attention_mask.tolist() == [[1, 1, 1]]
    assert short.old_values.tolist()[0] == pytest.approx([0.1, 0.2])


def random_length_buffer(n: int, group_size: int = 1, seed: int = 0) -> SequenceRolloutBuffer:
    """``n`` episodes with random prompt (1-6) and response (1-10) lengths, added in chunks of 4."""
    g = th.Generator().manual_seed(seed)
    space = spaces.Dict({"input_ids": spaces.Box(0, 9, (6,), dtype=int)})
    if group_size > 1:
        buffer = GroupRolloutBuffer(n, space, spaces.Discrete(10), device="cpu", group_size=group_size)
    else:
        buffer = SequenceRolloutBuffer(n, space, spaces.Discrete(10), device="cpu")
    for _ in range(n // 4):
        prompt_lengths = th.randint(1, 7, (4,), generator=g)
        response_lengths = th.randint(1, 11, (4,), generator=g)
        prompt_mask = (th.arange(6) >= 6 - prompt_lengths.unsqueeze(-1)).long()
        response_mask = th.arange(10) < response_lengths.unsqueeze(-1)
        buffer.add(
            prompt_ids=th.randint(2, 10, (4, 6), generator=g) * prompt_mask,
            prompt_mask=prompt_mask,
            response_ids=th.randint(2, 10, (4, 10), generator=g) * response_mask,
            response_mask=response_mask,
            logprobs=-th.rand(4, 10, generator=g) * response_mask,
            values=th.rand(4, 11, generator=g),
            rewards=th.rand(4, 10, generator=g) * response_mask,
            terminated=th.zeros(4, dtype=th.bool),
        )
    if group_size > 1:
        buffer.compute_group_advantages(lambda r: r - r.mean(-1, keepdim=True))
    else:
        buffer.compute_returns_and_advantage()
    return buffer


@pytest.mark.parametrize("group_size", [1, 4])
def test_token_budgeted_minibatches_respect_the_budget_and_cover_every_episode(group_size):
    buffer = random_length_buffer(32, group_size)
    th.manual_seed(0)
    fixed = list(buffer.get(batch_size=8))
    assert [b.input_ids.shape[0] for b in fixed] == [8, 8, 8, 8]
    widest = max(b.input_ids.numel() for b in fixed)
    budget = 60
    assert budget < widest  # the budget binds
    th.manual_seed(0)
    budgeted = list(buffer.get(batch_size=8, max_tokens=budget))
    assert len(budgeted) > len(fixed)
    seen = []
    for batch in budgeted:
        rows = batch.input_ids.shape[0]
        assert rows <= 8 and rows % group_size == 0
        # the forward sees exactly rows × (longest prompt + longest response) tokens, within budget
        assert batch.input_ids.numel() <= budget or rows == group_size
        # match each row back to its episode by its advantages and old log-probs
        for row in range(rows):
            length = int(batch.response_mask[row].sum())
            key = tuple(batch.old_logprobs[row, :length].tolist())
            seen.append(key)
    episodes = [tuple(buffer.logprobs[i, : int(buffer.response_mask[i].sum())].tolist()) for i in range(32)]
    assert sorted(seen) == sorted(episodes)  # each episode exactly once per epoch
    if group_size > 1:  # groups stay whole: consecutive rows of a minibatch come from one group
        for batch in budgeted:
            sequence_advantages = batch.advantages[:, 0].view(-1, group_size)
            assert th.allclose(sequence_advantages.sum(-1), th.zeros(len(sequence_advantages)), atol=1e-5)
    # a budget smaller than any single unit still yields every unit, one per minibatch
    th.manual_seed(0)
    assert len(list(buffer.get(batch_size=8, max_tokens=1))) == 32 // group_size


def test_response_mask_until_stop():
    ids = th.tensor([[4, 1, 0, 0], [4, 5, 6, 7], [1, 0, 0, 0]])
    mask, terminated = response_mask_until_stop(ids, (1,))
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert terminated.tolist() == [True, False, True]


def test_masked_whiten_zeros_padding():
    x = th.tensor([[1.0, 2.0, 100.0]])
    m = th.tensor([[True, True, False]])
    assert masked_whiten(x, m).tolist()[0] == pytest.approx([-1.0, 1.0, 0.0], abs=1e-4)


def test_ppo_loss_against_hand_computed_example():
    mask = th.tensor([[True, True, False]])
    old_logprobs = th.zeros(1, 3)
    logprobs = th.log(th.tensor([[1.5, 0.9, 1.0]])).requires_grad_()
    advantages = th.tensor([[1.0, -2.0, 5.0]])
    values = th.tensor([[1.0, 2.0, 9.0]])
    old_values = th.tensor([[0.5, 2.5, 0.0]])
    returns = th.tensor([[2.0, 2.0, 0.0]])
    entropy = th.tensor([[0.5, 1.5, 100.0]])
    losses = ppo_losses(
        logprobs, old_logprobs, advantages, values, old_values, returns, entropy, mask, 0.2, 0.2, 0.01, 0.5
    )
    # token 0: max(−1·1.5, −1·1.2) = −1.2; token 1: max(2·0.9, 2·0.9) = 1.8
    assert losses.pg_loss.item() == pytest.approx((-1.2 + 1.8) / 2)
    # token 0: max((1−2)², (0.5+0.2−2)²) = 1.69; token 1: max(0, (2.5−0.2−2)²) = 0.09
    assert losses.value_loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert losses.entropy_loss.item() == pytest.approx(-1.0)
    assert losses.loss.item() == pytest.approx(0.3 - 0.01 + 0.5 * 0.445)
    kl0 = 0.5 - math.log(1.5)
    kl1 = -0.1 - math.log(0.9)
    assert losses.approx_kl == pytest.approx((kl0 + kl1) / 2)
    assert losses.clip_fraction == pytest.approx(0.5)
    losses.pg_loss.backward()
    # clipped token: no gradient; unclipped: d/dlogp[−A·r/2] = −A·r/2 = 0.9; masked token: none
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, 0.9, 0.0])

    unclipped = ppo_losses(
        logprobs, old_logprobs, advantages, values, old_values, returns, entropy, mask, 0.2, None, 0.0, 1.0
    )
    assert unclipped.value_loss.item() == pytest.approx(0.5 * (1.0 + 0.0) / 2)


def test_ppo_losses_and_gradients_ignore_extreme_and_nan_values_at_padding():
    mask = th.tensor([[True, True, False, False], [True, True, True, False]])
    g = th.Generator().manual_seed(0)
    clean = {name: th.randn(2, 4, generator=g) * mask for name in ("old_logprobs", "advantages", "values", "returns")}
    clean["old_values"] = clean["values"] + 0.3 * mask
    clean["entropy"] = th.rand(2, 4, generator=g) * mask
    clean_logprobs = -th.rand(2, 4, generator=g) * mask
    dirty = {name: th.where(mask, value, th.tensor(math.nan)) for name, value in clean.items()}
    # log-ratios of ±2e4 at padding: exp overflows to inf there (and to 0), as stale garbage in a padded row can
    dirty["old_logprobs"] = th.where(mask, clean["old_logprobs"], th.tensor([[-1e4, 1e4], [-1e4, 1e4]]).repeat(1, 2))
    dirty_logprobs = th.where(mask, clean_logprobs, th.tensor([[1e4, -1e4], [1e4, -1e4]]).repeat(1, 2))

    results = []
    for logprobs, tensors in ((clean_logprobs, clean), (dirty_logprobs, dirty)):
        logprobs = logprobs.clone().requires_grad_()
        values = tensors["values"].clone().requires_grad_()
        losses = ppo_losses(
            logprobs,
            tensors["old_logprobs"],
            tensors["advantages"],
            values,
            tensors["old_values"],
            tensors["returns"],
            tensors["entropy"],
            mask,
            clip_range=0.2,
            clip_range_vf=0.2,
            ent_coef=0.01,
            vf_coef=0.5,
        )
        losses.loss.backward()
        results.append((losses, logprobs.grad, values.grad))
    (clean_losses, clean_lp_grad, clean_v_grad), (dirty_losses, dirty_lp_grad, dirty_v_grad) = results
    for field in ("loss", "pg_loss", "value_loss", "entropy_loss"):
        assert th.isfinite(getattr(dirty_losses, field)), field
        th.testing.assert_close(getattr(dirty_losses, field), getattr(clean_losses, field))
    assert dirty_losses.approx_kl == pytest.approx(clean_losses.approx_kl)
    assert dirty_losses.clip_fraction == pytest.approx(clean_losses.clip_fraction)
    assert th.isfinite(dirty_lp_grad).all() and th.isfinite(dirty_v_grad).all()
    th.testing.assert_close(dirty_lp_grad, clean_lp_grad)
    th.testing.assert_close(dirty_v_grad, clean_v_grad)
    assert th.equal(dirty_lp_grad[~mask], th.zeros(3))


@pytest.mark.parametrize("bootstrap_truncated", [False, True])
@pytest.mark.parametrize("garbage", [math.nan, math.inf, -1e30])
def test_gae_ignores_nan_and_inf_at_padded_positions(bootstrap_truncated, garbage):
    clean = filled_buffer(bootstrap_truncated)
    clean.compute_returns_and_advantage(normalize_advantage=True)
    dirty = filled_buffer(bootstrap_truncated, garbage=garbage)
    dirty.compute_returns_and_advantage(normalize_advantage=True)
    assert th.isfinite(dirty.advantages).all() and th.isfinite(dirty.returns).all()
    th.testing.assert_close(dirty.advantages, clean.advantages)
    th.testing.assert_close(dirty.returns, clean.returns)


def test_group_buffer_ignores_nan_rewards_at_padded_positions():
    space = spaces.Dict({"input_ids": spaces.Box(0, 9, (4,), dtype=int)})
    buffers = []
    for pad in (0.0, math.nan):
        buffer = GroupRolloutBuffer(2, space, spaces.Discrete(10), device="cpu", group_size=2)
        buffer.add(
            prompt_ids=th.tensor([[5], [5]]),
            prompt_mask=th.ones(2, 1, dtype=th.long),
            response_ids=th.tensor([[7, 1], [8, 0]]),
            response_mask=th.tensor([[True, True], [True, False]]),
            logprobs=th.tensor([[-1.0, -1.0], [-1.0, pad]]),
            values=th.zeros(2, 3),
            rewards=th.tensor([[0.0, 1.0], [0.25, pad]]),
            terminated=th.tensor([True, False]),
        )
        buffer.compute_group_advantages(lambda r: r - r.mean(-1, keepdim=True), normalize_advantage=True)
        buffers.append(buffer)
    clean, dirty = buffers
    assert dirty.sequence_returns.tolist() == [1.0, 0.25]
    th.testing.assert_close(dirty.advantages, clean.advantages)
    th.testing.assert_close(dirty.returns, clean.returns)
    assert dirty.advantages[1, 1].item() == 0.0
