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
        ("train_reward_model.py", ["--pairs", "48"]),
        ("supervised_fine_tuning.py", ["--epochs", "1"]),
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
