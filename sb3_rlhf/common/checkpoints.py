"""Checkpoints a long run can resume from, exactly where it stopped.

A checkpoint is a folder ``checkpoint_<timesteps>`` holding the SB3 zip (policy with its value head, optimizer
state, timestep and update counters) and ``training_state.json``: what SB3's zip leaves out because it lives
outside the algorithm, the reward wrappers' state (the KL controller's β) and every random number generator
(torch, CUDA, NumPy, Python, the env's prompt sampler). The folder is written under a temporary name and
renamed into place, so a run killed mid-save leaves the previous checkpoints intact and never a partial one.

The algorithm captures and restores that state itself (``get_training_state``/``set_training_state`` and
``load_checkpoint`` of :class:`~sb3_rlhf.common.on_policy_algorithm.RLHFOnPolicyAlgorithm`); this module names
the folders, writes them atomically and holds the callback. Resuming restores the state at the start of the
next ``learn()`` (after SB3's own setup), so a seeded run that is killed and resumed on CPU trains exactly as
the run that was never interrupted. A distributed run is checkpointed by rank 0; on resume the other ranks get
the weights, optimizer, β and counters, and fresh random streams of their own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import TYPE_CHECKING

from stable_baselines3.common.callbacks import BaseCallback

from sb3_rlhf.common.distributed import is_main_process
from sb3_rlhf.common.io import atomic_directory

if TYPE_CHECKING:
    from sb3_rlhf.common.on_policy_algorithm import RLHFOnPolicyAlgorithm

MODEL_FILE = "model.zip"
STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def save_checkpoint(model: RLHFOnPolicyAlgorithm, folder: str) -> str:
    """Write ``folder/checkpoint_<timesteps>`` atomically and return its path."""
    path = os.path.join(folder, f"checkpoint_{model.num_timesteps:012d}")
    with atomic_directory(path) as tmp:
        model.save(os.path.join(tmp, MODEL_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(model.get_training_state(), f)
    return path


def list_checkpoints(folder: str) -> list[str]:
    """The complete checkpoints in ``folder``, oldest first (temporary folders of an interrupted save are skipped)."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = _CHECKPOINT.match(name)
        path = os.path.join(folder, name)
        if match and os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(folder: str) -> str:
    """The newest complete checkpoint in ``folder`` (or ``folder`` itself if it is one)."""
    if os.path.isfile(os.path.join(folder, STATE_FILE)):
        return folder
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        raise FileNotFoundError(
            f"no checkpoint in {folder!r}: checkpoints are written during learn() by "
            "sb3_rlhf.common.checkpoints.TrainingCheckpointCallback (sb3-rlhf train writes them to <out>/checkpoints)"
        )
    return checkpoints[-1]


class TrainingCheckpointCallback(BaseCallback):
    """Writes a checkpoint every ``save_freq`` generated tokens, at the start of a rollout (after the previous
    update and KL-controller step, before any sampling: the point a resumed run starts from), and once at the
    end of training. Keeps the newest ``keep`` checkpoints.

    :param save_freq: timesteps (generated tokens) between checkpoints.
    :param save_path: the folder of the ``checkpoint_<timesteps>`` folders.
    :param keep: how many checkpoints to keep (``None``: all).
    """

    def __init__(self, save_freq: int, save_path: str, keep: int | None = 2, verbose: int = 0) -> None:
        super().__init__(verbose)
        if not isinstance(save_freq, int) or save_freq < 1:
            raise ValueError(f"save_freq must be a positive number of timesteps, got {save_freq!r}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        self.save_freq = save_freq
        self.save_path = save_path
        self.keep = keep
        self._last_saved = 0

    def _init_callback(self) -> None:
        self._last_saved = self.model.num_timesteps  # a resumed run counts from where it resumed

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        if self.num_timesteps - self._last_saved >= self.save_freq:
            self.save()

    def _on_training_end(self) -> None:
        if self.num_timesteps > self._last_saved:
            self.save()

    def save(self) -> str | None:
        """Write a checkpoint now and drop the oldest beyond ``keep`` (rank 0 only in a distributed run)."""
        self._last_saved = self.num_timesteps
        if not is_main_process():
            return None
        path = save_checkpoint(self.model, self.save_path)  # type: ignore[arg-type]
        if self.verbose >= 1:
            print(f"Saving checkpoint to {path}")
        if self.keep is not None:
            for old in list_checkpoints(self.save_path)[: -self.keep]:
                shutil.rmtree(old)
        return path
