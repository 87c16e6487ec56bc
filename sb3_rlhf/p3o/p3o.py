"""P3O: pairwise proximal policy optimization on pairs of responses to the same prompt."""

from __future__ import annotations

from typing import Any

import torch as th

from sb3_rlhf.common.buffers import SequenceBatch
from sb3_rlhf.common.group_rollouts import GroupRolloutAlgorithm
from sb3_rlhf.common.sequences import masked_mean, zero_padding
from sb3_rlhf.p3o.losses import P3O_CLIPPING, p3o_loss, pairwise_reward_difference


class P3O(GroupRolloutAlgorithm):
    """Pairwise Proximal Policy Optimization (Wu et al. 2023), SB3-style.

    Two responses per prompt are sampled from the rollout policy; the learning signal is their reward
    difference Δ = R(y1) − R(y2) = (r1 − r2) − β(ℓ1 − ℓ2), where R sums the env's reward terms: the reward
    model's score r and, with a :class:`~sb3_rlhf.rewards.KLPenaltyWrapper` (k1), −β·ℓ with ℓ the summed
    per-token log-ratio to the reference. A reward model trained with Bradley–Terry is only defined up to a
    per-prompt shift, and Δ is invariant to it; no value function is learned. The loss is
    :func:`~sb3_rlhf.p3o.losses.p3o_loss`, with ``clipping="separate"`` or ``"joint"``.

    ``samples_per_prompt`` (default 2) may be any even number: each prompt's responses form consecutive pairs.

    :param clipping: ``"separate"`` (each response's log-ratio clipped) or ``"joint"`` (the pair's log-ratio).
    :param clip_range: ε on the sequence log-ratios (float or schedule).
    :param weight_clip: c > 1: the importance weight ρ1·ρ2 is clipped to [1/c, c].
    :param normalize_advantage: divide Δ by its standard deviation over the rollout (Δ keeps its sign and
        its invariance; a pairwise Δ has mean 0 by construction).
    :param kwargs: :class:`~sb3_rlhf.common.group_rollouts.GroupRolloutAlgorithm` arguments.
    """

    algorithm_name = "P3O"

    def __init__(
        self,
        *args: Any,
        clipping: str = "separate",
        weight_clip: float = 2.0,
        samples_per_prompt: int = 2,
        **kwargs: Any,
    ) -> None:
        if clipping not in P3O_CLIPPING:
            raise ValueError(f"clipping must be one of {P3O_CLIPPING}, got {clipping!r}")
        if not weight_clip > 1:
            raise ValueError(f"weight_clip must be > 1 (ρ1·ρ2 is clipped to [1/c, c]), got {weight_clip}")
        if isinstance(samples_per_prompt, int) and samples_per_prompt >= 2 and samples_per_prompt % 2:
            raise ValueError(f"P3O forms pairs: samples_per_prompt must be even, got {samples_per_prompt}")
        self.clipping = clipping
        self.weight_clip = float(weight_clip)
        super().__init__(*args, samples_per_prompt=samples_per_prompt, **kwargs)

    def group_advantages(self, returns: th.Tensor) -> th.Tensor:
        return pairwise_reward_difference(returns.reshape(-1, 2)).reshape(returns.shape)

    def policy_loss(
        self, batch: SequenceBatch, logprobs: th.Tensor, entropy: th.Tensor, clip_range: float
    ) -> tuple[th.Tensor, dict[str, float]]:
        mask = batch.response_mask
        # sequence log-probabilities log π(y|x) = Σ_t log π(a_t|s_t), laid out as (n_pairs, 2)
        sequence_logprobs = zero_padding(logprobs, mask).sum(-1).view(-1, 2)
        old_sequence_logprobs = zero_padding(batch.old_logprobs, mask).sum(-1).view(-1, 2)
        delta = batch.advantages[:, 0].view(-1, 2)[:, 0]  # every response has at least one token
        losses = p3o_loss(sequence_logprobs, old_sequence_logprobs, delta, clip_range, self.weight_clip, self.clipping)
        entropy_loss = -masked_mean(entropy, mask)
        loss = losses.loss + self.ent_coef * entropy_loss
        with th.no_grad():
            log_ratio = zero_padding(logprobs - batch.old_logprobs, mask)
            approx_kl = masked_mean(th.expm1(log_ratio) - log_ratio, mask).item()
        return loss, {
            "policy_gradient_loss": losses.loss.item(),
            "entropy_loss": entropy_loss.item(),
            "approx_kl": approx_kl,
            "clip_fraction": losses.clip_fraction,
            "weight_clip_fraction": losses.weight_clip_fraction,
        }
