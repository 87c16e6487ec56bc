"""Benchmark: the reward-versus-KL trade-off of PPO, P3O (separate and joint clipping), RLOO, GRPO and DPO.

    python benchmarks/kl_reward_frontier.py --task envs/tiny_synthetic.toml                 # minutes
    python benchmarks/kl_reward_frontier.py --task envs/imdb_positive.toml --timesteps 4000 # about an hour, 2 CPUs

Every method starts from the same initial policy and learns from the same reward (the task's reward model,
trained once at the start, or its reward function), for each KL coefficient β given. The online methods get the
same budget of generated training tokens (``--timesteps``) and the task's shared settings (learning rate,
episodes per rollout, minibatch size, epochs); DPO learns from pairs of the initial policy's samples on the
training prompts, labelled by the same reward, with β as its own β; it samples as many responses as an online
run could generate in its token budget (``--timesteps`` / ``max_new_tokens``), once, before training. Along training, every method is scored on
the held-out prompts: mean reward score and KL to the initial policy (Σ_t log π − log π_ref per response, k1;
the same seed for every evaluation). The tables state each method's compute: responses sampled, tokens
generated and gradient steps.

Writes ``<out>.csv`` (every evaluation), ``<out>.md`` (the final point of each run and its budget) and
``<out>.png`` (score against KL, one line per run along training).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import platform
import sys
import time
from typing import Any

import torch as th
from versions import versions_line  # benchmarks/versions.py

from sb3_rlhf.common.callbacks import HeldOutEvaluationCallback
from sb3_rlhf.common.evaluation import evaluate_policy
from sb3_rlhf.rewards import reward_wrappers
from sb3_rlhf.tasks import load_task
from sb3_rlhf.tasks.config import kl_estimator
from sb3_rlhf.tasks.run import prepare
from sb3_rlhf.tasks.stages import PreparedTask, initial_policy, make_dpo_trainer, make_online_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: method name → (task algorithm, algorithm overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "ppo": ("ppo", {}),
    "p3o-separate": ("p3o", {"clipping": "separate"}),
    "p3o-joint": ("p3o", {"clipping": "joint"}),
    "rloo": ("rloo", {}),
    "grpo": ("grpo", {}),
    "dpo": ("dpo", {}),
}


def with_algorithm(prepared: PreparedTask, algorithm: str, beta: float, adaptive: bool) -> PreparedTask:
    """The prepared task switched to ``algorithm``, its KL coefficient set to ``beta`` (online methods); the
    coefficient stays fixed unless ``adaptive`` (then ``beta`` is the adaptive controller's starting value)."""
    task = dataclasses.replace(prepared.task, algorithm_name=algorithm)
    target = task.kl.target if adaptive else None
    kl = dataclasses.replace(task.kl, coef=beta, target=target, estimator=kl_estimator(task))
    task = dataclasses.replace(task, kl=kl)
    return dataclasses.replace(prepared, task=task)


def run_online(
    prepared: PreparedTask, overrides: dict[str, Any], timesteps: int, eval_freq: int, eval_samples: int
) -> list[dict]:
    task = prepared.task
    model = make_online_model(prepared, prepared.env(prepared.train_prompts), tensorboard_log=None, **overrides)
    evaluation = HeldOutEvaluationCallback(
        prepared.env(prepared.eval_prompts),
        eval_freq,
        seed=task.seed,
        samples_per_prompt=eval_samples,
        judge=prepared.judge,
    )
    model.learn(timesteps, callback=evaluation)
    return evaluation.history


def run_dpo(
    prepared: PreparedTask, beta: float, eval_samples: int, n_samples: int
) -> tuple[list[dict], dict[str, float]]:
    """DPO on pairs from ``n_samples`` responses of the initial policy (the online runs' budget of episodes)."""
    pairs_per_prompt = prepared.task.algorithm_settings().get("pairs_per_prompt", 1)
    n_prompts = max(1, n_samples // (2 * pairs_per_prompt))
    trainer, counts = make_dpo_trainer(prepared, beta=beta, tensorboard_log=None, n_prompts=n_prompts)
    eval_env = prepared.env(prepared.eval_prompts)
    policy = initial_policy(prepared, eval_env, trainer.device)
    reference = initial_policy(prepared, eval_env, trainer.device).actor
    history = []
    for epoch in range(trainer.n_epochs + 1):
        if epoch:
            trainer.learn(n_epochs=1)
        policy.actor.load_state_dict(trainer.model.state_dict())  # same architecture (and LoRA layout)
        metrics, _ = evaluate_policy(
            policy,
            reference,
            eval_env.unwrapped,
            reward_wrappers(eval_env),
            prepared.task.seed,
            samples_per_prompt=eval_samples,
            judge=prepared.judge,
        )
        history.append({**metrics, "episodes": counts["samples"], "gradient_steps": float(trainer.num_steps)})
    return history, counts


def write_plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = ["o", "s", "^", "D", "v", "P"]
    betas = sorted({r["beta"] for r in rows})
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method in METHODS:
        for i, beta in enumerate(betas):
            run = [r for r in rows if r["method"] == method and r["beta"] == beta]
            if not run:
                continue
            ax.plot(
                [r["kl"] for r in run],
                [r["score"] for r in run],
                color=colors[method],
                marker=markers[i % len(markers)],
                markersize=4,
                alpha=0.85,
                label=f"{method} β={beta:g}",
            )
    ax.set_xlabel("KL to the initial policy (nats per response, held-out prompts)")
    ax.set_ylabel("mean reward score (held-out prompts)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="envs/tiny_synthetic.toml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--betas", nargs="+", type=float, default=None, help="default: 0.5×, 1× and 2× the task's kl.coef"
    )
    parser.add_argument(
        "--timesteps", type=int, default=None, help="generated tokens per online run (default: the task's)"
    )
    parser.add_argument(
        "--eval-freq", type=int, default=None, help="rollouts between evaluations (default: ~8 per run)"
    )
    parser.add_argument("--adaptive", action="store_true", help="keep the task's adaptive KL target (default: fixed β)")
    parser.add_argument("--eval-samples", type=int, default=4, help="responses per held-out prompt per evaluation")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task overrides")
    parser.add_argument(
        "--out", default=None, help="results prefix (default benchmarks/results/kl_reward_frontier_<task>)"
    )
    parser.add_argument("--run-dir", default=None, help="folder for the reward model (default runs/frontier_<task>)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    th.set_num_threads(args.threads)
    task = load_task(args.task, args.set)
    out = args.out or os.path.join(RESULTS, f"kl_reward_frontier_{task.name}")
    run_dir = args.run_dir or os.path.join("runs", f"frontier_{task.name}")
    timesteps = args.timesteps or task.algorithm.total_timesteps
    betas = args.betas or [task.kl.coef / 2, task.kl.coef, task.kl.coef * 2]
    started = time.time()
    prepared, reward_model_metrics = prepare(task, run_dir, train_reward_model=task.reward.train is not None)
    n_episodes = task.algorithm_settings().get("n_episodes", 64)
    eval_freq = args.eval_freq or max(1, round(timesteps / n_episodes / task.generation.max_new_tokens / 8))

    rows: list[dict[str, Any]] = []
    finals: list[dict[str, Any]] = []
    for method in args.methods:
        algorithm, overrides = METHODS[method]
        for beta in betas:
            run_started = time.time()
            run = with_algorithm(prepared, algorithm, beta, args.adaptive)
            if algorithm == "dpo":
                # as many samples as an online run generates responses (all of length max_new_tokens at most)
                history, counts = run_dpo(run, beta, args.eval_samples, timesteps // task.generation.max_new_tokens)
                budget = f"{counts['samples']:.0f} samples once → {counts['pairs']:.0f} pairs"
            else:
                history = run_online(run, overrides, timesteps, eval_freq, args.eval_samples)
                budget = f"{history[-1]['episodes']:.0f} episodes, {history[-1]['timesteps']:.0f} tokens"
            for row in history:
                rows.append({"method": method, "beta": beta, **row})
            final = history[-1]
            finals.append(
                {
                    "method": method,
                    "beta": beta,
                    "score": final["score"],
                    "kl": final["kl"],
                    "length": final["response_length"],
                    "budget": budget,
                    "gradient_steps": final["gradient_steps"],
                    "seconds": time.time() - run_started,
                }
            )
            print(
                f"{method:13s} β={beta:<7g} score {history[0]['score']:.3f} -> {final['score']:.3f}  "
                f"KL {final['kl']:.2f}  ({budget}, {final['gradient_steps']:.0f} gradient steps, "
                f"{time.time() - run_started:.0f} s)",
                flush=True,
            )

    fields = [
        "method",
        "beta",
        "timesteps",
        "episodes",
        "gradient_steps",
        "score",
        "kl",
        "response_length",
        "eos_fraction",
    ]
    with open(out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_plot(rows, out + ".png", f"{task.name}: reward against KL along training")
    settings = task.algorithm_settings()
    initial = rows[0]
    lines = [
        f"# Reward against KL: {task.name}",
        "",
        f"Command: `python benchmarks/kl_reward_frontier.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {platform.machine()}, {args.threads} threads; total {time.time() - started:.0f} s.",
        f"Versions: {versions_line()}.",
        f"Held-out prompts: {len(prepared.eval_prompts)} × {args.eval_samples} samples each; training prompts: "
        f"{len(prepared.train_prompts)}. "
        f"Online budget per run: {timesteps} generated tokens; shared settings {settings}. "
        f"KL estimator: k1 in the reward (PPO, P3O, RLOO), k3 in the loss (GRPO); β is the KL coefficient for the "
        f"online methods ({'adaptive, starting value' if args.adaptive else 'fixed'}) and DPO's own β. "
        f"Evaluation every {eval_freq} rollouts, same seed each time.",
    ]
    if reward_model_metrics:
        lines.append(f"Reward model (trained once, shared): held-out accuracy {reward_model_metrics['accuracy']:.3f}.")
    lines += [
        "",
        f"Initial policy: score {initial['score']:.4f}, KL {initial['kl']:.3f}.",
        "",
        "| method | β | final score | final KL | response length | compute | gradient steps | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in finals:
        lines.append(
            f"| {r['method']} | {r['beta']:g} | {r['score']:.4f} | {r['kl']:.3f} | {r['length']:.1f} | {r['budget']} | "
            f"{r['gradient_steps']:.0f} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "One seed per run: small differences between single runs are within run-to-run noise; read the plot",
        "(every evaluation along training) rather than single final points. Seconds are wall-clock on a shared machine.",
    ]
    lines += ["", f"Every evaluation: `{os.path.basename(out)}.csv`; plot: `{os.path.basename(out)}.png`.", ""]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
