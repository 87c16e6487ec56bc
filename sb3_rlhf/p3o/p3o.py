"""P3O: pairwise proximal policy optimization on pairs of responses to the same prompt."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from sb3_rlhf.buffers import GroupRolloutBuffer, SequenceBatch
from sb3_rlhf.common.on_policy_algorithm import (
    RLHFOnPolicyAlgorithm,
    check_samples_per_prompt,
)
from sb3_rlhf.common.sequences import masked_mean, zero_padding
from sb3_rlhf.p3o.losses import P3O_CLIPPING, p3o_loss, pairwise_reward_difference
from sb3_rlhf.policies import TransformerActorCriticPolicy


class P3O(RLHFOnPolicyAlgorithm):
    """Pairwise Proximal Policy Optimization (Wu et al. 2023), SB3-style.

    Two responses per prompt are sampled from the rollout policy; the learning signal is their reward
    difference Δ = R(y1) − R(y2) = (r1 − r2) − β(ℓ1 − ℓ2), where R sums the env's reward terms: the reward
    model's score r and, with a :class:`~sb3_rlhf.rewards.KLPenaltyWrapper` (k1), −β·ℓ with ℓ the summed
    per-token log-ratio to the reference. A reward model trained with Bradley–Terry is only defined up to a
    per-prompt shift, and Δ is invariant to it; no value function is learned. The loss is
    :func:`~sb3_rlhf.p3o.losses.p3o_loss`, with ``clipping="separate"`` or ``"joint"``.

    :param policy: :class:`~sb3_rlhf.TransformerActorCriticPolicy` (or its name); its value head is kept (one
        policy class serves every algorithm) but nothing trains it.
    :param env: a :class:`~sb3_rlhf.TokenGenerationEnv` under its reward wrappers.
    :param learning_rate: learning rate, constant or schedule of the remaining progress.
    :param n_episodes: episodes (responses) per rollout, a multiple of ``samples_per_prompt``.
    :param samples_per_prompt: responses sampled for each prompt (default 2; any even number: each prompt's responses form consecutive pairs).
    :param batch_size: episodes per minibatch, a multiple of ``samples_per_prompt`` (groups stay whole).
    :param max_batch_tokens: also cap each minibatch at this many tokens (whole groups; ``None``: no cap).
    :param n_epochs: passes over the rollout per update (1: every sample is used once, on-policy).
    :param clip_range: ε on the sequence log-ratios (float or schedule).
    :param normalize_advantage: divide Δ by its standard deviation over the rollout (Δ keeps its sign and
        its invariance; a pairwise Δ has mean 0 by construction).
    :param ent_coef: entropy bonus coefficient.
    :param max_grad_norm: gradient clipping norm.
    :param target_kl: stop the epochs early when the approximate KL to the rollout policy exceeds 1.5×this.
    :param clipping: ``"separate"`` (each response's log-ratio clipped) or ``"joint"`` (the pair's log-ratio).
    :param weight_clip: c > 1: the importance weight ρ1·ρ2 is clipped to [1/c, c].
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

    #: P3O's loss is a mean over pairs of sequences
    loss_aggregation = "sequence"
    learns_values = False
    rollout_buffer: GroupRolloutBuffer

    def __init__(
        self,
        policy: str | type[TransformerActorCriticPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 1e-5,
        n_episodes: int = 64,
        samples_per_prompt: int = 2,
        batch_size: int = 16,
        max_batch_tokens: int | None = None,
        n_epochs: int = 1,
        clip_range: float | Schedule = 0.2,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        max_grad_norm: float = 1.0,
        target_kl: float | None = None,
        clipping: str = "separate",
        weight_clip: float = 2.0,
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
        if clipping not in P3O_CLIPPING:
            raise ValueError(f"clipping must be one of {P3O_CLIPPING}, got {clipping!r}")
        if not weight_clip > 1:
            raise ValueError(f"weight_clip must be > 1 (ρ1·ρ2 is clipped to [1/c, c]), got {weight_clip}")
        samples_per_prompt = check_samples_per_prompt("P3O", samples_per_prompt)
        if samples_per_prompt % 2:
            raise ValueError(f"P3O forms pairs: samples_per_prompt must be even, got {samples_per_prompt}")
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
        self.clipping = clipping
        self.weight_clip = float(weight_clip)
        if _init_setup_model:
            self._setup_model()

    def compute_advantages(self, rollout_buffer: GroupRolloutBuffer) -> None:  # type: ignore[override]
        rollout_buffer.compute_group_advantages(_pair_differences, self.normalize_advantage)

    def compute_loss(
        self,
        batch: SequenceBatch,
        logprobs: th.Tensor,
        values: th.Tensor | None,
        entropy: th.Tensor,
        clip_range: float,
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
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
            approx_kl = masked_mean(th.expm1(log_ratio) - log_ratio, mask)
        return loss, {
            "policy_gradient_loss": losses.loss.detach(),
            "entropy_loss": entropy_loss.detach(),
            "approx_kl": approx_kl,
            "clip_fraction": losses.clip_fraction,
            "weight_clip_fraction": losses.weight_clip_fraction,
        }


def _pair_differences(returns: th.Tensor) -> th.Tensor:
    """``(n_prompts, k)`` returns, consecutive pairs → each response's Δ against its pair partner."""
    return pairwise_reward_difference(returns.reshape(-1, 2)).reshape(returns.shape)
