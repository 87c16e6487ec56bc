"""``sb3-rlhf tasks``: the ready tasks shipped with the package, one line each, or one task's file to copy."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``tasks`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "tasks", help="list the ready tasks (`sb3-rlhf train NAME` runs one), or print one's task file"
    )
    parser.add_argument("name", nargs="?", help="print this task's file (to copy and edit)")
    parser.set_defaults(func=run_tasks)
    return parser


def run_tasks(args: argparse.Namespace) -> None:
    """``sb3-rlhf tasks [NAME]``."""
    from sb3_rlhf.tasks.config import find_task_file, read_task_file, ready_tasks

    if args.name:
        with open(find_task_file(args.name), encoding="utf-8") as f:
            print(f.read(), end="")
        return
    ready = ready_tasks()
    width = max(map(len, ready))
    for name, path in ready.items():
        task = read_task_file(path).get("task", {})
        print(f"{name:<{width}}  {task.get('algorithm', 'ppo'):<4}  {task.get('description', '')}")
    print("\nrun one: sb3-rlhf train NAME [--dry-run]; copy one to edit: sb3-rlhf tasks NAME > my_task.toml")
