"""The loop shared by the offline trainers (reward model, SFT): SB3 logger and TensorBoard, seeding,
AdamW, gradient clipping, a progress bar (a log line per epoch where standard output is not a terminal),
evaluation after each epoch."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.utils import configure_logger, get_device, set_random_seed
from tqdm.auto import tqdm

from sb3_rlhf.common.progress import PROGRESS_LOGGER, format_duration, show_progress_lines, stdout_is_terminal


class SupervisedTrainer:
    """Base class: subclasses define the batches, the loss, the evaluation and the export.

    :param learning_rate: AdamW learning rate.
    :param batch_size: examples per optimizer step.
    :param n_epochs: default number of passes for :meth:`learn`.
    :param weight_decay: AdamW weight decay.
    :param max_grad_norm: gradient clipping norm.
    :param log_interval: log training metrics every this many optimizer steps.
    :param tensorboard_log: TensorBoard folder (``None``: no TensorBoard).
    :param verbose: 0 silent, 1 prints the logged tables.
    :param seed: seeds Python, NumPy and torch (data order, initialisation of new heads).
    :param device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    #: logger key prefix and TensorBoard run name
    name = "trainer"

    def __init__(
        self,
        learning_rate: float,
        batch_size: int,
        n_epochs: int,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        log_interval: int = 10,
        tensorboard_log: str | None = None,
        verbose: int = 0,
        seed: int = 0,
        device: th.device | str = "auto",
    ) -> None:
        self.check_settings(learning_rate, batch_size, n_epochs, weight_decay, max_grad_norm, log_interval)
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.log_interval = log_interval
        self.tensorboard_log = tensorboard_log
        self.verbose = verbose
        self.seed = seed
        self.device = get_device(device)
        set_random_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.num_steps = 0
        self.num_examples = 0
        self.epochs_done = 0
        self.optimizer: th.optim.Optimizer | None = None
        self.logger = configure_logger(verbose, tensorboard_log, type(self).__name__)

    @staticmethod
    def check_settings(
        learning_rate: float,
        batch_size: int,
        n_epochs: int,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        log_interval: int = 10,
    ) -> None:
        """The training settings, each in its range (without a model: ``sb3-rlhf train --dry-run`` checks them too).

        :raises ValueError: naming the setting and the value.
        """
        from sb3_rlhf.common.on_policy_algorithm import (
            check_hyperparameter,
        )  # it imports the reward models, and they this

        for key, value, least in (
            ("batch_size", batch_size, 1),
            ("n_epochs", n_epochs, 0),
            ("log_interval", log_interval, 1),
        ):
            if not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"{key} must be an integer >= {least}, got {value!r}")
        check_hyperparameter("learning_rate", learning_rate, above=0.0)
        check_hyperparameter("weight_decay", weight_decay, at_least=0.0)
        check_hyperparameter("max_grad_norm", max_grad_norm, above=0.0, infinite=True)  # inf: no clipping

    # ------------------------------------------------------------------ for subclasses
    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups (``{"params": [...], "lr": ...}``); a group without ``lr`` uses ``learning_rate``."""
        raise NotImplementedError

    def training_examples(self) -> Sequence[Any]:
        """The training examples (pairs, encoded demonstrations) that :meth:`training_batches` shuffles."""
        raise NotImplementedError

    def training_batches(self) -> Iterator[list[Any]]:
        """One epoch of ``batch_size`` examples per batch, in an order drawn from ``self.rng``."""
        examples = self.training_examples()
        order = self.rng.permutation(len(examples))
        for start in range(0, len(order), self.batch_size):
            yield [examples[i] for i in order[start : start + self.batch_size]]

    def training_loss(self, batch: Any) -> tuple[th.Tensor, dict[str, float], int]:
        """:return: the loss to minimise, metrics to log, and the number of examples in the batch."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Metrics on the held-out data (empty without it)."""
        return {}

    def set_training_mode(self, mode: bool) -> None:
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        """Hook after each epoch's evaluation (checkpoints)."""

    # ------------------------------------------------------------------ the loop
    def learn(self, n_epochs: int | None = None, progress_bar: bool = False) -> SupervisedTrainer:
        """Train for ``n_epochs`` (default: the constructor's) more epochs, evaluating after each.

        :param progress_bar: a tqdm bar per epoch on a terminal; elsewhere one log line per epoch
            (:mod:`sb3_rlhf.common.progress`).
        """
        n_epochs = self.n_epochs if n_epochs is None else n_epochs
        lines = progress_bar and not stdout_is_terminal()
        if lines:
            show_progress_lines()
        started = time.monotonic()
        if self.optimizer is None:
            self.optimizer = th.optim.AdamW(
                self.parameter_groups(), lr=self.learning_rate, weight_decay=self.weight_decay
            )
        for _ in range(n_epochs):
            batches = list(self.training_batches())
            running: dict[str, list[float]] = defaultdict(list)
            self.set_training_mode(True)
            epoch_loss = []
            bar = tqdm(batches, desc=f"{self.name} epoch {self.epochs_done + 1}", disable=not progress_bar or lines)
            for batch in bar:
                loss, metrics, n_examples = self.training_loss(batch)
                if not th.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite {self.name} loss at step {self.num_steps}: lower the learning rate"
                    )
                self.optimizer.zero_grad()
                loss.backward()
                th.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], self.max_grad_norm
                )
                self.optimizer.step()
                self.num_steps += 1
                self.num_examples += n_examples
                epoch_loss.append(loss.item())
                running["loss"].append(epoch_loss[-1])
                for key, value in metrics.items():
                    running[key].append(value)
                if self.num_steps % self.log_interval == 0:
                    self._dump(running)
                    running.clear()
            if running:
                self._dump(running)
            self.epochs_done += 1
            eval_metrics = self.evaluate()
            for key, value in eval_metrics.items():
                self.logger.record(f"eval/{key}", value)
            if eval_metrics:
                self.logger.record("train/epoch", self.epochs_done)
                self.logger.dump(step=self.num_examples)
            if lines:
                held_out = "".join(f", held-out {key} {value:.3g}" for key, value in eval_metrics.items())
                PROGRESS_LOGGER.info(
                    f"{self.name} epoch {self.epochs_done} ({len(batches)} batches): training loss "
                    f"{np.mean(epoch_loss) if epoch_loss else float('nan'):.3g}{held_out}; "
                    f"{format_duration(time.monotonic() - started)} so far"
                )
            self.on_epoch_end()
        return self

    def _dump(self, running: dict[str, list[float]]) -> None:
        for key, values in running.items():
            self.logger.record(f"train/{key}", float(np.mean(values)))
        self.logger.record("train/n_updates", self.num_steps, exclude="tensorboard")
        self.logger.dump(step=self.num_examples)
