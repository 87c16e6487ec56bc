"""KLPenaltyWrapper: per-token penalty −β·KL(π ‖ π_ref) that keeps the policy near a reference model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch as th
from transformers import PreTrainedModel

from sb3_rlhf.common.distributed import sum_over_ranks, world_size
from sb3_rlhf.common.forward import next_token_logits, response_logprobs
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.kl_controllers import AdaptiveKLController, FixedKLController
from sb3_rlhf.common.models import freeze, load_causal_lm
from sb3_rlhf.common.sequences import logprobs_of_tokens, zero_padding
from sb3_rlhf.rewards.base import RewardWrapper

if TYPE_CHECKING:
    from sb3_rlhf.policies import TransformerActorCriticPolicy

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: th.Tensor, ref_logprobs: th.Tensor, estimator: str = "k1") -> th.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from sampled tokens (Schulman, "Approximating KL divergence").

    With log r = log π_ref(a|s) − log π(a|s), a ~ π:
      k1 = −log r              (unbiased, can be negative per token)
      k2 = (log r)² / 2        (biased, low variance)
      k3 = (r − 1) − log r     (unbiased, always ≥ 0)
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return th.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use one of {KL_ESTIMATORS}")


class KLPenaltyWrapper(RewardWrapper):
    """Reward −β·kl_t on every response token, kl_t the per-token KL estimate between the policy and a frozen
    reference model (the initial policy unless ``ref_model`` is given), both at the policy's temperature.

    β is fixed (``target=None``) or adapted towards ``target`` by the controller of Ziegler et al. after each
    rollout (after each episode in the ``step()`` path).

    :param env: the environment to wrap.
    :param coef: β, or its initial value with a target.
    :param ref_model: the reference: a model, or a folder, packaged name or hub id; ``None``: the policy's initial
        model when :class:`~sb3_rlhf.RLHFPPO` binds it.
    :param target: target KL per episode (nats) for the adaptive controller; ``None`` keeps β fixed.
    :param horizon: the adaptive controller's horizon, in episodes.
    :param proportional_gain: the adaptive controller's proportional term K_p (0: Ziegler et al.'s law; see
        :class:`~sb3_rlhf.common.kl_controllers.AdaptiveKLController`, which this damps the overshoot of).
    :param estimator: the per-token KL estimator, ``"k1"`` (default, as in Ziegler et al. and TRL), ``"k2"`` or
        ``"k3"`` (see :func:`kl_estimate`); GRPO puts the same estimator in its loss (``"k3"`` there).
    :param policy: the policy, when this env is stepped by an agent other than RLHFPPO (which binds its own).
    :param name: key of the term in ``info["reward_terms"]`` and the logs.
    :param ref_revision: branch, tag or commit when ``ref_model`` is a hub id.
    """

    is_score = False

    def __init__(
        self,
        env: gym.Env,
        coef: float = 0.05,
        ref_model: PreTrainedModel | str | None = None,
        target: float | None = None,
        horizon: int = 10_000,
        proportional_gain: float = 0.0,
        estimator: str = "k1",
        policy: TransformerActorCriticPolicy | None = None,
        name: str = "kl_penalty",
        ref_revision: str | None = None,
    ) -> None:
        super().__init__(env, name)
        if not coef > 0:
            raise ValueError(
                f"the KL coefficient β must be > 0, got {coef}: to train without a KL penalty, leave the wrapper out"
            )
        if estimator not in KL_ESTIMATORS:
            raise ValueError(f"unknown KL estimator {estimator!r}: use one of {KL_ESTIMATORS}")
        self.kl_controller: FixedKLController | AdaptiveKLController = (
            FixedKLController(coef)
            if target is None
            else AdaptiveKLController(coef, target, horizon, proportional_gain)
        )
        if isinstance(ref_model, (str, os.PathLike)):
            ref_model = load_causal_lm(os.fspath(ref_model), revision=ref_revision)
        # a causal LM, or the policy's adapter-disabled LoRA actor (both have get_output_embeddings()); None: the
        # policy's initial model, made when it binds
        self.ref_model: Any = None if ref_model is None else freeze(ref_model)
        #: True when the reference was made by the policy (its initial model) rather than given
        self.reference_from_policy = False
        self.estimator = estimator
        self.policy: TransformerActorCriticPolicy | None = None
        self._episode_kl = 0.0
        self._rollout_kl: list[th.Tensor] = []
        if policy is not None:
            self.bind(policy)

    @property
    def coef(self) -> float:
        """The current β."""
        return self.kl_controller.value

    def bind(self, policy: TransformerActorCriticPolicy) -> None:
        if self.ref_model is None or (self.reference_from_policy and policy is not self.policy):
            # a new policy (e.g. loaded from a zip or a checkpoint) brings its own initial model
            self.ref_model = policy.make_reference_model()
            self.reference_from_policy = True
        self.policy = policy
        self.ref_model.to(policy.device)  # a no-op for the adapter-disabled LoRA reference, which owns no weights
        if self.ref_model.get_output_embeddings().weight.shape[0] < policy.n_actions:
            raise ValueError(
                "the reference model's vocabulary is smaller than the policy tokenizer: use the policy's base model"
            )

    def frozen_models(self) -> list[th.nn.Module]:
        # the LoRA reference (the actor with its adapter off) owns no weights: the strategy leaves it as it is
        return [] if self.ref_model is None else [self.ref_model]

    def _require_bound(self) -> TransformerActorCriticPolicy:
        if self.policy is None or self.ref_model is None:
            raise RuntimeError(
                "KLPenaltyWrapper has no policy: RLHFPPO binds it automatically; for another agent pass policy="
            )
        return self.policy

    # ------------------------------------------------------------------ step path
    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        self._episode_kl = 0.0
        return super().reset(**kwargs)

    @th.no_grad()
    def step_reward(self, obs_before: dict[str, np.ndarray] | None, action: Any, done: bool, info: dict) -> float:
        policy = self._require_bound()
        if obs_before is None:
            raise RuntimeError("call reset() before step()")
        obs_t = {k: th.as_tensor(v, device=policy.device).unsqueeze(0) for k, v in obs_before.items()}
        action_t = th.as_tensor([int(np.asarray(action).item())], device=policy.device)
        logprob = policy.action_log_prob(obs_t, action_t)
        with policy.autocast():
            ref_logits = next_token_logits(
                self.ref_model,
                obs_t["input_ids"].long(),
                obs_t["attention_mask"].long(),
                policy.temperature,
                policy.n_actions,
            )
        kl = kl_estimate(logprob, logprobs_of_tokens(ref_logits, action_t), self.estimator).item()
        reward = -self.coef * kl
        self._episode_kl += kl
        if done:
            self.kl_controller.update(self._episode_kl, 1)
        return reward

    # ------------------------------------------------------------------ batch path
    @th.no_grad()
    def reference_logprobs(self, batch: GenerationBatch) -> th.Tensor:
        """log π_ref of each response token at the policy's temperature: ``(batch, T)`` float32."""
        policy = self._require_bound()
        with policy.autocast():  # the policy's own precision: an untrained policy is exactly at KL 0
            return response_logprobs(
                self.ref_model,
                batch.input_ids,
                batch.attention_mask,
                batch.response_length,
                policy.temperature,
                policy.n_actions,
                packed=policy.packs(self.ref_model),  # as the policy's own passes, where the reference allows it
            )

    @th.no_grad()
    def batch_kl(self, batch: GenerationBatch, ref_logprobs: th.Tensor | None = None) -> th.Tensor:
        """Per-token KL estimate ``(batch, T)`` (0 on padding), recorded for the rollout's statistics and the
        controller. Algorithms that put the KL in their loss (GRPO) call this instead of :meth:`batch_rewards`."""
        if batch.logprobs is None:
            raise ValueError("the batch has no policy log-probs: the algorithm fills batch.logprobs before scoring")
        if ref_logprobs is None:
            ref_logprobs = self.reference_logprobs(batch)
        mask = batch.response_mask  # padding selected away before k3's exp: exp(1e4)·0 is NaN
        kl = kl_estimate(zero_padding(batch.logprobs, mask), zero_padding(ref_logprobs, mask), self.estimator)
        self._rollout_kl.append(kl.sum(-1).float().cpu())
        return kl

    def batch_rewards(self, batch: GenerationBatch) -> th.Tensor:
        return -self.coef * self.batch_kl(batch)

    def on_rollout_start(self) -> None:
        self._rollout_kl = []

    def rollout_kl(self) -> th.Tensor:
        """KL per episode (summed over its tokens) of the episodes scored since the rollout started."""
        return th.cat(self._rollout_kl) if self._rollout_kl else th.zeros(0)

    def on_rollout_end(self) -> None:
        kl = self.rollout_kl()
        if world_size() > 1:  # every rank's episodes, so that β stays the same on all of them
            total, count = sum_over_ranks([kl.sum().item(), len(kl)])
            if count:
                self.kl_controller.update(total / count, int(count))
        elif len(kl):
            self.kl_controller.update(kl.mean().item(), len(kl))

    def state_dict(self) -> dict[str, Any]:
        """β as the controller has adapted it so far (and the adaptive controller's integral)."""
        return self.kl_controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_controller.load_state_dict(state)

    def rollout_stats(self) -> dict[str, float]:
        """β used for this rollout's rewards, the mean KL per episode (summed over its tokens) and, under the
        adaptive controller, the KL it steers towards."""
        kl = self.rollout_kl()
        stats = {"kl_coef": self.coef, **({"kl": kl.mean().item()} if len(kl) else {})}
        if isinstance(self.kl_controller, AdaptiveKLController):
            stats["kl_target"] = self.kl_controller.target
        return stats
