import glob
import json
import os

import numpy as np
import pytest

from sb3_rlhf import RLHFPPO
from sb3_rlhf.cli import main
from sb3_rlhf.common.data import train_test_split
from sb3_rlhf.tasks import load_task, parse_task
from sb3_rlhf.tasks.config import kl_estimator
from tests.helpers import minimal_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = sorted(glob.glob(os.path.join(ROOT, "envs", "*.toml")))


@pytest.mark.parametrize("path", TASKS, ids=os.path.basename)
def test_every_task_file_parses_and_validates(path):
    task = load_task(path)
    assert task.name == os.path.basename(path)[: -len(".toml")]
    assert task.algorithm.total_timesteps > 0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["policy"].update(temprature=0.7), r"unknown key policy.temprature"),
        (lambda d: d.update(rewards={}), r"unknown section \[rewards\]"),
        (lambda d: d["task"].update(sed=1), r"unknown key task.sed"),
        (lambda d: d["reward"].update(model="x"), "exactly one of function, model"),
        (lambda d: d["reward"].update(function="no_colon"), "module:function"),
        (lambda d: d["algorithm"].pop("total_timesteps"), "missing key algorithm.total_timesteps"),
        (lambda d: d["prompts"].update(source="file", texts=[]), "needs prompts.path"),
        (lambda d: d["policy"].pop("model"), "missing key policy.model"),
        (
            lambda d: d["reward"].update(function=None, train={"path": "x", "epoch": 2}),
            r"unknown key reward.train.epoch",
        ),
        (lambda d: d["task"].update(algorithm="a2c"), r"unknown task.algorithm 'a2c'"),
        (lambda d: d["algorithm"].update(n_epoch=2), r"unknown key algorithm.n_epoch: no algorithm takes it"),
        (lambda d: d["algorithm"].update(p3o={"vf_coef": 1.0}), r"unknown key algorithm.p3o.vf_coef"),
        (lambda d: d.update(kl={"estimator": "k4"}), "kl.estimator must be"),
        (lambda d: d["reward"].update(function=None, model="m", score="prob"), "reward.score must be one of"),
        (lambda d: d["reward"].update(label="POSITIVE"), "reward.label applies to reward.model"),
        (lambda d: d["reward"].update(revision="v1"), "reward.revision applies to reward.model"),
        (lambda d: d["reward"].update(score="probability"), "reward.score applies to a reward model"),
        (lambda d: d["task"].update(algorithm="dpo") or d["algorithm"].update(dpo={"beta": 0.0}), None),
    ],
)
def test_bad_task_files_name_the_problem(change, match):
    data = minimal_task()
    change(data)
    if match is None:  # valid at parse time; the algorithm refuses it when built (tested with DPOTrainer)
        parse_task(data)
        return
    with pytest.raises(ValueError, match=match):
        parse_task(data)


def test_algorithm_selection_shared_and_own_settings():
    data = minimal_task()
    data["algorithm"].update(vf_coef=0.3, samples_per_prompt=4, p3o={"clipping": "joint", "samples_per_prompt": 2})
    ppo = parse_task(data)
    assert ppo.algorithm_name == "ppo" and ppo.algorithm_settings() == {"n_episodes": 4, "vf_coef": 0.3}
    data["task"]["algorithm"] = "p3o"
    p3o = parse_task(data)  # vf_coef is PPO's: ignored for P3O; its own table wins over the shared key
    assert p3o.algorithm_settings() == {"n_episodes": 4, "clipping": "joint", "samples_per_prompt": 2}
    data["task"]["algorithm"] = "grpo"
    assert kl_estimator(parse_task(data)) == "k3" and kl_estimator(ppo) == "k1"
    data["kl"] = {"estimator": "k2"}
    assert kl_estimator(parse_task(data)) == "k2"
    data["task"]["algorithm"] = "dpo"
    data["algorithm"].pop("total_timesteps")
    assert parse_task(data).algorithm.total_timesteps is None  # DPO samples once; no timestep budget


def test_overrides_and_file_errors(tmp_path):
    task = load_task(TASKS[-1], ["algorithm.total_timesteps=123", "kl.coef=0.5", "task.seed=7"])
    assert (task.algorithm.total_timesteps, task.kl.coef, task.seed) == (123, 0.5, 7)
    with pytest.raises(FileNotFoundError, match="a ready task.s name .*tiny_synthetic"):
        load_task(str(tmp_path / "none.toml"))
    (tmp_path / "bad.toml").write_text("[task\nname=")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_task(str(tmp_path / "bad.toml"))
    with pytest.raises(ValueError, match="unknown key algorithm.bogus"):
        load_task(TASKS[-1], ["algorithm.bogus=1"])


def test_kl_controller_settings_are_checked_when_the_task_is_read():
    main_job = os.path.join(ROOT, "envs", "imdb_positive.toml")  # an adaptive target, before any stage runs
    for override, match in (
        ("kl.proportional_gain=-1", "kl.proportional_gain must be >= 0, got -1.0"),
        ("kl.target=-1", "kl.target must be > 0, got -1.0"),
        ("kl.horizon=0", "kl.horizon must be >= 1, got 0"),
    ):
        with pytest.raises(ValueError, match=match):
            load_task(main_job, [override])
    with pytest.raises(ValueError, match="kl.proportional_gain is a setting of the adaptive controller"):
        load_task(os.path.join(ROOT, "envs", "tiny_synthetic.toml"), ["kl.proportional_gain=1"])  # no target
    assert load_task(main_job).kl.proportional_gain == 1.5


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
        "--summary",
        str(tmp_path / "summary.json"),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trained policy against the initial one" in printed
    results = json.loads((out / "report.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["trained"]["score"] == results["trained"]["score"]
    assert summary["initial"]["eos_rate"] == results["initial"]["eos_fraction"]
    assert summary["trained"]["distinct_2"] == results["trained"]["distinct_2"]
    assert summary["trained"]["judge_positive_share"] is None  # the tiny task has no judge
    assert results["trained"]["score"] > results["initial"]["score"] + 0.3
    assert results["initial"]["kl"] == pytest.approx(0.0, abs=1e-4) and results["trained"]["kl"] > 0
    # each held-out prompt's two scores, the ones the paired comparison is made of
    per_prompt = results["per_prompt"]
    assert len(per_prompt) == results["paired"]["n"] and len({p["prompt"] for p in per_prompt}) == len(per_prompt)
    task = load_task(os.path.join(ROOT, "envs", "tiny_synthetic.toml"))
    eval_prompts = train_test_split(list(task.prompts.texts), task.prompts.test_size, task.seed)[1]
    assert [p["prompt"] for p in per_prompt] == eval_prompts[: task.evaluation.n_prompts]  # in order, as given
    assert np.mean([p["trained"] for p in per_prompt]) == pytest.approx(results["trained"]["score"])
    assert np.mean([p["trained"] - p["initial"] for p in per_prompt]) == pytest.approx(
        results["paired"]["mean_difference"]
    )
    for name in ("ppo_model.zip", "report.md", "policy/model.safetensors"):
        assert (out / name).exists(), name
    checkpoints = sorted(glob.glob(str(out / "checkpoints" / "checkpoint_*" / "model.zip")))
    assert len(checkpoints) == 2  # [checkpoint] keep = 2; the last one is the end of training
    assert RLHFPPO.load(checkpoints[-1]).num_timesteps == RLHFPPO.load(out / "ppo_model.zip").num_timesteps
    assert glob.glob(str(out / "tensorboard" / "tiny_synthetic_1" / "events.*"))

    # `sb3-rlhf evaluate` reproduces the report from the saved run
    task_file = os.path.join(ROOT, "envs", "tiny_synthetic.toml")
    assert main(["evaluate", task_file, "--out", str(out), "--summary", str(tmp_path / "again.json")]) == 0
    again = capsys.readouterr().out
    assert f"| trained | {results['trained']['score']:.4f} |" in again
    assert json.loads((tmp_path / "again.json").read_text()) == summary

    # the exported policy answers through `sb3-rlhf generate`
    assert (
        main(["generate", "--model", str(out / "policy"), "--prompt", "the cat", "--greedy", "--max-new-tokens", "4"])
        == 0
    )
    assert "'the cat' -> " in capsys.readouterr().out


def save_sentiment_classifier(folder, words: list[str]) -> None:
    """A tiny two-label BERT classifier (NEGATIVE, POSITIVE) and its tokenizer, saved like a hub checkpoint."""
    import torch as th
    from transformers import BertConfig, BertForSequenceClassification

    from sb3_rlhf.common.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(words)
    th.manual_seed(0)
    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def classifier_task(model: str, **reward) -> dict:
    data = minimal_task()
    data["reward"] = {"model": model, "label": "POSITIVE", **reward}
    data["prompts"]["texts"] = ["a b", "b a", "a a", "b b", "a", "b"]
    data["prompts"]["test_size"] = 2
    data["generation"] = {"max_prompt_tokens": 4, "max_new_tokens": 3}
    data["algorithm"] = {"total_timesteps": 24, "n_episodes": 4, "batch_size": 4, "n_epochs": 1}
    data["evaluation"] = {"n_prompts": 2, "n_samples_shown": 1}
    return data


def classifier_wrapper(prepared):
    from sb3_rlhf.rewards import RewardModelWrapper, reward_wrappers

    (wrapper,) = [w for w in reward_wrappers(prepared.env(prepared.eval_prompts)) if isinstance(w, RewardModelWrapper)]
    return wrapper


def test_a_sentiment_classifier_folder_rewards_a_task(tmp_path):
    from sb3_rlhf.tasks.run import prepare, run_task

    save_sentiment_classifier(tmp_path / "sentiment", ["a", "b"])
    task = parse_task(classifier_task(str(tmp_path / "sentiment"), score="logit_margin"))
    results = run_task(task, str(tmp_path / "run"), progress_bar=False)
    assert results["timesteps"] >= 24 and (tmp_path / "run" / "ppo_model.zip").exists()
    wrapper = classifier_wrapper(prepare(task, str(tmp_path / "run"), train_reward_model=False)[0])
    assert (wrapper.label_index, wrapper.score_kind) == (1, "logit_margin")


def test_a_hub_classifier_task_honours_the_revision(tmp_path, monkeypatch):
    import huggingface_hub

    from sb3_rlhf.tasks.run import prepare
    from tests.helpers import build_hub_cache

    save_sentiment_classifier(tmp_path / "sentiment", ["a", "b"])
    commit = build_hub_cache(tmp_path / "hf_home", "org/tiny-sentiment", tmp_path / "sentiment", revision="v1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    task = parse_task(classifier_task("org/tiny-sentiment", revision="v1", score="probability"))
    prepared, _ = prepare(task, str(tmp_path / "run"), train_reward_model=False)
    assert prepared.reward_model.endswith(commit)  # the snapshot of tag v1 (the cache has no "main")
    wrapper = classifier_wrapper(prepared)
    assert (wrapper.label_index, wrapper.score_kind) == (1, "probability")
    with pytest.raises(
        FileNotFoundError, match="'org/tiny-sentiment' does not exist as a local folder.*as a hub id at revision 'v2'"
    ):
        prepare(parse_task(classifier_task("org/tiny-sentiment", revision="v2")), str(tmp_path / "run"), False)


@pytest.mark.parametrize("algorithm", ["rloo", "grpo", "p3o", "nlpo", "dpo"])
def test_every_algorithm_runs_the_tiny_task_from_the_cli(algorithm, tmp_path, capsys):
    out = tmp_path / algorithm
    task = os.path.join(ROOT, "envs", "tiny_synthetic.toml")
    args = ["train", task, "--algorithm", algorithm, "--out", str(out), "--no-progress-bar"]
    assert main([*args, "--set", "algorithm.total_timesteps=5000"]) == 0
    results = json.loads((out / "report.json").read_text())
    assert results["algorithm"] == algorithm
    assert results["trained"]["score"] > results["initial"]["score"] + 0.1, results
    assert results["trained"]["kl"] > 0
    assert (out / "policy" / "model.safetensors").exists()
    if algorithm == "dpo":
        assert results["dpo"]["pairs"] > 0 and results["dpo"]["gradient_steps"] > 0
    else:
        assert (out / f"{algorithm}_model.zip").exists()
    capsys.readouterr()
    assert main(["evaluate", task, "--algorithm", algorithm, "--out", str(out)]) == 0
    assert f"| trained | {results['trained']['score']:.4f} |" in capsys.readouterr().out


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
    except (ImportError, FileNotFoundError) as missing:
        pytest.skip(str(missing))
    find_data_file("imdb_subset.csv")  # shipped with the package: never a reason to skip
    short = [
        "algorithm.total_timesteps=16",
        "algorithm.n_episodes=4",
        "algorithm.batch_size=4",  # a whole group of 4 for hh_harmless's RLOO
        "reward.train.max_pairs=24",
        "reward.train.n_epochs=0",
        "reward.train.test_size=16",
        "prompts.max_prompts=200",
        "generation.max_prompt_tokens=48",
        "generation.max_new_tokens=4",
        "evaluation.n_prompts=4",
    ]
    task = load_task(os.path.join(ROOT, "envs", f"{name}.toml"), short)
    results = run_task(task, str(tmp_path), progress_bar=False)
    # the reported held-out metrics are those of the saved reward model: rebuild the held-out pairs from the data
    # file and score each text on its own with the saved model, as a user loading the folder would
    import numpy as np
    import torch as th
    from transformers import AutoTokenizer

    from sb3_rlhf.common.data import load_labelled_texts, pairs_from_labels
    from sb3_rlhf.reward_modeling import load_reward_model
    from sb3_rlhf.tasks.data import labelled_halves, reward_training_pairs, split_reward_pairs

    stage = task.reward.train
    if stage.format == "labels":
        positives, negatives, _ = load_labelled_texts(
            find_data_file(stage.path), stage.text_column, stage.label_column, str(stage.positive_label)
        )
        if task.judge is not None:  # the judge's share of the reviews is not the reward model's
            (positives, negatives), judged, _ = labelled_halves(stage, task.judge.share, task.seed)
            assert results["judge"]["accuracy"] > 0.65 and results["judge"]["n_train"] + results["judge"][
                "n_test"
            ] == len(judged[0]) + len(judged[1])
            assert 0 <= results["trained"]["judge_positive_share"] <= 1
        pairs = pairs_from_labels(positives, negatives, seed=task.seed)
    else:
        pairs, _ = reward_training_pairs(stage, task.seed)  # with policy_share, the reward model's conversations only
    held_out = split_reward_pairs(stage, pairs, task.seed)[1]  # hh_harmless: 16 conversations, one pair each
    folder = str(tmp_path / "reward_model")
    reward_model, reward_tokenizer = load_reward_model(folder), AutoTokenizer.from_pretrained(folder)
    reward_tokenizer.truncation_side = "left"  # the answer at the end is what is judged

    def score(text: str) -> float:
        inputs = reward_tokenizer(text, truncation=True, max_length=stage.max_length, return_tensors="pt")
        with th.no_grad():
            return reward_model(**inputs).logits[0, 0].item()

    chosen = np.array([score(p.prompt + p.chosen) for p in held_out])
    rejected = np.array([score(p.prompt + p.rejected) for p in held_out])
    metrics = results["reward_model"]
    assert metrics["accuracy"] == pytest.approx(np.mean(chosen > rejected), abs=1e-6), (chosen, rejected)
    assert metrics["margin"] == pytest.approx(np.mean(chosen - rejected), abs=1e-4)
    assert metrics["mean"] == pytest.approx(np.mean([*chosen, *rejected]), abs=1e-4)
    assert results["initial"]["kl"] == pytest.approx(0.0, abs=1e-3)
    assert len(results["samples"]) == 4
    assert (tmp_path / "policy" / "model.safetensors").exists()
