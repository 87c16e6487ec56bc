"""``sb3-rlhf evaluate``: the trained-versus-initial report of a finished run, again."""

from __future__ import annotations

import argparse
from typing import Any

from sb3_rlhf.cli.common import add_algorithm_argument, run_folder, with_algorithm


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser("evaluate", help="re-run the trained-versus-initial report of a finished run")
    parser.add_argument("task", help="the task file the run used")
    add_algorithm_argument(parser, help="the algorithm the run used, if overridden")
    parser.add_argument("--out", help="the run folder (default as train's: runs/<task name>[_<algorithm>])")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--summary", metavar="PATH", help="also write the headline measures as JSON, as train does")
    parser.set_defaults(func=run_evaluate)
    return parser


def run_evaluate(args: argparse.Namespace) -> dict[str, object]:
    """``sb3-rlhf evaluate``: the comparison of a finished run's policy with the initial one."""
    from sb3_rlhf.common.evaluation import report_markdown
    from sb3_rlhf.tasks import evaluate_task, load_task

    task = load_task(args.task, with_algorithm(args))
    results = evaluate_task(task, run_folder(args, task))
    print(report_markdown(task.name, results, task.evaluation.n_prompts))
    if args.summary:
        from sb3_rlhf.cli.train import write_summary

        write_summary(results, args.summary)
    return results
