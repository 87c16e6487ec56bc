"""What progress a run shows. Log lines where there is no terminal to draw a bar on (a log file, CI, a cluster
job, a notebook's captured output): SB3's rich progress bar only redraws a terminal, so a redirected run would show
nothing until the end. The lines go through :mod:`logging` (logger ``sb3_rlhf.progress``), so that they can be
silenced: ``logging.getLogger("sb3_rlhf").setLevel(logging.WARNING)``. And no bar of transformers' own each time
the library loads or saves a model (one per checkpoint)."""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from stable_baselines3.common.callbacks import BaseCallback

from sb3_rlhf.common.distributed import is_main_process

#: the library's logger: :func:`show_progress_lines` gives it a handler when the application configured none
LIBRARY_LOGGER = logging.getLogger("sb3_rlhf")
PROGRESS_LOGGER = logging.getLogger("sb3_rlhf.progress")

P = ParamSpec("P")
R = TypeVar("R")


def stdout_is_terminal() -> bool:
    """Whether standard output is a terminal, where a progress bar redraws in place."""
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty is not None and isatty())


class _StandardErrorHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each line, not as it was when the handler was made: pytest, notebooks
    and ``contextlib.redirect_stderr`` swap it (as logging's own last-resort handler does)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if logging.root.handlers:  # the application configured logging since: the line reaches it by propagation
            return
        super().emit(record)


def show_progress_lines() -> None:
    """Make the progress lines visible: level INFO for the library's logger unless a level was set for it, and,
    where the application configured no logging, a handler on standard error (as transformers has for its own)."""
    if LIBRARY_LOGGER.level == logging.NOTSET:
        LIBRARY_LOGGER.setLevel(logging.INFO)
    if not LIBRARY_LOGGER.hasHandlers():
        handler = _StandardErrorHandler()  # standard error, as tqdm: standard output keeps the reports
        handler.setFormatter(logging.Formatter("%(message)s"))
        LIBRARY_LOGGER.addHandler(handler)


def announce(message: str) -> None:
    """A stage of a run begins or ends (``sb3-rlhf train`` prints these): one progress line, from rank 0 only."""
    if is_main_process():
        PROGRESS_LOGGER.info(message)


def without_transformers_bars(function: Callable[P, R]) -> Callable[P, R]:
    """Run ``function`` with transformers' progress bars off ("Loading weights", "Writing model shards": a bar
    per call, so one per checkpoint in a long run); as they were afterwards."""

    @functools.wraps(function)
    def quietly(*args: P.args, **kwargs: P.kwargs) -> R:
        import huggingface_hub.utils
        from transformers.utils import logging as transformers_logging

        if not transformers_logging.is_progress_bar_enabled():
            return function(*args, **kwargs)
        hub_bars_off = huggingface_hub.utils.are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()  # huggingface_hub's too
        try:
            return function(*args, **kwargs)
        finally:
            transformers_logging.enable_progress_bar()
            if hub_bars_off:  # enable_progress_bar() turned the hub's on again
                huggingface_hub.utils.disable_progress_bars()

    return quietly


def format_duration(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressLogCallback(BaseCallback):
    """One log line after each rollout (or at most one every ``every_seconds``): rollouts done and the estimated
    total, generated tokens against the budget, the reward-model score, the KL to the reference with the adaptive
    controller's target and β, tokens per second and the time left; then one line when training ends. Under
    several processes, rank 0 logs (the tokens are every rank's; the score and KL rank 0's, as in TensorBoard).

    ``learn(progress_bar=True)`` uses it instead of SB3's bar when standard output is not a terminal; pass it as a
    callback to have the lines anyway::

        model.learn(20_000, callback=ProgressLogCallback(every_seconds=30))

    :param every_seconds: the least time between two lines (0: every rollout); the first and last rollouts are
        always shown.
    """

    def __init__(self, every_seconds: float = 0.0, verbose: int = 0) -> None:
        super().__init__(verbose)
        if not every_seconds >= 0:
            raise ValueError(f"every_seconds must be >= 0, got {every_seconds}")
        self.every_seconds = float(every_seconds)
        self.rollouts = 0
        self._started = 0.0
        self._start_timesteps = 0
        self._total_timesteps = 0
        self._first_rollout: tuple[float, int] | None = None  # (time, timesteps) when the first rollout ended
        self._last_line = -math.inf

    def _on_training_start(self) -> None:
        if not is_main_process():
            return
        show_progress_lines()
        self._started = time.monotonic()
        # the model's count, not the callback's copy: a distributed rollout adds the other ranks' tokens after the
        # last on_step()
        self._start_timesteps = self.model.num_timesteps
        self._total_timesteps = int(self.locals["total_timesteps"])  # SB3's: the count this learn() stops at
        self.rollouts, self._first_rollout, self._last_line = 0, None, -math.inf
        PROGRESS_LOGGER.info(
            "%s: training to %s generated tokens%s",
            type(self.model).__name__,
            f"{self._total_timesteps:,}",
            f" (from {self._start_timesteps:,})" if self._start_timesteps else "",
        )

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        if not is_main_process():
            return
        self.rollouts += 1
        now, timesteps = time.monotonic(), self.model.num_timesteps
        if self._first_rollout is None:
            self._first_rollout = (now, timesteps)
        last = timesteps >= self._total_timesteps
        if self.rollouts > 1 and not last and now - self._last_line < self.every_seconds:
            return
        self._last_line = now
        PROGRESS_LOGGER.info(self.progress_line(now))

    def tokens_per_second(self, now: float) -> float:
        """Since the first rollout ended: whole iterations (rollout and update), past the first one's warm-up
        (compilation on a GPU); at the first rollout, that rollout's own rate."""
        assert self._first_rollout is not None
        since, timesteps = self._first_rollout
        if self.rollouts > 1 and now > since:
            return (self.model.num_timesteps - timesteps) / (now - since)
        return (timesteps - self._start_timesteps) / max(since - self._started, 1e-9)

    def progress_line(self, now: float) -> str:
        """The line for the rollout just collected, at ``now`` (``time.monotonic()``)."""
        timesteps = self.model.num_timesteps
        done = timesteps - self._start_timesteps
        left = max(0, self._total_timesteps - timesteps)
        # rollouts vary in length (responses end at EOS): the total is estimated from the mean so far
        estimated = self.rollouts + math.ceil(left * self.rollouts / done) if done > 0 else self.rollouts
        parts = [
            f"{type(self.model).__name__} rollout {self.rollouts}/~{estimated}",
            f"{timesteps:,}/{self._total_timesteps:,} tokens",
        ]
        values: dict[str, Any] = self.model.logger.name_to_value
        if "rlhf/scores" in values:
            parts.append(f"score {values['rlhf/scores']:.3g}")
        if "rlhf/kl" in values:
            target = values.get("rlhf/kl_target")
            kl = f"KL {values['rlhf/kl']:.3g}" + (f" (target {target:g})" if target is not None else "")
            if "rlhf/kl_coef" in values:
                kl += f" β {values['rlhf/kl_coef']:.3g}"
            parts.append(kl)
        rate = self.tokens_per_second(now)
        parts.append(f"{rate:.0f} tokens/s")
        if rate > 0 and left > 0:
            parts.append(f"{format_duration(left / rate)} left")
        return " | ".join(parts)

    def _on_training_end(self) -> None:
        if not is_main_process():
            return
        PROGRESS_LOGGER.info(
            "%s: %s tokens in %s",
            type(self.model).__name__,
            f"{self.model.num_timesteps - self._start_timesteps:,}",
            format_duration(time.monotonic() - self._started),
        )
