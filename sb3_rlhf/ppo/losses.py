"""The PPO objective on response tokens, written as the paper states it (Schulman et al. 2017)."""

from __future__ import annotations

from typing import NamedTuple

import torch as th

from sb3_rlhf.common.sequences import masked_aggregate, masked_mean, zero_padding


class PPOLosses(NamedTuple):
    """``loss = pg_loss + ent_coef·entropy_loss + vf_coef·value_loss``; the rest are diagnostics (floats)."""

    loss: th.Tensor
    pg_loss: th.Tensor
    value_loss: th.Tensor
    entropy_loss: th.Tensor
    approx_kl: th.Tensor  # 0-d, read on the host once per update
    clip_fraction: th.Tensor  # 0-d, read on the host once per update


class Surrogate(NamedTuple):
    """The clipped surrogate loss and its diagnostics (floats)."""

    pg_loss: th.Tensor
    ratio: th.Tensor
    approx_kl: th.Tensor  # 0-d, read on the host once per update
    clip_fraction: th.Tensor  # 0-d, read on the host once per update


def clipped_surrogate(
    logprobs: th.Tensor,
    old_logprobs: th.Tensor,
    advantages: th.Tensor,
    mask: th.Tensor,
    clip_range: float,
    aggregation: str = "token",
) -> Surrogate:
    """PPO's clipped surrogate over response tokens; every tensor is ``(batch, T)``.

    r_t(θ) = π_θ(a_t|s_t) / π_θ_old(a_t|s_t);   L^CLIP = −E_t[ min(r_t Â_t, clip(r_t, 1−ε, 1+ε) Â_t) ]

    :param aggregation: ``"token"`` or ``"sequence"`` (see :func:`~sb3_rlhf.common.sequences.masked_aggregate`).
    """
    # padded positions may hold anything (±inf log-ratios, NaN advantages): zero them before exp and products
    log_ratio = zero_padding(logprobs - old_logprobs, mask)
    advantages = zero_padding(advantages, mask)
    ratio = th.exp(log_ratio)
    pg_loss_unclipped = -advantages * ratio
    pg_loss_clipped = -advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
    pg_loss = masked_aggregate(th.max(pg_loss_unclipped, pg_loss_clipped), mask, aggregation)
    with th.no_grad():
        # k3 estimate of KL(π_old ‖ π_θ), as SB3: E[(r − 1) − log r]
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
        clip_fraction = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
    return Surrogate(pg_loss, ratio, approx_kl, clip_fraction)


def ppo_losses(
    logprobs: th.Tensor,
    old_logprobs: th.Tensor,
    advantages: th.Tensor,
    values: th.Tensor,
    old_values: th.Tensor,
    returns: th.Tensor,
    entropy: th.Tensor,
    mask: th.Tensor,
    clip_range: float,
    clip_range_vf: float | None,
    ent_coef: float,
    vf_coef: float,
) -> PPOLosses:
    """PPO losses, each a masked mean over real response tokens. Every tensor is ``(batch, T)``.

    :param logprobs: log π_θ(a_t|s_t) now (with gradient).
    :param old_logprobs: log π_θ_old(a_t|s_t) from the rollout.
    :param advantages: Â_t (already whitened if asked).
    :param values: V_θ(s_t) now (with gradient).
    :param old_values: V_θ_old(s_t) from the rollout.
    :param returns: R_t = Â_t + V_old(s_t) (before whitening).
    :param entropy: ``H[π_θ(·|s_t)]``.
    :param mask: bool, the real response tokens.
    """
    # L^CLIP = −E_t[ min(r_t Â_t, clip(r_t, 1−ε, 1+ε) Â_t) ],  r_t(θ) = π_θ(a_t|s_t) / π_θ_old(a_t|s_t)
    surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)

    # L^VF = ½ E_t[ max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²) ]
    values, old_values, returns = (zero_padding(x, mask) for x in (values, old_values, returns))
    value_loss_unclipped = (values - returns) ** 2
    if clip_range_vf is None:
        value_loss = 0.5 * masked_mean(value_loss_unclipped, mask)
    else:
        values_clipped = old_values + th.clamp(values - old_values, -clip_range_vf, clip_range_vf)
        value_loss = 0.5 * masked_mean(th.max(value_loss_unclipped, (values_clipped - returns) ** 2), mask)

    # Entropy bonus: minimising −H maximises the entropy.
    entropy_loss = -masked_mean(entropy, mask)

    loss = surrogate.pg_loss + ent_coef * entropy_loss + vf_coef * value_loss
    return PPOLosses(loss, surrogate.pg_loss, value_loss, entropy_loss, surrogate.approx_kl, surrogate.clip_fraction)
