"""Base classes of the reward wrappers: one reward term each, through ``step()`` or for a whole batch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
import torch as th

from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.envs.token_generation import TokenGenerationEnv

if TYPE_CHECKING:
    from sb3_rlhf.policies import TransformerActorCriticPolicy


class NonFiniteRewardError(ValueError):
    """A reward term came out NaN or infinite; the message names the wrapper and its model or function."""


class RewardWrapper(gym.Wrapper):
    """Adds one reward term to a :class:`~sb3_rlhf.TokenGenerationEnv`.

    Two paths give the same numbers for the same sequences:

    * ``step(action)``: for any Gymnasium agent; the term is added to the reward and reported in
      ``info["reward_terms"][name]``.
    * :meth:`batch_rewards`: the term for a whole :class:`~sb3_rlhf.common.generation.GenerationBatch` of
      finished episodes as a ``(batch, T)`` tensor over response tokens, used by :class:`~sb3_rlhf.RLHFPPO`.

    :param env: the environment to wrap (a TokenGenerationEnv, possibly already wrapped).
    :param name: key of this term in ``info["reward_terms"]`` and in the logs.
    """

    #: True for terms that score the response (summed into ``rlhf/scores``); False for penalties such as KL.
    is_score: bool = True

    def __init__(self, env: gym.Env, name: str) -> None:
        super().__init__(env)
        if not isinstance(env.unwrapped, TokenGenerationEnv):
            raise TypeError(f"{type(self).__name__} wraps a TokenGenerationEnv, got {type(env.unwrapped).__name__}")
        self.name = name
        #: what computes the term (a model path, a function name), for error messages
        self.source = type(self).__name__
        self._last_obs: dict[str, np.ndarray] | None = None

    @property
    def generation_env(self) -> TokenGenerationEnv:
        return self.env.unwrapped  # type: ignore[return-value]

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        obs, info = self.env.reset(**kwargs)
        self._last_obs = obs
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        obs_before = self._last_obs
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._last_obs = obs
        term = float(self.step_reward(obs_before, action, terminated or truncated, info))
        info.setdefault("reward_terms", {})[self.name] = term
        return obs, float(reward) + term, terminated, truncated, info

    def step_reward(self, obs_before: dict[str, np.ndarray] | None, action: Any, done: bool, info: dict) -> float:
        """The term for one ``step()``. ``info`` holds the episode's texts and ids when ``done``."""
        raise NotImplementedError

    def batch_rewards(self, batch: GenerationBatch) -> th.Tensor:
        """The term for every response token of every episode: ``(batch, T)`` float32, 0 on padding."""
        raise NotImplementedError

    def bind(self, policy: TransformerActorCriticPolicy) -> None:
        """Called by the algorithm once its policy exists (devices, reference models)."""

    def frozen_models(self) -> list[th.nn.Module]:
        """The models this term reads without training them (a reward model, a KL reference): the algorithm places
        them as its strategy says (replicated, or sharded under ``fsdp``) once :meth:`bind` has run."""
        return []

    def on_rollout_start(self) -> None:
        """Called by the algorithm before the batches of a rollout are scored."""

    def rollout_stats(self) -> dict[str, float]:
        """Statistics of the current rollout for the logs (under ``rlhf/``)."""
        return {}

    def on_rollout_end(self) -> None:
        """Called once per rollout after all rewards are computed (e.g. to adapt the KL coefficient)."""

    def state_dict(self) -> dict[str, Any]:
        """What changes during training (e.g. an adaptive KL coefficient), as JSON values, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (when a run resumes from a checkpoint)."""


class SequenceRewardWrapper(RewardWrapper):
    """A term that scores whole responses: the score lands on the last real token (EOS, or the last token of
    a truncated response); every other token gets 0. Subclasses implement :meth:`score`."""

    def score(self, batch: GenerationBatch) -> th.Tensor:
        """One finite score per episode: ``(batch,)`` float32."""
        raise NotImplementedError

    def checked_score(self, batch: GenerationBatch) -> th.Tensor:
        scores = self.score(batch)
        if scores.shape != (batch.batch_size,):
            raise ValueError(f"{self.name}: expected {batch.batch_size} scores, got shape {tuple(scores.shape)}")
        if not th.isfinite(scores).all():
            bad = (~th.isfinite(scores)).nonzero().flatten().tolist()
            raise NonFiniteRewardError(
                f"{self.name} ({self.source}) returned a non-finite reward (NaN or inf) for {len(bad)} of "
                f"{batch.batch_size} episodes, e.g. the completion {batch.completions[bad[0]]!r}"
            )
        return scores

    def step_reward(self, obs_before: dict[str, np.ndarray] | None, action: Any, done: bool, info: dict) -> float:
        if not done:
            return 0.0
        batch = GenerationBatch.from_episode(self.generation_env, info["prompt_index"], info["completion_ids"])
        return float(self.checked_score(batch)[0])

    def batch_rewards(self, batch: GenerationBatch) -> th.Tensor:
        return batch.at_last_token(self.checked_score(batch))


def reward_wrappers(env: gym.Env) -> list[RewardWrapper]:
    """The reward wrappers around ``env``, outermost first."""
    found = []
    while isinstance(env, gym.Wrapper):
        if isinstance(env, RewardWrapper):
            found.append(env)
        env = env.env
    return found
