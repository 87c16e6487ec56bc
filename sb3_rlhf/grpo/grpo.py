"""GRPO: group-relative advantages, per-token clipping, and the KL to the reference in the loss."""

from __future__ import annotations

from typing import Any

import torch as th

from sb3_rlhf.common.buffers import SequenceBatch
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.group_rollouts import GroupRolloutAlgorithm
from sb3_rlhf.common.sequences import LOSS_AGGREGATIONS, masked_mean
from sb3_rlhf.grpo.losses import group_normalized_advantages, grpo_losses
from sb3_rlhf.rewards.base import RewardWrapper
from sb3_rlhf.rewards.kl import KLPenaltyWrapper


class GRPO(GroupRolloutAlgorithm):
    """Group Relative Policy Optimization (Shao et al. 2024), SB3-style.

    Each prompt gets ``samples_per_prompt`` responses; a response's advantage is its score normalised by the
    mean and standard deviation of its group's scores, on every token. The KL to the reference is not a
    reward here: the env's :class:`~sb3_rlhf.rewards.KLPenaltyWrapper` supplies the reference log-probs, its
    β (fixed, or adapted by its controller from the measured KL) and its estimator, and the loss adds
    β·KL per token with that estimator (``"k3"`` in the paper; ``"k1"`` is refused, its gradient is zero in
    expectation). Without a KL wrapper GRPO trains without a KL term.

    :param loss_aggregation: ``"sequence"`` (the paper: each response's tokens averaged, then the responses)
        or ``"token"`` (all tokens of the minibatch weighted equally, as DAPO).
    :param advantage_eps: ε in Â = (R − mean) / (std + ε).
    :param kwargs: :class:`~sb3_rlhf.common.group_rollouts.GroupRolloutAlgorithm` arguments.
    """

    algorithm_name = "GRPO"

    def __init__(
        self, *args: Any, loss_aggregation: str = "sequence", advantage_eps: float = 1e-4, **kwargs: Any
    ) -> None:
        if loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {loss_aggregation!r}")
        self.loss_aggregation = loss_aggregation
        self.advantage_eps = advantage_eps
        self._rollout_kl: tuple[float, str] | None = None  # (β, estimator) the rollout was scored with
        kwargs.setdefault("normalize_advantage", False)  # already normalised within each group
        super().__init__(*args, **kwargs)

    def _kl_wrapper(self, wrappers: list[RewardWrapper]) -> KLPenaltyWrapper | None:
        found = [w for w in wrappers if isinstance(w, KLPenaltyWrapper)]
        if len(found) > 1:
            raise ValueError("GRPO puts the KL in its loss and takes one KLPenaltyWrapper, found several")
        if found and found[0].estimator == "k1":
            raise ValueError(
                "GRPO puts the KL in its loss, where the k1 estimator has zero expected gradient: "
                "build the KLPenaltyWrapper with estimator='k3' (as the paper) or 'k2'"
            )
        return found[0] if found else None

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.env is not None:
            self._kl_wrapper(self.reward_wrappers)

    def _score_batch(
        self, batch: GenerationBatch, wrappers: list[RewardWrapper]
    ) -> tuple[th.Tensor, dict[str, th.Tensor], th.Tensor | None]:
        kl_wrapper = self._kl_wrapper(wrappers)
        terms = {w.name: w.batch_rewards(batch) for w in wrappers if w is not kl_wrapper}
        rewards = sum(terms.values(), th.zeros_like(batch.logprobs))
        ref_logprobs, self._rollout_kl = None, None
        if kl_wrapper is not None:
            ref_logprobs = kl_wrapper.reference_logprobs(batch)
            # logged as the penalty it would be, so that rlhf/non_score_reward compares across algorithms
            terms[kl_wrapper.name] = -kl_wrapper.coef * kl_wrapper.batch_kl(batch, ref_logprobs)
            # β of this rollout (the controller updates it afterwards) and the estimator, for the loss
            self._rollout_kl = (kl_wrapper.coef, kl_wrapper.estimator)
        return rewards, terms, ref_logprobs

    def group_advantages(self, returns: th.Tensor) -> th.Tensor:
        return group_normalized_advantages(returns, self.advantage_eps)

    def policy_loss(
        self, batch: SequenceBatch, logprobs: th.Tensor, entropy: th.Tensor, clip_range: float
    ) -> tuple[th.Tensor, dict[str, float]]:
        mask = batch.response_mask
        if self._rollout_kl is None:  # no KL wrapper: no KL term
            ref_logprobs, (kl_coef, estimator) = logprobs.detach(), (0.0, "k3")
        else:
            ref_logprobs, (kl_coef, estimator) = batch.ref_logprobs, self._rollout_kl
        losses = grpo_losses(
            logprobs,
            batch.old_logprobs,
            ref_logprobs,
            batch.advantages,
            mask,
            clip_range,
            kl_coef,
            estimator,
            self.loss_aggregation,
        )
        entropy_loss = -masked_mean(entropy, mask)
        loss = losses.loss + self.ent_coef * entropy_loss
        return loss, {
            "policy_gradient_loss": losses.pg_loss.item(),
            "kl_loss": losses.kl_loss.item(),
            "entropy_loss": entropy_loss.item(),
            "approx_kl": losses.approx_kl,
            "clip_fraction": losses.clip_fraction,
        }
