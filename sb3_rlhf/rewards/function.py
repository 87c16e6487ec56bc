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
        if isinstance(result, th.Tensor):  # on the host, bfloat16 (no NumPy type) as float32
            result = result.detach().float().cpu() if result.is_floating_point() else result.detach().cpu()
        try:
            raw = np.asarray(result)
        except (TypeError, ValueError) as error:  # ragged
            raise TypeError(
                f"{self.name}: the reward function must return a list of floats, got {type(result).__name__}"
            ) from error
        # numbers only: NumPy would read "1.5" or True as a reward without a word
        if raw.dtype.kind not in "iuf":
            numbers = (int, float, np.integer, np.floating)
            offending = (v for v in raw.flat if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers))
            example = next(offending, None)
            raise TypeError(
                f"{self.name}: the reward function must return numbers, one float per completion; got "
                f"{type(result).__name__} of {type(example).__name__ if example is not None else 'nothing'}"
                f"{f' ({example!r})' if example is not None else ''}: convert with float(...) in the function"
            )
        values = raw.astype(np.float64)
        if values.shape != (batch.batch_size,):
            raise ValueError(
                f"{self.name}: the reward function returned {values.size} value(s) of shape {values.shape} "
                f"for {batch.batch_size} completions; return exactly one float per completion"
            )
        return th.as_tensor(values, dtype=th.float32)
