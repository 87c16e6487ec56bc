"""The examples run as a user runs them (short schedules)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ppo_rule_reward.py", "ppo_reward_model.py"])
def test_example_runs(script, tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--out", str(tmp_path), "--timesteps", "300"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(name.endswith(".zip") for name in os.listdir(tmp_path))
