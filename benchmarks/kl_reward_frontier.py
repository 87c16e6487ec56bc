"""Benchmark: the reward-versus-KL trade-off of PPO, NLPO, P3O (separate and joint clipping), RLOO, GRPO and DPO.

    python benchmarks/kl_reward_frontier.py --task envs/tiny_synthetic.toml                 # minutes
    python benchmarks/kl_reward_frontier.py --task envs/imdb_positive.toml --timesteps 4000 # hours, 2 CPUs
    python benchmarks/kl_reward_frontier.py --task envs/imdb_positive.toml --kl-targets 2 4 8 --dpo-betas ...

At fixed β (``--betas``) the methods end at whatever KL their β leads them to, and two methods are compared only
where their final KLs overlap. With ``--kl-targets`` the x-axis is controlled instead: every online method runs the
adaptive KL controller (the task's horizon and proportional gain, starting from its ``kl.coef``; GRPO's k3 term in
its loss steered by the same controller) towards each target, and the report says whether each run settled within
±20% of its target over the last third of its training rollouts; DPO, which has no controller, sweeps its β over
``--dpo-betas`` instead, chosen to put its final KL across the same range. On IMDB at 20,000 tokens the task's
horizon of 200 episodes left PPO 21–25% above target 2 over its last third; ``--set kl.horizon=100`` settles it
(within 16% at targets 2, 4 and 8, seeds 0 and 1;
``benchmarks/results/kl_reward_frontier_imdb_positive_controlled.md``).

Every method starts from the same initial policy and learns from the same reward (the task's reward model,
trained once at the start, or its reward function), for each KL coefficient β given (default three) and each
training seed (default two; ``--extra-seeds ppo=2`` adds one to the methods whose seeds' spread leaves a gap
unreadable). The online methods get the same budget of generated training tokens
(``--timesteps``) and the task's shared settings (learning rate, episodes per rollout, minibatch size, epochs);
DPO learns from pairs of the initial policy's samples on the training prompts, labelled by the same reward, with
β as its own β; it samples ``--dpo-samples`` responses once, before training (default: as many as an online run
generates), and trains ``--dpo-epochs`` epochs over their pairs. Along training, every method is scored on the
held-out prompts (the same prompts and sampling seed at every evaluation): mean reward score, KL to the initial
policy (Σ_t log π − log π_ref per response, k1), and the text's quality (distinct-n, repeated bigrams, EOS rate,
the reference's perplexity, and the task's second judge when it has one). The tables state each method's
compute: responses sampled, tokens generated and gradient steps.

Writes ``<out>.csv`` (every evaluation of every run: ``method``, ``beta``, ``seed``, ``evaluation``, compute and
measures), ``<out>.md`` (the final points, mean and range over seeds, with their quality; where P3O lies against
PPO and DPO, and NLPO against PPO, read from these points; under ``--kl-targets``, each method's score at each
target's KL, its line run on below its lowest final point to its measured starting point; and P3O's and NLPO's
comparisons read again from each online run's mean over the last third of its evaluations after the first, where
one evaluation's noise is reduced) and ``<out>.png``
(score against KL: each method's final points, and the path along training; means over seeds with the seeds'
range).

Every finished run is appended to ``<out>.runs.jsonl`` as it ends. ``--resume`` keeps the runs there that were
made with the same settings (an online run's for the online runs, DPO's samples and epochs for DPO; an override
of the KL controller, ``--set kl.horizon=100``, makes new online runs but keeps DPO's and the reward model), skips
them, and reuses the reward model and judge in ``--run-dir``, so a benchmark stopped midway loses at most the run in
progress, and a long one can be split between processes by ``--methods`` (start the second once the first has
trained the reward model; a last ``--resume`` with every method writes the report of all of them). ``--report-only``
writes the report of the runs in the log without running the missing ones, and names those.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import CallbackList
from versions import versions_line  # benchmarks/versions.py

from sb3_rlhf.common.callbacks import HeldOutEvaluationCallback, RolloutHistoryCallback
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
    "nlpo": ("nlpo", {}),  # its task's [algorithm.nlpo] table applies
    "dpo": ("dpo", {}),
}


def method_seeds(value: str) -> tuple[str, list[int]]:
    """``--extra-seeds``' ``METHOD=SEED[,SEED]``: ``"ppo=2,3"`` → ``("ppo", [2, 3])``."""
    method, _, seeds = value.partition("=")
    if method not in METHODS or not seeds:
        raise argparse.ArgumentTypeError(
            f"{value!r}: expected METHOD=SEED[,SEED] with METHOD one of {', '.join(METHODS)}, e.g. ppo=2"
        )
    try:
        return method, [int(seed) for seed in seeds.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: seeds are whole numbers, comma-separated, e.g. ppo=2,3") from None


def with_algorithm(
    prepared: PreparedTask, algorithm: str, beta: float, target: float | None, seed: int
) -> PreparedTask:
    """The prepared task switched to ``algorithm``, its KL coefficient set to ``beta`` (online methods), its
    training seeded by ``seed`` (the prompt split, the reward model and the evaluations keep the task's seed); the
    coefficient stays fixed unless a ``target`` is given (then ``beta`` is the adaptive controller's starting value,
    and the task's horizon and proportional gain steer it)."""
    task = dataclasses.replace(prepared.task, algorithm_name=algorithm, seed=seed)
    kl = dataclasses.replace(task.kl, coef=beta, target=target, estimator=kl_estimator(task))
    task = dataclasses.replace(task, kl=kl)
    return dataclasses.replace(prepared, task=task)


def run_online(
    prepared: PreparedTask,
    overrides: dict[str, Any],
    timesteps: int,
    eval_freq: int,
    eval_samples: int,
    eval_seed: int,
) -> tuple[list[dict], list[float]]:
    """An online run: its held-out evaluations, and the KL of each of its training rollouts."""
    model = make_online_model(prepared, prepared.env(prepared.train_prompts), tensorboard_log=None, **overrides)
    evaluation = HeldOutEvaluationCallback(
        prepared.env(prepared.eval_prompts),
        eval_freq,
        seed=eval_seed,
        samples_per_prompt=eval_samples,
        judge=prepared.judge,
    )
    # each rollout's rlhf/* metrics: "kl" is the KL wrapper's mean per response, as its controller measured it
    rollouts = RolloutHistoryCallback()
    model.learn(timesteps, callback=CallbackList([evaluation, rollouts]))
    return evaluation.history, [row["kl"] for row in rollouts.history if "kl" in row]


def run_dpo(
    prepared: PreparedTask, beta: float, eval_samples: int, eval_seed: int, n_samples: int, n_epochs: int | None
) -> tuple[list[dict], dict[str, float]]:
    """DPO on pairs from ``n_samples`` responses of the initial policy, over ``n_epochs`` (default: the task's)."""
    pairs_per_prompt = prepared.task.algorithm_settings().get("pairs_per_prompt", 1)
    n_prompts = max(1, n_samples // (2 * pairs_per_prompt))
    epochs = {} if n_epochs is None else {"n_epochs": n_epochs}
    trainer, counts = make_dpo_trainer(prepared, beta=beta, tensorboard_log=None, n_prompts=n_prompts, **epochs)
    eval_env = prepared.env(prepared.eval_prompts)
    policy = initial_policy(prepared, eval_env, trainer.device)
    reference = initial_policy(prepared, eval_env, trainer.device).actor
    history = []
    for epoch in range(trainer.n_epochs + 1):
        if epoch:
            trainer.learn(n_epochs=1)
        policy.actor.load_state_dict(trainer.model.state_dict())  # same architecture (and LoRA layout)
        metrics, _, _ = evaluate_policy(
            policy,
            reference,
            eval_env.unwrapped,
            reward_wrappers(eval_env),
            eval_seed,
            samples_per_prompt=eval_samples,
            judge=prepared.judge,
        )
        history.append({**metrics, "episodes": counts["samples"], "gradient_steps": float(trainer.num_steps)})
    return history, counts


#: the measures of every evaluation kept in the CSV, and those of the final points in the report
MEASURES = [
    "score",
    "kl",
    "response_length",
    "eos_fraction",
    "distinct_1",
    "distinct_2",
    "repeated_2gram_rate",
    "reference_perplexity",
    "judge_positive_share",
]


def run_settings(args: argparse.Namespace, task_name: str, timesteps: int, eval_freq: int, dpo_samples: int) -> dict:
    """The invocation's settings, logged with each run; :func:`same_settings` says which of them a run must share
    with another invocation to be reused by ``--resume``."""
    return {
        "task": task_name,
        "set": sorted(args.set),
        "timesteps": timesteps,
        "eval_freq": eval_freq,
        "eval_samples": args.eval_samples,
        "dpo_samples": dpo_samples,
        "dpo_epochs": args.dpo_epochs,
        "adaptive": args.adaptive,
        # a log from before targets still reads; each run of one with targets records its rollouts' KL
        **({"kl_targets": args.kl_targets, "rollout_kl": True} if args.kl_targets else {}),
    }


#: the task sections whose overrides (``--set``) never change a run of these methods (None: the reward model)
UNREAD_SECTIONS: dict[str | None, tuple[str, ...]] = {None: ("kl.", "algorithm."), "dpo": ("kl.",)}


def same_settings(logged: dict, settings: dict, method: str | None) -> bool:
    """Whether a run of ``method`` logged under ``logged`` settings is one this invocation's ``settings`` would
    make (``method`` None: the reward model, which only the task and its overrides outside ``[kl]`` and
    ``[algorithm]`` make): an online run's budget, evaluations and control of the KL, DPO's samples and epochs;
    DPO's settings do not touch the online runs, nor theirs DPO's, and an override of the KL controller touches
    neither DPO nor the reward model."""
    unread = UNREAD_SECTIONS.get(method, ())
    if [o for o in logged.get("set", []) if not o.startswith(unread)] != [
        o for o in settings.get("set", []) if not o.startswith(unread)
    ]:
        return False
    keys = ["task"]
    if method == "dpo":
        keys += ["eval_samples", "dpo_samples", "dpo_epochs"]
    elif method is not None:
        keys += ["eval_samples", "timesteps", "eval_freq", "adaptive", "rollout_kl"]
        if bool(logged.get("kl_targets")) != bool(settings.get("kl_targets")):  # the targets are in the run's key
            return False
    return all(logged.get(key) == settings.get(key) for key in keys)


#: a run: (method, β, KL target or None, seed)
RunKey = tuple[str, float, float | None, int]


def read_run_log(path: str, settings: dict) -> tuple[dict[RunKey, dict], dict | None]:
    """The runs logged in ``path`` that these ``settings`` would make (:func:`same_settings`), by (method, β,
    target, seed), and the reward model's metrics logged there (None when none are). A last line cut short by a
    crash is ignored."""
    runs: dict[RunKey, dict] = {}
    reward_model_metrics = None
    if not os.path.exists(path):
        return runs, reward_model_metrics
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            logged = record.get("settings", {})
            if "reward_model" in record:
                if same_settings(logged, settings, None):
                    reward_model_metrics = record["reward_model"]
            elif same_settings(logged, settings, record["method"]):
                runs[(record["method"], record["beta"], record.get("target"), record["seed"])] = record
    return runs, reward_model_metrics


def append_to_run_log(path: str, record: dict) -> None:
    """One line per record, written in one call and synced: processes sharing the log do not interleave, and a
    crash loses at most the line being written."""
    line = json.dumps(record, default=float) + "\n"
    if os.path.exists(path) and os.path.getsize(path):
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut short by a crash: end it, or this record would be glued to it
                line = "\n" + line
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def seed_mean(rows: list[dict], key: str) -> tuple[float, float, float]:
    """Mean, min and max of ``key`` over rows (one per seed); NaN where no row has it. The mean is kept inside
    [min, max] (three equal floats can average a rounding step outside them)."""
    values = np.array([r[key] for r in rows if key in r], dtype=float)
    if not len(values):
        return (float("nan"),) * 3
    low, high = float(values.min()), float(values.max())
    return min(max(float(values.mean()), low), high), low, high


def write_plot(rows: list[dict], path: str, title: str) -> None:
    """Score against KL in two panels: left, each method's final points (one per β or KL target), joined in order
    of KL, and dotted from its measured starting point (a star) to the lowest of them; right, the path of each
    point along training. Each marker is the mean over seeds, with bars from the lowest to the highest seed on both
    axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    points = sorted({point_of(r) for r in rows}, key=lambda p: (p[1] is not None, p[1] or 0.0, p[0]))
    fig, (ends, paths) = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)

    def bars(ax: Any, kl: np.ndarray, score: np.ndarray, **style: Any) -> None:
        ax.errorbar(
            kl[:, 0],
            score[:, 0],
            xerr=[kl[:, 0] - kl[:, 1], kl[:, 2] - kl[:, 0]],
            yerr=[score[:, 0] - score[:, 1], score[:, 2] - score[:, 0]],
            color=style.pop("color"),
            elinewidth=0.6,
            capsize=1.5,
            alpha=0.85,
            **style,
        )

    for method in METHODS:
        finals = []
        for i, point in enumerate(points):
            run = [r for r in rows if r["method"] == method and point_of(r) == point]
            if not run:
                continue
            evaluations = sorted({r["evaluation"] for r in run})
            by_point = [[r for r in run if r["evaluation"] == k] for k in evaluations]
            kl = np.array([seed_mean(rs, "kl") for rs in by_point])
            score = np.array([seed_mean(rs, "score") for rs in by_point])
            style = {"color": colors[method], "marker": markers[i % len(markers)], "markersize": 4}
            bars(paths, kl, score, label=f"{method} {point_label(point)}", **style)
            # each seed's own last evaluation (DPO's epochs and the online methods' budgets end the same for all)
            last = [
                max((r for r in run if r["seed"] == seed), key=lambda r: r["evaluation"])
                for seed in {r["seed"] for r in run}
            ]
            finals.append((seed_mean(last, "kl"), seed_mean(last, "score")))
        if finals:
            finals.sort(key=lambda f: f[0][0])
            kl, score = np.array([f[0] for f in finals]), np.array([f[1] for f in finals])
            bars(ends, kl, score, color=colors[method], marker="o", markersize=5, label=method)
            start = initial_point(rows, method)
            if start is not None and start[0] < kl[0, 0]:  # the stretch the KL-target table reads below (*)
                ends.plot(
                    [start[0], kl[0, 0]],
                    [start[1], score[0, 0]],
                    ls=":",
                    marker="*",
                    markevery=[0],
                    color=colors[method],
                )
    ends.set_title("final points (β or KL target), seed mean and range; dotted: to the start")
    paths.set_title("along training")
    for ax in (ends, paths):
        ax.set_xlabel("KL to the initial policy (nats per response, held-out prompts)")
        ax.grid(alpha=0.3)
    ends.set_ylabel("mean reward score (held-out prompts)")
    ends.legend(fontsize=8)
    paths.legend(fontsize=6, ncol=3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def point_of(row: dict) -> tuple[float, float | None]:
    """A run's point on the frontier: its β and its KL target (None: β fixed)."""
    target = row.get("target")
    return row["beta"], None if target is None or (isinstance(target, float) and np.isnan(target)) else target


def point_label(point: tuple[float, float | None]) -> str:
    beta, target = point
    return f"β={beta:g}" if target is None else f"KL target {target:g}"


def settled(kls: list[float], target: float, tolerance: float = 0.2) -> tuple[bool, float, float, float]:
    """Whether a run's KL (its training rollouts', as the controller measured it, in order) settled within
    ``tolerance`` (a share) of ``target``: the mean over the last third of its rollouts (at least one) that close.
    A rollout's own KL is a mean over a few responses, too noisy to hold each one to the band. Also the lowest and
    highest rollout KL there."""
    last = kls[len(kls) - max(1, len(kls) // 3) :]
    mean = float(np.mean(last))
    return bool(abs(mean - target) <= tolerance * target), mean, float(min(last)), float(max(last))


def score_at_kl(points: list[tuple[float, float]], kl: float, run_on: bool = False) -> float | None:
    """A method's score at ``kl``, linearly between its points (its final points, and where asked its starting
    point); None outside their range, or with ``run_on`` (two KLs at least) read off the end segment run on past
    its ends. Points with the same KL count as one, at their mean score."""
    by_kl: dict[float, list[float]] = {}
    for k, score in points:
        by_kl.setdefault(k, []).append(score)
    line = sorted((k, float(np.mean(scores))) for k, scores in by_kl.items())
    if len(line) == 1:
        return line[0][1] if kl == line[0][0] else None
    segments = list(zip(line, line[1:]))
    if run_on:  # the segment kl falls in, or the end one past either end
        inside = [i for i, ((k0, _), (k1, _)) in enumerate(segments) if kl <= k1]
        segments = [segments[inside[0] if inside else -1]]
    for (k0, s0), (k1, s1) in segments:
        if run_on or k0 <= kl <= k1:
            return s0 + (s1 - s0) * (kl - k0) / (k1 - k0)
    return None


def runs_of(rows: list[dict], method: str) -> dict[tuple[float, float | None, int], list[dict]]:
    """``method``'s evaluations by run: (β, target, seed) → its rows."""
    runs: dict[tuple[float, float | None, int], list[dict]] = {}
    for row in rows:
        if row["method"] == method:
            runs.setdefault((*point_of(row), row["seed"]), []).append(row)
    return runs


def run_ends(rows: list[dict], method: str, first: bool) -> list[dict]:
    """Each of ``method``'s runs' first evaluation (before any update) or last one, one row per (β, target, seed)."""
    pick = min if first else max
    return [pick(r, key=lambda x: x["evaluation"]) for r in runs_of(rows, method).values()]


def frontier_points(rows: list[dict], method: str, late: bool = False) -> list[dict]:
    """``method``'s points on the frontier, one per (β, target), seed means: each run's last evaluation, or with
    ``late`` its mean over the last third of its evaluations after the first (at least one), so that one
    evaluation's noise is reduced (the rule :func:`settled` applies to the rollouts, here applied to the
    evaluations: with one every few rollouts, a shorter stretch of training). One ``{"method", "point", "kl",
    "score", "score_range", "seeds", "by_seed"}`` per point, in order of target (then β); ``by_seed`` maps each
    seed to its run's (KL, score), for :func:`seed_spread`."""
    by_point: dict[tuple[float, float | None], dict[int, list[dict]]] = {}
    for (*point, seed), evaluations in runs_of(rows, method).items():
        by_point.setdefault(tuple(point), {})[seed] = sorted(evaluations, key=lambda r: r["evaluation"])  # type: ignore[index]
    finals = []
    for point, runs in by_point.items():
        ends = {}
        for seed, evaluations in runs.items():
            later = evaluations[1:] or evaluations
            window = later[len(later) - max(1, len(later) // 3) :] if late else evaluations[-1:]
            ends[seed] = {key: float(np.mean([r[key] for r in window])) for key in ("kl", "score")}
        score = seed_mean(list(ends.values()), "score")
        finals.append(
            {
                "method": method,
                "point": point,
                "kl": seed_mean(list(ends.values()), "kl")[0],
                "score": score[0],
                "score_range": score[2] - score[1],
                "seeds": len(ends),
                "by_seed": {seed: (end["kl"], end["score"]) for seed, end in sorted(ends.items())},
            }
        )
    return sorted(finals, key=lambda f: (f["point"][1] is None, f["point"][1] or 0.0, f["point"][0]))


def seed_spread(finals: list[dict], method: str) -> list[tuple[float, float]]:
    """``method``'s seed range at each of its points with two seeds or more, (KL, range) in order of KL: the range
    over its seeds of each seed's score minus the method's line at that seed's own KL (the line through the
    seed-mean points, its end segments run on past its ends), so that seeds ending at different KLs count for
    how far they lie from the line, not for how far they moved along it. Each final is ``{"method", "kl",
    "score", "by_seed"}`` (:func:`frontier_points`); non-finite points are left out."""
    mine = [f for f in finals if f["method"] == method and np.isfinite(f["kl"]) and np.isfinite(f["score"])]
    line = [(f["kl"], f["score"]) for f in mine]
    if len({kl for kl, _ in line}) < 2:
        return []
    spread = []
    for f in mine:
        off = [
            score - score_at_kl(line, kl, run_on=True)  # type: ignore[operator]
            for kl, score in f["by_seed"].values()
            if np.isfinite(kl) and np.isfinite(score)
        ]
        if len(off) > 1:
            spread.append((f["kl"], max(off) - min(off)))
    return sorted(spread)


def initial_point(rows: list[dict], method: str) -> tuple[float, float] | None:
    """``method``'s measured starting point, (KL, score) means over its runs' first evaluations: the end of its
    frontier where the KL penalty is infinite. None where it has not run."""
    first = run_ends(rows, method, first=True)
    if not first:
        return None
    return float(np.mean([r["kl"] for r in first])), float(np.mean([r["score"] for r in first]))


def target_row(finals: list[dict], rows: list[dict], method: str, targets: list[float]) -> str:
    """``method``'s row of the KL-target table: its score at each target's KL off the line through its final points
    (``{"method", "kl", "score"}``), run on below the lowest of them to its starting point (marked *) where it
    starts below them; and that starting point."""
    line = [(f["kl"], f["score"]) for f in finals if f["method"] == method and np.isfinite(f["kl"])]
    start = initial_point(rows, method)
    if not line or start is None:
        return f"| {method} | " + "– | " * len(targets) + "not run yet |"
    lowest = min(k for k, _ in line)
    anchor = [start] if start[0] < lowest else []  # a start at or past a final point would bend the line back
    cells = []
    for target in targets:
        score = score_at_kl([*anchor, *line], target)
        cells.append("–" if score is None else f"{score:.3f}" + ("*" if target < lowest else ""))
    return f"| {method} | {' | '.join(cells)} | KL {shown_kl(start[0]):.2f}, score {start[1]:.3f} |"


def per_seed(values: list[str]) -> str:
    """One value where every seed's is the same, else each seed's in order: "316", "320 / 316 / 316"."""
    return values[0] if len(set(values)) == 1 else " / ".join(values)


def shown_kl(kl: float, digits: int = 2) -> float:
    """``kl`` to ``digits`` decimals as printed, a k1 mean a hair below zero as 0.00 rather than -0.00 (the + 0.0)."""
    return round(kl, digits) + 0.0


def kl_gained_line(rows: list[dict], methods: list[str]) -> str:
    """Each method's KL before its first update and at its last evaluation, means over its points (β or KL
    target) of their seed means, so that a point with more seeds weighs no more: a masked policy (NLPO) starts
    away from its unmasked reference, by the nucleus' own cost."""

    def mean_kl(method: str, first: bool) -> float:
        by_point: dict[tuple[float, float | None], list[float]] = {}
        for row in run_ends(rows, method, first):
            by_point.setdefault(point_of(row), []).append(row["kl"])
        return float(np.mean([np.mean(kls) for kls in by_point.values()]))

    parts = []
    for method in methods:
        if not any(row["method"] == method for row in rows):
            parts.append(f"{method} not run yet")
            continue
        start, end = mean_kl(method, True), mean_kl(method, False)
        start = shown_kl(start)
        parts.append(f"{method} {start:.2f} before training → {end:.2f} at the end (+{end - start:.2f})")
    return "- KL, mean over its points (each its seeds' mean): " + "; ".join(parts) + "."


def comparison_lines(finals: list[dict], method: str, others: list[str]) -> list[str]:
    """Where ``method``'s final points lie against each of ``others``': their scores at the same KL, read off
    the lines through each method's seed-mean final points (one per β or KL target), at five KLs where both
    methods reach them; and at which of those KLs the gap exceeds the seeds' spread there, half the sum of the two
    methods' seed ranges at that KL, so that the two ranges around the lines do not overlap. A method's seed range
    at a KL is that of its neighbouring points (:func:`seed_spread`: each seed measured from the method's line),
    interpolated along KL, the nearest one's past its outermost points. A range only widens with more seeds, so
    a gap that still exceeds it after a third seed is the firmer reading. Each final is ``{"method", "kl",
    "score", "by_seed"}`` (:func:`frontier_points`); points with a non-finite KL or score are left out."""

    def points(name: str) -> list[tuple[float, float]]:
        return [
            (f["kl"], f["score"])
            for f in finals
            if f["method"] == name and np.isfinite(f["kl"]) and np.isfinite(f["score"])
        ]

    lines = []
    for other in others:
        mine, theirs = points(method), points(other)
        if not mine or not theirs:
            lines.append(f"- {method} against {other}: no final point of {method if not mine else other} yet.")
            continue
        if len({k for k, _ in mine}) < 2 or len({k for k, _ in theirs}) < 2:
            lines.append(f"- {method} against {other}: fewer than two final KLs each: no line to read.")
            continue
        low = max(min(k for k, _ in mine), min(k for k, _ in theirs))
        high = min(max(k for k, _ in mine), max(k for k, _ in theirs))
        if low >= high:
            lines.append(
                f"- {method} against {other}: their final KLs do not overlap ({method} "
                f"{min(k for k, _ in mine):.2f}–{max(k for k, _ in mine):.2f}, {other} "
                f"{min(k for k, _ in theirs):.2f}–{max(k for k, _ in theirs):.2f} nats): no like-for-like reading."
            )
            continue
        grid = list(np.linspace(low, high, 5))
        gaps = [score_at_kl(mine, k) - score_at_kl(theirs, k) for k in grid]  # type: ignore[operator]
        spreads = {name: seed_spread(finals, name) for name in (method, other)}
        one_seed = [name for name, spread in spreads.items() if not spread]
        if one_seed:
            noise = None
        else:
            ranges = [np.interp(grid, [k for k, _ in spreads[name]], [r for _, r in spreads[name]]) for name in spreads]
            noise = [float(n) for n in (ranges[0] + ranges[1]) / 2]
        if noise is not None and all(abs(g) <= n for g, n in zip(gaps, noise)):
            verdict = f"{method} lies within the seeds' spread of {other}"
        elif min(gaps) > 0:
            verdict = f"{method} lies above {other}"
        elif max(gaps) < 0:
            verdict = f"{method} lies below {other}"
        else:
            verdict = f"the lines cross, {method} {where_it_lies(grid, gaps, other)}"
        if noise is None:
            verdict += f"; {one_seed[0]} has one seed per point, no seed range to judge by"
        elif any(abs(g) > n for g, n in zip(gaps, noise)):
            # by side, so that a stretch beyond the spread never spans a change of sign
            beyond = [(k, "above" if g > n else "below" if g < -n else None) for k, g, n in zip(grid, gaps, noise)]
            where = [kls for side, *kls in stretches_of(beyond) if side]
            verdict += "; the gap exceeds the seeds' spread " + (
                "at all five KLs" if all(side for _, side in beyond) else "only at KL " + kl_spans(where)
            )
        lines.append(
            f"- {method} against {other}, KL {low:.2f}–{high:.2f}: score difference "
            + ", ".join(f"{g:+.3f}" for g in gaps)
            + f" at KL {', '.join(f'{k:.2f}' for k in grid)}"
            + ("" if noise is None else f" (seeds' spread there {', '.join(f'{n:.3f}' for n in noise)})")
            + f"; {verdict}."
        )
    return lines


def stretches_of(labelled: list[tuple[float, Any]]) -> list[tuple[Any, float, float]]:
    """Runs of equal labels along KL, in order: ``[(1, "a"), (2, "a"), (3, "b")]`` → ``[("a", 1, 2), ("b", 3, 3)]``."""
    stretches: list[tuple[Any, float, float]] = []
    for k, label in labelled:
        if stretches and stretches[-1][0] == label:
            stretches[-1] = (label, stretches[-1][1], k)
        else:
            stretches.append((label, k, k))
    return stretches


def kl_spans(spans: list[list[float]]) -> str:
    """``[[1, 2], [4, 4]]`` → "1.00–2.00 and 4.00"."""
    return in_words([f"{a:.2f}" + (f"–{b:.2f}" if b > a else "") for a, b in spans])


def in_words(parts: list[str]) -> str:
    """``["a", "b", "c"]`` → "a, b and c"."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def where_it_lies(kls: list[float], gaps: list[float], other: str) -> str:
    """The KL stretches where a score difference against ``other`` is above, level with or below zero, in order:
    "below ppo at KL 1.00–2.00 and above it at KL 3.00–5.00"."""
    side = ["above" if g > 0 else "below" if g < 0 else "level with" for g in gaps]
    return in_words(
        [
            f"{name} {other if i == 0 else 'it'} at KL {kl_spans([[a, b]])}"
            for i, (name, a, b) in enumerate(stretches_of(list(zip(kls, side))))
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="envs/tiny_synthetic.toml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--betas", nargs="+", type=float, default=None, help="default: 0.5×, 1× and 2× the task's kl.coef"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds per point")
    parser.add_argument(
        "--extra-seeds",
        nargs="+",
        type=method_seeds,
        default=[],
        metavar="METHOD=SEED[,SEED]",
        help="more seeds for some methods' points (not in --seeds), where their seeds' spread leaves a gap "
        "unreadable: ppo=2 p3o-separate=2; a later --resume or --report-only without them leaves those runs out",
    )
    parser.add_argument(
        "--timesteps", type=int, default=None, help="generated tokens per online run (default: the task's)"
    )
    parser.add_argument(
        "--eval-freq", type=int, default=None, help="rollouts between evaluations (default: ~8 per run)"
    )
    parser.add_argument("--adaptive", action="store_true", help="keep the task's adaptive KL target (default: fixed β)")
    parser.add_argument(
        "--kl-targets",
        nargs="+",
        type=float,
        default=None,
        help="control the KL: each online method runs the adaptive controller towards each target (nats per response)",
    )
    parser.add_argument(
        "--dpo-betas", nargs="+", type=float, default=None, help="DPO's β values with --kl-targets (default: --betas)"
    )
    parser.add_argument("--eval-samples", type=int, default=4, help="responses per held-out prompt per evaluation")
    parser.add_argument(
        "--dpo-samples",
        type=int,
        default=None,
        help="initial-policy responses DPO's pairs are made of (default: as many as an online run generates)",
    )
    parser.add_argument("--dpo-epochs", type=int, default=None, help="DPO's epochs (default: the task's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task overrides")
    parser.add_argument(
        "--out", default=None, help="results prefix (default benchmarks/results/kl_reward_frontier_<task>)"
    )
    parser.add_argument("--run-dir", default=None, help="folder for the reward model (default runs/frontier_<task>)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip the runs already in <out>.runs.jsonl with these settings and reuse the reward model in --run-dir",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report of the runs in <out>.runs.jsonl (these settings) without running the missing ones",
    )
    args = parser.parse_args()
    args.resume = args.resume or args.report_only
    extra_seeds: dict[str, list[int]] = {}
    for method, seeds in args.extra_seeds:
        if method not in args.methods:
            parser.error(f"--extra-seeds {method}=...: {method} is not among --methods {' '.join(args.methods)}")
        if set(seeds) & set(args.seeds):
            parser.error(f"--extra-seeds {method}=...: seed {min(set(seeds) & set(args.seeds))} is in --seeds already")
        extra_seeds.setdefault(method, []).extend(seeds)

    def seeds_of(method: str) -> list[int]:
        return [*args.seeds, *dict.fromkeys(extra_seeds.get(method, []))]

    th.set_num_threads(args.threads)
    task = load_task(args.task, args.set)
    out = args.out or os.path.join(RESULTS, f"kl_reward_frontier_{task.name}")
    run_dir = args.run_dir or os.path.join("runs", f"frontier_{task.name}")
    timesteps = args.timesteps or task.algorithm.total_timesteps
    betas = args.betas or [task.kl.coef / 2, task.kl.coef, task.kl.coef * 2]
    if args.kl_targets and args.adaptive:
        parser.error("--kl-targets sets the adaptive controller's targets; --adaptive keeps the task's one: give one")
    if args.kl_targets and (min(args.kl_targets) <= 0 or task.kl.coef <= 0):
        parser.error("--kl-targets must be > 0, and the task's kl.coef (the controller's starting β) too")

    def points(method: str) -> list[tuple[float, float | None]]:
        """(β, KL target) of each point of ``method``: the targets for an online method under --kl-targets (from
        the task's β), else the β values (fixed, or the task's target with --adaptive)."""
        if args.kl_targets and method != "dpo":
            return [(task.kl.coef, target) for target in args.kl_targets]
        values = (args.dpo_betas or betas) if method == "dpo" and args.kl_targets else betas
        return [(beta, task.kl.target if args.adaptive and method != "dpo" else None) for beta in values]

    dpo_samples = timesteps // task.generation.max_new_tokens if args.dpo_samples is None else args.dpo_samples
    if dpo_samples < 2:
        parser.error(f"--dpo-samples must be at least 2 (one pair), got {dpo_samples}")
    started = time.time()
    n_episodes = task.algorithm_settings().get("n_episodes", 64)
    eval_freq = args.eval_freq or max(1, round(timesteps / n_episodes / task.generation.max_new_tokens / 8))
    log_settings = run_settings(args, task.name, timesteps, eval_freq, dpo_samples)
    log_path = out + ".runs.jsonl"
    if not args.resume and os.path.exists(log_path):
        os.remove(log_path)  # a new benchmark: the old log's runs are not part of it
    logged, reward_model_metrics = read_run_log(log_path, log_settings) if args.resume else ({}, None)
    reuse_reward_model = args.resume and os.path.isdir(os.path.join(run_dir, "reward_model"))
    if args.report_only and not logged:
        parser.error(f"--report-only: {log_path} holds no run made with these settings")
    if args.report_only and task.reward.train is not None and not reuse_reward_model:
        parser.error(f"--report-only: no reward model in {run_dir} (--run-dir) to read the held-out prompts with")
    train_reward_model = task.reward.train is not None and not reuse_reward_model
    prepared, trained_metrics = prepare(task, run_dir, train_reward_model=train_reward_model)
    if trained_metrics is not None:
        reward_model_metrics = trained_metrics
        append_to_run_log(log_path, {"settings": log_settings, "reward_model": trained_metrics})

    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    reused: list[RunKey] = []
    missing: list[str] = []
    for method in args.methods:
        algorithm, overrides = METHODS[method]
        for beta, target in points(method):
            label = point_label((beta, target))
            for seed in seeds_of(method):
                if (method, beta, target, seed) in logged:
                    record = logged[(method, beta, target, seed)]
                    rows += record["rows"]
                    runs.append(record["run"])
                    reused.append((method, beta, target, seed))
                    print(f"{method:13s} {label:<14s} seed {seed}: from {log_path}", flush=True)
                    continue
                if args.report_only:
                    missing.append(f"{method} {label} seed {seed}")
                    continue
                run_started = time.time()
                run = with_algorithm(prepared, algorithm, beta, target, seed)
                rollout_kl: list[float] = []
                if algorithm == "dpo":
                    history, counts = run_dpo(run, beta, args.eval_samples, task.seed, dpo_samples, args.dpo_epochs)
                    budget = (
                        f"{counts['samples']:.0f} samples once → {counts['pairs']:.0f} pairs, {len(history) - 1} epochs"
                    )
                else:
                    history, rollout_kl = run_online(run, overrides, timesteps, eval_freq, args.eval_samples, task.seed)
                    budget = f"{history[-1]['episodes']:.0f} episodes, {history[-1]['timesteps']:.0f} tokens"
                run_rows = [
                    {"method": method, "beta": beta, "target": target, "seed": seed, "evaluation": point, **row}
                    for point, row in enumerate(history)
                ]
                rows += run_rows
                final = history[-1]
                runs.append(
                    {
                        "method": method,
                        "beta": beta,
                        "target": target,
                        "seed": seed,
                        **{key: final[key] for key in MEASURES if key in final},
                        "budget": budget,
                        "gradient_steps": final["gradient_steps"],
                        "seconds": time.time() - run_started,
                        "rollout_kl": rollout_kl,
                    }
                )
                append_to_run_log(
                    log_path,
                    {
                        "settings": log_settings,
                        "method": method,
                        "beta": beta,
                        "target": target,
                        "seed": seed,
                        "rows": run_rows,
                        "run": runs[-1],
                    },
                )
                print(
                    f"{method:13s} {label:<14s} seed {seed}: score {history[0]['score']:.3f} -> "
                    f"{final['score']:.3f}  KL {final['kl']:.2f}  ({budget}, {final['gradient_steps']:.0f} gradient "
                    f"steps, {time.time() - run_started:.0f} s)",
                    flush=True,
                )

    if not runs:  # --report-only, and none of these methods' runs is in the log
        parser.error(f"--report-only: {log_path} holds none of the runs asked for ({'; '.join(missing)})")
    fields = ["method", "beta", "target", "seed", "evaluation", "timesteps", "episodes", "gradient_steps", *MEASURES]
    with open(out + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_plot(rows, out + ".png", f"{task.name}: reward against KL")
    # the final point of each (method, β): mean over its seeds
    finals = []
    for method in args.methods:
        for beta, target in points(method):
            group = [r for r in runs if r["method"] == method and point_of(r) == (beta, target)]
            if not group:  # --report-only: not run yet
                continue
            settling = [settled(r["rollout_kl"], target) for r in group if target is not None]
            finals.append(
                {
                    "method": method,
                    "beta": beta,
                    "target": target,
                    # every seed's mean KL over its last third of rollouts within ±20% of the target; the seeds' means
                    "settled": None if target is None else all(s[0] for s in settling),
                    "settled_means": None if target is None else [s[1] for s in settling],
                    **{key: seed_mean(group, key) for key in MEASURES},
                    "budget": per_seed([r["budget"] for r in group]),
                    "gradient_steps": per_seed([f"{r['gradient_steps']:.0f}" for r in group]),
                    "seconds": float(np.mean([r["seconds"] for r in group])),
                    "seeds": len(group),
                }
            )
    settings = task.algorithm_settings()
    initial = rows[0]
    lines = [
        f"# Reward against KL: {task.name}",
        "",
        f"Command: `python benchmarks/kl_reward_frontier.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {platform.machine()}, {args.threads} threads; total {time.time() - started:.0f} s"
        + (f" in this invocation; runs taken from {os.path.basename(log_path)}: {len(reused)}." if reused else ".")
        + " Seconds per run are wall clock, with any pause of the process while other jobs ran.",
        *(
            [
                "",
                f"**Partial: {len(runs)} of {len(runs) + len(missing)} runs.** Not run yet: {'; '.join(missing)}.",
                "",
            ]
            if missing
            else []
        ),
        f"Versions: {versions_line()}.",
        f"Held-out prompts: {len(prepared.eval_prompts)} × {args.eval_samples} samples each; training prompts: "
        f"{len(prepared.train_prompts)}. Seeds per point: {', '.join(map(str, args.seeds))}"
        + "".join(f"; for {m}: {', '.join(map(str, seeds_of(m)))}" for m in extra_seeds)
        + " (the training's: "
        "sampling, minibatch order, DPO's pairs; the prompt split, the reward model and every evaluation keep the "
        f"task's seed {task.seed}). "
        f"Online budget per run: {timesteps} generated tokens; shared settings {settings}. "
        f"KL estimator: k1 in the reward (PPO, P3O, RLOO), k3 in the loss (GRPO); β is the KL coefficient for the "
        + (
            f"online methods (the adaptive controller's starting value, towards each KL target: horizon "
            f"{task.kl.horizon} episodes, proportional gain {task.kl.proportional_gain}) and DPO's own β. "
            if args.kl_targets
            else f"online methods ({'adaptive, starting value' if args.adaptive else 'fixed'}) and DPO's own β. "
        )
        + f"Evaluation every {eval_freq} rollouts, same seed each time.",
    ]
    if reward_model_metrics:
        lines.append(f"Reward model (trained once, shared): held-out accuracy {reward_model_metrics['accuracy']:.3f}.")
    if prepared.judge_metrics:
        lines.append(
            "Second judge (never trained against): bag-of-words logistic regression, held-out accuracy "
            f"{prepared.judge_metrics['accuracy']:.3f} on whole texts, {prepared.judge_metrics['fragment_accuracy']:.3f} "
            f"on {prepared.judge_metrics['fragment_words']}-word windows."
        )
    judged = not np.isnan(finals[0]["judge_positive_share"][0])
    lines += [
        "",
        f"Initial policy: score {initial['score']:.4f}, KL {shown_kl(initial['kl'], 3):.3f}, distinct-2 {initial['distinct_2']:.3f}, "
        f"reference perplexity {initial['reference_perplexity']:.1f}"
        + (f", judged positive {initial['judge_positive_share']:.2f}." if judged else "."),
        "",
        "Final points, mean over the seeds (lowest–highest seed in brackets for score and KL)"
        + (
            "; a run settled when its mean KL over the last third of its training rollouts, as the controller "
            "measured it, is within ±20% of its target (every seed; each seed's mean in brackets):"
            if args.kl_targets
            else ":"
        ),
        "",
        "| method | "
        + ("point | settled " if args.kl_targets else "β ")
        + "| final score | final KL | distinct-2 | repeated bigrams | reference perplexity | EOS rate "
        + ("| judged positive " if judged else "")
        + "| compute | gradient steps | wall-clock seconds per run |",
        "|---|---|"
        + ("---|" if args.kl_targets else "")
        + "---|---|---|---|---|---|"
        + ("---|" if judged else "")
        + "---|---|---|",
    ]
    # under --kl-targets, by target (DPO's β last)
    order = sorted(finals, key=lambda r: (r["target"] is None, r["target"] or 0.0)) if args.kl_targets else finals
    for r in order:
        if args.kl_targets:
            means = ", ".join(f"{m:.2f}" for m in r["settled_means"] or [])
            verdict = "–" if r["settled"] is None else f"{'yes' if r['settled'] else 'no'} ({means})"
            point = f"{point_label((r['beta'], r['target']))} | {verdict}"
        else:
            point = f"{r['beta']:g}"
        lines.append(
            f"| {r['method']} | {point} | {r['score'][0]:.3f} [{r['score'][1]:.3f}, {r['score'][2]:.3f}] | "
            f"{r['kl'][0]:.2f} [{r['kl'][1]:.2f}, {r['kl'][2]:.2f}] | {r['distinct_2'][0]:.3f} | "
            f"{r['repeated_2gram_rate'][0]:.3f} | {r['reference_perplexity'][0]:.1f} | {r['eos_fraction'][0]:.2f} | "
            + (f"{r['judge_positive_share'][0]:.2f} | " if judged else "")
            + f"{r['budget']} | {r['gradient_steps']} | {r['seconds']:.0f} |"
        )
    point_finals = [f for method in args.methods for f in frontier_points(rows, method)]
    others = [m for m in ("ppo", "dpo") if m in args.methods]
    comparison = [
        line
        for p3o in ("p3o-separate", "p3o-joint")
        if p3o in args.methods
        for line in comparison_lines(point_finals, p3o, others)
    ]
    if missing:
        lines += [
            "",
            f"**Provisional:** the readings below use the {len(runs)} runs logged so far"
            + (
                "; a point with one seed has no seed range, and counts in no spread below."
                if any(f["seeds"] == 1 for f in finals)
                else "."
            ),
        ]
    if args.kl_targets:
        lines += [
            "",
            "Each method's score at each target's KL, read off the line through its final points (seed means). Below "
            "a method's lowest final KL the line runs on to its measured starting point, the mean of its runs' first "
            "evaluations before any update (the frontier's end where the KL penalty is infinite); a score read on "
            "that straight stretch is marked *, and is likely low where the frontier bends upwards. Where a method starts "
            "at or past its lowest final KL (a masked policy), no stretch is drawn; off its line, no score (–).",
            "",
        ]
        lines += [
            f"| method | {' | '.join(f'KL {t:g}' for t in args.kl_targets)} | starting point |",
            "|---|" + "---|" * len(args.kl_targets) + "---|",
        ]
        lines += [target_row(point_finals, rows, method, args.kl_targets) for method in args.methods]
    if comparison:
        lines += [
            "",
            "Where P3O lies, from these final points (seed means, one per β or KL target; a method's score at a KL "
            "read off the line through its points, where both methods reach that KL). The gap exceeds the seeds' "
            "spread at a KL where it is wider than half the sum of the two methods' seed ranges there, so that the "
            "ranges around the lines do not overlap. A seed is measured from its method's line at its own KL (the "
            "line's end segments run on past its ends), so that seeds ending at different KLs count for how far "
            "they lie from the line, not along it; a method's range at a KL is that of its neighbouring points, "
            "interpolated along KL:",
            "",
            *comparison,
        ]
    if "nlpo" in args.methods and "ppo" in args.methods:
        lines += [
            "",
            "Where NLPO (PPO on its masking policy's top-p nucleus) lies against PPO, read the same way:",
            "",
            *comparison_lines(point_finals, "nlpo", ["ppo"]),
            kl_gained_line(rows, ["ppo", "nlpo"]),
        ]
    if args.kl_targets:
        # one held-out evaluation is a few dozen responses, so its KL jumps between neighbours: check the readings
        # against each online run's mean over its last third; DPO keeps its last epoch (no controller holds its
        # KL, which grows with every epoch, so a mean over epochs would mix points far apart)
        late = [f for m in args.methods if m != "dpo" for f in frontier_points(rows, m, late=True)]
        late += [f for f in point_finals if f["method"] == "dpo"]
        late_pairs = [
            ("p3o-separate", others),
            ("p3o-joint", others),
            ("nlpo", ["ppo"] if "ppo" in args.methods else []),
        ]
        late_lines = [
            line
            for compared, against in late_pairs
            if compared in args.methods
            for line in comparison_lines(late, compared, against)
        ]
        lines += [
            "",
            "The same readings with each online run's last evaluation replaced by its mean over the last third of "
            "its evaluations after the first (the KL of one evaluation jumps between neighbours); DPO keeps its "
            "last epoch, with that epoch's noise, and a run still improving scores lower on its mean than at its "
            "end, so this reading leans against the online methods where they are compared with DPO. Seed means, "
            "with the range of the seeds' scores:",
            "",
            "| method | point | score | KL |",
            "|---|---|---|---|",
            *(
                f"| {f['method']} | {point_label(f['point'])} | {f['score']:.3f} "
                + (f"(range {f['score_range']:.3f}) | " if f["seeds"] > 1 else "(one seed) | ")
                + f"{f['kl']:.2f} |"
                for f in late
                if f["method"] != "dpo"
            ),
            "",
            *late_lines,
        ]
    lines += ["", f"Every evaluation: `{os.path.basename(out)}.csv`; plot: `{os.path.basename(out)}.png`.", ""]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
