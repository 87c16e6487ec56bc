"""RLHFPPO: SB3's PPO with a batched rollout for language models (generate + teacher-forced passes)."""

from __future__ import annotations

import inspect
import io
import os
import time
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, Schedule
from stable_baselines3.common.utils import explained_variance
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from sb3_rlhf.common.buffers import SequenceBatch, SequenceRolloutBuffer
from sb3_rlhf.common.distributed import (
    any_rank,
    average_gradients,
    broadcast_parameters,
    init_distributed,
    is_main_process,
    mean_over_ranks,
    rank,
    sum_over_ranks,
    world_size,
)
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.io import atomic_file
from sb3_rlhf.envs.token_generation import TokenGenerationEnv
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.ppo.losses import ppo_losses
from sb3_rlhf.rewards.base import NonFiniteRewardError, RewardWrapper, reward_wrappers

SelfRLHFPPO = TypeVar("SelfRLHFPPO", bound="RLHFPPO")


class RLHFPPO(PPO):
    """Proximal Policy Optimization for language models (Schulman et al. 2017; Ziegler et al. 2019).

    One timestep is one generated token. A rollout samples ``n_episodes`` prompts from the env, generates
    all responses with ``generate()`` and the KV cache, computes old log-probs and values in one
    teacher-forced pass, asks the env's reward wrappers for every reward term in one batch, and runs GAE
    over response tokens. The update runs ``n_epochs`` over minibatches of ``batch_size`` episodes, one
    forward each: clipped surrogate, clipped value loss, entropy bonus, gradient clipping, early stop on
    ``target_kl``. Everything else is SB3's PPO: schedules, callbacks, logger, ``save``/``load``.

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
    :param max_consecutive_skips: a minibatch whose loss or gradient is not finite is skipped (no optimizer
        step), and so is the update of a rollout with a non-finite reward; both are counted in
        ``train/skipped_updates``. After this many skips in a row the run stops with an error (0: at the first).
    :param generation_batch_size: prompts per ``generate()`` call (``None``: all ``n_episodes`` at once).
    :param bootstrap_truncated: bootstrap truncated responses from V(s_T) (see :class:`~sb3_rlhf.common.buffers.SequenceRolloutBuffer`).
    :param n_logged_samples: generations written to TensorBoard as text each rollout (0 to disable).
    :param stats_window_size: episodes averaged for ``rollout/ep_rew_mean``.
    :param tensorboard_log: TensorBoard log folder.
    :param policy_kwargs: for the policy; models are named by path (``model_name_or_path``).
    :param verbose: 0 silent, 1 info.
    :param seed: seed of every RNG (prompt sampling, generation, minibatch order).
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    :param _init_setup_model: build the model now (SB3's ``load`` passes False).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "TransformerActorCriticPolicy": TransformerActorCriticPolicy
    }
    rollout_buffer: SequenceRolloutBuffer
    policy: TransformerActorCriticPolicy

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
        for name, value in (("n_episodes", n_episodes), ("batch_size", batch_size), ("n_epochs", n_epochs)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (
            ("learning_rate", learning_rate),
            ("clip_range", clip_range),
            ("clip_range_vf", clip_range_vf),
        ):
            if not (callable(value) or isinstance(value, (int, float)) or (name == "clip_range_vf" and value is None)):
                raise TypeError(
                    f"{name} must be a number or a schedule (a callable of the remaining progress), got {value!r}"
                )
        if env is None and _init_setup_model:
            raise ValueError("RLHFPPO needs an env: a TokenGenerationEnv under its reward wrappers")
        _check_policy_kwargs(policy, policy_kwargs)
        for name, value in (("generation_batch_size", generation_batch_size), ("max_batch_tokens", max_batch_tokens)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            # SB3 sizes the rollout buffer by n_steps per env: here that is episodes per rollout.
            n_steps=n_episodes,
            batch_size=batch_size,
            n_epochs=n_epochs,
            gamma=gamma,
            gae_lambda=gae_lambda,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            # SB3 whitens per minibatch and so refuses batch_size=1; here whitening is over the whole rollout
            # (SequenceRolloutBuffer), so SB3's check does not apply and the flag is set below
            normalize_advantage=False,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            rollout_buffer_class=SequenceRolloutBuffer,
            rollout_buffer_kwargs={"bootstrap_truncated": bootstrap_truncated},
            target_kl=target_kl,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        if init_distributed() and max_batch_tokens is not None:
            raise ValueError(
                "max_batch_tokens is not supported with several processes: the ranks would take different numbers "
                "of optimizer steps; leave it None"
            )
        if not isinstance(max_consecutive_skips, (int, np.integer)) or max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be an integer >= 0, got {max_consecutive_skips!r}")
        self.normalize_advantage = normalize_advantage
        self.max_consecutive_skips = max_consecutive_skips
        self.n_skipped_updates = 0
        self._skips_in_a_row = 0
        self._rollout_fault: str | None = None
        self.n_episodes = n_episodes
        self.max_batch_tokens = max_batch_tokens
        self.generation_batch_size = generation_batch_size
        self.bootstrap_truncated = bootstrap_truncated
        self.n_logged_samples = n_logged_samples
        # the training state of a checkpoint, restored when the next learn() starts (see load_checkpoint)
        self._resume_state: dict[str, Any] | None = None
        if self.env is not None:
            self._single_env()
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ env access
    def _single_env(self) -> gym.Env:
        env = self.env
        if not isinstance(env, DummyVecEnv) or env.num_envs != 1:
            raise ValueError(
                "RLHFPPO batches episodes inside its rollout: pass one TokenGenerationEnv (under its reward "
                "wrappers), not a VecEnv; set n_episodes for more episodes per rollout"
            )
        if not isinstance(env.envs[0].unwrapped, TokenGenerationEnv):
            raise TypeError(f"RLHFPPO needs a TokenGenerationEnv, got {type(env.envs[0].unwrapped).__name__}")
        return env.envs[0]

    @property
    def generation_env(self) -> TokenGenerationEnv:
        """The unwrapped TokenGenerationEnv (prompts, tokenizer, limits)."""
        return self._single_env().unwrapped  # type: ignore[return-value]

    @property
    def reward_wrappers(self) -> list[RewardWrapper]:
        """The env's reward wrappers, outermost first."""
        return reward_wrappers(self._single_env())

    def _bind_reward_wrappers(self) -> None:
        wrappers = self.reward_wrappers
        if not wrappers:
            raise ValueError(
                "the env has no reward: wrap it with sb3_rlhf.rewards.RewardFunctionWrapper or RewardModelWrapper "
                "(and KLPenaltyWrapper to stay near the reference model)"
            )
        for wrapper in wrappers:
            wrapper.bind(self.policy)

    def _setup_model(self) -> None:
        super()._setup_model()
        if getattr(self.policy, "revision", None) is not None:
            # the zip's policy_kwargs name a hub model by the commit it resolved to, not a branch that moves
            self.policy_kwargs = {**self.policy_kwargs, "revision": self.policy.revision}
        broadcast_parameters(self.policy)  # every rank starts from rank 0's weights (the value head is random)
        if self.env is not None:
            self._bind_reward_wrappers()

    def set_random_seed(self, seed: int | None = None) -> None:
        """SB3's seeding, offset by the rank: each rank of a distributed run draws its own prompts and samples."""
        super().set_random_seed(None if seed is None else seed + rank())

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        super().set_env(env, force_reset=force_reset)
        self._single_env()
        self._bind_reward_wrappers()

    # ------------------------------------------------------------------ rollout
    def collect_rollouts(  # type: ignore[override]
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: SequenceRolloutBuffer,
        n_rollout_steps: int,
    ) -> bool:
        """Generate ``n_rollout_steps`` episodes in batches and store them with their rewards.

        Callbacks see one ``on_step()`` per generated token, after generation, so step-based callbacks
        (checkpoints, progress bar) count timesteps as SB3 does.
        """
        gen_env = self.generation_env
        wrappers = self.reward_wrappers
        self.policy.set_training_mode(False)
        rollout_buffer.reset()
        for wrapper in wrappers:
            wrapper.on_rollout_start()
        callback.on_rollout_start()

        indices = self._rollout_prompt_indices(gen_env, n_rollout_steps)
        chunk = self.generation_batch_size or n_rollout_steps
        episodes: dict[str, list[Any]] = {"reward": [], "length": [], "eos": [], "neg_logprob": [], "infos": []}
        terms_per_episode: dict[str, list[th.Tensor]] = {w.name: [] for w in wrappers}
        fault = None
        for start in range(0, n_rollout_steps, chunk):
            batch, values = self.policy.sample_episodes(gen_env, indices[start : start + chunk])
            try:
                rewards, terms, ref_logprobs = self._score_batch(batch, wrappers)
            except NonFiniteRewardError as error:
                fault = str(error)
                break
            for name, term in terms.items():
                terms_per_episode[name].append(term.sum(-1).cpu())
            rollout_buffer.add(
                batch.prompt_ids,
                batch.prompt_mask,
                batch.response_ids,
                batch.response_mask,
                batch.logprobs,
                values,
                rewards,
                batch.terminated,
                ref_logprobs,
            )
            episodes["reward"] += rewards.sum(-1).tolist()
            episodes["length"] += batch.lengths.tolist()
            episodes["eos"] += batch.terminated.tolist()
            episodes["neg_logprob"] += (-batch.logprobs.sum(-1)).tolist()
            episodes["infos"] += batch.infos

        # every rank must agree on the rollout's fate and on the timestep counter (it decides when learn() stops)
        local_tokens = int(sum(episodes["length"]))
        global_tokens, faults = sum_over_ranks([local_tokens, float(fault is not None)])
        if faults:
            # nothing to learn from: the rollout is dropped (no timesteps counted) and train() skips its update
            self._rollout_fault = fault or "another rank's rollout had a non-finite reward"
            return True
        self._rollout_fault = None

        elapsed = time.time() - self.start_time / 1e9
        for i, (reward, length) in enumerate(zip(episodes["reward"], episodes["length"])):
            info = {**episodes["infos"][i], "episode": {"r": reward, "l": length, "t": round(elapsed, 6)}}
            self.ep_info_buffer.append(info["episode"])
            for t in range(length):
                self.num_timesteps += 1
                done = t == length - 1
                callback.update_locals(
                    {
                        "dones": np.array([done]),
                        "infos": [info if done else {}],
                        "rewards": np.zeros(1, dtype=np.float32),
                    }
                )
                if not callback.on_step():
                    return False
        self.num_timesteps += int(global_tokens) - local_tokens  # the other ranks' tokens

        self._compute_advantages(rollout_buffer)
        self._log_rollout(wrappers, episodes, {k: th.cat(v) for k, v in terms_per_episode.items()})
        for wrapper in wrappers:
            wrapper.on_rollout_end()
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _rollout_prompt_indices(self, env: TokenGenerationEnv, n_episodes: int) -> np.ndarray:
        """The prompt of each episode of the rollout, drawn from the env's RNG (from this rank's shard)."""
        return env.sample_prompt_indices(n_episodes, rank(), world_size())

    def _score_batch(
        self, batch: GenerationBatch, wrappers: list[RewardWrapper]
    ) -> tuple[th.Tensor, dict[str, th.Tensor], th.Tensor | None]:
        """Every reward term of a batch, in one call per wrapper.

        :return: the summed per-token rewards ``(batch, T)``, each wrapper's term ``(batch, T)`` by name, and
            the reference log-probs to store (``None``: the KL is a reward term here, not a loss term).
        """
        terms = {wrapper.name: wrapper.batch_rewards(batch) for wrapper in wrappers}
        return sum(terms.values(), th.zeros_like(batch.logprobs)), terms, None

    def _compute_advantages(self, rollout_buffer: SequenceRolloutBuffer) -> None:
        """GAE over response tokens (the value head's estimates)."""
        rollout_buffer.compute_returns_and_advantage(normalize_advantage=self.normalize_advantage)

    def _log_rollout(
        self, wrappers: list[RewardWrapper], episodes: dict[str, list[Any]], terms: dict[str, th.Tensor]
    ) -> None:
        """RLHF metrics under ``rlhf/`` (TRL's names where they exist) and a few samples as text."""
        n = len(episodes["reward"])
        scores = sum((terms[w.name] for w in wrappers if w.is_score), th.zeros(n))
        non_scores = sum((terms[w.name] for w in wrappers if not w.is_score), th.zeros(n))
        record = self.logger.record
        record("rlhf/scores", scores.mean().item())
        record("rlhf/non_score_reward", non_scores.mean().item())
        record("rlhf/rlhf_reward", (scores + non_scores).mean().item())
        for name, values in terms.items():
            record(f"rlhf/reward_terms/{name}", values.mean().item())
        for wrapper in wrappers:
            for key, value in wrapper.rollout_stats().items():
                record(f"rlhf/{key}", value)
        record("rlhf/entropy", float(np.mean(episodes["neg_logprob"])))
        record("rlhf/response_length", float(np.mean(episodes["length"])))
        record("rlhf/eos_fraction", float(np.mean(episodes["eos"])))
        if self.n_logged_samples > 0:
            self._log_samples(episodes["infos"][: self.n_logged_samples], scores, episodes["reward"])

    def _log_samples(self, infos: list[dict[str, Any]], scores: th.Tensor, rewards: list[float]) -> None:
        writers = [f.writer for f in self.logger.output_formats if isinstance(f, TensorBoardOutputFormat)]
        if not writers:
            return

        def cell(text: str) -> str:
            return text.replace("|", "\\|").replace("\n", " ")

        rows = ["| prompt | completion | score | reward |", "|---|---|---|---|"]
        for i, info in enumerate(infos):
            rows.append(f"| {cell(info['prompt'])} | {cell(info['completion'])} | {scores[i]:.3f} | {rewards[i]:.3f} |")
        for writer in writers:
            writer.add_text("rlhf/samples", "\n".join(rows), self.num_timesteps)

    def _update_current_progress_remaining(self, num_timesteps: int, total_timesteps: int) -> None:
        # A rollout generates a variable number of tokens and can overshoot total_timesteps: without the clamp a
        # linear schedule would hand the last update a negative learning rate.
        super()._update_current_progress_remaining(num_timesteps, total_timesteps)
        self._current_progress_remaining = max(0.0, self._current_progress_remaining)

    # ------------------------------------------------------------------ update
    def train(self) -> None:
        """PPO epochs over minibatches of sequences (CleanRL-style, token-level masked means)."""
        if self._skipped_rollout():
            return
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = None if self.clip_range_vf is None else self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        pg_losses, value_losses, entropy_losses, clip_fractions, approx_kls = [], [], [], [], []
        continue_training = True
        for epoch in range(self.n_epochs):
            for mb in self.rollout_buffer.get(self.batch_size, self.max_batch_tokens):
                mask = mb.response_mask
                logprobs, values, entropy = self.policy.evaluate_sequences(
                    mb.input_ids, mb.attention_mask, mask.shape[1], entropy_grad=self.ent_coef != 0
                )
                losses = ppo_losses(
                    logprobs,
                    mb.old_logprobs,
                    mb.advantages,
                    values[:, :-1],  # V(s_t) for the states where a token was chosen
                    mb.old_values,
                    mb.returns,
                    entropy,
                    mask,
                    clip_range,
                    clip_range_vf,
                    self.ent_coef,
                    self.vf_coef,
                )
                approx_kl = mean_over_ranks(losses.approx_kl)  # the same early-stop decision on every rank
                approx_kls.append(approx_kl)
                if self.target_kl is not None and approx_kl > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl:.2f}")
                    break

                if not self._optimizer_step(losses.loss, self._loss_normalizer(mb)):
                    continue
                pg_losses.append(losses.pg_loss.item())
                value_losses.append(losses.value_loss.item())
                entropy_losses.append(losses.entropy_loss.item())
                clip_fractions.append(losses.clip_fraction)
            self._n_updates += 1
            if not continue_training:
                break

        buffer = self.rollout_buffer
        valid = buffer.response_mask.bool()
        explained_var = explained_variance(
            buffer.values[:, :-1][valid].cpu().numpy(), buffer.returns[valid].cpu().numpy()
        )
        self.logger.record("train/entropy_loss", np.mean(entropy_losses) if entropy_losses else float("nan"))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses) if pg_losses else float("nan"))
        self.logger.record("train/value_loss", np.mean(value_losses) if value_losses else float("nan"))
        self.logger.record("train/approx_kl", np.mean(approx_kls))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions) if clip_fractions else float("nan"))
        self.logger.record("train/loss", losses.loss.item())
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/skipped_updates", self.n_skipped_updates)
        self.logger.record("train/clip_range", clip_range)
        if clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)

    def _optimizer_step(self, loss: th.Tensor, normalizer: float = 1.0) -> bool:
        """Backward, gradient clipping at ``max_grad_norm``, one optimizer step; skipped (returns False) when the
        loss or the gradient is not finite, so that one bad minibatch cannot poison the weights or Adam's moments.

        With several ranks each holds part of the minibatch: its loss, a mean over ``normalizer`` items (tokens, or
        sequences), is weighted by its share of all ranks' items, and the gradients are averaged across ranks, so
        the step is the one a single process would take on the whole minibatch.
        """
        self.policy.optimizer.zero_grad()
        finite = bool(th.isfinite(loss))
        if any_rank(not finite):
            self._skip_update(f"the loss is {loss.item()}" if not finite else "another rank's loss is not finite")
            return False
        if world_size() > 1:
            (total,) = sum_over_ranks([normalizer])
            loss = loss * (world_size() * normalizer / total)
        loss.backward()
        average_gradients(self.policy.parameters())
        grad_norm = th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
        if not th.isfinite(grad_norm):
            self.policy.optimizer.zero_grad()
            self._skip_update(f"the gradient norm is {grad_norm.item()}")
            return False
        self.policy.optimizer.step()
        self._skips_in_a_row = 0
        return True

    def _loss_normalizer(self, batch: SequenceBatch) -> float:
        """What the minibatch loss is a mean over: its real response tokens (PPO's losses are token means)."""
        return float(batch.response_mask.sum())

    def _skipped_rollout(self) -> bool:
        """Skip the update of a rollout dropped for a non-finite reward (see :meth:`collect_rollouts`)."""
        if self._rollout_fault is None:
            return False
        fault, self._rollout_fault = self._rollout_fault, None
        self._skip_update(fault)
        self.logger.record("train/skipped_updates", self.n_skipped_updates)
        return True

    def _skip_update(self, reason: str) -> None:
        """Count a skipped update; stop the run after more than ``max_consecutive_skips`` in a row."""
        self.n_skipped_updates += 1
        self._skips_in_a_row += 1
        if self.verbose >= 1:
            print(f"Skipping an update: {reason}")
        if self._skips_in_a_row > self.max_consecutive_skips:
            raise FloatingPointError(
                f"{self._skips_in_a_row} updates in a row were skipped because of non-finite values (the last: "
                f"{reason}); stopping. Check the reward for NaN/inf, lower the learning rate, or train in float32 "
                "or bfloat16 rather than float16; raise max_consecutive_skips to tolerate more"
            )

    # ------------------------------------------------------------------ saving and resuming
    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_resume_state"]

    def save(self, path: str | os.PathLike | io.BufferedIOBase, *args: Any, **kwargs: Any) -> None:
        """SB3's ``save``, written to a temporary file and renamed into place: a crash mid-save leaves the
        previous file intact."""
        if isinstance(path, io.BufferedIOBase):
            return super().save(path, *args, **kwargs)
        with atomic_file(str(path) if str(path).endswith(".zip") else f"{path}.zip") as tmp:
            super().save(tmp, *args, **kwargs)

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfRLHFPPO],
        path: str | os.PathLike | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        trust_pickled_objects: bool = False,
        **kwargs: Any,
    ) -> SelfRLHFPPO:
        """SB3's ``load``, without running code from the zip: tensors load with ``weights_only=True`` (as in SB3)
        and the pickled hyperparameters through an allowlist (:mod:`sb3_rlhf.common.safe_load`).

        :param trust_pickled_objects: unpickle the zip's data as SB3 does, with no allowlist (needed for a zip that
            holds your own code, e.g. a lambda learning-rate schedule); only for files you trust.
        :param kwargs: the rest of SB3's ``load`` arguments.
        """
        if not trust_pickled_objects:
            from sb3_rlhf.common.safe_load import safe_custom_objects

            custom_objects = safe_custom_objects(path, custom_objects)
        return super().load(path, env=env, device=device, custom_objects=custom_objects, **kwargs)

    @classmethod
    def load_checkpoint(
        cls: type[SelfRLHFPPO], path: str, env: GymEnv, device: th.device | str = "auto", **kwargs: Any
    ) -> SelfRLHFPPO:
        """Resume from the newest checkpoint in ``path`` (see :class:`~sb3_rlhf.common.checkpoints.TrainingCheckpointCallback`).

        The policy, value head, optimizer and counters load now; the KL controller, the env's prompt sampler and
        every RNG are restored when ``learn(..., reset_num_timesteps=False)`` starts, so the run continues as if
        it had never stopped. ``learn(total_timesteps - model.num_timesteps, reset_num_timesteps=False)`` finishes
        a run planned for ``total_timesteps``.

        :param path: a checkpoint folder, or the folder of ``checkpoint_<timesteps>`` folders.
        :param env: the env of the original run (same prompts and reward wrappers).
        """
        from sb3_rlhf.common.checkpoints import load_checkpoint

        return load_checkpoint(cls, path, env, device=device, **kwargs)  # type: ignore[return-value]

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: Any = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        if rank() > 0 and not self._custom_logger:
            self.set_logger(Logger(folder=None, output_formats=[]))  # rank 0 logs for all
        progress_bar = progress_bar and is_main_process()
        if self._resume_state is not None and reset_num_timesteps:
            raise ValueError(
                "this model was loaded from a checkpoint to resume a run: call "
                "learn(total_timesteps - model.num_timesteps, reset_num_timesteps=False) so that its timestep "
                "counter, schedules and logs carry on"
            )
        total_timesteps, callback = super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        if self._resume_state is not None:
            # after SB3's setup (which resets the env), so that the first rollout draws what it would have drawn
            from sb3_rlhf.common.checkpoints import restore_training_state

            restore_training_state(self, self._resume_state)
            self._resume_state = None
        return total_timesteps, callback

    def learn(  # type: ignore[override]
        self: SelfRLHFPPO,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 1,
        tb_log_name: str = "RLHFPPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfRLHFPPO:
        """Train for ``total_timesteps`` generated tokens (SB3's ``learn``)."""
        if (
            isinstance(total_timesteps, bool)
            or not isinstance(total_timesteps, (int, np.integer))
            or total_timesteps < 0
        ):
            raise ValueError(f"total_timesteps must be an integer >= 0 (generated tokens), got {total_timesteps!r}")
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )


def _check_policy_kwargs(policy: Any, policy_kwargs: dict[str, Any] | None) -> None:
    """Name an unknown ``policy_kwargs`` key before SB3 builds the policy with it."""
    policy_class = RLHFPPO.policy_aliases.get(policy, policy) if isinstance(policy, str) else policy
    if not policy_kwargs or not isinstance(policy_class, type):
        return
    parameters = inspect.signature(policy_class.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    taken = set(parameters) - {"self", "observation_space", "action_space", "lr_schedule"}
    unknown = sorted(set(policy_kwargs) - taken)
    if unknown:
        raise ValueError(f"unknown policy_kwargs key {unknown[0]!r}: {policy_class.__name__} takes {sorted(taken)}")
