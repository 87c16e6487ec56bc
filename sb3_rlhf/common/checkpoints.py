"""Checkpoints a long run can resume from, exactly where it stopped.

A checkpoint is a folder ``checkpoint_<timesteps>`` holding the SB3 zip (policy with its value head, optimizer
state, timestep and update counters) and ``training_state.json``: what SB3's zip leaves out because it lives
outside the algorithm, the reward wrappers' state (the KL controller's β) and every random number generator
(torch, CUDA, NumPy, Python, the env's prompt sampler). The folder is written under a temporary name and
renamed into place, so a run killed mid-save leaves the previous checkpoints intact and never a partial one.

Resuming restores that state at the start of the next ``learn()`` (after SB3's own setup), so a seeded run
that is killed and resumed on CPU trains exactly as the run that was never interrupted. A distributed run is
checkpointed by rank 0; on resume the other ranks get the weights, optimizer, β and counters, and fresh random
streams of their own.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import set_random_seed

from sb3_rlhf.common.distributed import is_main_process, rank
from sb3_rlhf.common.io import atomic_directory

if TYPE_CHECKING:
    from sb3_rlhf.ppo.ppo import RLHFPPO

MODEL_FILE = "model.zip"
STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint_(\d+)$")


def capture_training_state(model: RLHFPPO) -> dict[str, Any]:
    """What a resumed run needs beyond the SB3 zip, as JSON-serialisable values (no pickle)."""
    wrappers = model.reward_wrappers
    state: dict[str, Any] = {
        "num_timesteps": int(model.num_timesteps),
        "reward_wrappers": {w.name: w.state_dict() for w in wrappers},
        "env_rng": model.generation_env.np_random.bit_generator.state,
        "torch_rng": th.get_rng_state().tolist(),
        "numpy_rng": _numpy_global_state(),
        "python_rng": _python_state(),
    }
    if th.cuda.is_available():
        state["cuda_rng"] = [s.tolist() for s in th.cuda.get_rng_state_all()]
    return state


def restore_training_state(model: RLHFPPO, state: dict[str, Any]) -> None:
    """Put back what :func:`capture_training_state` recorded (the algorithm's own state comes from the zip)."""
    wrappers = {w.name: w for w in model.reward_wrappers}
    saved = state["reward_wrappers"]
    if set(saved) != set(wrappers):
        raise ValueError(
            f"the checkpoint was written with reward wrappers {sorted(saved)} but the env has {sorted(wrappers)}: "
            "resume with the env the run was started with"
        )
    for name, wrapper_state in saved.items():
        wrappers[name].load_state_dict(wrapper_state)
    if rank() > 0:
        # the checkpoint holds rank 0's generators: the other ranks draw fresh, distinct streams instead
        seed = ((model.seed or 0) + 7919 * rank() + int(state["num_timesteps"])) % 2**32
        model.generation_env.np_random = np.random.default_rng(seed)
        set_random_seed(seed, using_cuda=th.cuda.is_available())
        return
    model.generation_env.np_random.bit_generator.state = state["env_rng"]
    th.set_rng_state(th.tensor(state["torch_rng"], dtype=th.uint8))
    if "cuda_rng" in state and th.cuda.is_available() and len(state["cuda_rng"]) == th.cuda.device_count():
        th.cuda.set_rng_state_all([th.tensor(s, dtype=th.uint8) for s in state["cuda_rng"]])
    name, keys, position, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(model: RLHFPPO, folder: str) -> str:
    """Write ``folder/checkpoint_<timesteps>`` atomically and return its path."""
    path = os.path.join(folder, f"checkpoint_{model.num_timesteps:012d}")
    with atomic_directory(path) as tmp:
        model.save(os.path.join(tmp, MODEL_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(capture_training_state(model), f)
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


def load_checkpoint(
    cls: type[RLHFPPO], path: str, env: Any, device: th.device | str = "auto", **kwargs: Any
) -> RLHFPPO:
    """Load the newest checkpoint under ``path`` into ``cls``; its training state is restored when the next
    ``learn(..., reset_num_timesteps=False)`` starts."""
    path = latest_checkpoint(path)
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    model = cls.load(os.path.join(path, MODEL_FILE), env=env, device=device, **kwargs)
    if model.num_timesteps != state["num_timesteps"]:
        raise ValueError(
            f"{path} is inconsistent: the zip is at {model.num_timesteps} timesteps, the state at {state['num_timesteps']}"
        )
    policy = model.policy
    if policy.model_name_or_path is None and policy.lora is None:
        for wrapper in model.reward_wrappers:
            if getattr(wrapper, "reference_from_policy", False):
                raise ValueError(
                    f"{wrapper.name}: the policy was built from model_config, so its initial weights exist nowhere "
                    "but in the original run; resume with KLPenaltyWrapper(..., ref_model=<the initial model>)"
                )
    model._resume_state = state
    return model


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


def _numpy_global_state() -> list[Any]:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached)]


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
