"""GRPO (Shao et al. 2024, "DeepSeekMath"): group-normalised advantages, per-token clipping, KL in the loss."""

from __future__ import annotations

from typing import NamedTuple

import torch as th

from sb3_rlhf.common.sequences import masked_aggregate, zero_padding
from sb3_rlhf.ppo.losses import clipped_surrogate
from sb3_rlhf.rewards.kl import kl_estimate


def group_normalized_advantages(returns: th.Tensor, eps: float = 1e-4) -> th.Tensor:
    """Â_i = (R_i − mean(R_group)) / (std(R_group) + eps) for ``k`` responses to the same prompt.

    :param returns: ``(n_prompts, k)`` sequence returns, ``k >= 2``.
    :return: ``(n_prompts, k)``; a group whose responses all score the same gets 0.
    """
    if returns.shape[1] < 2:
        raise ValueError("group-normalised advantages need at least two samples per prompt")
    mean = returns.mean(-1, keepdim=True)
    std = returns.std(-1, keepdim=True)  # unbiased, as the paper's reference implementations
    return (returns - mean) / (std + eps)


class GRPOLosses(NamedTuple):
    """``loss = pg_loss + β·kl_loss``; diagnostics are floats."""

    loss: th.Tensor
    pg_loss: th.Tensor
    kl_loss: th.Tensor
    approx_kl: th.Tensor  # 0-d, read on the host once per update
    clip_fraction: th.Tensor  # 0-d, read on the host once per update


def grpo_losses(
    logprobs: th.Tensor,
    old_logprobs: th.Tensor,
    ref_logprobs: th.Tensor,
    advantages: th.Tensor,
    mask: th.Tensor,
    clip_range: float,
    kl_coef: float,
    kl_estimator: str = "k3",
    aggregation: str = "sequence",
) -> GRPOLosses:
    """The GRPO objective; every tensor is ``(batch, T)`` (sequence advantages broadcast over tokens)::

        J = 1/G Σ_i 1/|o_i| Σ_t [ min(r_t Â_i, clip(r_t, 1−ε, 1+ε) Â_i) − β·D_t ]
        D_t = π_ref/π_θ − log(π_ref/π_θ) − 1   (k3: unbiased, ≥ 0; its gradient pulls π_θ towards π_ref)

    :param ref_logprobs: log π_ref(a_t|s_t) from the rollout (no gradient).
    :param kl_estimator: the per-token KL estimator in the loss (``"k3"`` in the paper, or ``"k2"``).
    :param aggregation: ``"sequence"`` (the paper's ``1/|o_i|``) or ``"token"``.
    """
    if kl_estimator == "k1":
        raise ValueError("k1 in the loss has zero expected gradient (E[∇log π] = 0): use estimator 'k3' (GRPO) or 'k2'")
    surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range, aggregation)
    # k3 takes exp of the log-ratio: zero padded positions first (exp(1e4)·0 is NaN, in the value and the gradient)
    kl = kl_estimate(zero_padding(logprobs, mask), zero_padding(ref_logprobs, mask), kl_estimator)
    kl_loss = masked_aggregate(kl, mask, aggregation)
    loss = surrogate.pg_loss + kl_coef * kl_loss
    return GRPOLosses(loss, surrogate.pg_loss, kl_loss, surrogate.approx_kl, surrogate.clip_fraction)
