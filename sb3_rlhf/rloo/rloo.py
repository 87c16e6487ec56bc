"""RLOO: REINFORCE with a leave-one-out baseline over k responses per prompt."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from sb3_rlhf.buffers import GroupRolloutBuffer, SequenceBatch
from sb3_rlhf.common.on_policy_algorithm import (
    RLHFOnPolicyAlgorithm,
    check_loss_aggregation,
    check_samples_per_prompt,
)
from sb3_rlhf.common.sequences import masked_mean
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.ppo.losses import clipped_surrogate
from sb3_rlhf.rloo.losses import leave_one_out_advantages


class RLOO(RLHFOnPolicyAlgorithm):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024) for language models, SB3-style.

    Each prompt gets ``samples_per_prompt`` responses; a response's advantage is its return minus the mean
    return of the other responses to the same prompt (no value function). The return is the sum of the env's
    reward terms: the reward model's score and, with a :class:`~sb3_rlhf.rewards.KLPenaltyWrapper`, the KL
    penalty to the reference (β fixed or adapted by its controller). The advantage weights every token of the
    response in PPO's clipped surrogate. With ``n_epochs=1`` **and** ``batch_size == n_episodes`` (one gradient
    step per rollout) the ratio is 1 at that step, clipping never acts, and this is plain REINFORCE with the
    leave-one-out baseline, as in the paper; smaller minibatches take several steps per rollout, and every step
    after the first is off-policy and clipped, PPO-style.

    :param policy: :class:`~sb3_rlhf.TransformerActorCriticPolicy` (or its name); its value head is kept (one
        policy class serves every algorithm) but nothing trains it.
    :param env: a :class:`~sb3_rlhf.TokenGenerationEnv` under its reward wrappers.
    :param learning_rate: learning rate, constant or schedule of the remaining progress.
    :param n_episodes: episodes (responses) per rollout, a multiple of ``samples_per_prompt``.
    :param samples_per_prompt: responses sampled for each prompt (``k >= 2``).
    :param batch_size: episodes per minibatch, a multiple of ``samples_per_prompt`` (groups stay whole).
    :param max_batch_tokens: also cap each minibatch at this many tokens (whole groups; ``None``: no cap).
    :param n_epochs: passes over the rollout per update (1: every sample is used once, on-policy).
    :param clip_range: the trust-region clip ε (float or schedule).
    :param normalize_advantage: scale the advantages to unit variance over the rollout. Off by default, as in the
        paper: the leave-one-out baseline already centres them, and the reward scale stays in the step size.
    :param ent_coef: entropy bonus coefficient.
    :param max_grad_norm: gradient clipping norm.
    :param target_kl: stop the epochs early when the approximate KL to the rollout policy exceeds 1.5×this.
    :param loss_aggregation: ``"token"`` (mean over every response token of the minibatch) or ``"sequence"``.
    :param max_consecutive_skips: non-finite minibatches (or rollouts) skipped in a row before the run stops
        with an error (see :class:`~sb3_rlhf.common.on_policy_algorithm.RLHFOnPolicyAlgorithm`).
    :param generation_batch_size: prompts per ``generate()`` call (``None``: all ``n_episodes`` at once).
    :param generation_cache: ``generate()``'s KV cache: ``"auto"`` (static on CUDA, so that transformers compiles
        the decoding step; dynamic elsewhere), ``"static"``, ``"dynamic"`` or ``"continuous"`` (transformers'
        continuous batching) (:class:`~sb3_rlhf.common.rollout_engine.RolloutEngine`).
    :param micro_batch_tokens: the update's token budget per forward: each minibatch is split into micro-batches
        whose gradients add up to its one optimizer step; ``"auto"`` sizes it from the free GPU memory (no split on
        a CPU), ``None`` never splits.
    :param strategy: with several processes (``torchrun``): ``"ddp"`` (a whole replica each) or ``"fsdp"``
        (weights, gradients and optimizer state sharded by FSDP2); see :mod:`sb3_rlhf.common.strategies`.
    :param shard_frozen_models: under ``"fsdp"``, shard the KL reference and reward models too (``False``: whole on
        each process).
    :param n_logged_samples: generations written to TensorBoard as text each rollout (0 to disable).
    :param stats_window_size: episodes averaged for ``rollout/ep_rew_mean``.
    :param tensorboard_log: TensorBoard log folder.
    :param policy_kwargs: for the policy; models are named by path (``model_name_or_path``).
    :param verbose: 0 silent, 1 info.
    :param seed: seed of every RNG (prompt sampling, generation, minibatch order).
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    :param _init_setup_model: build the model now (SB3's ``load`` passes False).
    """

    learns_values = False
    rollout_buffer: GroupRolloutBuffer

    def __init__(
        self,
        policy: str | type[TransformerActorCriticPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 1e-5,
        n_episodes: int = 64,
        samples_per_prompt: int = 4,
        batch_size: int = 16,
        max_batch_tokens: int | None = None,
        n_epochs: int = 1,
        clip_range: float | Schedule = 0.2,
        normalize_advantage: bool = False,
        ent_coef: float = 0.0,
        max_grad_norm: float = 1.0,
        target_kl: float | None = None,
        loss_aggregation: str = "token",
        max_consecutive_skips: int = 5,
        generation_batch_size: int | None = None,
        generation_cache: str = "auto",
        micro_batch_tokens: int | str | None = "auto",
        strategy: str = "ddp",
        shard_frozen_models: bool = True,
        n_logged_samples: int = 4,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        samples_per_prompt = check_samples_per_prompt("RLOO", samples_per_prompt)
        loss_aggregation = check_loss_aggregation(loss_aggregation)
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_episodes=n_episodes,
            batch_size=batch_size,
            n_epochs=n_epochs,
            clip_range=clip_range,
            normalize_advantage=normalize_advantage,
            ent_coef=ent_coef,
            max_grad_norm=max_grad_norm,
            rollout_buffer_class=GroupRolloutBuffer,
            rollout_buffer_kwargs={"group_size": samples_per_prompt},
            max_batch_tokens=max_batch_tokens,
            target_kl=target_kl,
            max_consecutive_skips=max_consecutive_skips,
            generation_batch_size=generation_batch_size,
            generation_cache=generation_cache,
            micro_batch_tokens=micro_batch_tokens,
            strategy=strategy,
            shard_frozen_models=shard_frozen_models,
            samples_per_prompt=samples_per_prompt,
            n_logged_samples=n_logged_samples,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        self.loss_aggregation = loss_aggregation
        if _init_setup_model:
            self._setup_model()

    def compute_advantages(self, rollout_buffer: GroupRolloutBuffer) -> None:  # type: ignore[override]
        rollout_buffer.compute_group_advantages(leave_one_out_advantages, self.normalize_advantage)

    def compute_loss(
        self,
        batch: SequenceBatch,
        logprobs: th.Tensor,
        values: th.Tensor | None,
        entropy: th.Tensor,
        clip_range: float,
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        mask = batch.response_mask
        surrogate = clipped_surrogate(
            logprobs, batch.old_logprobs, batch.advantages, mask, clip_range, self.loss_aggregation
        )
        entropy_loss = -masked_mean(entropy, mask)
        loss = surrogate.pg_loss + self.ent_coef * entropy_loss
        return loss, {
            "policy_gradient_loss": surrogate.pg_loss.detach(),
            "entropy_loss": entropy_loss.detach(),
            "approx_kl": surrogate.approx_kl,
            "clip_fraction": surrogate.clip_fraction,
        }
