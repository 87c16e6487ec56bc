"""RewardFunctionWrapper: a plain Python function of prompts and completions as the reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch as th

from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.rewards.base import SequenceRewardWrapper

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class RewardFunctionWrapper(SequenceRewardWrapper):
    """Score each finished response with ``fn(prompts, completions) -> scores``.

    ``fn`` receives lists of texts (a batch of finished episodes; a batch of one through ``step()``) and
    returns one finite float per episode (list, NumPy array or tensor).

    :param env: the environment to wrap.
    :param fn: the reward function.
    :param name: key of the term in ``info["reward_terms"]`` and the logs.
    """

    def __init__(self, env: gym.Env, fn: RewardFn, name: str = "reward_fn") -> None:
        super().__init__(env, name)
        if not callable(fn):
            raise TypeError(
                f"fn must be callable as fn(prompts, completions) -> list of floats, got {type(fn).__name__}"
            )
        self.fn = fn
        self.source = f"reward function {getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"

    def score(self, batch: GenerationBatch) -> th.Tensor:
        result = self.fn(batch.prompts, batch.completions)
        try:
            values = np.asarray(result.detach().cpu() if isinstance(result, th.Tensor) else result, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"{self.name}: the reward function must return a list of floats, got {type(result).__name__}"
            ) from error
        if values.shape != (batch.batch_size,):
            raise ValueError(
                f"{self.name}: the reward function returned {values.size} value(s) of shape {values.shape} "
                f"for {batch.batch_size} completions; return exactly one float per completion"
            )
        return th.as_tensor(values, dtype=th.float32)
