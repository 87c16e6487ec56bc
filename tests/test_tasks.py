import glob
import json
import os

import pytest

from sb3_rlhf.cli import main
from sb3_rlhf.tasks import load_task, parse_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = sorted(glob.glob(os.path.join(ROOT, "envs", "*.toml")))


@pytest.mark.parametrize("path", TASKS, ids=os.path.basename)
def test_every_task_file_parses_and_validates(path):
    task = load_task(path)
    assert task.name == os.path.basename(path)[: -len(".toml")]
    assert task.algorithm.total_timesteps > 0


def minimal() -> dict:
    return {
        "task": {"name": "t"},
        "policy": {"model": "tiny", "tiny_words": ["a", "b"]},
        "prompts": {"source": "inline", "texts": ["a b"]},
        "reward": {"function": "sb3_rlhf.rewards.rules:share_of_good"},
        "algorithm": {"total_timesteps": 10, "n_episodes": 4},
    }


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["policy"].update(temprature=0.7), r"unknown key policy.temprature"),
        (lambda d: d.update(rewards={}), r"unknown section \[rewards\]"),
        (lambda d: d["task"].update(sed=1), r"unknown key task.sed"),
        (lambda d: d["reward"].update(model="x"), "exactly one of function, model"),
        (lambda d: d["reward"].update(function="no_colon"), "module:function"),
        (lambda d: d["algorithm"].pop("total_timesteps"), "missing key algorithm.total_timesteps"),
        (lambda d: d["prompts"].update(source="csv"), "needs prompts.path"),
        (lambda d: d["policy"].pop("model"), "missing key policy.model"),
        (
            lambda d: d["reward"].update(function=None, train={"data": "x", "epoch": 2}),
            r"unknown key reward.train.epoch",
        ),
    ],
)
def test_bad_task_files_name_the_problem(change, match):
    data = minimal()
    change(data)
    with pytest.raises(ValueError, match=match):
        parse_task(data)


def test_overrides_and_file_errors(tmp_path):
    task = load_task(TASKS[-1], ["algorithm.total_timesteps=123", "kl.coef=0.5", "task.seed=7"])
    assert (task.algorithm.total_timesteps, task.kl.coef, task.seed) == (123, 0.5, 7)
    with pytest.raises(FileNotFoundError, match="envs/"):
        load_task(str(tmp_path / "none.toml"))
    (tmp_path / "bad.toml").write_text("[task\nname=")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_task(str(tmp_path / "bad.toml"))
    with pytest.raises(ValueError, match="unknown key algorithm.bogus"):
        load_task(TASKS[-1], ["algorithm.bogus=1"])


def test_tiny_task_end_to_end_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        os.path.join(ROOT, "envs", "tiny_synthetic.toml"),
        "--out",
        str(out),
        "--no-progress-bar",
        "--set",
        "algorithm.total_timesteps=5000",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trained policy against the initial one" in printed
    results = json.loads((out / "report.json").read_text())
    assert results["trained"]["score"] > results["initial"]["score"] + 0.3
    assert results["initial"]["kl"] == pytest.approx(0.0, abs=1e-4) and results["trained"]["kl"] > 0
    for name in ("ppo_model.zip", "report.md", "policy/model.safetensors"):
        assert (out / name).exists(), name
    assert glob.glob(str(out / "checkpoints" / "ppo_*_steps.zip"))
    assert glob.glob(str(out / "tensorboard" / "tiny_synthetic_1" / "events.*"))

    # `sb3-rlhf evaluate` reproduces the report from the saved run
    assert main(["evaluate", os.path.join(ROOT, "envs", "tiny_synthetic.toml"), "--out", str(out)]) == 0
    again = capsys.readouterr().out
    assert f"| trained | {results['trained']['score']:.4f} |" in again

    # the exported policy answers through `sb3-rlhf generate`
    assert (
        main(["generate", "--model", str(out / "policy"), "--prompt", "the cat", "--greedy", "--max-new-tokens", "4"])
        == 0
    )
    assert "'the cat' -> " in capsys.readouterr().out


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["imdb_positive", "hh_harmless"])
def test_real_tasks_run_end_to_end_on_a_short_schedule(name, tmp_path):
    """The ready tasks on their real models and data, with the schedule cut to a few steps."""
    from sb3_rlhf.common.data import find_data_file
    from sb3_rlhf.common.models import packaged_model_path
    from sb3_rlhf.tasks import run_task

    try:
        packaged_model_path("all-MiniLM-L6-v2")
        packaged_model_path("SmolLM2-135M-Instruct")
        find_data_file("imdb_subset.csv")
    except (ImportError, FileNotFoundError) as missing:
        pytest.skip(str(missing))
    short = [
        "algorithm.total_timesteps=16",
        "algorithm.n_episodes=4",
        "algorithm.batch_size=2",
        "reward.train.max_pairs=24",
        "reward.train.epochs=0",
        "reward.train.test_size=16",
        "prompts.max_prompts=200",
        "generation.max_prompt_tokens=48",
        "generation.max_new_tokens=4",
        "evaluation.n_prompts=4",
    ]
    results = run_task(load_task(os.path.join(ROOT, "envs", f"{name}.toml"), short), str(tmp_path), progress_bar=False)
    assert 0.0 <= results["reward_model"]["accuracy"] <= 1.0
    assert results["initial"]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert len(results["samples"]) == 4
    assert (tmp_path / "policy" / "model.safetensors").exists()
