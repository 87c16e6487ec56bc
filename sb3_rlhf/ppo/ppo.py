"""RLHFPPO: PPO for language models on the batched on-policy base (generate + teacher-forced passes)."""

from __future__ import annotations

from typing import Any

import torch as th
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import FloatSchedule, explained_variance

from sb3_rlhf.buffers import SequenceBatch, SequenceRolloutBuffer
from sb3_rlhf.common.on_policy_algorithm import RLHFOnPolicyAlgorithm, check_hyperparameter
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.ppo.losses import ppo_losses


class RLHFPPO(RLHFOnPolicyAlgorithm):
    """Proximal Policy Optimization for language models (Schulman et al. 2017; Ziegler et al. 2019).

    One timestep is one generated token. A rollout samples ``n_episodes`` prompts from the env, generates
    all responses with ``generate()`` and the KV cache, computes old log-probs and values in one
    teacher-forced pass, asks the env's reward wrappers for every reward term in one batch, and runs GAE
    over response tokens. The update runs ``n_epochs`` over minibatches of ``batch_size`` episodes, one
    forward each: clipped surrogate, clipped value loss, entropy bonus, gradient clipping, early stop on
    ``target_kl``. Everything else is SB3's: schedules, callbacks, logger, ``save``/``load``.

    :param policy: :class:`~sb3_rlhf.TransformerActorCriticPolicy` (or its name).
    :param env: a :class:`~sb3_rlhf.TokenGenerationEnv` under its reward wrappers (one env: episodes are
        batched inside the rollout, not across a VecEnv).
    :param learning_rate: learning rate, constant or schedule of the remaining progress.
    :param n_episodes: episodes (prompts) per rollout.
    :param batch_size: episodes per minibatch.
    :param max_batch_tokens: also cap each minibatch at this many tokens (episodes × longest prompt + response):
        long responses then come in smaller minibatches, so one forward's memory stays bounded (``None``: no cap).
    :param n_epochs: passes over the rollout per update.
    :param gamma: discount factor (1.0: the reward model judges the whole response).
    :param gae_lambda: GAE λ.
    :param clip_range: PPO clip ε (float or schedule).
    :param clip_range_vf: value clip (float or schedule); ``None`` for an unclipped value loss.
    :param normalize_advantage: whiten advantages over all response tokens of the rollout.
    :param ent_coef: entropy bonus coefficient.
    :param vf_coef: value loss coefficient.
    :param max_grad_norm: gradient clipping norm.
    :param target_kl: stop the epochs early when the approximate KL to the rollout policy exceeds 1.5×this.
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
    :param bootstrap_truncated: bootstrap truncated responses from V(s_T) (see
        :class:`~sb3_rlhf.buffers.SequenceRolloutBuffer`).
    :param n_logged_samples: generations written to TensorBoard as text each rollout (0 to disable).
    :param stats_window_size: episodes averaged for ``rollout/ep_rew_mean``.
    :param tensorboard_log: TensorBoard log folder.
    :param policy_kwargs: for the policy; models are named by path (``model_name_or_path``).
    :param verbose: 0 silent, 1 info.
    :param seed: seed of every RNG (prompt sampling, generation, minibatch order).
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    :param _init_setup_model: build the model now (SB3's ``load`` passes False).
    """

    rollout_buffer: SequenceRolloutBuffer

    def __init__(
        self,
        policy: str | type[TransformerActorCriticPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 1e-5,
        n_episodes: int = 64,
        batch_size: int = 16,
        max_batch_tokens: int | None = None,
        n_epochs: int = 4,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        clip_range: float | Schedule = 0.2,
        clip_range_vf: float | Schedule | None = 0.2,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 1.0,
        target_kl: float | None = None,
        max_consecutive_skips: int = 5,
        generation_batch_size: int | None = None,
        generation_cache: str = "auto",
        micro_batch_tokens: int | str | None = "auto",
        strategy: str = "ddp",
        shard_frozen_models: bool = True,
        bootstrap_truncated: bool = False,
        n_logged_samples: int = 4,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        check_hyperparameter("gamma", gamma, at_least=0.0, at_most=1.0)
        check_hyperparameter("gae_lambda", gae_lambda, at_least=0.0, at_most=1.0)
        check_hyperparameter("vf_coef", vf_coef, at_least=0.0)
        if not (callable(clip_range_vf) or isinstance(clip_range_vf, (int, float)) or clip_range_vf is None):
            raise TypeError(
                "clip_range_vf must be a number, a schedule (a callable of the remaining progress) or None, "
                f"got {clip_range_vf!r}"
            )
        if isinstance(clip_range_vf, (int, float)) and not clip_range_vf > 0:
            # 0 would pin the value head to its rollout estimates: it would never learn
            raise ValueError(f"clip_range_vf must be > 0, or None for an unclipped value loss, got {clip_range_vf}")
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
            rollout_buffer_class=SequenceRolloutBuffer,
            rollout_buffer_kwargs={"bootstrap_truncated": bootstrap_truncated},
            max_batch_tokens=max_batch_tokens,
            target_kl=target_kl,
            max_consecutive_skips=max_consecutive_skips,
            generation_batch_size=generation_batch_size,
            generation_cache=generation_cache,
            micro_batch_tokens=micro_batch_tokens,
            strategy=strategy,
            shard_frozen_models=shard_frozen_models,
            n_logged_samples=n_logged_samples,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.vf_coef = vf_coef
        self.clip_range_vf = clip_range_vf
        self.bootstrap_truncated = bootstrap_truncated
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.clip_range_vf is not None:
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)

    def _rollout_buffer_arguments(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "gae_lambda": self.gae_lambda, **super()._rollout_buffer_arguments()}

    def compute_advantages(self, rollout_buffer: SequenceRolloutBuffer) -> None:  # type: ignore[override]
        """GAE over response tokens (the value head's estimates)."""
        rollout_buffer.compute_returns_and_advantage(normalize_advantage=self.normalize_advantage)

    def compute_loss(
        self,
        batch: SequenceBatch,
        logprobs: th.Tensor,
        values: th.Tensor | None,
        entropy: th.Tensor,
        clip_range: float,
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        """Clipped surrogate, clipped value loss and entropy bonus (:func:`~sb3_rlhf.ppo.losses.ppo_losses`)."""
        assert values is not None and batch.old_values is not None  # learns_values
        clip_range_vf = None if self.clip_range_vf is None else self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]
        losses = ppo_losses(
            logprobs,
            batch.old_logprobs,
            batch.advantages,
            values[:, :-1],  # V(s_t) for the states where a token was chosen
            batch.old_values,
            batch.returns,
            entropy,
            batch.response_mask,
            clip_range,
            clip_range_vf,
            self.ent_coef,
            self.vf_coef,
        )
        return losses.loss, {
            "policy_gradient_loss": losses.pg_loss.detach(),
            "value_loss": losses.value_loss.detach(),
            "entropy_loss": losses.entropy_loss.detach(),
            "clip_fraction": losses.clip_fraction,
            "approx_kl": losses.approx_kl,
        }

    def _record_train_stats(self, stats: dict[str, list[float]], clip_range: float, last_loss: float) -> None:
        for key in ("entropy_loss", "policy_gradient_loss", "value_loss", "clip_fraction"):
            stats.setdefault(key, [])  # logged (NaN) even when every step was skipped
        stats["loss"] = [last_loss]  # SB3's PPO logs the loss of the last minibatch
        super()._record_train_stats(stats, clip_range, last_loss)
        buffer = self.rollout_buffer
        assert buffer.values is not None  # learns_values
        valid = buffer.response_mask.bool()
        self.logger.record(
            "train/explained_variance",
            explained_variance(buffer.values[:, :-1][valid].cpu().numpy(), buffer.returns[valid].cpu().numpy()),
        )
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", self.clip_range_vf(self._current_progress_remaining))  # type: ignore[operator]
