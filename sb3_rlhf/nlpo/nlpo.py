"""NLPO: PPO on the masked action space of a periodically synchronised masking policy (Ramamurthy et al. 2022)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.vec_env import VecEnv

from sb3_rlhf.buffers import SequenceRolloutBuffer
from sb3_rlhf.common.sequences import count_packed
from sb3_rlhf.common.truncation import check_truncation
from sb3_rlhf.envs.masks import ActionMask
from sb3_rlhf.nlpo.masking import MaskingPolicy
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.ppo import RLHFPPO


class NLPO(RLHFPPO):
    """Natural Language Policy Optimization (Ramamurthy et al. 2022, "Is Reinforcement Learning (Not) for Natural
    Language Processing?", the RL4LMs paper): PPO whose action space at every step is the top-p nucleus of a
    *masking policy*, a frozen copy of the policy brought level with it every ``mask_update_freq`` rollouts.

    The mask is the policy's :attr:`~sb3_rlhf.TransformerActorCriticPolicy.action_mask`, so everything is computed on
    one masked distribution: ``generate()`` samples from it (a logits processor, with the masking model's KV cache),
    and the old log-probs, the update's log-probs and entropy, and the KL reward's policy log-probs are the
    teacher-forced masked ones (the masking model's one forward per minibatch gives every step's mask). The
    masking policy changes only between rollouts, so a rollout and its update share one mask. An env's own
    ``mask_sources`` (a constrained vocabulary, banned tokens) are intersected with the nucleus; the env's stop
    tokens stay allowed, as RL4LMs keeps the special tokens.

    The KL reference is unchanged (the initial model, unmasked), so the KL is that of the distribution actually
    sampled, and it is not 0 at the start: there (policy = masking copy = reference) a sampled token's
    log π_masked − log π_ref is −log of the reference's probability mass on the nucleus, at most
    log(1 / ``mask_top_p``) per token.

    As in RL4LMs, the mask of every step is kept in the rollout (one bit per token) and the update uses exactly the
    masks the tokens were sampled under. Differences from RL4LMs' implementation: its KL reward takes the unmasked
    policy's log-probs; its nucleus is that of the masking model's raw logits, ours at the policy's temperature (the
    masking copy is the policy's distribution as sampled); its masking copy is refreshed after a rollout is
    collected, ours at the start of the next one (the same copy serves a rollout and its update either way). Saved
    and resumed with the rest of the model: the masking copy's trained parameters go into the zip (under LoRA only
    its adapter), with the count of rollouts since its last synchronisation.

    The per-step ``predict(obs)`` samples without the mask (an observation does not say where the response
    starts), and ``policy.save_pretrained`` exports the unmasked model: the masked policy is ``generate()`` on this
    model.

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
    :param mask_top_p: the masking policy's nucleus: at each step only the most probable tokens under it whose
        probability reaches this are allowed (the paper's 0.9).
    :param mask_update_freq: rollouts between two synchronisations of the masking policy with the policy (RL4LMs'
        most used setting, 20; its IMDB configs use 5).
    :param mask_min_tokens_to_keep: the mask always keeps at least this many tokens (RL4LMs' default is 100 on
        GPT-2's vocabulary; 1 is the plain nucleus).
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
        mask_top_p: float = 0.9,
        mask_update_freq: int = 20,
        mask_min_tokens_to_keep: int = 1,
        _init_setup_model: bool = True,
    ) -> None:
        try:
            check_truncation(0, mask_top_p)
        except ValueError as error:
            raise ValueError(f"mask_top_p: {error}") from None
        for name, value in (
            ("mask_update_freq", mask_update_freq),
            ("mask_min_tokens_to_keep", mask_min_tokens_to_keep),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_episodes=n_episodes,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            n_epochs=n_epochs,
            gamma=gamma,
            gae_lambda=gae_lambda,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            normalize_advantage=normalize_advantage,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            target_kl=target_kl,
            max_consecutive_skips=max_consecutive_skips,
            generation_batch_size=generation_batch_size,
            generation_cache=generation_cache,
            micro_batch_tokens=micro_batch_tokens,
            strategy=strategy,
            shard_frozen_models=shard_frozen_models,
            bootstrap_truncated=bootstrap_truncated,
            n_logged_samples=n_logged_samples,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        self.mask_top_p = float(mask_top_p)
        self.mask_update_freq = int(mask_update_freq)
        self.mask_min_tokens_to_keep = int(mask_min_tokens_to_keep)
        self.rollouts_since_mask_update = 0
        self.n_mask_updates = 0
        # the tokens the mask never removes (the env's stop tokens), saved so that a model loaded without an env
        # still masks as it trained
        self.mask_keep_token_ids: list[int] = []
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        if self.parallel.sharded:
            raise ValueError(
                "NLPO is not supported with strategy='fsdp' yet (its masking policy is a copy of the whole actor): "
                "use strategy='ddp'"
            )
        self.masking_policy = MaskingPolicy(self.policy, self.mask_top_p, self.mask_min_tokens_to_keep)
        self._bind_action_mask()
        self.rollout_engine.check_policy(self.policy)  # now with the nucleus mask: not every cache samples under it

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        super().set_env(env, force_reset=force_reset)
        self._bind_action_mask()

    def _bind_action_mask(self) -> None:
        """Set the policy's action mask: the masking policy's nucleus, intersected with the env's own sources."""
        env_mask = self.generation_env.action_mask if self.env is not None else None
        if self.env is not None:
            env = self.generation_env
            self.mask_keep_token_ids = list(env_mask.keep_token_ids if env_mask is not None else env.stop_token_ids)
        sources = [self.masking_policy.mask, *(env_mask.sources if env_mask is not None else [])]
        self.policy.action_mask = ActionMask(sources, self.policy.n_actions, self.mask_keep_token_ids)

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, variables = super()._get_torch_save_params()
        return [*state_dicts, "masking_policy"], variables

    def collect_rollouts(  # type: ignore[override]
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: SequenceRolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """Bring the masking policy level with the policy every ``mask_update_freq`` rollouts, then collect one.

        The count goes up after the rollout, so that a checkpoint written as it starts records the state before it.
        """
        if self.rollouts_since_mask_update >= self.mask_update_freq:
            self.masking_policy.sync()
            self.rollouts_since_mask_update = 0
            self.n_mask_updates += 1
        else:
            self.masking_policy.follow_policy()
        collected = super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)
        if collected and self._rollout_fault is None:  # a stopped or dropped rollout is not trained on
            self.rollouts_since_mask_update += 1
        return collected

    def _log_rollout(self, wrappers: list[Any], episodes: dict[str, list[Any]], terms: dict[str, th.Tensor]) -> None:
        super()._log_rollout(wrappers, episodes, terms)
        buffer = self.rollout_buffer
        if buffer.action_masks is not None:  # NLPO's diagnostic: how many tokens the mask leaves, per step
            allowed = count_packed(buffer.action_masks)
            self.logger.record("rlhf/mask_size", allowed[buffer.response_mask.bool()].float().mean().item())

    def _record_train_stats(self, stats: dict[str, list[float]], clip_range: float, last_loss: float) -> None:
        super()._record_train_stats(stats, clip_range, last_loss)
        self.logger.record("train/mask_updates", self.n_mask_updates)
