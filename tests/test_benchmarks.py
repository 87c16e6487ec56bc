"""The reward-versus-KL benchmark runs end to end on the tiny task and writes its table, CSV and plot."""

import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kl_reward_frontier_on_the_tiny_task(tmp_path):
    out = tmp_path / "frontier"
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "kl_reward_frontier.py"),
        "--task",
        os.path.join(ROOT, "envs", "tiny_synthetic.toml"),
        "--methods",
        "ppo",
        "p3o-joint",
        "grpo",
        "dpo",
        "--betas",
        "0.02",
        "--timesteps",
        "800",
        "--out",
        str(out),
        "--run-dir",
        str(tmp_path / "run"),
    ]
    subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"ppo", "p3o-joint", "grpo", "dpo"}
    for method in ("ppo", "p3o-joint", "grpo", "dpo"):
        run = [r for r in rows if r["method"] == method]
        assert float(run[0]["kl"]) == 0.0 or abs(float(run[0]["kl"])) < 1e-4  # starts at the initial policy
        assert float(run[-1]["gradient_steps"]) > 0
    table = open(f"{out}.md").read()
    assert "| p3o-joint | 0.02 |" in table and "gradient steps" in table
    assert os.path.getsize(f"{out}.png") > 10_000


def test_throughput_benchmark_runs_on_a_small_setting(tmp_path):
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "throughput.py"),
        *("--batch", "2", "--new-tokens", "4", "--epochs", "1", "--minibatch", "2", "--repeats", "1"),
        *("--naive-steps", "8", "--scaling-tokens", "2", "4", "--scaling-batch", "2", "4", "--no-write"),
    ]
    result = subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    out = result.stdout
    assert "| Llama 6×384 (built in memory) | 15.7M |" in out
    assert "stock SB3 PPO, one forward per token" in out and "Fitted exponent in T" in out


def test_memory_benchmark_runs_and_python_objects_stay_flat(tmp_path):
    """The memory benchmark on a short run; the count of live Python objects must not grow once warm (after the
    first checkpoint has imported what saving needs). A leak of a per-iteration object, e.g. a list of rollout
    statistics that is never cleared, would show here."""
    command = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "memory_growth.py"),
        *("--algorithms", "ppo", "--iterations", "25", "--warmup", "12", "--n-episodes", "16", "--no-write"),
    ]
    result = subprocess.run(command, check=True, cwd=tmp_path, capture_output=True, text=True)
    row = next(line for line in result.stdout.splitlines() if line.startswith("| ppo | 25 |"))
    objects_growth = int(row.strip("|").split("|")[-1])
    assert objects_growth <= 50, row
