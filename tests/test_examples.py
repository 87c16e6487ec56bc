"""The examples run as a user runs them (short schedules)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "arguments"),
    [
        ("ppo_rule_reward.py", ["--timesteps", "300"]),
        ("ppo_reward_model.py", ["--timesteps", "300"]),
        ("train_reward_model.py", ["--pairs", "48", "--test-pairs", "32"]),
        ("supervised_fine_tuning.py", ["--epochs", "1"]),
        ("pairwise_and_group_rl.py", ["--timesteps", "300"]),
        ("pairwise_and_group_rl.py", ["--timesteps", "300", "--algorithm", "grpo"]),
        ("direct_preference_optimization.py", ["--epochs", "1", "--lora"]),
        ("constrained_vocabulary.py", ["--timesteps", "300"]),
        ("constrained_vocabulary.py", ["--timesteps", "300", "--algorithm", "maskable-ppo"]),
    ],
)
def test_example_runs(script, arguments, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--out", str(tmp_path), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = os.listdir(tmp_path)
    assert any(name.endswith(".zip") or name == "model" for name in written), written


def test_inspect_run_reads_the_curves(tmp_path):
    from sb3_rlhf.cli import main

    main(["demo", "--out", str(tmp_path), "--timesteps", "600", "--no-progress-bar"])
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "inspect_run.py"), str(tmp_path / "tensorboard")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rlhf/scores" in result.stdout and "| prompt | completion | score | reward |" in result.stdout
