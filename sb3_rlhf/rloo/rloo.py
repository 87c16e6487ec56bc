"""RLOO: REINFORCE with a leave-one-out baseline over k responses per prompt."""

from __future__ import annotations

from typing import Any

import torch as th

from sb3_rlhf.common.buffers import SequenceBatch
from sb3_rlhf.common.group_rollouts import GroupRolloutAlgorithm
from sb3_rlhf.common.sequences import LOSS_AGGREGATIONS, masked_mean
from sb3_rlhf.ppo.losses import clipped_surrogate
from sb3_rlhf.rloo.losses import leave_one_out_advantages


class RLOO(GroupRolloutAlgorithm):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024) for language models, SB3-style.

    Each prompt gets ``samples_per_prompt`` responses; a response's advantage is its return minus the mean
    return of the other responses to the same prompt (no value function). The return is the sum of the env's
    reward terms: the reward model's score and, with a :class:`~sb3_rlhf.rewards.KLPenaltyWrapper`, the KL
    penalty to the reference (β fixed or adapted by its controller). The advantage weights every token of the
    response in PPO's clipped surrogate. With ``n_epochs=1`` **and** ``batch_size == n_episodes`` (one gradient
    step per rollout) the ratio is 1 at that step, clipping never acts, and this is plain REINFORCE with the
    leave-one-out baseline, as in the paper; smaller minibatches take several steps per rollout, and every step
    after the first is off-policy and clipped, PPO-style.

    Advantages are not whitened by default (``normalize_advantage=False``), as in the paper: the leave-one-out
    baseline already centres them, and the reward scale stays in the step size. ``normalize_advantage=True``
    scales them to unit variance over the rollout.

    :param loss_aggregation: ``"token"`` (mean over every response token of the minibatch) or ``"sequence"``.
    :param kwargs: :class:`~sb3_rlhf.common.group_rollouts.GroupRolloutAlgorithm` arguments.
    """

    algorithm_name = "RLOO"

    def __init__(self, *args: Any, loss_aggregation: str = "token", **kwargs: Any) -> None:
        if loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {loss_aggregation!r}")
        self.loss_aggregation = loss_aggregation
        kwargs.setdefault("normalize_advantage", False)  # Ahmadian et al. use the raw leave-one-out advantages
        super().__init__(*args, **kwargs)

    def group_advantages(self, returns: th.Tensor) -> th.Tensor:
        return leave_one_out_advantages(returns)

    def policy_loss(
        self, batch: SequenceBatch, logprobs: th.Tensor, entropy: th.Tensor, clip_range: float
    ) -> tuple[th.Tensor, dict[str, float]]:
        mask = batch.response_mask
        surrogate = clipped_surrogate(
            logprobs, batch.old_logprobs, batch.advantages, mask, clip_range, self.loss_aggregation
        )
        entropy_loss = -masked_mean(entropy, mask)
        loss = surrogate.pg_loss + self.ent_coef * entropy_loss
        return loss, {
            "policy_gradient_loss": surrogate.pg_loss.item(),
            "entropy_loss": entropy_loss.item(),
            "approx_kl": surrogate.approx_kl,
            "clip_fraction": surrogate.clip_fraction,
        }
