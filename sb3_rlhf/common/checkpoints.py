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
the run that was never interrupted.

In a distributed run every rank takes part: each writes its own random streams (``training_state_rank<r>.json``),
and under ``strategy="fsdp"`` its shard of the weights and optimizer state with :mod:`torch.distributed.checkpoint`
(``sharded/``; the zip then holds the hyperparameters and counters only, not a gathered copy). Rank 0 makes the
temporary folder and renames it into place once every rank has written, so the folder must be on storage every
rank sees (one machine, or a shared file system across machines). Such a checkpoint resumes with the same number
of processes, each taking back its shard and its streams.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch.distributed as dist
from stable_baselines3.common.callbacks import BaseCallback

from sb3_rlhf.common.distributed import is_main_process, raise_on_every_rank, rank, world_size
from sb3_rlhf.common.io import atomic_directory

if TYPE_CHECKING:
    from sb3_rlhf.common.on_policy_algorithm import RLHFOnPolicyAlgorithm

MODEL_FILE = "model.zip"
STATE_FILE = "training_state.json"
SHARDED_FOLDER = "sharded"
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def rank_state_file(rank: int) -> str:
    """The training state of ``rank`` in a checkpoint (rank 0's is :data:`STATE_FILE`)."""
    return STATE_FILE if rank == 0 else f"training_state_rank{rank}.json"


@contextlib.contextmanager
def _shared_atomic_directory(path: str) -> Iterator[str]:
    """:func:`~sb3_rlhf.common.io.atomic_directory` made by rank 0, its temporary name sent to every rank, and
    renamed into place by rank 0 once every rank has written into it. A failure on any rank (making the folder,
    writing into it, renaming it) is raised on every rank, none left waiting for the others."""
    if world_size() == 1:
        with atomic_directory(path) as tmp:
            yield tmp
        return
    with contextlib.ExitStack() as stack:
        name: list[str | None] = [None]
        made: BaseException | None = None
        if is_main_process():
            try:
                name = [stack.enter_context(atomic_directory(path))]
            except BaseException as error:  # noqa: BLE001 - raised below, once the other ranks know
                made = error
        dist.broadcast_object_list(name, src=0)
        if made is not None:
            raise made
        if name[0] is None:
            raise RuntimeError(f"rank 0 could not make the checkpoint folder {path}")
        failed: BaseException | None = None
        try:
            yield name[0]
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the other ranks know
            failed = error
        # every rank's files are in, or one failed, before rank 0 renames the folder (or removes it)
        raise_on_every_rank(
            failed, "another rank failed writing its part of the checkpoint; the checkpoint was not kept"
        )
        renamed: BaseException | None = None
        if is_main_process():
            try:
                stack.close()  # the rename into place
            except BaseException as error:  # noqa: BLE001 - raised below, once the other ranks know
                renamed = error
        raise_on_every_rank(renamed, f"rank 0 could not put the checkpoint in place at {path}")


def save_checkpoint(model: RLHFOnPolicyAlgorithm, folder: str) -> str:
    """Write ``folder/checkpoint_<timesteps>`` atomically and return its path (every rank of a distributed run
    calls it)."""
    path = os.path.join(folder, f"checkpoint_{model.num_timesteps:012d}")
    with _shared_atomic_directory(path) as tmp:
        if model.parallel.sharded:
            model.parallel.save_sharded(os.path.join(tmp, SHARDED_FOLDER))
        # rank 0 writes it; the weights of a sharded run are in the shards
        model.save(os.path.join(tmp, MODEL_FILE), weights=not model.parallel.sharded)
        with open(os.path.join(tmp, rank_state_file(rank())), "w") as f:
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
        """Write a checkpoint now and drop the oldest beyond ``keep`` (every rank of a distributed run takes part;
        rank 0 drops the old ones)."""
        self._last_saved = self.num_timesteps
        path = save_checkpoint(self.model, self.save_path)  # type: ignore[arg-type]
        if not is_main_process():
            return None
        if self.verbose >= 1:
            print(f"Saving checkpoint to {path}")
        if self.keep is not None:
            for old in list_checkpoints(self.save_path)[: -self.keep]:
                shutil.rmtree(old)
        return path
