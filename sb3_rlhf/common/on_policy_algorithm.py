"""RLHFOnPolicyAlgorithm: the base of every online algorithm for language models (RLHFPPO, NLPO, RLOO, GRPO, P3O).

As SB3's :class:`~stable_baselines3.common.on_policy_algorithm.OnPolicyAlgorithm` is for PPO and A2C, this class
owns what the online algorithms share: env access and reward binding, the batched rollout (``generate()`` and one
teacher-forced pass, every reward term in one call per wrapper, logging), the epoch/minibatch loop of the update
with the early stop on ``target_kl`` and the non-finite skip logic, seeding and the distributed hooks, and atomic
``save``, safe ``load`` and resuming from a checkpoint. A subclass says how advantages are computed
(:meth:`compute_advantages`) and what the loss of a minibatch is (:meth:`compute_loss`).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import os
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from typing import Any, ClassVar, TypeVar

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, ConvertCallback
from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import FloatSchedule, set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

from sb3_rlhf.buffers import BaseSequenceBuffer, SequenceBatch, split_minibatch
from sb3_rlhf.common.checkpoints import MODEL_FILE, SHARDED_FOLDER, STATE_FILE, latest_checkpoint, rank_state_file
from sb3_rlhf.common.distributed import (
    init_distributed,
    is_main_process,
    max_over_ranks,
    mean_over_ranks,
    rank,
    sum_over_ranks,
    world_size,
)
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.io import atomic_file
from sb3_rlhf.common.memory import (
    DeviceMemoryError,
    activation_bytes_per_token,
    check_micro_batch_tokens,
    local_bytes,
    micro_batch_tokens_for,
)
from sb3_rlhf.common.models import check_device
from sb3_rlhf.common.progress import ProgressLogCallback, stdout_is_terminal
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.common.safe_load import safe_custom_objects
from sb3_rlhf.common.sequences import LOSS_AGGREGATIONS, minibatch_normalizers
from sb3_rlhf.common.strategies import ParallelStrategy, check_strategy, make_strategy
from sb3_rlhf.envs.token_generation import TokenGenerationEnv
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.rewards.base import NonFiniteRewardError, RewardWrapper, reward_wrappers

SelfRLHFOnPolicyAlgorithm = TypeVar("SelfRLHFOnPolicyAlgorithm", bound="RLHFOnPolicyAlgorithm")


class RLHFOnPolicyAlgorithm(OnPolicyAlgorithm):
    """The base class of the online algorithms: one timestep is one generated token, one rollout is
    ``n_episodes`` responses sampled in batches, and the update runs ``n_epochs`` over minibatches of whole
    episodes (or whole groups of responses to one prompt).

    :param policy: :class:`~sb3_rlhf.TransformerActorCriticPolicy` (or its name).
    :param env: a :class:`~sb3_rlhf.TokenGenerationEnv` under its reward wrappers (one env: episodes are batched
        inside the rollout, not across a VecEnv).
    :param learning_rate: learning rate, constant or schedule of the remaining progress.
    :param n_episodes: episodes (responses) per rollout.
    :param batch_size: episodes per minibatch.
    :param max_batch_tokens: also cap each minibatch at this many tokens (episodes × longest prompt + response):
        long responses then come in smaller minibatches, so one forward's memory stays bounded (``None``: no cap).
    :param n_epochs: passes over the rollout per update.
    :param clip_range: the trust-region clip ε (float or schedule).
    :param normalize_advantage: whiten (or scale) the advantages over the rollout.
    :param ent_coef: entropy bonus coefficient.
    :param max_grad_norm: gradient clipping norm.
    :param target_kl: stop the epochs early when the approximate KL to the rollout policy exceeds 1.5×this.
    :param max_consecutive_skips: a minibatch whose loss or gradient is not finite is skipped (no optimizer
        step), and so is the update of a rollout with a non-finite reward; both are counted in
        ``train/skipped_updates``. After this many skips in a row the run stops with an error (0: at the first).
    :param generation_batch_size: prompts per ``generate()`` call (``None``: all ``n_episodes`` at once).
    :param generation_cache: the KV cache of ``generate()``: ``"static"`` (transformers then compiles the decoding
        step on CUDA, with CUDA graphs; the shapes are bucketed so that a run compiles once), ``"dynamic"``,
        ``"auto"`` (static on CUDA, dynamic elsewhere), or ``"continuous"`` (transformers' continuous batching,
        ``generate_batch``, for long or uneven responses; a policy without top-k/top-p or an action mask). See
        :class:`~sb3_rlhf.common.rollout_engine.RolloutEngine`.
    :param micro_batch_tokens: split each minibatch into micro-batches of at most this many tokens and accumulate
        their gradients into the minibatch's one optimizer step (the same step, in less memory): a positive integer,
        ``"auto"`` (on CUDA, sized from the free GPU memory; elsewhere no split) or ``None`` (no split).
    :param strategy: how a run of several processes (``torchrun``, ``accelerate launch``) spreads the policy:
        ``"ddp"`` (a whole replica per process, gradients all-reduced by PyTorch's DistributedDataParallel) or
        ``"fsdp"`` (weights, gradients and optimizer state sharded over the processes by FSDP2's ``fully_shard``).
        See :mod:`sb3_rlhf.common.strategies`; one process ignores it.
    :param shard_frozen_models: under ``"fsdp"``, shard the KL reference and reward models too (``False``: a whole
        copy on each process, no gathering in their forwards).
    :param samples_per_prompt: responses sampled for each prompt drawn (consecutive episodes share a prompt);
        ``n_episodes`` and ``batch_size`` must be multiples of it, so that a group stays in one minibatch.
    :param rollout_buffer_class: the rollout storage, a :class:`~sb3_rlhf.buffers.BaseSequenceBuffer`.
    :param rollout_buffer_kwargs: its own arguments.
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
    #: what a minibatch loss is a mean over, for weighting the ranks of a distributed run: ``"token"`` (every
    #: response token) or ``"sequence"`` (every response)
    loss_aggregation: str = "token"
    #: whether the algorithm learns a value function: the critic-free ones (RLOO, GRPO, P3O) compute no values,
    #: neither in the rollout nor in the update
    learns_values: ClassVar[bool] = True
    rollout_buffer: BaseSequenceBuffer  # type: ignore[assignment]
    policy: TransformerActorCriticPolicy  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[TransformerActorCriticPolicy],
        env: GymEnv | str | None,
        learning_rate: float | Schedule,
        n_episodes: int,
        batch_size: int,
        n_epochs: int,
        clip_range: float | Schedule,
        normalize_advantage: bool,
        ent_coef: float,
        max_grad_norm: float,
        rollout_buffer_class: type[BaseSequenceBuffer],
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        max_batch_tokens: int | None = None,
        target_kl: float | None = None,
        max_consecutive_skips: int = 5,
        generation_batch_size: int | None = None,
        generation_cache: str = "auto",
        micro_batch_tokens: int | str | None = "auto",
        strategy: str = "ddp",
        shard_frozen_models: bool = True,
        samples_per_prompt: int = 1,
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
        for name, schedule in (("learning_rate", learning_rate), ("clip_range", clip_range)):
            if not (callable(schedule) or isinstance(schedule, (int, float))):
                raise TypeError(
                    f"{name} must be a number or a schedule (a callable of the remaining progress), got {schedule!r}"
                )
            check_hyperparameter(name, schedule, above=0.0)
        check_hyperparameter("ent_coef", ent_coef)
        check_hyperparameter("max_grad_norm", max_grad_norm, above=0.0, infinite=True)  # inf: no clipping
        if target_kl is not None:
            check_hyperparameter("target_kl", target_kl, above=0.0)
        check_device(device)
        if samples_per_prompt > 1:
            for name, value in (("n_episodes", n_episodes), ("batch_size", batch_size)):
                if value % samples_per_prompt:
                    raise ValueError(
                        f"{name} ({value}) must be a multiple of samples_per_prompt ({samples_per_prompt}): "
                        "every group of responses to one prompt stays whole"
                    )
        _check_policy_kwargs(self.policy_aliases, policy, policy_kwargs)
        if not self.learns_values and (policy_kwargs or {}).get("value_head") == "separate":
            raise ValueError(
                f"{type(self).__name__} learns no value function: value_head='separate' would build a critic "
                "backbone that nothing uses; leave value_head at its default"
            )
        for name, limit in (("generation_batch_size", generation_batch_size), ("max_batch_tokens", max_batch_tokens)):
            if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {limit!r}")
        super().__init__(
            policy,  # type: ignore[arg-type]
            env,  # type: ignore[arg-type]
            learning_rate=learning_rate,
            # SB3 sizes the rollout buffer by n_steps per env: here that is episodes per rollout.
            n_steps=n_episodes,
            # SB3's GAE settings; the GAE family (RLHFPPO) sets its own, the group family has none
            gamma=1.0,
            gae_lambda=1.0,
            ent_coef=ent_coef,
            vf_coef=0.0,
            max_grad_norm=max_grad_norm,
            use_sde=False,
            sde_sample_freq=-1,
            rollout_buffer_class=rollout_buffer_class,  # type: ignore[arg-type]
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
            supported_action_spaces=(spaces.Discrete,),
        )
        init_distributed()  # the process group a launcher describes, joined before anything is built
        micro_batch_tokens = check_micro_batch_tokens(micro_batch_tokens)
        check_strategy(strategy)
        if not isinstance(shard_frozen_models, bool):
            raise TypeError(f"shard_frozen_models must be True or False, got {shard_frozen_models!r}")
        RolloutEngine(generation_cache)  # the setting checked where it is read, not at the first rollout
        if not isinstance(max_consecutive_skips, (int, np.integer)) or max_consecutive_skips < 0:
            raise ValueError(f"max_consecutive_skips must be an integer >= 0, got {max_consecutive_skips!r}")
        self.n_episodes = n_episodes
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.normalize_advantage = normalize_advantage
        self.target_kl = target_kl
        self.max_batch_tokens = max_batch_tokens
        self.max_consecutive_skips = max_consecutive_skips
        self.generation_batch_size = generation_batch_size
        self.generation_cache = generation_cache
        self.micro_batch_tokens = micro_batch_tokens
        self.strategy = strategy
        self.shard_frozen_models = shard_frozen_models
        self.samples_per_prompt = int(samples_per_prompt)
        self.n_logged_samples = n_logged_samples
        self.n_skipped_updates = 0
        self._skips_in_a_row = 0
        self._rollout_fault: str | None = None
        # the training state of a checkpoint, restored when the next learn() starts (see load_checkpoint)
        self._pending_training_state: dict[str, Any] | None = None
        # a sharded checkpoint's torch.distributed.checkpoint folder, read by the next set_parameters (load_checkpoint)
        self._sharded_checkpoint: str | None = None
        #: the class that trained it, kept in the zip: load() of another algorithm's zip is refused by name
        self.algorithm_class = type(self).__name__
        if self.env is not None:
            self._single_env()
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ what a subclass defines
    def compute_advantages(self, rollout_buffer: BaseSequenceBuffer) -> None:
        """Fill the rollout's advantages (and returns) once its episodes and rewards are stored."""
        raise NotImplementedError

    def compute_loss(
        self,
        batch: SequenceBatch,
        logprobs: th.Tensor,
        values: th.Tensor | None,
        entropy: th.Tensor,
        clip_range: float,
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        """The loss of one minibatch and its diagnostics as 0-d tensors (read once per update), ``approx_kl``
        among them (the early stop reads it).

        :param batch: the minibatch.
        :param logprobs: ``(batch, T)`` log π_θ of the response tokens (with gradient).
        :param values: ``(batch, T + 1)`` V(s_0)..V(s_T) (with gradient); ``None`` unless :attr:`learns_values`.
        :param entropy: ``(batch, T)`` entropy of π_θ at each response position.
        :param clip_range: the clip ε now.
        """
        raise NotImplementedError

    def _rollout_buffer_arguments(self) -> dict[str, Any]:
        """The rollout storage's own arguments (besides its size, spaces, device and number of envs)."""
        return dict(self.rollout_buffer_kwargs)

    # ------------------------------------------------------------------ model and env
    def _setup_model(self) -> None:
        saved_by = getattr(self, "algorithm_class", type(self).__name__)  # load() has put the zip's in place
        saved_class = _algorithm_classes().get(saved_by)
        # refused between unrelated algorithms; a class and its subclasses (a user's own) load each other's zips
        if saved_class is not None and not (issubclass(type(self), saved_class) or issubclass(saved_class, type(self))):
            raise ValueError(
                f"this zip was saved by {saved_by}, not {type(self).__name__}: load it with {saved_by}.load(...)"
            )
        if getattr(self, "observation_space", None) is None:  # built without an env, and not by load()
            raise ValueError(f"{type(self).__name__} needs an env: a TokenGenerationEnv under its reward wrappers")
        # SB3's OnPolicyAlgorithm._setup_model, with a rollout storage that takes only its own arguments
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.rollout_buffer = self.rollout_buffer_class(  # type: ignore[assignment,misc]
            self.n_steps,
            self.observation_space,  # type: ignore[arg-type]
            self.action_space,
            device=self.device,
            n_envs=self.n_envs,
            **self._rollout_buffer_arguments(),
        )
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, use_sde=self.use_sde, **self.policy_kwargs
        )
        self.policy = self.policy.to(self.device)
        self.clip_range = FloatSchedule(self.clip_range)
        if world_size() > 1 and getattr(self, "max_batch_tokens", None) is not None:
            # here too, not in __init__ alone: a zip saved with a cap and loaded under torchrun is refused as well
            raise ValueError(
                "max_batch_tokens is not supported with several processes: the ranks would take different numbers "
                "of optimizer steps; leave it None (micro_batch_tokens bounds the memory of a forward instead)"
            )
        if self.device.type == "cuda":
            self.policy.use_fused_optimizer()
        if not self.learns_values:  # never trained: frozen, so that no strategy waits for its gradient
            self.policy.value_head.requires_grad_(False)
        #: how the policy is spread over the processes (:mod:`sb3_rlhf.common.strategies`); not saved in the zip
        self.parallel: ParallelStrategy = make_strategy(
            getattr(self, "strategy", "ddp"), getattr(self, "shard_frozen_models", True)
        )
        self.policy.parallel = self.parallel
        self.parallel.prepare(self.policy)  # every rank starts from rank 0's weights (the value head is random)
        #: samples the rollouts (cache, compilation, shapes); rebuilt from its settings, never saved in the zip
        self.rollout_engine = RolloutEngine(
            getattr(self, "generation_cache", "auto"), batch_size=self.generation_batch_size or self.n_episodes
        )
        self.rollout_engine.check_policy(self.policy)
        if self.parallel.sharded and self.rollout_engine.cache == "continuous":
            raise ValueError(
                "generation_cache='continuous' is not supported with strategy='fsdp' yet: use 'auto' (static on CUDA)"
            )
        if getattr(self.policy, "revision", None) is not None:
            # the zip's policy_kwargs name a hub model by the commit it resolved to, not a branch that moves
            self.policy_kwargs = {**self.policy_kwargs, "revision": self.policy.revision}
        if self.env is not None:
            self._bind_reward_wrappers()

    def _single_env(self) -> gym.Env:
        env = self.env
        name = type(self).__name__
        if not isinstance(env, DummyVecEnv) or env.num_envs != 1:
            raise ValueError(
                f"{name} batches episodes inside its rollout: pass one TokenGenerationEnv (under its reward "
                "wrappers), not a VecEnv; set n_episodes for more episodes per rollout"
            )
        if not isinstance(env.envs[0].unwrapped, TokenGenerationEnv):
            raise TypeError(f"{name} needs a TokenGenerationEnv, got {type(env.envs[0].unwrapped).__name__}")
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
            for model in wrapper.frozen_models():
                self.parallel.prepare_frozen(model)

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
        rollout_buffer: BaseSequenceBuffer,
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
        episodes: dict[str, list[Any]] = {
            "reward": [], "length": [], "eos": [], "neg_logprob": [], "infos": [], "token_rewards": [], "actions": []
        }  # fmt: skip
        terms_per_episode: dict[str, list[th.Tensor]] = {w.name: [] for w in wrappers}
        fault = None
        # the weights gathered once for the rollout (a sharded run), not for every generated token
        with self.parallel.whole_weights():
            for start in range(0, n_rollout_steps, chunk):
                batch, values = self.rollout_engine.sample_episodes(
                    self.policy, gen_env, indices[start : start + chunk], with_values=self.learns_values
                )
                assert batch.logprobs is not None  # sample_episodes fills the old log-probs
                try:
                    rewards, terms, ref_logprobs = self._score_batch(batch, wrappers)
                except th.OutOfMemoryError as error:
                    raise DeviceMemoryError(
                        f"out of device memory scoring {batch.batch_size} episodes × {batch.input_ids.shape[1]} "
                        f"tokens (the reward model and the KL reference): set generation_batch_size below "
                        f"{batch.batch_size} (now {self.generation_batch_size}: the episodes of one generate() call "
                        "are scored together); checkpoints already written stay loadable"
                    ) from error
                except NonFiniteRewardError as error:
                    fault = str(error)
                    if self.parallel.sharded:
                        continue  # a sharded frozen model gathers in each forward: every rank scores every batch
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
                    batch.action_masks,
                )
                episodes["reward"] += rewards.sum(-1).tolist()
                episodes["length"] += batch.lengths.tolist()
                # per token, on the host, for the callbacks' locals (one copy per batch)
                episodes["token_rewards"] += list(rewards.float().cpu().numpy())
                episodes["actions"] += list(batch.response_ids.cpu().numpy())
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

        if not self._step_callbacks(callback, episodes):
            return False
        self.num_timesteps += int(global_tokens) - local_tokens  # the other ranks' tokens

        self.compute_advantages(rollout_buffer)
        self._log_rollout(wrappers, episodes, {k: th.cat(v) for k, v in terms_per_episode.items()})
        for wrapper in wrappers:
            wrapper.on_rollout_end()
        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _step_callbacks(self, callback: BaseCallback, episodes: dict[str, list[Any]]) -> bool:
        """Count the rollout's tokens and show them to the callbacks as SB3 shows env steps: one ``on_step()`` per
        generated token, after generation, with ``locals`` holding what SB3's rollout loop holds for one env:
        ``actions`` (the token), ``rewards`` (its reward: every term the wrappers gave that token, as the rollout
        stores it), ``dones`` and ``infos`` (the episode's ``info``, with SB3's ``"episode"`` record, at its last
        token). ``new_obs``, ``values`` and ``log_probs`` are not set: a token's observation is its whole prefix.

        :param episodes: the rollout's ``reward``, ``length``, ``infos``, ``token_rewards`` and ``actions`` per
            episode.
        :return: False when a callback stops training.
        """
        elapsed = time.time() - self.start_time / 1e9
        for i, (reward, length) in enumerate(zip(episodes["reward"], episodes["length"])):
            info = {**episodes["infos"][i], "episode": {"r": reward, "l": length, "t": round(elapsed, 6)}}
            self.ep_info_buffer.append(info["episode"])  # type: ignore[union-attr]
            for t in range(length):
                self.num_timesteps += 1
                done = t == length - 1
                callback.update_locals(
                    {
                        "actions": episodes["actions"][i][t : t + 1],
                        "dones": np.array([done]),
                        "infos": [info if done else {}],
                        "rewards": episodes["token_rewards"][i][t : t + 1],
                    }
                )
                if not callback.on_step():
                    return False
        return True

    def _rollout_prompt_indices(self, env: TokenGenerationEnv, n_episodes: int) -> np.ndarray:
        """The prompt of each episode of the rollout, drawn from the env's RNG (from this rank's shard), each
        repeated ``samples_per_prompt`` times."""
        prompts = env.sample_prompt_indices(n_episodes // self.samples_per_prompt, rank(), world_size())
        return np.repeat(prompts, self.samples_per_prompt)

    def _score_batch(
        self, batch: GenerationBatch, wrappers: list[RewardWrapper]
    ) -> tuple[th.Tensor, dict[str, th.Tensor], th.Tensor | None]:
        """Every reward term of a batch, in one call per wrapper.

        :return: the summed per-token rewards ``(batch, T)``, each wrapper's term ``(batch, T)`` by name, and
            the reference log-probs to store (``None``: the KL is a reward term here, not a loss term).
        """
        terms = self._terms_of_every_wrapper(batch, wrappers)
        return sum(terms.values(), th.zeros_like(batch.response_mask, dtype=th.float32)), terms, None

    @staticmethod
    def _terms_of_every_wrapper(batch: GenerationBatch, wrappers: list[RewardWrapper]) -> dict[str, th.Tensor]:
        """Each wrapper's term of a batch by name; a non-finite reward is raised once every wrapper has scored the
        batch, so that each rank runs the same forwards (a sharded frozen model gathers its weights in each)."""
        terms, error = {}, None
        for wrapper in wrappers:
            try:
                terms[wrapper.name] = wrapper.batch_rewards(batch)
            except NonFiniteRewardError as raised:
                error = error or raised
        if error is not None:
            raise error
        return terms

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
        """``n_epochs`` over minibatches of whole episodes (or groups), one optimizer step per minibatch
        (CleanRL-style, masked means over the real response tokens): one forward, or, where the minibatch exceeds
        the token budget of :attr:`micro_batch_tokens`, one forward and backward per micro-batch with the gradients
        accumulated (:meth:`_accumulate_gradients`).

        One host sync per minibatch (whether its step is taken; one more where it is split); the diagnostics stay on
        the device and are read once per update, except ``approx_kl`` where the early stop (``target_kl``) or other
        ranks need it at once.
        """
        if self._skipped_rollout():
            return
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        stats: dict[str, list[th.Tensor | float]] = defaultdict(list)
        last_loss: th.Tensor | float = float("nan")
        continue_training = True
        micro_batch_tokens = self._micro_batch_token_budget()
        for epoch in range(self.n_epochs):
            for batch in self.rollout_buffer.get(self.batch_size, self.max_batch_tokens):
                micro_batches = [batch]
                if micro_batch_tokens is not None:
                    micro_batches = self._split_minibatch(batch, micro_batch_tokens)
                # with several ranks every one takes the same path (its collectives must pair with the others')
                accumulated = len(micro_batches) > 1 or (micro_batch_tokens is not None and world_size() > 1)
                with self._naming_out_of_memory(micro_batch_tokens):
                    if accumulated:
                        self.policy.optimizer.zero_grad()
                        loss, metrics = self._accumulate_gradients(batch, micro_batches, clip_range)
                    else:
                        loss, metrics = self._minibatch_loss(batch, clip_range)
                last_loss = loss.detach()
                approx_kl: th.Tensor | float = metrics.pop("approx_kl")
                if self.target_kl is not None or world_size() > 1:
                    approx_kl = mean_over_ranks(float(approx_kl))  # the same early stop on every rank
                stats["approx_kl"].append(approx_kl)
                if self.target_kl is not None and approx_kl > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl:.2f}")
                    break
                with self._naming_out_of_memory(micro_batch_tokens):
                    stepped = self._optimizer_step(loss, batch, backward=not accumulated)
                if not stepped:
                    continue
                for key, value in metrics.items():
                    stats[key].append(value)
                stats["loss"].append(last_loss)
            self._n_updates += 1
            if not continue_training:
                break
        if micro_batch_tokens is not None:
            self.logger.record("train/micro_batch_tokens", micro_batch_tokens, exclude="stdout")
        self._record_train_stats(_read_on_host(stats), clip_range, float(last_loss))

    def _minibatch_loss(self, batch: SequenceBatch, clip_range: float) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        """One forward of the policy over ``batch`` (through the strategy's wrapper, whose hooks reduce the
        gradients) and :meth:`compute_loss` of it."""
        logprobs, values, entropy = self.parallel.update_forward(
            batch.input_ids,
            batch.attention_mask,
            batch.response_mask.shape[1],
            entropy_grad=self.ent_coef != 0,
            with_values=self.learns_values,
            action_masks=batch.action_masks,  # the masks the rollout sampled under, if any
        )
        assert entropy is not None  # evaluate_sequences computes it by default
        return self.compute_loss(batch, logprobs, values, entropy, clip_range)

    def _split_minibatch(self, batch: SequenceBatch, micro_batch_tokens: int) -> list[SequenceBatch]:
        """The micro-batches of ``batch`` (:func:`~sb3_rlhf.buffers.split_minibatch`); with several ranks as many on
        every rank as on the one that needs the most, since each micro-batch's forward under ``fsdp`` gathers the
        weights with every rank."""
        micro_batches = split_minibatch(batch, micro_batch_tokens, self.rollout_buffer._unit)
        if world_size() > 1:
            (most,) = max_over_ranks([len(micro_batches)])
            if len(micro_batches) < most:
                micro_batches = split_minibatch(batch, micro_batch_tokens, self.rollout_buffer._unit, int(most))
        return micro_batches

    def _accumulate_gradients(
        self, batch: SequenceBatch, micro_batches: list[SequenceBatch], clip_range: float
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        """Forward and backward of each micro-batch of ``batch``, the gradients summed into ``.grad``. Each loss is
        computed inside :func:`~sb3_rlhf.common.sequences.minibatch_normalizers`, so every mean in it (over tokens,
        over responses, over pairs) divides by the whole minibatch's count: the micro-batches' losses, gradients
        and diagnostics add up to exactly the minibatch's.

        With several ranks each backward is weighted by the rank's share of the minibatch (:meth:`_rank_weight`),
        and the gradients are reduced across ranks in the last micro-batch's backward only.

        :return: the minibatch's loss (detached) and its diagnostics.
        """
        loss_sum = th.zeros((), device=self.device)
        metrics_sum: dict[str, th.Tensor] = {}
        weight = self._rank_weight(batch)
        with minibatch_normalizers(batch.response_mask):
            for i, micro in enumerate(micro_batches):
                with self.parallel.gradient_sync(i == len(micro_batches) - 1):
                    loss, metrics = self._minibatch_loss(micro, clip_range)
                    # the backward frees this micro-batch's activations before the next forward
                    (loss if weight == 1.0 else loss * weight).backward()
                loss_sum = loss_sum + loss.detach()
                for key, value in metrics.items():
                    metrics_sum[key] = metrics_sum.get(key, th.zeros((), device=self.device)) + value.detach()
        return loss_sum, metrics_sum

    @contextlib.contextmanager
    def _naming_out_of_memory(self, micro_batch_tokens: int | None) -> Iterator[None]:
        """Turn a device out of memory in the update into an error that names the settings bounding its memory."""
        try:
            yield
        except DeviceMemoryError:
            raise
        except th.OutOfMemoryError as error:
            raise DeviceMemoryError(
                f"out of device memory in the update (micro_batch_tokens={self.micro_batch_tokens!r}: "
                f"{'no split' if micro_batch_tokens is None else f'{micro_batch_tokens} tokens'} per forward): set "
                "micro_batch_tokens to a lower number of tokens (a group of samples_per_prompt responses is never "
                "split: with one too long for it, lower samples_per_prompt or max_new_tokens), or lower batch_size; "
                "checkpoints already written stay loadable"
            ) from error

    def _micro_batch_token_budget(self) -> int | None:
        """The token budget of one micro-batch now: :attr:`micro_batch_tokens`, or under ``"auto"`` the one
        :func:`~sb3_rlhf.common.memory.micro_batch_tokens_for` reads from the free GPU memory (``None`` on a CPU:
        no split), the smallest of every rank's."""
        if self.micro_batch_tokens != "auto":
            return self.micro_batch_tokens  # type: ignore[return-value]  # an int or None (check_micro_batch_tokens)
        config = self.policy.actor.config
        intermediate = getattr(config, "intermediate_size", None)
        per_token = activation_bytes_per_token(
            config.num_hidden_layers, config.hidden_size, config.vocab_size, self.policy.actor.dtype, intermediate
        )
        if self.policy.critic is not None:  # its backbone's activations, without a head over the vocabulary
            critic = self.policy.critic.config
            per_token += activation_bytes_per_token(
                critic.num_hidden_layers, critic.hidden_size, 0, self.policy.critic.dtype
            )
        # before the first step, the gradients and Adam's two moments are still to be allocated (of this rank's
        # shard, under fsdp)
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        pending = 3 * sum(local_bytes(p) for p in trainable) if not self.policy.optimizer.state else 0
        budget = micro_batch_tokens_for(self.device, per_token, reserved_bytes=pending)
        if world_size() > 1:  # one budget for every rank (None, no split, is taken as no limit)
            (largest_negative,) = max_over_ranks([-(budget or float("inf"))])
            budget = None if largest_negative == -float("inf") else int(-largest_negative)
        return budget

    def _record_train_stats(self, stats: dict[str, list[float]], clip_range: float, last_loss: float) -> None:
        """Log the update under ``train/`` (SB3's keys): the mean of each diagnostic over the minibatches that
        took a step (``approx_kl``: over every minibatch evaluated).

        :param last_loss: the loss of the last minibatch evaluated (SB3's PPO logs that as ``train/loss``).
        """
        for key, values in stats.items():
            self.logger.record(f"train/{key}", float(np.mean(values)) if values else float("nan"))
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/skipped_updates", self.n_skipped_updates)
        self.logger.record("train/clip_range", clip_range)

    def _loss_normalizer(self, batch: SequenceBatch) -> float:
        """What the minibatch loss is a mean over (see :attr:`loss_aggregation`)."""
        if self.loss_aggregation == "token":
            return float(batch.response_mask.sum())
        return float(batch.response_mask.shape[0])

    def _rank_weight(self, batch: SequenceBatch) -> float:
        """With several ranks, the factor of this rank's loss, a mean over its part of the minibatch: its share of
        every rank's items (:meth:`_loss_normalizer`) times the number of ranks, which the strategy's gradient
        averaging divides by again, so that the step is the one a single process takes on the whole minibatch.
        One process: 1."""
        if world_size() == 1:
            return 1.0
        normalizer = self._loss_normalizer(batch)
        (total,) = sum_over_ranks([normalizer])
        return world_size() * normalizer / total

    def _optimizer_step(self, loss: th.Tensor, batch: SequenceBatch, backward: bool = True) -> bool:
        """Backward, gradient clipping at ``max_grad_norm``, one optimizer step; skipped (returns False) when the
        loss or the gradient is not finite, so that one bad minibatch cannot poison the weights or Adam's moments.
        In one process the one host sync of a minibatch is that decision, taken after the backward pass on the
        loss and the gradient norm together (the rare wasted backward is cheaper than a sync before it).

        With several ranks each holds part of the minibatch: its loss is weighted by its share of all ranks' items
        (:meth:`_rank_weight`) and the strategy averages the gradients across ranks in the backward pass, so the
        step is the one a single process would take on the whole minibatch. The ranks agree on a non-finite loss
        (whose gradient can be finite), and a non-finite gradient on one rank is non-finite on all after the
        averaging: all ranks skip together.

        :param backward: ``False`` when the gradients of ``batch`` are already in ``.grad``, accumulated over its
            micro-batches (:meth:`_accumulate_gradients`): then only the clipping, the finiteness check and the
            step remain.
        """
        if backward:
            self.policy.optimizer.zero_grad()
        if world_size() > 1:
            # ranks must skip together, and a non-finite loss can have a finite gradient (k3 at a -inf
            # reference log-prob): its finiteness travels with the normaliser, in the all-reduce that needs anyway
            normalizer = self._loss_normalizer(batch) if backward else 0.0
            finite = bool(th.isfinite(loss))
            total, faults = sum_over_ranks([normalizer, float(not finite)])
            if faults:
                self.policy.optimizer.zero_grad()
                self._skip_update(f"the loss is {loss.item()}" if not finite else "another rank's loss is not finite")
                return False
            if backward:
                loss = loss * (world_size() * normalizer / total)
        if backward:
            loss.backward()
        grad_norm = self.parallel.clip_grad_norm(self.max_grad_norm)
        if not bool(th.isfinite(grad_norm) & th.isfinite(loss.detach())):
            self.policy.optimizer.zero_grad()
            finite_loss = bool(th.isfinite(loss))
            self._skip_update(
                f"the gradient norm is {grad_norm.item()}" if finite_loss else f"the loss is {loss.item()}"
            )
            return False
        self.policy.optimizer.step()
        self._skips_in_a_row = 0
        return True

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

    # ------------------------------------------------------------------ saving, loading and resuming
    def _excluded_save_params(self) -> list[str]:
        return [
            *super()._excluded_save_params(),
            "_pending_training_state",
            "rollout_engine",
            "parallel",
            "_sharded_checkpoint",
            "_zip_without_weights",
        ]

    def get_parameters(self) -> dict[str, dict]:
        """SB3's state dicts of the policy and its optimizer, whole as a single process holds them: in a sharded
        run (``strategy="fsdp"``) gathered onto rank 0 (every rank calls it, and the others get them empty)."""
        parallel = getattr(self, "parallel", None)
        if getattr(self, "_zip_without_weights", False):
            return {}  # a sharded checkpoint: its weights are in torch.distributed.checkpoint's files beside the zip
        if parallel is None or not parallel.sharded:
            return super().get_parameters()
        policy_state, optimizer_state = parallel.full_state_dicts()
        return {"policy": policy_state, "policy.optimizer": optimizer_state}

    def set_parameters(
        self,
        load_path_or_dict: str | dict[str, th.Tensor],
        exact_match: bool = True,
        device: th.device | str = "auto",
    ) -> None:
        """SB3's, with the weights of a sharded checkpoint read by :mod:`torch.distributed.checkpoint` (each rank
        its shard) and a zip's whole state dicts scattered into the shards of a sharded run."""
        folder = getattr(self, "_sharded_checkpoint", None)
        if isinstance(load_path_or_dict, dict) and not load_path_or_dict:
            if folder is None:  # not a ValueError: SB3's load() catches those and reads on in the empty dict
                raise FileNotFoundError(
                    "this zip holds no weights: it is a sharded checkpoint's (strategy='fsdp'), whose weights are in "
                    f"the {SHARDED_FOLDER}/ folder beside it; resume it with {type(self).__name__}.load_checkpoint("
                    "<the checkpoint folder>, env) in as many processes as wrote it"
                )
            self.parallel.load_sharded(folder)
            return
        if isinstance(load_path_or_dict, dict) and self.parallel.sharded:
            params: dict[str, Any] = load_path_or_dict
            if set(params) - {"policy", "policy.optimizer"} or (exact_match and len(params) != 2):
                raise RuntimeError(f"expected the state dicts of policy and policy.optimizer, got {sorted(params)}")
            self.parallel.load_full_state_dicts(params.get("policy"), params.get("policy.optimizer"), exact_match)
            return
        super().set_parameters(load_path_or_dict, exact_match=exact_match, device=device)

    def save(  # type: ignore[override]
        self,
        path: str | os.PathLike | io.BufferedIOBase,
        exclude: list[str] | None = None,
        include: list[str] | None = None,
        weights: bool = True,
    ) -> None:
        """SB3's ``save``, written to a temporary file and renamed into place: a crash mid-save leaves the
        previous file intact.

        With several processes rank 0 writes the file; under ``strategy="fsdp"`` every rank must call it (the
        weights are gathered from every rank's shard), and the file is the one a single-process run writes.

        :param weights: ``False``: the zip without the policy's and optimizer's state dicts (a sharded
            checkpoint's, whose weights :mod:`torch.distributed.checkpoint` writes beside it).
        """
        self._zip_without_weights = not weights
        try:
            if not is_main_process():
                if self.parallel.sharded:
                    self.get_parameters()  # this rank's part of the gathering
                return None
            if isinstance(path, io.BufferedIOBase):
                return super().save(path, exclude, include)
            with atomic_file(str(path) if str(path).endswith(".zip") else f"{path}.zip") as tmp:
                super().save(tmp, exclude, include)
        finally:
            self._zip_without_weights = False

    @classmethod
    def load(  # type: ignore[override]
        cls: type[SelfRLHFOnPolicyAlgorithm],
        path: str | os.PathLike | io.BufferedIOBase,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        custom_objects: dict[str, Any] | None = None,
        trust_pickled_objects: bool = False,
        **kwargs: Any,
    ) -> SelfRLHFOnPolicyAlgorithm:
        """SB3's ``load``, without running code from the zip: tensors load with ``weights_only=True`` (as in SB3)
        and the pickled hyperparameters through an allowlist (:mod:`sb3_rlhf.common.safe_load`).

        :param trust_pickled_objects: unpickle the zip's data as SB3 does, with no allowlist (needed for a zip that
            holds your own code, e.g. a lambda learning-rate schedule); only for files you trust.
        :param kwargs: the rest of SB3's ``load`` arguments.
        """
        if not trust_pickled_objects:
            custom_objects = safe_custom_objects(path, custom_objects)
        return super().load(path, env=env, device=device, custom_objects=custom_objects, **kwargs)  # type: ignore[arg-type]

    def get_training_state(self) -> dict[str, Any]:
        """What a resumed run needs beyond the SB3 zip, as JSON-serialisable values (no pickle): the reward
        wrappers' state (the KL controller's β) and every random number generator (torch, CUDA, NumPy, Python,
        the env's prompt sampler)."""
        state: dict[str, Any] = {
            "rank": rank(),
            "num_timesteps": int(self.num_timesteps),
            "reward_wrappers": {w.name: w.state_dict() for w in self.reward_wrappers},
            "env_rng": self.generation_env.np_random.bit_generator.state,
            "torch_rng": th.get_rng_state().tolist(),
            "numpy_rng": _numpy_global_state(),
            "python_rng": _python_state(),
        }
        if th.cuda.is_available():
            state["cuda_rng"] = [s.tolist() for s in th.cuda.get_rng_state_all()]
        return state

    def set_training_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`get_training_state` recorded (the algorithm's own state comes from the zip).

        In a distributed run each rank restores its own random streams (every rank writes its state into the
        checkpoint); a rank given another rank's state (a checkpoint of an older version, written by rank 0 alone)
        takes its β and counters and draws fresh, distinct streams of its own.
        """
        wrappers = {w.name: w for w in self.reward_wrappers}
        saved = state["reward_wrappers"]
        if set(saved) != set(wrappers):
            raise ValueError(
                f"the checkpoint was written with reward wrappers {sorted(saved)} but the env has "
                f"{sorted(wrappers)}: resume with the env the run was started with"
            )
        for name, wrapper_state in saved.items():
            wrappers[name].load_state_dict(wrapper_state)
        if state.get("rank", 0) != rank():
            seed = ((self.seed or 0) + 7919 * rank() + int(state["num_timesteps"])) % 2**32
            self.generation_env.np_random = np.random.default_rng(seed)
            set_random_seed(seed, using_cuda=th.cuda.is_available())
            return
        self.generation_env.np_random.bit_generator.state = state["env_rng"]
        th.set_rng_state(th.tensor(state["torch_rng"], dtype=th.uint8))
        if "cuda_rng" in state and th.cuda.is_available() and len(state["cuda_rng"]) == th.cuda.device_count():
            th.cuda.set_rng_state_all([th.tensor(s, dtype=th.uint8) for s in state["cuda_rng"]])
        name, keys, position, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
        version, internal, gauss = state["python_rng"]
        random.setstate((version, tuple(internal), gauss))

    @classmethod
    def load_checkpoint(
        cls: type[SelfRLHFOnPolicyAlgorithm], path: str, env: GymEnv, device: th.device | str = "auto", **kwargs: Any
    ) -> SelfRLHFOnPolicyAlgorithm:
        """Resume from the newest checkpoint in ``path`` (see :class:`~sb3_rlhf.common.checkpoints.TrainingCheckpointCallback`).

        The policy, value head, optimizer and counters load now; the KL controller, the env's prompt sampler and
        every RNG are restored (:meth:`set_training_state`) when ``learn(..., reset_num_timesteps=False)`` starts,
        after SB3's own setup, so the run continues as if it had never stopped.
        ``learn(total_timesteps - model.num_timesteps, reset_num_timesteps=False)`` finishes a run planned for
        ``total_timesteps``.

        :param path: a checkpoint folder, or the folder of ``checkpoint_<timesteps>`` folders.
        :param env: the env of the original run (same prompts and reward wrappers).
        :param device: where to load the model.
        :param kwargs: the rest of :meth:`load`'s arguments.
        """
        path = latest_checkpoint(path)
        own_state = os.path.join(path, rank_state_file(rank()))
        with open(own_state if os.path.isfile(own_state) else os.path.join(path, STATE_FILE)) as f:
            state = json.load(f)
        sharded = os.path.join(path, SHARDED_FOLDER)
        if os.path.isdir(sharded):  # the weights and optimizer in torch.distributed.checkpoint's files
            kwargs = {**kwargs, "_sharded_checkpoint": sharded}
        model = cls.load(os.path.join(path, MODEL_FILE), env=env, device=device, **kwargs)
        model._sharded_checkpoint = None
        if model.num_timesteps != state["num_timesteps"]:
            raise ValueError(
                f"{path} is inconsistent: the zip is at {model.num_timesteps} timesteps, the state at "
                f"{state['num_timesteps']}"
            )
        policy = model.policy
        if policy.model_name_or_path is None and policy.lora is None:
            for wrapper in model.reward_wrappers:
                if getattr(wrapper, "reference_from_policy", False):
                    raise ValueError(
                        f"{wrapper.name}: the policy was built from model_config, so its initial weights exist "
                        "nowhere but in the original run; resume with KLPenaltyWrapper(..., ref_model=<the initial "
                        "model>)"
                    )
        model._pending_training_state = state
        return model

    def _init_callback(self, callback: MaybeCallback, progress_bar: bool = False) -> BaseCallback:
        """SB3's, except that ``progress_bar`` gives log lines (:class:`ProgressLogCallback`) where standard
        output is not a terminal: a redirected run would otherwise show nothing until it ends."""
        if progress_bar and not stdout_is_terminal():
            callbacks = list(callback) if isinstance(callback, list) else [callback]
            callbacks = [c if isinstance(c, BaseCallback) else ConvertCallback(c) for c in callbacks]
            if not any(isinstance(c, ProgressLogCallback) for c in callbacks):  # the user's own has its interval
                callbacks.append(ProgressLogCallback())
            return super()._init_callback(callbacks, progress_bar=False)
        return super()._init_callback(callback, progress_bar)

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
        if self._pending_training_state is not None and reset_num_timesteps:
            raise ValueError(
                "this model was loaded from a checkpoint to resume a run: call "
                "learn(total_timesteps - model.num_timesteps, reset_num_timesteps=False) so that its timestep "
                "counter, schedules and logs carry on"
            )
        total_timesteps, callback = super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        if self._pending_training_state is not None:
            # after SB3's setup (which resets the env), so that the first rollout draws what it would have drawn
            self.set_training_state(self._pending_training_state)
            self._pending_training_state = None
        return total_timesteps, callback

    def learn(  # type: ignore[override]
        self: SelfRLHFOnPolicyAlgorithm,
        total_timesteps: int,
        callback: Any = None,
        log_interval: int = 1,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfRLHFOnPolicyAlgorithm:
        """Train for ``total_timesteps`` generated tokens (SB3's ``learn``).

        :param tb_log_name: the TensorBoard run's name (default: the algorithm's class name).
        """
        if (
            isinstance(total_timesteps, bool)
            or not isinstance(total_timesteps, (int, np.integer))
            or total_timesteps < 0
        ):
            raise ValueError(f"total_timesteps must be an integer >= 0 (generated tokens), got {total_timesteps!r}")
        with warnings.catch_warnings():
            # SB3's bar is tqdm.rich, which warns on every run that it is experimental: SB3's call, not the user's
            warnings.filterwarnings("ignore", message="rich is experimental/alpha")
            return super().learn(
                total_timesteps=total_timesteps,
                callback=callback,
                log_interval=log_interval,
                tb_log_name=tb_log_name or type(self).__name__,
                reset_num_timesteps=reset_num_timesteps,
                progress_bar=progress_bar,
            )


def _algorithm_classes() -> dict[str, type[RLHFOnPolicyAlgorithm]]:
    """Every online algorithm class defined so far (the library's and a user's), by name."""
    found: dict[str, type[RLHFOnPolicyAlgorithm]] = {}
    pending = list(RLHFOnPolicyAlgorithm.__subclasses__())
    while pending:
        cls = pending.pop()
        found.setdefault(cls.__name__, cls)
        pending += cls.__subclasses__()
    return found


def check_hyperparameter(
    name: str,
    value: Any,
    above: float = -math.inf,
    at_least: float = -math.inf,
    at_most: float = math.inf,
    infinite: bool = False,
) -> None:
    """A finite number in its range (``infinite``: or +inf), or an error naming it (a schedule is the caller's
    own: not checked here)."""
    if callable(value):
        return
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    finite = number and (math.isfinite(float(value)) or (infinite and float(value) == math.inf))
    if not finite or not (above < value and at_least <= value <= at_most):
        bounds = [f"> {above}" if above > -math.inf else "", f">= {at_least}" if at_least > -math.inf else ""]
        bounds.append(f"<= {at_most}" if at_most < math.inf else "")
        wanted = " and ".join(b for b in bounds if b)
        raise ValueError(f"{name} must be a finite number{f' {wanted}' if wanted else ''}, got {value!r}")


def check_loss_aggregation(loss_aggregation: str) -> str:
    """``loss_aggregation`` itself, or a clear error."""
    if loss_aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {loss_aggregation!r}")
    return loss_aggregation


def check_samples_per_prompt(algorithm: str, samples_per_prompt: int) -> int:
    """``samples_per_prompt`` of an algorithm that compares responses to one prompt (``>= 2``), or a clear error."""
    if not isinstance(samples_per_prompt, (int, np.integer)) or samples_per_prompt < 2:
        raise ValueError(
            f"{algorithm} compares responses to the same prompt: samples_per_prompt must be an integer >= 2, "
            f"got {samples_per_prompt!r}"
        )
    return int(samples_per_prompt)


def _check_policy_kwargs(
    aliases: dict[str, type[BasePolicy]], policy: Any, policy_kwargs: dict[str, Any] | None
) -> None:
    """Name an unknown ``policy_kwargs`` key before SB3 builds the policy with it."""
    policy_class = aliases.get(policy, policy) if isinstance(policy, str) else policy
    if not policy_kwargs or not isinstance(policy_class, type):
        return
    parameters = inspect.signature(policy_class.__init__).parameters  # type: ignore[misc]
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return
    taken = set(parameters) - {"self", "observation_space", "action_space", "lr_schedule"}
    unknown = sorted(set(policy_kwargs) - taken)
    if unknown:
        raise ValueError(f"unknown policy_kwargs key {unknown[0]!r}: {policy_class.__name__} takes {sorted(taken)}")


def _read_on_host(stats: dict[str, list[th.Tensor | float]]) -> dict[str, list[float]]:
    """Every diagnostic of an update as floats, the tensors among them read in one host sync."""
    tensors = [v.detach().float().reshape(()) for values in stats.values() for v in values if isinstance(v, th.Tensor)]
    read = iter(th.stack(tensors).tolist() if tensors else [])
    return {
        key: [next(read) if isinstance(v, th.Tensor) else float(v) for v in values] for key, values in stats.items()
    }


def _numpy_global_state() -> list[Any]:
    name, keys, position, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached)]  # type: ignore[union-attr]


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
