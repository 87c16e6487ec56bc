"""``sb3-rlhf train``: run a task file end to end, or print its plan (``--dry-run``)."""

from __future__ import annotations

import argparse
import os
import shlex
from typing import Any

from sb3_rlhf.cli.common import add_algorithm_argument, non_negative_float, positive_int, run_folder, with_algorithm


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser("train", help="run a task file (envs/*.toml): reward-model stage, RL or DPO, report")
    parser.add_argument("task", help="a task file, e.g. envs/tiny_synthetic.toml")
    add_algorithm_argument(parser, help="override the task's algorithm (task.algorithm)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a task key, e.g. algorithm.total_timesteps=2000",
    )
    parser.add_argument(
        "--out", help="run folder (default runs/<task name>, runs/<task name>_<algorithm> with --algorithm)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint (online algorithms)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the results of another run in --out (a new run refuses them; a finished run with the same "
        "settings is repeated without it)",
    )
    parser.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="train in this many processes on this machine (torchrun; one per GPU)",
    )
    parser.add_argument(
        "--strategy",
        choices=["ddp", "fsdp"],
        help="with several processes: a whole replica per process (ddp, the default) or the weights, gradients and "
        "optimizer state sharded over them (fsdp); the same as --set algorithm.strategy=...",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve every model and data file, print the plan (models, data sizes, budget) and exit without training",
    )
    parser.add_argument(
        "--summary",
        metavar="PATH",
        help="also write the report's headline measures as JSON: {initial, trained} x {score, kl, distinct_1, "
        "distinct_2, eos_rate, judge_positive_share}",
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="no progress bar or progress lines in training")
    parser.add_argument(
        "--progress-lines",
        type=non_negative_float,
        metavar="SECONDS",
        help="online algorithms: a progress line (rollouts, tokens, score, KL, tokens/s, time left) at most every "
        "SECONDS (0: every rollout) instead of the bar, even on a terminal; off a terminal, lines are the default "
        "(every rollout)",
    )
    parser.set_defaults(func=run)
    return parser


def run_train(args: argparse.Namespace) -> dict[str, object]:
    """``sb3-rlhf train``: every stage of a task file, then the comparison with the initial policy."""
    from sb3_rlhf.algorithms import ONLINE_ALGORITHMS
    from sb3_rlhf.common.distributed import is_main_process
    from sb3_rlhf.common.evaluation import report_markdown
    from sb3_rlhf.tasks import load_task, run_task

    task = load_task(args.task, with_algorithm(args))
    out = run_folder(args, task)
    if args.dry_run:
        from sb3_rlhf.tasks.folders import claim_run_folder
        from sb3_rlhf.tasks.plan import describe_output, format_plan, plan_task

        claim_run_folder(task, out, args.resume, args.overwrite)  # the run folder would take this run (read only)

        print(format_plan(plan_task(task)))
        print(describe_output(out))
        return {}
    if task.algorithm_name in ONLINE_ALGORITHMS:  # the ones that checkpoint and resume
        again = [a for a in args.argv if a != "--overwrite"]  # the run in --out is this one now: resume it
        again += [*([] if args.resume else ["--resume"]), *([] if args.out else ["--out", out])]
        args.on_interrupt = (
            f"; checkpoints written so far are in {os.path.join(out, 'checkpoints')} (none before the first "
            f"[checkpoint] every): continue with `sb3-rlhf {shlex.join(again)}`"
        )
    results = run_task(
        task,
        out,
        progress_bar=not args.no_progress_bar,
        resume=args.resume,
        overwrite=args.overwrite,
        progress_lines=None if args.no_progress_bar else args.progress_lines,
    )
    if not is_main_process():
        return results
    if results.get("reward_model"):
        print(f"reward model: held-out accuracy {results['reward_model']['accuracy']:.3f}")
    print(report_markdown(task.name, results, task.evaluation.n_prompts))
    print(f"run folder: {out} (tensorboard/, checkpoints/, {task.algorithm_name}_model.zip, policy/, report.md)")
    if args.summary:
        write_summary(results, args.summary)
    return results


#: the summary's keys and the report's names for them
SUMMARY_KEYS = {
    "score": "score",
    "kl": "kl",
    "distinct_1": "distinct_1",
    "distinct_2": "distinct_2",
    "eos_rate": "eos_fraction",
    "judge_positive_share": "judge_positive_share",
}


def write_summary(results: dict[str, Any], path: str) -> None:
    """The headline measures of the initial and the trained policy (``None`` where the task has no judge)."""
    import json

    from sb3_rlhf.common.io import atomic_file

    summary = {
        policy: {key: results[policy].get(name) for key, name in SUMMARY_KEYS.items()}
        for policy in ("initial", "trained")
    }
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def run(args: argparse.Namespace) -> dict[str, object]:
    """:func:`run_train`, then the end of the process group a torchrun rank joined (even on an error)."""
    try:
        return run_train(args)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
