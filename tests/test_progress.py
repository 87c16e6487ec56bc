"""Progress where there is no terminal (a log file, CI, a cluster job): a line per rollout through ``logging``,
the CLI's stages announcing themselves, and no third-party bars or deprecation warnings from our own calls."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import pytest
from stable_baselines3.common.logger import Logger

from sb3_rlhf.common import progress
from sb3_rlhf.common.data import train_test_split
from sb3_rlhf.common.progress import ProgressLogCallback, format_duration
from sb3_rlhf.reward_modeling import RewardModel, RewardModelTrainer
from tests.helpers import make_model, rule_env, tiny_bert, toy_reward_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def progress_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sb3_rlhf.progress"]


@pytest.fixture
def not_a_terminal(monkeypatch):
    """Standard output redirected, as to a log file (pytest -s on a terminal would otherwise draw bars)."""
    for module in ("sb3_rlhf.common.on_policy_algorithm", "sb3_rlhf.common.trainer"):
        monkeypatch.setattr(f"{module}.stdout_is_terminal", lambda: False)


def test_learn_with_a_progress_bar_off_a_terminal_logs_a_line_per_rollout(
    tokenizer, model_path, caplog, not_a_terminal
):
    model = make_model(rule_env(tokenizer, kl_coef=0.05, target=1.0, horizon=100), model_path)
    with caplog.at_level(logging.INFO, logger="sb3_rlhf"):
        model.learn(total_timesteps=1_000, progress_bar=True)
    lines = progress_lines(caplog)
    rollouts = [line for line in lines if " rollout " in line]
    assert lines[0] == "RLHFPPO: training to 1,000 generated tokens"
    assert len(rollouts) >= 3 and rollouts[0].startswith("RLHFPPO rollout 1/~")
    assert rollouts[-1].startswith(f"RLHFPPO rollout {len(rollouts)}/~{len(rollouts)} | {model.num_timesteps:,}/1,000")
    # each one names the score, the KL with the controller's target and β, the speed and the time left
    assert all(" | score " in line and "(target 1) β " in line and " tokens/s" in line for line in rollouts)
    assert " left" in rollouts[0] and " left" not in rollouts[-1]
    assert lines[-1].startswith(f"RLHFPPO: {model.num_timesteps:,} tokens in ")

    # a resumed run counts from where it stands; a callback of the user's own replaces the default one
    caplog.clear()
    before = model.num_timesteps
    with caplog.at_level(logging.INFO, logger="sb3_rlhf"):
        model.learn(600, reset_num_timesteps=False, progress_bar=True, callback=ProgressLogCallback(3600))
    lines = progress_lines(caplog)
    assert lines[0] == f"RLHFPPO: training to {before + 600:,} generated tokens (from {before:,})"
    assert sum(" rollout 1/~" in line for line in lines) == 1  # one callback, not two
    assert lines[-1].startswith(f"RLHFPPO: {model.num_timesteps - before:,} tokens in ")


def test_progress_lines_at_most_every_n_seconds_keep_the_first_and_last(tokenizer, model_path, caplog):
    model = make_model(rule_env(tokenizer), model_path)
    every_rollout = ProgressLogCallback()
    with caplog.at_level(logging.INFO, logger="sb3_rlhf"):
        model.learn(total_timesteps=1_000, callback=[every_rollout, ProgressLogCallback(every_seconds=3600)])
    rollouts = [line for line in progress_lines(caplog) if " rollout " in line]
    n = every_rollout.rollouts
    assert n >= 3
    # every rollout from the first callback; the first and the last from the second
    assert len(rollouts) == n + 2
    assert sum(line.startswith("RLHFPPO rollout 1/") for line in rollouts) == 2
    assert sum(line.startswith(f"RLHFPPO rollout {n}/") for line in rollouts) == 2
    with pytest.raises(ValueError, match="every_seconds must be >= 0"):
        ProgressLogCallback(every_seconds=-1)


def test_the_interval_between_lines_is_kept_by_the_clock(tokenizer, model_path, caplog, monkeypatch):
    """Driven by hand with a clock that moves 10 s per reading: at most one line every 25 s, the first and the
    last rollout always; tokens/s over whole iterations after the first rollout, and the time left from it."""
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    model = make_model(rule_env(tokenizer), model_path)
    model.set_logger(Logger(folder=None, output_formats=[]))
    callback = ProgressLogCallback(every_seconds=25)
    callback.init_callback(model)
    with caplog.at_level(logging.INFO, logger="sb3_rlhf"):
        callback.on_training_start({"total_timesteps": 1000}, {})  # t = 0
        for _ in range(10):  # rollouts end at t = 10, 20, ..., 100, 100 tokens each
            model.num_timesteps += 100
            callback.on_rollout_end()
    shown = [int(line.split(" rollout ")[1].split("/")[0]) for line in progress_lines(caplog)[1:]]
    assert shown == [1, 4, 7, 10]
    lines = progress_lines(caplog)
    assert lines[1].endswith("| 10 tokens/s | 1m30s left")  # 100 tokens in 10 s, 900 left
    assert lines[2].endswith("| 10 tokens/s | 1m00s left")  # 300 tokens from t = 10 to 40
    assert lines[2].startswith("RLHFPPO rollout 4/~10 | 400/1,000 tokens | ")


def test_supervised_trainers_log_a_line_per_epoch_off_a_terminal(tokenizer, caplog, not_a_terminal):
    train, test = train_test_split(toy_reward_pairs(64), 16, seed=0)
    trainer = RewardModelTrainer(RewardModel(tiny_bert(len(tokenizer))), tokenizer, train, test, n_epochs=2)
    with caplog.at_level(logging.INFO, logger="sb3_rlhf"):
        trainer.learn(progress_bar=True)
    lines = progress_lines(caplog)
    assert [line.split(" (")[0] for line in lines] == ["reward_model epoch 1", "reward_model epoch 2"]
    assert all("training loss " in line and "held-out accuracy " in line for line in lines)


def test_durations_read_as_a_person_would():
    assert [format_duration(s) for s in (0, 12.4, 245, 3725)] == ["0s", "12s", "4m05s", "1h02m"]


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}  # standard output and error are pipes here, as in `make main > log`
    return subprocess.run(
        [sys.executable, "-m", "sb3_rlhf.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_captured_cli_run_shows_its_stages_and_progress_and_no_third_party_noise(tmp_path):
    """A LoRA run (peft reads a deprecated transformers property) that loads and saves models several times."""
    overrides = ["--set", "algorithm.total_timesteps=1200", "--set", "policy.lora.r=4"]
    result = run_cli("train", "tiny_synthetic", "--out", "run", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    for expected in (
        "tiny_synthetic: ppo into run\n",
        "policy run/base_model: 15 prompts to train on, 5 held out\n",
        "RLHFPPO: training to 1,200 generated tokens\n",
        "RLHFPPO rollout 1/~",
        " tokens/s | ",
        " left\n",
        "evaluation: the trained policy against the initial one on 5 held-out prompts\n",
        "tiny_synthetic: done in ",
    ):
        assert expected in err, f"{expected!r} not in:\n{err}"
    # transformers' loading and saving bars, deprecations raised by our calls, a rich bar
    for noise in ("Loading weights", "Writing model shards", "Warning", "it/s", "━"):
        assert noise not in err + result.stdout, f"{noise!r} in the output:\n{err}"
    assert "| trained |" in result.stdout  # the report stays on standard output

    quiet = run_cli("--quiet", "train", "tiny_synthetic", "--out", "run", "--overwrite", *overrides, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert quiet.stderr == "" and "| trained |" in quiet.stdout


def test_progress_lines_every_negative_seconds_is_refused(tmp_path):
    result = run_cli("train", "tiny_synthetic", "--progress-lines", "-5", "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert "--progress-lines: must be >= 0, got -5" in result.stderr
