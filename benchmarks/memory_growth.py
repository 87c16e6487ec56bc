"""Benchmark: does memory stay flat over a long run? Resident memory and live Python objects per iteration.

    python benchmarks/memory_growth.py                       # PPO and GRPO, 200 iterations each (~2 min)
    python benchmarks/memory_growth.py --algorithms p3o --iterations 60

The tiny task (a random Llama, the "good"-word rule reward, the adaptive KL controller), trained with every
per-iteration feature switched on: TensorBoard logging with sample tables, periodic checkpoints, a held-out
evaluation every iteration. After each iteration (a rollout and its update) a callback runs the garbage
collector and records the resident set size and the number of objects the collector tracks. The growth is
measured after a warm-up (allocator pools, the episode-statistics window, lazily built kernels fill up first)
as a least-squares slope. Writes ``benchmarks/results/memory.md``. A benchmark reports: it fails on nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from versions import versions_line  # benchmarks/versions.py

from sb3_rlhf import TokenGenerationEnv
from sb3_rlhf.algorithms import ONLINE_ALGORITHMS
from sb3_rlhf.common.callbacks import HeldOutEvaluationCallback
from sb3_rlhf.common.checkpoints import TrainingCheckpointCallback
from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model, tiny_prompts
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
from sb3_rlhf.rewards.rules import share_of_good

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "memory.md")


def resident_mb() -> float:
    """The current resident set size (Linux ``/proc``; elsewhere the peak, which can only overstate growth)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        scale = 2**20 if sys.platform == "darwin" else 2**10
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


class MemoryRecorder(BaseCallback):
    """Resident MB and gc-tracked objects after every iteration (at the start of the next rollout); stops
    ``learn()`` after ``n_iterations`` (responses shorter than the limit make timesteps a poor counter)."""

    def __init__(self, n_iterations: int) -> None:
        super().__init__()
        self.n_iterations = n_iterations
        self.rows: list[tuple[int, float, int]] = []

    def _on_rollout_start(self) -> None:
        if self.num_timesteps > 0:
            gc.collect()
            self.rows.append((self.num_timesteps, resident_mb(), len(gc.get_objects())))

    def _on_step(self) -> bool:
        return len(self.rows) < self.n_iterations


def task_env(tokenizer, texts: list[str], estimator: str):
    env = TokenGenerationEnv(texts, tokenizer, max_prompt_tokens=8, max_new_tokens=12)
    env = RewardFunctionWrapper(env, fn=share_of_good)
    return KLPenaltyWrapper(env, coef=0.05, target=2.0, horizon=500, estimator=estimator)


def slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(xs, ys, 1)[0]) if len(xs) > 1 else float("nan")


def measure(algorithm: str, iterations: int, n_episodes: int, seed: int) -> tuple[list[tuple[int, float, int]], float]:
    """Train ``algorithm`` for ``iterations`` on the tiny task; the recorder's rows and the seconds it took."""
    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(tmp, "tiny")
        tokenizer = save_tiny_model(model_path, TINY_WORDS, "llama", seed=seed)
        estimator = "k3" if algorithm == "grpo" else "k1"
        settings = dict(n_episodes=n_episodes, batch_size=8, n_epochs=2)
        if algorithm != "ppo":
            settings["samples_per_prompt"] = 2 if algorithm == "p3o" else 4
        model = ONLINE_ALGORITHMS[algorithm](
            "TransformerActorCriticPolicy",
            task_env(tokenizer, tiny_prompts(64, seed), estimator),
            learning_rate=1e-3,
            tensorboard_log=os.path.join(tmp, "tb"),
            policy_kwargs=dict(model_name_or_path=model_path),
            seed=seed,
            **settings,
        )
        recorder = MemoryRecorder(iterations)
        evaluation = HeldOutEvaluationCallback(task_env(tokenizer, tiny_prompts(8, seed + 1), estimator))
        checkpoints = TrainingCheckpointCallback(5 * n_episodes * 12, os.path.join(tmp, "checkpoints"))
        start = time.perf_counter()
        model.learn(10**9, callback=[recorder, evaluation, checkpoints])
        return recorder.rows, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["ppo", "grpo"], choices=sorted(ONLINE_ALGORITHMS))
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10, help="iterations left out of the growth fit")
    parser.add_argument("--n-episodes", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.iterations <= args.warmup + 1:
        parser.error("--iterations must exceed --warmup by at least 2")
    th.set_num_threads(2)

    table = [
        "| algorithm | iterations | seconds | resident MB after warm-up | at the end | growth | slope per 100 iterations "
        "| gc objects after warm-up | at the end | growth |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for algorithm in args.algorithms:
        rows, seconds = measure(algorithm, args.iterations, args.n_episodes, args.seed)
        warm, last = rows[args.warmup - 1], rows[-1]
        xs = list(range(args.warmup + 1, len(rows) + 1))
        rss_slope = slope(xs, [r[1] for r in rows[args.warmup :]]) * 100
        table.append(
            f"| {algorithm} | {len(rows)} | {seconds:.0f} | {warm[1]:.1f} | {last[1]:.1f} | {last[1] - warm[1]:+.1f} "
            f"| {rss_slope:+.2f} MB | {warm[2]} | {last[2]} | {last[2] - warm[2]:+d} |"
        )
        print(table[-1], flush=True)
    lines = [
        "# Memory over a long run: the tiny task",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {th.get_num_threads()} torch threads.",
        f"Versions: {versions_line()}.",
        f"Each iteration: {args.n_episodes} episodes of up to 12 tokens, minibatches of 8, 2 epochs, the adaptive KL "
        "controller, TensorBoard logging with sample tables, a held-out evaluation; a checkpoint every 5 "
        f"iterations. Measured after each iteration, after `gc.collect()`; growth counted from the end of a "
        f"{args.warmup}-iteration warm-up. Command: `python benchmarks/memory_growth.py --algorithms "
        f"{' '.join(args.algorithms)} --iterations {args.iterations}`.",
        "",
        *table,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            f.write(text)
        print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
