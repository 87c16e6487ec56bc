"""The base of the critic-free online algorithms (RLOO, GRPO, P3O): several responses per prompt, sequence
advantages from the group, no value function. Rollouts, callbacks, logging and saving are RLHFPPO's."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, ClassVar

import numpy as np
import torch as th
from stable_baselines3.common.type_aliases import GymEnv, Schedule

from sb3_rlhf.common.buffers import GroupRolloutBuffer, SequenceBatch
from sb3_rlhf.common.distributed import mean_over_ranks, rank, world_size
from sb3_rlhf.envs.token_generation import TokenGenerationEnv
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.ppo.ppo import RLHFPPO


class GroupRolloutAlgorithm(RLHFPPO):
    """Samples ``samples_per_prompt`` responses for each of ``n_episodes / samples_per_prompt`` prompts per
    rollout and trains on sequence advantages computed within each group. Subclasses define
    :meth:`group_advantages` and :meth:`policy_loss`.

    The policy keeps its value head (the same policy class serves every algorithm) but nothing trains it.

    :param policy: :class:`~sb3_rlhf.TransformerActorCriticPolicy` (or its name).
    :param env: a :class:`~sb3_rlhf.TokenGenerationEnv` under its reward wrappers.
    :param learning_rate: learning rate, constant or schedule of the remaining progress.
    :param n_episodes: episodes (responses) per rollout, a multiple of ``samples_per_prompt``.
    :param samples_per_prompt: responses sampled for each prompt (``k >= 2``).
    :param batch_size: episodes per minibatch, a multiple of ``samples_per_prompt`` (groups stay whole).
    :param n_epochs: passes over the rollout per update (1: every sample is used once, on-policy).
    :param clip_range: the trust-region clip ε (float or schedule).
    :param normalize_advantage: scale the sequence advantages to unit variance over the rollout.
    :param ent_coef: entropy bonus coefficient.
    :param max_grad_norm: gradient clipping norm.
    :param target_kl: stop the epochs early when the approximate KL to the rollout policy exceeds 1.5×this.
    :param kwargs: the rest of :class:`~sb3_rlhf.RLHFPPO`'s arguments (``generation_batch_size``,
        ``n_logged_samples``, ``tensorboard_log``, ``policy_kwargs``, ``verbose``, ``seed``, ``device``, ...).
    """

    #: the algorithm's name in errors
    algorithm_name = "group"
    #: what the policy loss is a mean over: ``"token"`` or ``"sequence"`` (RLOO and GRPO take it as an argument;
    #: P3O's loss is a mean over pairs of sequences)
    loss_aggregation = "sequence"
    #: RLHFPPO arguments fixed here (no GAE, no value loss)
    fixed_arguments: ClassVar[frozenset[str]] = frozenset(
        {"gamma", "gae_lambda", "clip_range_vf", "vf_coef", "bootstrap_truncated"}
    )
    rollout_buffer: GroupRolloutBuffer

    def __init__(
        self,
        policy: str | type[TransformerActorCriticPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule = 1e-5,
        n_episodes: int = 64,
        samples_per_prompt: int = 4,
        batch_size: int = 16,
        n_epochs: int = 1,
        clip_range: float | Schedule = 0.2,
        normalize_advantage: bool = True,
        ent_coef: float = 0.0,
        max_grad_norm: float = 1.0,
        target_kl: float | None = None,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(samples_per_prompt, (int, np.integer)) or samples_per_prompt < 2:
            raise ValueError(
                f"{self.algorithm_name} compares responses to the same prompt: samples_per_prompt must be an "
                f"integer >= 2, got {samples_per_prompt!r}"
            )
        for name, value in (("n_episodes", n_episodes), ("batch_size", batch_size)):
            if isinstance(value, (int, np.integer)) and value % samples_per_prompt:
                raise ValueError(
                    f"{name} ({value}) must be a multiple of samples_per_prompt ({samples_per_prompt}): "
                    "every group of responses to one prompt stays whole"
                )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_episodes=n_episodes,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=1.0,
            gae_lambda=1.0,
            clip_range=clip_range,
            clip_range_vf=None,
            normalize_advantage=normalize_advantage,
            ent_coef=ent_coef,
            vf_coef=0.0,
            max_grad_norm=max_grad_norm,
            target_kl=target_kl,
            _init_setup_model=False,
            **kwargs,
        )
        self.samples_per_prompt = int(samples_per_prompt)
        self.rollout_buffer_class = GroupRolloutBuffer
        self.rollout_buffer_kwargs = {"group_size": self.samples_per_prompt}
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ rollout
    def _rollout_prompt_indices(self, env: TokenGenerationEnv, n_episodes: int) -> np.ndarray:
        prompts = env.sample_prompt_indices(n_episodes // self.samples_per_prompt, rank(), world_size())
        return np.repeat(prompts, self.samples_per_prompt)

    def _compute_advantages(self, rollout_buffer: GroupRolloutBuffer) -> None:  # type: ignore[override]
        rollout_buffer.compute_group_advantages(self.group_advantages, self.normalize_advantage)

    def group_advantages(self, returns: th.Tensor) -> th.Tensor:
        """``(n_prompts, k)`` sequence returns → ``(n_prompts, k)`` sequence advantages."""
        raise NotImplementedError

    # ------------------------------------------------------------------ update
    def _loss_normalizer(self, batch: SequenceBatch) -> float:
        if self.loss_aggregation == "token":
            return float(batch.response_mask.sum())
        return float(batch.response_mask.shape[0])

    def policy_loss(
        self, batch: SequenceBatch, logprobs: th.Tensor, entropy: th.Tensor, clip_range: float
    ) -> tuple[th.Tensor, dict[str, float]]:
        """The loss of one minibatch and its diagnostics (``approx_kl`` and ``clip_fraction`` among them).

        :param logprobs: ``(batch, T)`` log π_θ of the response tokens (with gradient).
        :param entropy: ``(batch, T)`` entropy of π_θ at each response position (with gradient).
        """
        raise NotImplementedError

    def train(self) -> None:
        """``n_epochs`` over minibatches of whole groups; one forward per minibatch."""
        if self._skipped_rollout():
            return
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        stats: dict[str, list[float]] = defaultdict(list)
        continue_training = True
        for epoch in range(self.n_epochs):
            for mb in self.rollout_buffer.get(self.batch_size, self.max_batch_tokens):
                logprobs, _, entropy = self.policy.evaluate_sequences(
                    mb.input_ids, mb.attention_mask, mb.response_mask.shape[1], entropy_grad=self.ent_coef != 0
                )
                loss, metrics = self.policy_loss(mb, logprobs, entropy, clip_range)
                metrics["approx_kl"] = mean_over_ranks(metrics["approx_kl"])  # the same early stop on every rank
                stats["approx_kl"].append(metrics["approx_kl"])
                if self.target_kl is not None and metrics["approx_kl"] > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {metrics['approx_kl']:.2f}")
                    break
                if not self._optimizer_step(loss, self._loss_normalizer(mb)):
                    continue
                for key, value in metrics.items():
                    if key != "approx_kl":
                        stats[key].append(value)
                stats["loss"].append(loss.item())
            self._n_updates += 1
            if not continue_training:
                break

        for key, values in stats.items():
            self.logger.record(f"train/{key}", float(np.mean(values)) if values else float("nan"))
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/skipped_updates", self.n_skipped_updates)
        self.logger.record("train/clip_range", clip_range)
