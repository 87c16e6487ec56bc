"""The losses of P3O, GRPO, RLOO and DPO against hand-computed examples."""

import math

import pytest
import torch as th

from sb3_rlhf.dpo.losses import dpo_loss
from sb3_rlhf.grpo.losses import group_normalized_advantages, grpo_losses
from sb3_rlhf.p3o.losses import p3o_loss, pairwise_reward_difference
from sb3_rlhf.rloo.losses import leave_one_out_advantages


def test_pairwise_difference_is_invariant_to_a_per_prompt_shift():
    rewards = th.tensor([[1.0, 0.25], [-2.0, 3.0], [0.5, 0.5]])
    shift = th.tensor([[10.0], [-4.0], [7.5]])  # one constant per prompt (row)
    delta = pairwise_reward_difference(rewards)
    assert th.equal(delta, th.tensor([[0.75, -0.75], [-5.0, 5.0], [0.0, -0.0]]))
    assert th.allclose(pairwise_reward_difference(rewards + shift), delta)
    # invariant, not blind: raising one response's reward raises its Δ by as much and lowers its partner's
    bump = th.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    moved = pairwise_reward_difference(rewards + bump) - delta
    assert th.allclose(moved, th.tensor([[1.0, -1.0], [0.0, 0.0], [-2.0, 2.0]]))


def test_p3o_loss_hand_computed_inside_the_clip_region():
    logprobs = th.tensor([[-1.0, -2.0]], requires_grad=True)
    old = th.tensor([[-1.05, -1.95]])  # log ρ = [0.05, −0.05], ρ1·ρ2 = 1
    delta = th.tensor([2.0])
    for clipping in ("separate", "joint"):
        losses = p3o_loss(logprobs, old, delta, clip_range=0.2, weight_clip=2.0, clipping=clipping)
        # separate: −½(2·0.05 + (−2)(−0.05)) = −0.1;  joint: −½·2·(0.05 − (−0.05)) = −0.1
        assert losses.loss.item() == pytest.approx(-0.1, abs=1e-6)
        assert losses.clip_fraction == 0.0
        (grad,) = th.autograd.grad(losses.loss, logprobs)
        # the pairwise policy gradient: −½Δ·(∇log π(y1) − ∇log π(y2))
        assert th.allclose(grad, th.tensor([[-1.0, 1.0]]))


def test_p3o_separate_and_joint_clipping_differ_as_written():
    logprobs = th.tensor([[-0.5, -2.1]], requires_grad=True)
    old = th.tensor([[-1.0, -2.0]])  # log ρ1 = 0.5 (outside ε = 0.2), log ρ2 = −0.1
    w = math.exp(0.4)  # ρ1·ρ2, inside [1/2, 2]
    delta = th.tensor([2.0])

    separate = p3o_loss(logprobs, old, delta, 0.2, 2.0, "separate")
    # y1: min(2·0.5, 2·0.2) = 0.4 (clipped);  y2: min(−2·(−0.1), −2·(−0.1)) = 0.2
    assert separate.loss.item() == pytest.approx(-w * (0.4 + 0.2) / 2, rel=1e-6)
    assert separate.clip_fraction == 0.5
    (grad,) = th.autograd.grad(separate.loss, logprobs)
    assert grad[0, 0].item() == 0.0  # the clipped response gets no gradient
    assert grad[0, 1].item() == pytest.approx(w * 2.0 / 2, rel=1e-6)  # −(w/2)·(−Δ)

    joint = p3o_loss(logprobs, old, delta, 0.2, 2.0, "joint")
    # log(ρ1/ρ2) = 0.6 → min(2·0.6, 2·0.2) = 0.4, and the whole pair stops
    assert joint.loss.item() == pytest.approx(-w * 0.4 / 2, rel=1e-6)
    (grad,) = th.autograd.grad(joint.loss, logprobs)
    assert th.equal(grad, th.zeros_like(grad))

    # a negative Δ: the pessimistic bound keeps the unclipped (worse) term for y1
    negative = p3o_loss(logprobs, old, -delta, 0.2, 2.0, "separate")
    assert negative.loss.item() == pytest.approx(-w * (-1.0 + -0.2) / 2, rel=1e-6)


def test_p3o_importance_weight_is_clipped_to_one_over_c_and_c():
    old = th.tensor([[-1.0, -1.0]])
    delta = th.tensor([1.0])
    high = p3o_loss(th.tensor([[0.0, -1.0]]), old, delta, 10.0, 2.0, "joint")  # ρ1·ρ2 = e > 2
    assert high.loss.item() == pytest.approx(-2.0 * 1.0 / 2, rel=1e-6) and high.weight_clip_fraction == 1.0
    low = p3o_loss(th.tensor([[-2.0, -1.0]]), old, delta, 10.0, 2.0, "joint")  # ρ1·ρ2 = 1/e < 1/2
    assert low.loss.item() == pytest.approx(-0.5 * (-1.0) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="clipping"):
        p3o_loss(old, old, delta, 0.2, 2.0, "both")


def test_rloo_and_grpo_advantages_hand_computed():
    returns = th.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    assert th.allclose(leave_one_out_advantages(returns), th.tensor([[-1.5, 0.0, 1.5], [0.0, 0.0, 0.0]]))
    grpo = group_normalized_advantages(returns, eps=0.0)
    assert th.allclose(grpo[0], th.tensor([-1.0, 0.0, 1.0]))  # unbiased std of (1, 2, 3) is 1
    assert th.equal(group_normalized_advantages(returns)[1], th.zeros(3))  # equal scores: no signal
    shifted = returns + th.tensor([[100.0], [-3.0]])
    assert th.allclose(leave_one_out_advantages(shifted), leave_one_out_advantages(returns), atol=1e-5)
    with pytest.raises(ValueError, match="two samples"):
        leave_one_out_advantages(th.ones(4, 1))


def test_grpo_loss_hand_computed_with_k3_in_the_loss():
    logprobs = th.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    old = logprobs.detach().clone()  # ratio 1
    ref = th.tensor([[-1.5, -1.5, 0.0], [-1.0, -1.0, 0.0]])
    mask = th.tensor([[True, True, False], [True, False, False]])
    advantages = th.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]]) * mask
    k3 = [math.expm1(-0.5) + 0.5, math.expm1(0.5) - 0.5]  # log(π_ref/π) = −0.5, +0.5
    losses = grpo_losses(logprobs, old, ref, advantages, mask, 0.2, kl_coef=0.1, aggregation="sequence")
    # per sequence: pg −1 (seq 1), +2 (seq 2), then the mean over sequences
    assert losses.pg_loss.item() == pytest.approx((-1.0 + 2.0) / 2, rel=1e-6)
    assert losses.kl_loss.item() == pytest.approx((sum(k3) / 2 + 0.0) / 2, rel=1e-5)
    assert losses.loss.item() == pytest.approx(0.5 + 0.1 * sum(k3) / 4, rel=1e-5)
    token = grpo_losses(logprobs, old, ref, advantages, mask, 0.2, kl_coef=0.1, aggregation="token")
    assert token.pg_loss.item() == pytest.approx((-1.0 - 1.0 + 2.0) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="k3"):
        grpo_losses(logprobs, old, ref, advantages, mask, 0.2, 0.1, kl_estimator="k1")


def test_dpo_sigmoid_and_ipo_losses_hand_computed():
    chosen, rejected = th.tensor([-1.0]), th.tensor([-2.0])
    ref_chosen, ref_rejected = th.tensor([-1.5]), th.tensor([-1.5])  # h = 0.5 − (−0.5) = 1
    losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    assert losses.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))), rel=1e-6)
    assert losses.chosen_rewards.item() == pytest.approx(0.05) and losses.rejected_rewards.item() == pytest.approx(
        -0.05
    )
    smoothed = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, label_smoothing=0.2)
    expected = -0.8 * math.log(1 / (1 + math.exp(-0.1))) - 0.2 * math.log(1 / (1 + math.exp(0.1)))
    assert smoothed.loss.item() == pytest.approx(expected, rel=1e-6)
    ipo = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="ipo")
    assert ipo.loss.item() == pytest.approx((1 - 1 / 0.2) ** 2)
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta must be > 0"):
            dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="hinge2")


def _padded_batch(garbage: bool):
    """Two responses of 2 and 3 tokens in width 4; with ``garbage``, padded positions hold extreme log-ratios
    (log π − log π_old = 1e4 and log π_ref − log π = 2e4: exp overflows to inf) and NaN advantages, as nothing
    guarantees what padding holds."""
    mask = th.tensor([[True, True, False, False], [True, True, True, False]])
    logprobs = th.tensor([[-1.0, -0.5, 0.0, 0.0], [-2.0, -0.3, -0.7, 0.0]])
    old = th.tensor([[-1.1, -0.4, 0.0, 0.0], [-1.9, -0.3, -0.9, 0.0]])
    ref = th.tensor([[-0.8, -0.6, 0.0, 0.0], [-2.2, -0.1, -0.7, 0.0]])
    advantages = th.tensor([[1.0], [-0.5]]) * mask
    if garbage:
        logprobs = th.where(mask, logprobs, th.tensor(-1e4))
        old = th.where(mask, old, th.tensor(-2e4))
        ref = th.where(mask, ref, th.tensor(1e4))
        advantages = th.where(mask, advantages, th.tensor(math.nan))
    return logprobs.requires_grad_(), old, ref, advantages, mask


@pytest.mark.parametrize("estimator", ["k3", "k2"])
@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_grpo_loss_and_gradient_ignore_extreme_log_ratios_at_padding(estimator, aggregation):
    results = []
    for garbage in (False, True):
        logprobs, old, ref, advantages, mask = _padded_batch(garbage)
        losses = grpo_losses(logprobs, old, ref, advantages, mask, 0.2, 0.1, estimator, aggregation)
        (grad,) = th.autograd.grad(losses.loss, logprobs)
        results.append((losses, grad))
    (clean, clean_grad), (dirty, dirty_grad) = results
    assert th.isfinite(dirty.loss) and th.isfinite(dirty.kl_loss) and th.isfinite(dirty_grad).all()
    th.testing.assert_close(dirty.loss, clean.loss)
    th.testing.assert_close(dirty.kl_loss, clean.kl_loss)
    assert dirty.approx_kl == pytest.approx(clean.approx_kl) and dirty.clip_fraction == clean.clip_fraction
    th.testing.assert_close(dirty_grad, clean_grad)
    assert clean.kl_loss.item() > 0 and clean_grad.abs().sum() > 0  # the comparison is not 0 == 0


@pytest.mark.parametrize("algorithm", ["rloo", "p3o"])
def test_rloo_and_p3o_policy_losses_ignore_garbage_at_padding(algorithm):
    from types import SimpleNamespace

    from sb3_rlhf.buffers import SequenceBatch
    from sb3_rlhf.p3o import P3O
    from sb3_rlhf.rloo import RLOO

    # compute_loss reads only these settings from the algorithm
    settings = SimpleNamespace(ent_coef=0.01, loss_aggregation="token", weight_clip=2.0, clipping="separate")
    compute_loss = RLOO.compute_loss if algorithm == "rloo" else P3O.compute_loss
    results = []
    for garbage in (False, True):
        logprobs, old, _, advantages, mask = _padded_batch(garbage)
        entropy = th.where(mask, th.full((2, 4), 0.7), th.tensor(math.nan if garbage else 0.0))
        batch = SequenceBatch(th.zeros(2, 4), th.ones(2, 4), mask, old, th.zeros(2, 4), advantages, th.zeros(2, 4))
        loss, stats = compute_loss(settings, batch, logprobs, None, entropy, 0.2)  # critic-free: no values
        (grad,) = th.autograd.grad(loss, logprobs)
        results.append((loss, stats, grad))
    (clean, clean_stats, clean_grad), (dirty, dirty_stats, dirty_grad) = results
    assert th.isfinite(dirty) and th.isfinite(dirty_grad).all()
    th.testing.assert_close(dirty, clean)
    th.testing.assert_close(dirty_grad, clean_grad)
    th.testing.assert_close(dirty_stats, clean_stats)
    assert clean_grad.abs().sum() > 0
