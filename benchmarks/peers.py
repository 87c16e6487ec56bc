"""Benchmark: sb3_rlhf against TRL, side by side in one run: same models, prompts, reward, budget and settings.

    make bench-peers                                  # creates .venv-trl-1.12 and .venv-trl-1.16 on first use
    python benchmarks/peers.py                        # GPT-2 128×4 and 512×8; PPO, GRPO, RLOO; 3 repeats
    python benchmarks/peers.py --models llama-128x4 --smollm --repeats 1
    python benchmarks/peers.py --trl-results benchmarks/results/peers_raw.json   # re-measure our side only
    python benchmarks/peers.py --render benchmarks/results/peers_raw.json        # rewrite the tables only

Pairs (one row each per model and device):

* ``RLHFPPO`` (value head shared with the policy, and on a separate backbone) against TRL 1.12's
  ``trl.experimental.ppo.PPOTrainer`` (a separate value model, as TRL has it), with a reward model;
* ``GRPO`` against TRL 1.16's ``GRPOTrainer`` and ``RLOO`` against TRL 1.16's ``RLOOTrainer``, with a Python
  reward function (``peers_common.word_score_reward``).

Every run is its own process with one torch thread: ours is this file's ``--worker`` mode under the project's
python, TRL's is ``peers_trl_worker.py`` under the python of a TRL virtual environment (which never imports
sb3_rlhf). The driver builds the models once (random GPT-2 / Llama from a config and a seed, or the packaged
SmolLM2-135M-Instruct folder) and both sides load the same folders; the sides alternate within each repeat and
the table reports medians. Each worker times only training (``learn()`` / ``trainer.train()``), counts the
episodes and generated tokens it ran, measures peak memory (see ``peers_common.PeakMemory``) and, with the same
code on both sides, evaluates its policy before and after training on fixed prompts (mean reward; KL to the
initial model), so that a speed-up cannot come from running a different algorithm.

Writes ``benchmarks/results/peers.md``, ``peers.csv`` and ``peers_raw.json`` (every run). A benchmark reports: it
fails on nothing but a crashed worker.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
TRL_VENVS = {"1.12": os.path.join(ROOT, ".venv-trl-1.12"), "1.16": os.path.join(ROOT, ".venv-trl-1.16")}

#: models built in memory from a config and a seed (word-level vocabulary of ``--vocab`` words), or packaged
MODELS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": dict(architecture="gpt2", hidden_size=16, num_layers=1, num_heads=2, label="GPT-2 16×1 (tests)"),
    "gpt2-128x4": dict(architecture="gpt2", hidden_size=128, num_layers=4, num_heads=4, label="GPT-2 128×4"),
    "gpt2-512x8": dict(architecture="gpt2", hidden_size=512, num_layers=8, num_heads=8, label="GPT-2 512×8"),
    "llama-128x4": dict(architecture="llama", hidden_size=128, num_layers=4, num_heads=4, label="Llama 128×4"),
    # SmolLM2-135M's width, depth and heads (random weights, the word vocabulary): the GPU comparison's model
    "llama-576x30": dict(architecture="llama", hidden_size=576, num_layers=30, num_heads=9, label="Llama 576×30"),
    "smollm2-135m": dict(packaged="SmolLM2-135M-Instruct", label="SmolLM2-135M-Instruct"),
}
#: per model, when --iterations / --learning-rate are not given: rollouts per run (a few seconds to a minute per run
#: on 2 CPU cores) and a learning rate at which the reward rises clearly within them while the KL stays moderate
MODEL_DEFAULTS = {
    "gpt2-tiny": dict(iterations=1, learning_rate=1e-3),
    "gpt2-128x4": dict(iterations=16, learning_rate=1e-3),
    "gpt2-512x8": dict(iterations=8, learning_rate=1e-4),
    "llama-128x4": dict(iterations=16, learning_rate=1e-3),
    "llama-576x30": dict(iterations=4, learning_rate=1e-5),
    "smollm2-135m": dict(iterations=4, learning_rate=1e-5),
}


@dataclass(frozen=True)
class Pair:
    """One row of the table: our algorithm (with its variant) against a TRL trainer."""

    name: str
    algorithm: str
    ours_label: str
    trl_label: str
    trl_version: str
    value_head: str | None = None

    @property
    def ours_side(self) -> str:
        return f"ours-{self.value_head}" if self.value_head else "ours"

    @property
    def trl_side(self) -> str:
        return f"trl-{self.algorithm}"

    @property
    def floor_side(self) -> str:
        return f"floor-{self.name}"


PAIRS = {
    "ppo": [
        Pair("ppo-shared", "ppo", "RLHFPPO (shared value head)", "TRL 1.12 PPOTrainer", "1.12", "shared"),
        Pair("ppo-separate", "ppo", "RLHFPPO (separate critic)", "TRL 1.12 PPOTrainer", "1.12", "separate"),
    ],
    "grpo": [Pair("grpo", "grpo", "GRPO", "TRL 1.16 GRPOTrainer", "1.16")],
    "rloo": [Pair("rloo", "rloo", "RLOO", "TRL 1.16 RLOOTrainer", "1.16")],
}

#: the CSV's columns, in this order (extras after the ten the issue names)
COLUMNS = [
    "pair",
    "device",
    "ours_episodes_per_s",
    "trl_episodes_per_s",
    "ours_tokens_per_s",
    "trl_tokens_per_s",
    "ours_peak_memory_mib",
    "trl_peak_memory_mib",
    "speedup",
    "memory_ratio",
    "model",
    "ours",
    "trl",
    "repeats",
    "ours_episodes_per_s_min",
    "ours_episodes_per_s_max",
    "trl_episodes_per_s_min",
    "trl_episodes_per_s_max",
    "ours_train_growth_mib",
    "trl_train_growth_mib",
    "token_speedup",
    "initial_reward",
    "ours_final_reward",
    "trl_final_reward",
    "ours_final_kl",
    "trl_final_kl",
    "ours_train_reward_first",
    "ours_train_reward_last",
    "trl_train_reward_first",
    "trl_train_reward_last",
    "same_initial_policy",
    "comparable",
    "targets_met",
    "floor_episodes_per_s",
    "floor_peak_memory_mib",
    "ours_over_floor",
    "trl_over_floor",
]
#: the issue's targets: at least this many times TRL's episodes/s at most this share of its peak memory
TARGET_SPEEDUP, TARGET_MEMORY_RATIO = 2.0, 0.7


# ---------------------------------------------------------------------------------------------- models and specs
def build_models(folder: str, model: str, vocab: int, seed: int) -> tuple[str, str]:
    """Save the policy (with its tokenizer) and a reward model (a one-output sequence classifier over the same
    vocabulary) under ``folder``; return both folders. Dropout is 0 in both configs (both sides switch it off).
    The reward head is drawn with std 1/sqrt(hidden), so that scores spread by about 1 (a random init's 0.02
    gives a signal far below the KL penalty)."""
    import torch as th
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from sb3_rlhf.common.models import packaged_model_path
    from sb3_rlhf.common.tiny import tiny_config, tiny_tokenizer

    transformers_logging.disable_progress_bar()
    info = MODELS[model]
    if "packaged" in info:
        policy_dir = packaged_model_path(info["packaged"])
        tokenizer = AutoTokenizer.from_pretrained(policy_dir)
        # a small Llama reward model over SmolLM2's vocabulary (a 135M one would double the scoring cost)
        rm_config = tiny_config(
            len(tokenizer), "llama", 128, 2, 4, 2048, tokenizer.pad_token_id, tokenizer.eos_token_id
        )
    else:
        policy_dir = os.path.join(folder, "policy")
        tokenizer = tiny_tokenizer([f"w{i}" for i in range(vocab)])
        config = tiny_config(
            len(tokenizer), info["architecture"], info["hidden_size"], info["num_layers"], info["num_heads"], 256
        )
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "attention_dropout"):
            if hasattr(config, name):
                setattr(config, name, 0.0)
        with th.random.fork_rng():
            th.manual_seed(seed)
            policy = AutoModelForCausalLM.from_config(config)
        if info["architecture"] == "gpt2":
            improbable_eos(policy, tokenizer.eos_token_id)
        policy.save_pretrained(policy_dir)
        tokenizer.save_pretrained(policy_dir)
        rm_config = config
    rm_config = copy.deepcopy(rm_config)
    rm_config.num_labels = 1
    reward_dir = os.path.join(folder, "reward_model")
    with th.random.fork_rng():
        th.manual_seed(seed + 1)
        reward_model = AutoModelForSequenceClassification.from_config(rm_config)
        th.nn.init.normal_(reward_model.score.weight, std=rm_config.hidden_size**-0.5)
    reward_model.save_pretrained(reward_dir)
    return policy_dir, reward_dir


def improbable_eos(model: Any, eos_token_id: int, logit: float = 30.0) -> None:
    """Make EOS about e^-30 as probable as any other token, so that responses run to the limit on both sides (TRL's
    PPO never stops early, the others stop at EOS): one channel of GPT-2's final LayerNorm becomes the constant −1
    (weight 0, bias −1), and EOS's (tied) embedding reads only that channel. Training moves these weights by far
    less than it would take to make EOS likely; the other tokens' logits shift by their embedding's tiny entry
    there."""
    import torch as th

    channel = model.config.n_embd - 1
    with th.no_grad():
        model.transformer.ln_f.weight[channel] = 0.0
        model.transformer.ln_f.bias[channel] = -1.0
        embedding = model.get_output_embeddings().weight  # tied to the input embeddings: EOS is never an input
        embedding[eos_token_id] = 0.0
        embedding[eos_token_id, channel] = logit


def word_prompts(n: int, words: int, vocab: int, seed: int) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(vocab, size=words)) for _ in range(n)]


def make_spec(args: argparse.Namespace, model: str, pair: Pair, policy_dir: str, reward_dir: str) -> dict[str, Any]:
    """Everything one run needs, identical for both sides of a pair (JSON)."""
    epochs = {"ppo": args.ppo_epochs, "grpo": args.grpo_epochs, "rloo": args.rloo_epochs}[pair.algorithm]
    return {
        "model": model,
        "algorithm": pair.algorithm,
        "value_head": pair.value_head,
        "model_dir": policy_dir,
        "reward_model_dir": reward_dir,
        "prompts": word_prompts(64, args.prompt_words, args.vocab, args.seed),
        "eval_prompts": word_prompts(args.eval_prompts, args.prompt_words, args.vocab, args.seed + 1),
        "eval_samples": args.eval_samples,
        "eval_seed": args.seed + 2,
        "n_episodes": args.n_episodes,
        "iterations": args.iterations or MODEL_DEFAULTS[model]["iterations"],
        "response_length": args.response_length,
        "n_epochs": epochs,
        "n_minibatches": args.minibatches,
        "samples_per_prompt": args.samples_per_prompt,
        "learning_rate": args.learning_rate or MODEL_DEFAULTS[model]["learning_rate"],
        "beta": args.beta,
        "clip_range": 0.2,
        "vf_coef": 0.1,  # TRL's PPO default
        "max_grad_norm": 1.0,  # GRPO and RLOO (TRL's Trainer default); TRL's PPO loop does not clip, nor does ours then
        "temperature": args.temperature,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
    }


# ---------------------------------------------------------------------------------------------- our side
def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run of the project's algorithm on ``spec``; the same measurements as the TRL worker's."""
    import torch as th
    from peers_common import (
        PeakMemory,
        RecordedReward,
        Timer,
        evaluate,
        parameter_checksum,
        run_result,
        word_score_reward,
    )
    from stable_baselines3.common.callbacks import BaseCallback
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sb3_rlhf import GRPO, RLHFPPO, RLOO, TokenGenerationEnv, TransformerActorCriticPolicy
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper, RewardModelWrapper

    memory = PeakMemory(spec["device"])
    memory.baseline()  # after the imports, as the TRL worker

    class RecordingRewardModelWrapper(RewardModelWrapper):
        """Remembers the mean reward-model score of every rollout (TRL logs it as ``objective/scores``)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.batch_means: list[float] = []

        def score(self, batch: Any) -> th.Tensor:
            scores = super().score(batch)
            self.batch_means.append(scores.mean().item())
            return scores

    class Rollouts(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            self.count += 1

    device, n_episodes = spec["device"], spec["n_episodes"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    longest_prompt = max(len(tokenizer(p)["input_ids"]) for p in spec["prompts"] + spec["eval_prompts"])
    env: Any = TokenGenerationEnv(spec["prompts"], tokenizer, longest_prompt, spec["response_length"])
    policy_kwargs = dict(
        model_name_or_path=spec["model_dir"],
        temperature=spec["temperature"],
        optimizer_kwargs=dict(weight_decay=0.0),  # TRL's TrainingArguments default (torch's AdamW: 0.01)
    )
    if spec.get("precision") == "bf16":  # float32 master weights, bf16 forwards: TRL's bf16=True does the same
        policy_kwargs["mixed_precision"] = "bf16"
    common = dict(
        learning_rate=spec["learning_rate"],
        n_episodes=n_episodes,
        batch_size=n_episodes // spec["n_minibatches"],
        n_epochs=spec["n_epochs"],
        clip_range=spec["clip_range"],
        n_logged_samples=0,
        seed=spec["seed"],
        device=device,
    )
    reward = RecordedReward(word_score_reward)
    if spec["algorithm"] == "ppo":
        reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model_dir"]).to(device)
        scorer = RecordingRewardModelWrapper(env, reward_model)
        env = KLPenaltyWrapper(scorer, coef=spec["beta"], estimator="k1")
        model: Any = RLHFPPO(
            TransformerActorCriticPolicy,
            env,
            gamma=1.0,
            gae_lambda=0.95,
            clip_range_vf=spec["clip_range"],
            normalize_advantage=True,  # TRL whitens the advantages too
            ent_coef=0.0,
            vf_coef=spec["vf_coef"],
            max_grad_norm=math.inf,  # TRL's PPO loop steps without clipping
            policy_kwargs={**policy_kwargs, "value_head": spec["value_head"]},
            **common,
        )
        train_scores, score = scorer.batch_means, dict(reward_model=reward_model)
    else:
        estimator = "k3" if spec["algorithm"] == "grpo" else "k1"  # GRPO: k3 in the loss; RLOO: k1 in the reward
        env = KLPenaltyWrapper(RewardFunctionWrapper(env, fn=reward), coef=spec["beta"], estimator=estimator)
        algorithm = GRPO if spec["algorithm"] == "grpo" else RLOO
        model = algorithm(
            TransformerActorCriticPolicy,
            env,
            samples_per_prompt=spec["samples_per_prompt"],
            loss_aggregation="sequence",  # TRL: GRPO loss_type="grpo"; RLOO averages per-sequence losses
            normalize_advantage=False,
            max_grad_norm=spec["max_grad_norm"],
            policy_kwargs=policy_kwargs,
            **common,
        )
        train_scores, score = reward.batch_means, dict(reward_fn=word_score_reward)
    actor = model.policy.actor
    checksum = parameter_checksum(actor)
    initial = evaluate(actor, tokenizer, spec, **score)
    rollouts = Rollouts()
    memory.start()
    with Timer(device) as timer:
        # one timestep is one generated token: responses that run to the limit make exactly `iterations` rollouts
        model.learn(spec["iterations"] * n_episodes * spec["response_length"], callback=rollouts)
    return run_result(
        actor,
        tokenizer,
        spec,
        score,
        initial,
        train_scores,
        episodes=rollouts.count * n_episodes,
        tokens=int(model.num_timesteps),
        rollouts=rollouts.count,
        seconds=timer.seconds,
        **memory.peak_mib(),
        initial_checksum=checksum,
    )


def worker_main(spec_path: str, result_path: str) -> int:
    import warnings

    import torch as th
    from peers_common import write_json

    with open(spec_path) as f:
        spec = json.load(f)
    th.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    write_json(result_path, run_ours(spec))
    return 0


# ---------------------------------------------------------------------------------------------- the driver
def run_side(side: str, spec: dict[str, Any], pair: Pair, folder: str) -> dict[str, Any]:
    """One run in its own process; the worker's JSON result."""
    spec_path = os.path.join(folder, "spec.json")
    result_path = os.path.join(folder, "result.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if side.startswith("trl"):
        python = os.path.join(TRL_VENVS[pair.trl_version], "bin", "python")
        command = [python, os.path.join(HERE, "peers_trl_worker.py"), spec_path, result_path]
    elif side.startswith("floor"):
        command = [sys.executable, os.path.join(HERE, "peers_floor.py"), spec_path, result_path]
    else:
        command = [sys.executable, os.path.abspath(__file__), "--worker", spec_path, result_path]
    threads = str(spec["threads"])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    for attempt in range(2):  # once more after a pause: a working tree being edited can fail an import briefly
        if os.path.exists(result_path):
            os.remove(result_path)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            break
        if attempt == 1:
            raise RuntimeError(f"{side} worker failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
        print(f"{side} worker failed, retrying in 30 s:\n{done.stderr[-1500:]}", flush=True)
        time.sleep(30)
    with open(result_path) as f:
        return json.load(f)


def check_trl_venvs(versions: set[str]) -> None:
    for version in sorted(versions):
        python = os.path.join(TRL_VENVS[version], "bin", "python")
        if not os.path.exists(python):
            sys.exit(
                f"{python} is missing: `make bench-peers` creates it (python3 -m venv {TRL_VENVS[version]} and "
                f"pip install torch==2.13.0 trl=={version}.0 -c constraints.txt)"
            )


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def device_label(args: argparse.Namespace) -> str:
    """The ``device`` column of peers.csv: the device, and the precision where it is not float32."""
    precision = getattr(args, "precision", "float32")
    return args.device if precision == "float32" else f"{args.device} {precision}"


def summarize(results: list[dict[str, Any]], pairs: list[Pair], models: list[str], device: str) -> list[dict]:
    """One row per pair and model: medians over the repeats of each side's runs, and their ratios.

    :param results: the runs, each with ``model``, ``side``, ``algorithm``, ``episodes``, ``tokens``, ``seconds``,
        ``peak_memory_mib`` (and the training check's keys).
    """
    rows = []
    for model in models:
        for pair in pairs:

            def runs(side: str, model: str = model, pair: Pair = pair) -> list[dict[str, Any]]:
                return [
                    r for r in results if r["model"] == model and r["side"] == side and r["algorithm"] == pair.algorithm
                ]

            ours, trl = runs(pair.ours_side), runs(pair.trl_side)
            if not ours or not trl:
                continue

            def med(runs: list[dict[str, Any]], key: str) -> float:
                return median([r[key] for r in runs])

            def rate(runs: list[dict[str, Any]], key: str) -> list[float]:
                return [r[key] / r["seconds"] for r in runs]

            row: dict[str, Any] = {
                "pair": f"{pair.name}/{model}",
                "device": device,
                "ours_episodes_per_s": median(rate(ours, "episodes")),
                "trl_episodes_per_s": median(rate(trl, "episodes")),
                "ours_tokens_per_s": median(rate(ours, "tokens")),
                "trl_tokens_per_s": median(rate(trl, "tokens")),
                "ours_peak_memory_mib": med(ours, "peak_memory_mib"),
                "trl_peak_memory_mib": med(trl, "peak_memory_mib"),
                "model": model,
                "ours": pair.ours_label,
                "trl": pair.trl_label,
                "repeats": min(len(ours), len(trl)),
                "ours_episodes_per_s_min": min(rate(ours, "episodes")),
                "ours_episodes_per_s_max": max(rate(ours, "episodes")),
                "trl_episodes_per_s_min": min(rate(trl, "episodes")),
                "trl_episodes_per_s_max": max(rate(trl, "episodes")),
                "ours_train_growth_mib": med(ours, "train_growth_mib"),
                "trl_train_growth_mib": med(trl, "train_growth_mib"),
                "initial_reward": med(ours, "initial_reward"),
                "ours_final_reward": med(ours, "final_reward"),
                "trl_final_reward": med(trl, "final_reward"),
                "ours_final_kl": med(ours, "final_kl"),
                "trl_final_kl": med(trl, "final_kl"),
                "ours_train_reward_first": med(ours, "train_reward_first"),
                "ours_train_reward_last": med(ours, "train_reward_last"),
                "trl_train_reward_first": med(trl, "train_reward_first"),
                "trl_train_reward_last": med(trl, "train_reward_last"),
            }
            row["speedup"] = row["ours_episodes_per_s"] / row["trl_episodes_per_s"]
            row["memory_ratio"] = row["ours_peak_memory_mib"] / row["trl_peak_memory_mib"]
            row["token_speedup"] = row["ours_tokens_per_s"] / row["trl_tokens_per_s"]
            # both sides evaluate the same initial weights with the same seeded sampling: equal up to float noise
            row["same_initial_policy"] = all(
                math.isclose(o["initial_checksum"], t["initial_checksum"], rel_tol=1e-9)
                and math.isclose(o["initial_reward"], t["initial_reward"], rel_tol=1e-3, abs_tol=1e-3)
                for o in ours
                for t in trl
            )
            row["comparable"] = comparable(ours, trl)
            row["targets_met"] = row["speedup"] >= TARGET_SPEEDUP and row["memory_ratio"] <= TARGET_MEMORY_RATIO
            floor = runs(pair.floor_side)
            row["floor_episodes_per_s"] = median(rate(floor, "episodes"))
            row["floor_peak_memory_mib"] = med(floor, "peak_memory_mib")
            # how much slower than the bare model work each side is: TRL's bounds any speedup over TRL
            row["ours_over_floor"] = row["floor_episodes_per_s"] / row["ours_episodes_per_s"]
            row["trl_over_floor"] = row["floor_episodes_per_s"] / row["trl_episodes_per_s"]
            rows.append(row)
    return rows


def comparable(ours: list[dict[str, Any]], trl: list[dict[str, Any]]) -> bool:
    """Whether both sides learned about as much from the same budget: the reward gains (final − initial
    evaluation) and the final KLs differ by at most half the larger of the two, plus the two sides' spreads over
    the repeats (noise that a few repeats cannot average away)."""

    def close(key: str, base: str | None) -> bool:
        values = {}
        for side, runs in (("ours", ours), ("trl", trl)):
            values[side] = [r[key] - (r[base] if base else 0.0) for r in runs]
        a, b = median(values["ours"]), median(values["trl"])
        spread = sum(max(v) - min(v) for v in values.values())
        return abs(a - b) <= 0.5 * max(abs(a), abs(b)) + spread

    return close("final_reward", "initial_reward") and close("final_kl", None)


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in COLUMNS})


def markdown_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| pair | model | device | episodes/s ours | episodes/s TRL | speedup | tokens/s ours | tokens/s TRL | "
        "peak MiB ours | peak MiB TRL | memory ratio | targets met |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ours']} vs {r['trl']} | {MODELS[r['model']]['label']} | {r['device']} | "
            f"{r['ours_episodes_per_s']:.2f} ({r['ours_episodes_per_s_min']:.2f}–{r['ours_episodes_per_s_max']:.2f}) | "
            f"{r['trl_episodes_per_s']:.2f} ({r['trl_episodes_per_s_min']:.2f}–{r['trl_episodes_per_s_max']:.2f}) | "
            f"{r['speedup']:.2f}× | {r['ours_tokens_per_s']:.0f} | {r['trl_tokens_per_s']:.0f} | "
            f"{r['ours_peak_memory_mib']:.0f} | {r['trl_peak_memory_mib']:.0f} | {r['memory_ratio']:.2f} | "
            f"{'yes' if r['targets_met'] else 'no'} |"
        )
    return lines


def training_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| pair | model | initial reward (both) | final reward ours | final reward TRL | KL ours | KL TRL | "
        "train batch reward ours (first → last) | TRL (first → last) | same initial policy | comparable |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pair'].split('/')[0]} | {MODELS[r['model']]['label']} | {r['initial_reward']:.3f} | "
            f"{r['ours_final_reward']:.3f} | {r['trl_final_reward']:.3f} | {r['ours_final_kl']:.3f} | "
            f"{r['trl_final_kl']:.3f} | {r['ours_train_reward_first']:.3f} → {r['ours_train_reward_last']:.3f} | "
            f"{r['trl_train_reward_first']:.3f} → {r['trl_train_reward_last']:.3f} | "
            f"{'yes' if r['same_initial_policy'] else 'NO'} | {'yes' if r['comparable'] else 'NO'} |"
        )
    return lines


def floor_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| pair | model | episodes/s floor | ours' time / floor's | TRL's time / floor's: the most any implementation "
        "could gain over TRL | peak MiB floor | floor's peak memory / TRL's |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if math.isnan(r["floor_episodes_per_s"]):
            continue
        lines.append(
            f"| {r['pair'].split('/')[0]}{' (a lighter algorithm than TRL’s)' if 'shared' in r['pair'] else ''} | "
            f"{MODELS[r['model']]['label']} | {r['floor_episodes_per_s']:.2f} | {r['ours_over_floor']:.2f} | "
            f"{r['trl_over_floor']:.2f}× | {r['floor_peak_memory_mib']:.0f} | "
            f"{r['floor_peak_memory_mib'] / r['trl_peak_memory_mib']:.2f} |"
        )
    return lines


def run_metadata(argv: list[str], seconds: float, trl_versions: dict[str, Any]) -> dict[str, Any]:
    """What ``peers.md`` names besides the runs: the command, the time it took and every side's versions."""
    from versions import versions_line  # benchmarks/versions.py

    return {
        "command": ["benchmarks/peers.py", *argv],
        "seconds": seconds,
        "ours_versions": versions_line(),
        "revision": source_revision(),
        "trl_versions": trl_versions,
    }


def verdict(rows: list[dict[str, Any]]) -> str:
    met = [r["pair"] for r in rows if r["targets_met"]]
    if rows and len(met) == len(rows):
        return "**Targets met for every pair.**"
    fast = [r["pair"] for r in rows if r["speedup"] >= TARGET_SPEEDUP]
    light = [r["pair"] for r in rows if r["memory_ratio"] <= TARGET_MEMORY_RATIO]
    return (
        f"**Targets not met**: {len(met)} of {len(rows)} rows reach both ≥ {TARGET_SPEEDUP:g}× TRL's episodes/s and "
        f"≤ {TARGET_MEMORY_RATIO:g}× its peak memory{' (' + ', '.join(met) + ')' if met else ''}. "
        f"Speed target met by: {', '.join(fast) or 'none'}. Memory target met by: {', '.join(light) or 'none'}."
    )


def lengths_line(results: list[dict[str, Any]], response_length: int) -> str:
    """Whether every run's responses ran to the limit (the sides then generated the same tokens per episode)."""
    short = [r for r in results if r["tokens"] != r["episodes"] * response_length]
    if not short:
        return (
            f"Every run generated exactly {response_length} tokens per episode: no response stopped early, on "
            "either side."
        )
    return "Runs whose responses stopped early (tokens per episode): " + ", ".join(
        f"{r['model']} {r['side']} {r['tokens'] / r['episodes']:.1f}" for r in short
    )


def write_markdown(
    rows: list[dict[str, Any]], path: str, args: argparse.Namespace, meta: dict[str, Any], results: list[dict]
) -> None:
    spec_line = (
        f"{args.n_episodes} episodes per rollout, responses of up to {args.response_length} tokens, prompts of "
        f"{args.prompt_words} words, PPO {args.ppo_epochs} epochs, GRPO {args.grpo_epochs}, RLOO {args.rloo_epochs}, "
        f"{args.minibatches} minibatch(es), group size {args.samples_per_prompt}, β = {args.beta}, temperature "
        f"{args.temperature}, {args.threads} torch thread(s) per process; rollouts per run and (constant) learning "
        "rate: "
        + ", ".join(
            f"{MODELS[m]['label']} {args.iterations or MODEL_DEFAULTS[m]['iterations']} at "
            f"{args.learning_rate or MODEL_DEFAULTS[m]['learning_rate']:g}"
            for m in args.models
        )
    )
    lines = [
        "# sb3_rlhf against TRL, side by side",
        "",
        f"Command: `python {' '.join(meta['command'])}` (`make bench-peers` runs it without options). Total "
        f"{meta['seconds']:.0f} s.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, device {args.device}. Every run is its own process; "
        f"the sides alternate within each of {args.repeats} repeat(s)"
        + (f" ({args.smollm_repeats} for SmolLM2)" if args.smollm_repeats and args.smollm else "")
        + "; medians (min–max over the repeats).",
        f"Ours: {meta['ours_versions']}; {meta['revision']}.",
        "TRL: "
        + "; ".join(
            f"{side}: " + ", ".join(f"{k} {v}" for k, v in versions.items())
            for side, versions in meta["trl_versions"].items()
        )
        + ".",
        f"Settings (both sides): {spec_line}.",
        "",
        *markdown_table(rows),
        "",
        verdict(rows),
        "",
        lengths_line(results, args.response_length),
        "",
        "Episodes/s and tokens/s count only training (`learn()` / `trainer.train()`, after the models are built). "
        "Tokens are generated tokens: TRL's PPO always generates the full response length, ours and TRL's "
        "GRPO/RLOO stop at EOS, which the built GPT-2 models make improbable (`improbable_eos`: its logit is about "
        "−30), so that both sides of a pair generate the same tokens per episode. "
        "Peak memory on CPU is the process's peak resident set (`VmHWM`, reset through `/proc/self/clear_refs` "
        "when training starts) minus its resident set after the imports, before any model was loaded: the "
        "resident models (policy, reference, critic, reward model) plus what training adds at its peak; the CSV's "
        "`*_train_growth_mib` is the part above the resident set when training started. On CUDA it is "
        "`torch.cuda.max_memory_allocated()` over training.",
        "",
        "## How far is each side from the floor?",
        "",
        "The floor (`benchmarks/peers_floor.py`, its own process, same spec) is the least work any implementation "
        "of the pair's algorithm does per rollout, written directly with torch and transformers: one "
        "`generate()` (the old log-probs recorded as it samples), the reference forward, for PPO the reward model and "
        "one value forward (policy or critic), then the epochs' forward, backward and AdamW steps; no env, no "
        "evaluation, no logging, no checks. Each side's time is a multiple of the floor's: TRL's multiple is the "
        "largest speedup over TRL that any implementation doing this algorithm's work could show on this "
        "machine, and the floor's peak memory (the resident models, gradients and AdamW's moments, and the "
        "activations) against TRL's was meant to bound the memory ratio the same way, but it does not: TRL's "
        "peak stays below the floor's for the separate critic, GRPO and RLOO (see the last column), by a saving "
        "not found yet (not the fused AdamW TRL's Trainer defaults to: ours with it peaks no lower; a candidate: how "
        "much of each process's weights stays file-backed from the safetensors mmap). A speed target beyond TRL's multiple "
        "cannot be met by speed-ups of the same algorithm; only doing less work (a shared value head instead of a "
        "critic model, LoRA instead of full fine-tuning) moves it.",
        "",
        *floor_table(rows),
        "",
        "## Does each pair train comparably?",
        "",
        "Both sides evaluate their policy before and after training with the same code (`peers_common.evaluate`): "
        f"{args.eval_samples} responses sampled (seeded) to each of {args.eval_prompts} fixed prompts at the "
        "training temperature, the mean reward (reward-model logit for PPO, the reward function for GRPO/RLOO) "
        "and the KL to the initial model per response, Σ_t KL(π(·|y<t) ‖ π_ref(·|y<t)) with each term exact over "
        "the vocabulary (the sampled log-ratio Σ_t log π − log π_ref is far noisier). Our side is deterministic for "
        "a seed, so its evaluations repeat exactly; TRL's PPO is not (it shuffles minibatches with NumPy's "
        "unseeded global generator). The training batch columns are the "
        "mean score of the first and last rollouts as each side computed it during training. *Same initial "
        "policy*: both sides loaded identical weights (checksum) and their initial evaluations agree. "
        "*Comparable*: the reward gains and final KLs differ by at most half the larger one plus the spreads "
        "over the repeats.",
        "",
        *training_table(rows),
        "",
        "## How each side is configured",
        "",
        "- Models: built once by the driver from a config and a seed (dropout 0) and saved; both sides load the "
        "same folders (the policy, a reward model of the same architecture over the same vocabulary with its "
        "score head drawn at std 1/√hidden; SmolLM2 is the packaged, de-quantized folder with a 2-layer Llama "
        f"reward model). Word-level vocabulary of {args.vocab} words `w0…`, plus `<pad>`, `<eos>`, `<unk>`; EOS "
        "made improbable in the GPT-2 models (one channel of the final LayerNorm is the constant −1 and EOS's "
        "embedding reads only that channel). Prompts: 8 random words; reward function: the mean over a response's "
        "words of a fixed score in [−1, 1] (`peers_common.word_score_reward`).",
        "- PPO: ours `RLHFPPO(gamma=1, gae_lambda=0.95, clip_range=0.2, clip_range_vf=0.2, vf_coef=0.1, "
        "ent_coef=0, normalize_advantage=True, max_grad_norm=inf)` with `KLPenaltyWrapper(estimator='k1')` over "
        "`RewardModelWrapper`; TRL `PPOConfig(num_ppo_epochs, num_mini_batches, kl_coef, kl_estimator='k1', "
        "cliprange=cliprange_value=0.2, vf_coef=0.1, gamma=1, lam=0.95, whiten_rewards=False, stop_token=None)` "
        "with its value model a sequence classifier whose backbone starts from the policy's weights. TRL's PPO "
        "loop never clips gradients, so ours does not either here.",
        "- GRPO: ours `GRPO(samples_per_prompt, loss_aggregation='sequence', max_grad_norm=1)` with "
        "`KLPenaltyWrapper(estimator='k3')`; TRL `GRPOConfig(num_generations, beta, loss_type='grpo', "
        "scale_rewards='group', use_bias_correction_kl=False, num_iterations=epochs, steps_per_generation="
        "minibatches)`.",
        "- RLOO: ours `RLOO(samples_per_prompt, loss_aggregation='sequence', normalize_advantage=False)` with "
        "`KLPenaltyWrapper(estimator='k1')` (β·KL in the return); TRL `RLOOConfig(num_generations, beta, "
        "normalize_advantages=False)` (β·KL in the reward too).",
        "- Both: AdamW (β = 0.9, 0.999, ε = 1e-8, weight decay 0), constant learning rate, "
        + (
            "float32 (TRL's bf16 and gradient checkpointing defaults switched off)"
            if getattr(args, "precision", "float32") == "float32"
            else "bf16 mixed precision (float32 weights, bf16 autocast: TRL's bf16=True, our mixed_precision='bf16'; "
            "TRL's gradient checkpointing default switched off)"
        )
        + f", dropout off, top-k/top-p off, one process, {args.threads} thread(s).",
        "",
        "Differences that remain: TRL's RLOO clips one importance ratio per sequence (exp of the summed token "
        "log-ratios) and its loss sums token log-probs per sequence, ours clips per token and averages them (equal "
        "at one epoch and one minibatch, up to a constant factor in the gradient that Adam normalises away, except "
        "through gradient clipping); TRL's PPO draws prompts by shuffling the data set per epoch, ours samples "
        "them with replacement; the value heads' initial weights differ (TRL's score layer has no bias); "
        "for the old log-probs TRL's PPO keeps the generation logits (`output_scores`) and with one epoch TRL's "
        "GRPO skips them altogether (the ratio is 1), where ours records them during `generate()` for GRPO and "
        "RLOO (no value head) and runs one teacher-forced pass for PPO, which needs it for the values anyway.",
        "",
    ]
    if "smollm2-135m" not in args.models:
        lines += [
            "SmolLM2-135M-Instruct runs with `--smollm` (both sides load the packaged, de-quantized folder); it is "
            "not in the default run because on 2 CPU cores one PPO rollout and update of 8 episodes takes about "
            "45 s per side, a few minutes per repeat.",
            "",
        ]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def source_revision() -> str:
    """The commit measured, and whether the package's working tree differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        changed = subprocess.run(
            ["git", "status", "--porcelain", "sb3_rlhf"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "commit unknown"
    return f"sb3_rlhf at commit {commit.stdout.strip()}" + (" with uncommitted changes" if changed else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-128x4", "gpt2-512x8"], choices=sorted(MODELS))
    parser.add_argument("--smollm", action="store_true", help="also SmolLM2-135M-Instruct (slow on 2 CPU cores)")
    parser.add_argument(
        "--smollm-repeats", type=int, default=None, help="repeats for SmolLM2 (default: --repeats); a few minutes each"
    )
    parser.add_argument("--pairs", nargs="+", default=["ppo", "grpo", "rloo"], choices=sorted(PAIRS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=None, help="rollouts per run (default: per model)")
    parser.add_argument("--n-episodes", type=int, default=8, help="episodes (responses) per rollout")
    parser.add_argument("--response-length", type=int, default=16)
    parser.add_argument("--prompt-words", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256, help="words in the built models' vocabulary")
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--grpo-epochs", type=int, default=1, help="TRL's num_iterations (μ)")
    parser.add_argument("--rloo-epochs", type=int, default=1)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="group size of GRPO and RLOO")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: per model")
    parser.add_argument("--beta", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-floor", dest="floor", action="store_false", help="skip the floor runs (peers_floor.py) of each pair"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bf16"],
        help="float32 on both sides, or bf16 mixed precision on both (float32 master weights, bf16 autocast: "
        "TRL's bf16=True, its configs' default, and our mixed_precision='bf16')",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trl-results", default=None, help="take TRL's runs from this peers_raw.json instead of running TRL"
    )
    parser.add_argument("--render", default=None, help="only rewrite the tables from this peers_raw.json")
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.smollm and "smollm2-135m" not in args.models:
        args.models.append("smollm2-135m")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1], argv[2])
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.out_dir)
    started = time.time()
    pairs = [p for name in args.pairs for p in PAIRS[name]]
    stored: list[dict[str, Any]] = []
    if args.trl_results:
        with open(args.trl_results) as f:
            stored = [r for r in json.load(f)["runs"] if r["side"].startswith("trl")]
    else:
        check_trl_venvs({p.trl_version for p in pairs})
    results: list[dict[str, Any]] = []
    trl_versions: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            policy_dir, reward_dir = build_models(os.path.join(tmp, model), model, args.vocab, args.seed)
            repeats = args.smollm_repeats if model == "smollm2-135m" and args.smollm_repeats else args.repeats
            for repeat in range(repeats):
                for pair_name in args.pairs:
                    group = PAIRS[pair_name]
                    sides = [(p.ours_side, p) for p in group] + [(group[0].trl_side, group[0])]
                    sides += [(p.floor_side, p) for p in group] if args.floor else []
                    if repeat % 2:  # alternate who goes first, so that a drift of the machine hits both sides
                        sides.reverse()
                    for side, pair in sides:
                        if side.startswith("trl") and args.trl_results:
                            continue
                        spec = make_spec(args, model, pair, policy_dir, reward_dir)
                        result = run_side(side, spec, pair, tmp)
                        trl_versions.update({side: result["versions"]} if "versions" in result else {})
                        result.update(model=model, side=side, algorithm=pair.algorithm, repeat=repeat)
                        results.append(result)
                        trained = (
                            f", reward {result['initial_reward']:.3f} → {result['final_reward']:.3f}, "
                            f"KL {result['final_kl']:.3f}"
                            if "final_reward" in result
                            else ""  # the floor trains without evaluating
                        )
                        print(
                            f"{model} {side:18s} repeat {repeat}: {result['episodes'] / result['seconds']:6.2f} "
                            f"episodes/s, {result['tokens'] / result['seconds']:7.1f} tokens/s, peak "
                            f"{result['peak_memory_mib']:6.0f} MiB{trained}",
                            flush=True,
                        )
    for run in stored:
        trl_versions.update({run["side"]: run.get("versions", {})})
    results += [r for r in stored if r["model"] in args.models]
    rows = summarize(results, pairs, args.models, device_label(args))
    print("\n".join(markdown_table(rows)))
    print("\n".join(training_table(rows)))
    if not args.no_write:
        meta = run_metadata(argv, time.time() - started, trl_versions)
        write_results(rows, results, args, meta, args.out_dir)
    return 0


def write_results(
    rows: list[dict[str, Any]], results: list[dict], args: argparse.Namespace, meta: dict[str, Any], out_dir: str
) -> None:
    """``peers.csv``, ``peers.md`` and ``peers_raw.json`` (the metadata and every run) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "peers.csv"))
    write_markdown(rows, os.path.join(out_dir, "peers.md"), args, meta, results)
    with open(os.path.join(out_dir, "peers_raw.json"), "w") as f:
        json.dump({**meta, "runs": results}, f, indent=1)


def render(raw_path: str, out_dir: str) -> int:
    """Rewrite the tables from a ``peers_raw.json`` (after a change to the report, without measuring again)."""
    with open(raw_path) as f:
        raw = json.load(f)
    args = parse_args(raw["command"][1:])
    pairs = [p for name in args.pairs for p in PAIRS[name]]
    rows = summarize(raw["runs"], pairs, args.models, device_label(args))
    write_results(rows, raw["runs"], args, {k: v for k, v in raw.items() if k != "runs"}, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
