"""A run folder belongs to one run: ``run.json`` records the task and settings a run was started with, a new run
refuses a folder that holds another run's results unless told to replace them, and ``--resume`` continues only
the run that was recorded, with the settings it can honour."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import sb3_rlhf
from sb3_rlhf.algorithms import (
    ALGORITHM_NAMES,
    ONLINE_ALGORITHMS,
    accepted_arguments,
    algorithm_class,
    argument_defaults,
)
from sb3_rlhf.common.checkpoints import latest_checkpoint, list_checkpoints
from sb3_rlhf.common.io import atomic_file
from sb3_rlhf.common.progress import announce
from sb3_rlhf.tasks.config import SET_BY_TASK, TaskConfig, kl_estimator

#: The record of the run a folder holds.
RUN_RECORD = "run.json"
#: Settings a resumed run (or ``sb3-rlhf evaluate``) honours when they differ from the recorded ones: the budget it
#: trains to, how it checkpoints, how it evaluates, and where it runs.
RESUMABLE_CHANGES = (
    "algorithm.total_timesteps",
    "checkpoint.every",
    "checkpoint.keep",
    "evaluation.n_prompts",
    "evaluation.n_samples_shown",
    "evaluation.every",
    "task.device",
    # how much is generated or trained on at once: memory, not the result (the out-of-memory errors name them)
    "algorithm.generation_batch_size",
    "algorithm.micro_batch_tokens",
    "algorithm.max_batch_tokens",
)
#: The settings of :data:`RESUMABLE_CHANGES` that the resumed algorithm takes at load (SB3's ``load(**kwargs)``).
MEMORY_SETTINGS = ("generation_batch_size", "micro_batch_tokens", "max_batch_tokens")


def task_settings(task: TaskConfig) -> dict[str, Any]:
    """Every setting of ``task`` by its dotted key in a task file (``kl.coef``, ``algorithm.learning_rate``,
    ``task.seed``), as the run reads it: its algorithm's arguments with their defaults (other algorithms' tables and
    keys it ignores left out); the file's own path and description left out. JSON values, as ``run.json`` holds."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = value

    data = dataclasses.asdict(task)
    for key in ("source", "description"):
        data.pop(key)
    data.pop("algorithm")
    data["kl"]["estimator"] = kl_estimator(task)  # as the run reads it: "k1" written out is the default
    cls = algorithm_class(task.algorithm_name)
    taken = accepted_arguments(cls) - SET_BY_TASK
    arguments = {k: v for k, v in argument_defaults(cls).items() if k in taken}
    arguments = {**arguments, **task.algorithm_settings()}
    if task.algorithm_name in ONLINE_ALGORITHMS:  # DPO has no timestep budget
        arguments["total_timesteps"] = task.algorithm.total_timesteps
    walk("algorithm", arguments)
    data["task"] = {"algorithm": data.pop("algorithm_name")}
    for key in ("name", "seed", "device"):
        data["task"][key] = data.pop(key)
    walk("", data)
    return json.loads(json.dumps(flat, default=repr))  # as read back from run.json (a tuple is a list, ...)


def run_record(task: TaskConfig, finished: bool = False) -> dict[str, Any]:
    """What ``run.json`` holds: the task's name, its algorithm, every setting, whether the run finished, and the
    version of sb3_rlhf that wrote it (whose defaults the settings hold)."""
    return {
        "task": task.name,
        "algorithm": task.algorithm_name,
        "settings": task_settings(task),
        "finished": finished,
        "version": sb3_rlhf.__version__,
    }


def _previous_results(out: str) -> list[str]:
    """What a previous run left in ``out`` that a new run would mix with its own."""
    found = []
    if list_checkpoints(os.path.join(out, "checkpoints")):
        found.append("checkpoints/")
    names = [f"{name}_model.zip" for name in ALGORITHM_NAMES] + ["policy", "report.json", "report.md"]
    return found + [name for name in names if os.path.exists(os.path.join(out, name))]


def read_record(out: str) -> dict[str, Any] | None:
    """The record of the run in ``out`` (``None``: no record, a folder from before records or no run)."""
    path = os.path.join(out, RUN_RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not {"task", "algorithm", "settings"} <= set(record):
            raise ValueError("keys missing")
    except ValueError as error:
        raise ValueError(
            f"{path} is not a run record ({error}): remove it, or start this run with --overwrite or another --out"
        ) from None
    _add_later_settings(record["settings"])
    return record


def _add_later_settings(settings: dict[str, Any]) -> None:
    """Settings added after a record was written, as the run that wrote it used them: the data were split item by
    item before the ``split_by`` keys, so ``--set ...split_by=prompt`` (or ``pair``) takes such a run as it was."""
    if settings.get("prompts.format") == "hh":
        settings.setdefault("prompts.split_by", "prompt")
    if settings.get("reward.train.format") == "pairs":
        settings.setdefault("reward.train.split_by", "pair")


def check_same_run(previous: dict[str, Any], record: dict[str, Any], out: str, what: str, may_change: tuple) -> None:
    """``record`` describes the run ``previous`` recorded: the same task and algorithm, and no setting changed but
    ``may_change``.

    :param what: the command, for the message (``"--resume"``, ``"evaluate"``).
    :raises ValueError: naming the run, or the settings that changed.
    """
    if (previous["task"], previous["algorithm"]) != (record["task"], record["algorithm"]):
        raise ValueError(
            f"{what}: {out} holds {_describe(previous)}, not a {record['algorithm']} run of {record['task']}: give "
            f"its own task and --algorithm {previous['algorithm']}, or another --out"
        )
    fixed = {k: v for k, v in previous["settings"].items() if k not in may_change}
    now = {k: v for k, v in record["settings"].items() if k not in may_change}
    if previous.get("version") != record["version"]:
        # another version's record: its defaults may differ, and settings may have come or gone; compare the
        # settings both know, and say so rather than refuse
        common = set(fixed) & set(now)
        changed = changed_settings({k: fixed[k] for k in common}, {k: now[k] for k in common})
        if changed:
            warnings.warn(
                f"{what}: {out}/{RUN_RECORD} was written by sb3_rlhf {previous.get('version', '< 0.1.0')}, this is "
                f"{record['version']}; these settings now differ from it (a changed default, or a changed task): "
                f"{'; '.join(changed)}",
                UserWarning,
                stacklevel=3,
            )
        return
    changed = changed_settings(fixed, now)
    if changed:
        raise ValueError(
            f"{what} takes the run in {out} as it was started; these settings differ from its {RUN_RECORD}: "
            f"{'; '.join(changed)}. Give the recorded values (--set, the task file), or start a new run with "
            f"--overwrite or another --out ({what} may change only {', '.join(may_change)})"
        )


def _describe(record: dict[str, Any] | None) -> str:
    if record is None:
        return "a run without a record (run.json)"
    total = record["settings"].get("algorithm.total_timesteps")
    return f"a {record['algorithm']} run of {record['task']}" + (f" ({total} timesteps)" if total else "")


def changed_settings(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """``key before -> after`` for each setting that differs."""
    keys = sorted(set(before) | set(after))
    return [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)]


@dataclass
class RunFolder:
    """What a run does with its folder, decided by :func:`claim_run_folder` before anything is written."""

    out: str
    record: dict[str, Any]
    clear: list[str]  # a previous run's results to remove first
    repeat: bool = False  # they are those of a finished run with the same settings

    def apply(self) -> None:
        """Remove the previous results and write the record (rank 0 only, in a run of several processes)."""
        if self.clear:
            why = "a finished run with the same settings, run again" if self.repeat else "--overwrite"
            announce(f"replacing {', '.join(self.clear)} in {self.out} ({why})")
        for name in self.clear:
            path = os.path.join(self.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        write_record(self.out, self.record)


def write_record(out: str, record: dict[str, Any]) -> None:
    """Write ``out/run.json`` (atomically); a run writes it when it starts, and again with ``finished`` at its end."""
    os.makedirs(out, exist_ok=True)
    with atomic_file(os.path.join(out, RUN_RECORD)) as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")


def claim_run_folder(task: TaskConfig, out: str, resume: bool = False, overwrite: bool = False) -> RunFolder:
    """Check that ``out`` can take this run, reading only (every rank of a run may call it).

    * a new run in an empty folder, or in one holding only stages it redoes (a reward model, a tiny base model),
      goes ahead; so does a new run over a *finished* run with the same settings (it would repeat it);
    * a new run over any other run's results is refused unless ``overwrite``, which removes them first;
    * ``resume`` continues the recorded run only: the same task and algorithm, and no setting changed except
      :data:`RESUMABLE_CHANGES`.

    :raises ValueError: one line naming the folder, what it holds, and the flags that would go ahead.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file: name a folder for the run (it is made if it does not exist)")
    record, previous = run_record(task), read_record(out)
    if resume:
        if overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        if task.algorithm_name not in ONLINE_ALGORITHMS:
            raise ValueError(
                f"--resume continues an online run ({', '.join(ONLINE_ALGORITHMS)}), not {task.algorithm_name}"
            )
        latest_checkpoint(os.path.join(out, "checkpoints"))  # nothing to resume is an error naming the folder
        if previous is not None:  # a folder from before run records: its checkpoint's own checks apply
            check_same_run(previous, record, out, "--resume", RESUMABLE_CHANGES)
        return RunFolder(out, record, [])
    found = _previous_results(out)
    if not found:
        return RunFolder(out, record, [])
    repeat = previous is not None and previous == {**record, "finished": True}
    if not (overwrite or repeat):
        raise ValueError(
            f"{out} holds {_describe(previous)} ({', '.join(found)}): pass --overwrite to replace it, --resume to "
            "continue it, or --out to start this run elsewhere"
        )
    logs = ["tensorboard"] if os.path.isdir(os.path.join(out, "tensorboard")) else []  # the old run's curves too
    return RunFolder(out, record, [*found, *logs], repeat=repeat)
