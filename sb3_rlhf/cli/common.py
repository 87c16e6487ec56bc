"""What several ``sb3-rlhf`` commands share: the data/model/training options, the ``--algorithm`` option, the
trainer settings and export of ``sft``/``dpo``, and the multi-process launch of ``train``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def test_size(text: str) -> int | float:
    """``--test-size``: a share of the data below 1, else a count."""
    value = float(text)
    return value if value < 1 else int(value)


def add_training_arguments(
    parser: argparse.ArgumentParser, learning_rate: float, batch_size: int, max_length: int
) -> None:
    """The data, model, output and training options of ``reward-model``, ``sft`` and ``dpo``.

    :param learning_rate: the command's default ``--learning-rate``.
    :param batch_size: the command's default ``--batch-size``.
    :param max_length: the command's default ``--max-length``.
    """
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a .jsonl/.jsonl.gz file (or .csv for labelled texts)")
    source.add_argument(
        "--dataset", help="a `datasets` data set instead: a hub name (e.g. Anthropic/hh-rlhf), a folder or a builder"
    )
    parser.add_argument("--dataset-config", help="--dataset: its configuration (subset)")
    parser.add_argument("--split", default="train", help="--dataset: the split, e.g. train or 'test[:1000]'")
    parser.add_argument("--data-dir", help="--dataset: a folder inside it (Anthropic/hh-rlhf: harmless-base)")
    parser.add_argument("--dataset-revision", help="--dataset: a branch, tag or commit")
    parser.add_argument(
        "--model", required=True, help="a local model folder, a packaged model name or a Hugging Face hub id"
    )
    parser.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--test-size", type=test_size, default=0.1, help="held-out share (<1) or count")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress-bar", action="store_true")


def records(args: argparse.Namespace) -> Any:
    """The ``--data`` file, or the ``--dataset`` split loaded with ``datasets`` (an iterable of records)."""
    if args.data:
        return args.data
    from sb3_rlhf.common.data import load_hub_dataset

    return load_hub_dataset(args.dataset, args.dataset_config, args.split, args.dataset_revision, args.data_dir)


def training_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer arguments that ``sft`` and ``dpo`` take from their shared flags (:func:`add_training_arguments`)."""
    return dict(
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        n_epochs=args.epochs,
        max_length=args.max_length,
        tensorboard_log=os.path.join(args.out, "tensorboard"),
        seed=args.seed,
        device=args.device,
    )


def fit_and_export(trainer: Any, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out metrics before, ``learn()``, metrics after, then the export to ``<out>/model``."""
    before = trainer.evaluate()
    trainer.learn(progress_bar=not args.no_progress_bar)
    after = trainer.evaluate()
    trainer.save(os.path.join(args.out, "model"))
    return before, after


def add_algorithm_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """``--algorithm``, with the choices of the algorithm registry (:mod:`sb3_rlhf.algorithms`)."""
    from sb3_rlhf.algorithms import ALGORITHM_NAMES

    parser.add_argument("--algorithm", choices=list(ALGORITHM_NAMES), help=help)


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (argparse names the option and the value when it is not)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def run_folder(args: argparse.Namespace, task: Any) -> str:
    """``--out``, else ``runs/<task name>``, or ``runs/<task name>_<algorithm>`` when the command runs another
    algorithm than the task file names (so that each algorithm of a task has its own run)."""
    if args.out:
        return str(args.out)
    from sb3_rlhf.tasks.config import read_task_file

    own = read_task_file(task.source).get("task", {}).get("algorithm", "ppo")
    return os.path.join("runs", task.name if task.algorithm_name == own else f"{task.name}_{task.algorithm_name}")


def with_algorithm(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, with ``--algorithm`` as ``task.algorithm`` (and ``train --strategy`` as
    ``algorithm.strategy``)."""
    strategy = getattr(args, "strategy", None)
    return [
        *args.set,
        *([f"task.algorithm={args.algorithm}"] if args.algorithm else []),
        *([f"algorithm.strategy={strategy}"] if strategy else []),
    ]


def launch_processes(nproc: int, argv: Sequence[str]) -> int:
    """``sb3-rlhf train --nproc N``: the same command in N processes under torchrun (one node; for several nodes
    run torchrun or ``accelerate launch`` yourself, see the "Several processes and GPUs" guide in docs/)."""
    rest, skip = [], False
    for arg in argv:  # the ranks run the command without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*command, "-m", "sb3_rlhf.cli", *rest]).returncode
