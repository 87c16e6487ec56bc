"""The task schema (one place defines every key: type, default, range), renamed keys, typed ``--set``, the ready
tasks shipped in the package, and run folders that belong to one run."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
import warnings

import pytest

from sb3_rlhf.cli import main
from sb3_rlhf.tasks import load_task, parse_task
from sb3_rlhf.tasks.config import SECTIONS, describe_type, parse_override, ready_tasks
from sb3_rlhf.tasks.folders import claim_run_folder, task_settings
from tests.helpers import copy_of_repository, minimal_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_change(section: str, **values) -> dict:
    data = minimal_task()
    data.setdefault(section, {}).update(values)
    return data


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("policy", {"temperature": "hot"}, "policy.temperature must be a number, got 'hot'"),
        ("policy", {"temperature": 0}, "policy.temperature must be > 0, got 0.0"),
        ("policy", {"top_k": 2.5}, "policy.top_k must be a whole number, got 2.5"),
        ("policy", {"dtype": "fp8"}, "policy.dtype must be one of ['float32', 'bfloat16', 'float16'], got 'fp8'"),
        ("policy", {"value_head": "own"}, "policy.value_head must be one of ['shared', 'separate']"),
        ("policy", {"tiny_words": ["a", 2]}, "policy.tiny_words must be a list of texts, got ['a', 2]"),
        ("policy", {"lora": 16}, "policy.lora must be a table (or left out), got 16"),
        ("prompts", {"first_words": 0}, "prompts.first_words must be >= 1, got 0"),
        ("prompts", {"chat_template": "yes"}, "prompts.chat_template must be true or false, got 'yes'"),
        ("prompts", {"test_size": 1.5}, "prompts.test_size must be a share in (0, 1) or a whole number >= 1"),
        ("generation", {"max_prompt_tokens": 0}, "generation.max_prompt_tokens must be >= 1, got 0"),
        ("kl", {"coef": -0.1}, "kl.coef must be >= 0, got -0.1"),
        ("kl", {"coef": float("inf")}, "kl.coef must be a finite number, got inf"),
        ("evaluation", {"n_samples_shown": -1}, "evaluation.n_samples_shown must be >= 0, got -1"),
        ("checkpoint", {"keep": True}, "checkpoint.keep must be a whole number, got True"),
        ("task", {"seed": -1}, "task.seed must be >= 0, got -1"),
        ("task", {"name": "../x"}, "task.name names the run folder"),
        ("algorithm", {"n_epochs": "2"}, "algorithm.n_epochs must be a whole number, got '2'"),
        ("algorithm", {"learning_rate": "fast"}, "algorithm.learning_rate must be a number, got 'fast'"),
        ("algorithm", {"p3o": {"clipping": 1}}, "algorithm.p3o.clipping must be a text, got 1"),
        ("algorithm", {"samples_per_prompt": "four"}, "algorithm.samples_per_prompt must be a whole number"),
        ("algorithm", {"seed": 3}, "algorithm.seed is set by the task: use [task] seed"),
        ("algorithm", {"dpo": {"n_prompts": -3}}, "algorithm.dpo.n_prompts must be >= 1, got -3"),
        ("task", {"algorithm_name": "ppo"}, "unknown key task.algorithm_name: the keys of [task] are"),
        # keys that would do nothing where they are
        ("kl", {"coef": 0, "target": 2}, "kl.target adapts kl.coef, and coef = 0 turns the penalty off"),
        ("kl", {"horizon": 100}, "kl.horizon is a setting of the adaptive controller (kl.target): remove it"),
        ("kl", {"estimator": "k1"}, None),  # fine for ppo; refused for grpo below
        ("reward", {"max_length": 64}, "reward.max_length applies to a reward model: remove it"),
        ("prompts", {"column": "text"}, "prompts.column names a column of a file or data set of texts: remove it"),
        ("policy", {"lora": {"r": 4, "alpha": 8}}, "unknown key policy.lora.alpha: lora takes peft.LoraConfig's"),
        ("policy", {"lora": {"r": 0}}, "policy.lora.r must be >= 1, got 0"),
    ],
)
def test_every_key_is_checked_for_its_type_and_range_when_read(section, values, message):
    if message is None:
        parse_task(with_change(section, **values))
        return
    with pytest.raises(ValueError) as error:
        parse_task(with_change(section, **values))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_keys_that_go_together_are_checked_together():
    with pytest.warns(UserWarning, match="policy.tiny_words applies to model = 'tiny': ignored in this run"):
        parse_task(with_change("policy", model="org/real"))  # minimal_task() gives tiny_words
    data = with_change("kl", estimator="k1")
    data["task"]["algorithm"] = "grpo"
    with pytest.raises(ValueError, match="kl.estimator = 'k1' with grpo: GRPO puts the KL in its loss"):
        parse_task(data)
    pairs = minimal_task()
    pairs["reward"] = {"train": {"path": "p.jsonl", "text_column": "review"}}
    with pytest.raises(ValueError, match="reward.train.text_column applies to format = 'labels': remove it"):
        parse_task(pairs)
    labels = minimal_task()
    labels["reward"] = {"train": {"path": "r.csv", "format": "labels", "chosen_key": "good"}}
    with pytest.raises(ValueError, match="reward.train.chosen_key applies to format = 'pairs': remove it"):
        parse_task(labels)


def test_valid_edge_values_pass_and_take_the_schemas_type():
    data = minimal_task()
    data["policy"].update(temperature=1, top_p=1, top_k=0)  # an int where a float is asked for is a float
    data["prompts"].update(test_size=1)  # a count
    data["kl"] = {"coef": 0.1, "target": 1, "horizon": 1}
    data["reward"] = {
        "train": {"path": "f.csv", "format": "labels", "n_epochs": 0, "positive_label": 1, "center_coef": 0}
    }
    task = parse_task(data)
    assert isinstance(task.policy.temperature, float) and isinstance(task.kl.target, float)
    assert task.prompts.test_size == 1 and isinstance(task.prompts.test_size, int)
    assert task.reward.train.positive_label == 1


def test_every_key_of_the_schema_has_a_type_a_task_file_can_give():
    import typing

    for where, cls in SECTIONS.items():
        for name, annotation in typing.get_type_hints(cls).items():
            if dataclasses.is_dataclass(annotation) or name in ("settings", "per_algorithm", "train"):
                continue
            assert describe_type(annotation), f"{where}.{name}: {annotation}"


OLD_NAMES = {
    "prompts": {"source": "csv", "path": "reviews.csv", "column": "review", "eval_size": 8},
    "reward": {"train": {"source": "labels", "data": "reviews.csv", "epochs": 0}},
}
NEW_NAMES = {
    "prompts": {"source": "file", "path": "reviews.csv", "column": "review", "test_size": 8},
    "reward": {"train": {"source": "file", "format": "labels", "path": "reviews.csv", "n_epochs": 0}},
}


def test_old_key_names_still_read_with_a_warning_naming_the_new_one():
    old, new = minimal_task(), minimal_task()
    old.update(OLD_NAMES)
    new.update(NEW_NAMES)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upgraded = parse_task(old)
    messages = [str(w.message) for w in caught if w.category is FutureWarning]
    assert any("prompts.eval_size" in m and "is now prompts.test_size" in m for m in messages), messages
    assert any("reward.train.data" in m and "is now reward.train.path" in m for m in messages), messages
    assert any("reward.train.epochs" in m and "reward.train.n_epochs" in m for m in messages), messages
    assert any("prompts.source = 'csv'" in m and "source = 'file' with format = 'texts'" in m for m in messages)
    assert any("reward.train.source = 'labels'" in m and "format = 'labels'" in m for m in messages)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names: no warning at all
        assert parse_task(new) == upgraded
    both = minimal_task()
    both["prompts"].update(eval_size=2, test_size=2)
    with pytest.raises(ValueError, match="prompts.eval_size and prompts.test_size are one setting"):
        parse_task(both)


def test_the_ready_tasks_use_the_current_names():
    for path in ready_tasks().values():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_task(path)


def test_a_hub_key_on_a_file_source_is_refused_whatever_its_value():
    for split in ("train", "test"):  # "train" (the default) used to pass unnoticed
        with pytest.raises(
            ValueError, match="prompts.split names a datasets data set: it needs prompts.source = 'hub'"
        ):
            parse_task(with_change("prompts", source="file", texts=[], path="f.csv", split=split))


def test_old_names_through_set_replace_the_files_value():
    with pytest.warns(
        FutureWarning, match="--set reward.train.epochs in the command line is now reward.train.n_epochs"
    ):
        task = load_task("imdb_positive", ["reward.train.epochs=0", "prompts.eval_size=3"])
    assert task.reward.train.n_epochs == 0 and task.prompts.test_size == 3


def test_set_none_leaves_a_key_out():
    task = load_task("imdb_positive", ["kl.target=none", "kl.horizon=none", "kl.proportional_gain=none"])
    assert (task.kl.target, task.kl.horizon, task.kl.proportional_gain) == (None, 10_000, 0.0)
    with pytest.raises(ValueError, match="missing key policy.model"):
        load_task("imdb_positive", ["policy.model=none"])


def test_set_values_are_read_as_the_schemas_types():
    assert parse_override("policy.model=123") == ("policy.model", "123")  # a text key: the text as given
    assert parse_override('policy.revision="v1.0"') == ("policy.revision", "v1.0")
    assert parse_override("policy.temperature=0.7") == ("policy.temperature", 0.7)
    assert parse_override("reward.train.positive_label=1") == ("reward.train.positive_label", 1)  # text or whole number
    assert parse_override('policy.tiny_words=["a", "b"]') == ("policy.tiny_words", ["a", "b"])
    assert parse_override("algorithm.generation_cache=static") == ("algorithm.generation_cache", "static")
    assert parse_override("policy.top_p=.5") == ("policy.top_p", 0.5)  # not TOML, still a number
    task = load_task("tiny_synthetic", ["policy.model=123", "task.algorithm=dpo"])
    assert task.policy.model == "123" and task.algorithm_name == "dpo"
    with pytest.raises(ValueError, match="policy.temperature must be a number, got 'hot'"):
        load_task("tiny_synthetic", ["policy.temperature=hot"])
    with pytest.raises(ValueError, match="--set policy.model.name: model is a key, not a section"):
        load_task("tiny_synthetic", ["policy.model.name=x"])


def test_shared_keys_the_algorithm_does_not_take_are_named_in_a_warning(capsys):
    data = minimal_task()
    data["algorithm"].update(vf_coef=0.3, samples_per_prompt=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parse_task(data)
    (warning,) = [str(w.message) for w in caught]
    assert warning.startswith("[algorithm] samples_per_prompt: not a setting of ppo, ignored in this run")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_task("tiny_synthetic")  # every shared key is ppo's
    # on the CLI: one line, not a code location
    assert main(["train", "tiny_synthetic", "--algorithm", "dpo", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "sb3-rlhf train: warning: [algorithm] n_episodes: not a setting of dpo" in err and ".py:" not in err


# ------------------------------------------------------------------------------------------------ ready tasks
def test_a_missing_task_file_is_never_taken_for_a_ready_task(tmp_path, monkeypatch):
    from sb3_rlhf.tasks.config import find_task_file

    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_task_file(str(tmp_path / "my_tasks" / "imdb_positive.toml"))  # a typo in a folder: not the packaged one
    monkeypatch.chdir(os.path.join(ROOT, "envs"))  # the same file under its name here and packaged: no conflict
    assert os.path.samefile(find_task_file("imdb_positive"), "imdb_positive.toml")
    monkeypatch.chdir(tmp_path)  # outside a clone
    assert find_task_file("envs/imdb_positive.toml") == ready_tasks()["imdb_positive"]  # the README's path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_task_file("imdb_positive.toml")  # a file named here that is not here: not the packaged task
    (tmp_path / "imdb_positive.toml").write_text("")
    with pytest.raises(ValueError, match="give the file as imdb_positive.toml"):
        find_task_file("imdb_positive")


def test_the_ready_tasks_ship_in_the_package_and_envs_links_to_them():
    ready = ready_tasks()
    assert set(ready) == {"tiny_synthetic", "imdb_positive", "hh_harmless"}
    for name, path in ready.items():
        assert os.path.samefile(os.path.join(ROOT, "envs", f"{name}.toml"), path)
        assert load_task(name) == load_task(path)


def test_sb3_rlhf_tasks_lists_them_and_prints_one(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "imdb_positive   ppo   IMDB review continuations made positive" in out
    assert "hh_harmless     rloo  RLOO towards the less harmful answers" in out
    assert main(["tasks", "tiny_synthetic"]) == 0
    printed = capsys.readouterr().out
    with open(ready_tasks()["tiny_synthetic"]) as f:
        assert printed == f.read()
    assert main(["tasks", "nope"]) == 2
    assert "give a path to a .toml file or a ready task's name" in capsys.readouterr().err


def test_a_wheel_runs_the_ready_tasks_by_name_outside_a_clone(tmp_path):
    """``pip install`` of the package alone (no clone, no envs/): ``sb3-rlhf tasks`` and ``train NAME --dry-run``."""
    source = tmp_path / "source"
    copy_of_repository(source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)], check=True
    )
    (wheel,) = (tmp_path / "dist").glob("sb3_rlhf-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "sb3_rlhf.cli", *args], cwd=elsewhere, env=env, capture_output=True, text=True
        )

    where = subprocess.run(
        [sys.executable, "-c", "import sb3_rlhf; print(sb3_rlhf.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(tmp_path / "site")), where.stdout  # the installed copy, not this clone
    listing = cli("tasks")
    assert listing.returncode == 0 and "tiny_synthetic" in listing.stdout, listing.stderr
    for task in ("tiny_synthetic", "envs/tiny_synthetic.toml"):  # a README command outside a clone too
        plan = cli("train", task, "--dry-run")
        assert plan.returncode == 0, plan.stderr
        assert "task tiny_synthetic" in plan.stdout and str(tmp_path / "site") in plan.stdout


# ------------------------------------------------------------------------------------------------ run folders
TINY_SETTINGS = ["algorithm.total_timesteps=256", "algorithm.n_episodes=16", "evaluation.n_prompts=2"]
TINY = [
    "train",
    "tiny_synthetic",
    "--no-progress-bar",
    "--set",
    "algorithm.total_timesteps=256",
    "--set",
    "algorithm.n_episodes=16",
    "--set",
    "evaluation.n_prompts=2",
]


def test_a_run_folder_belongs_to_one_run(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    first = [*TINY, "--out", str(out)]
    assert main(first) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["task"] == "tiny_synthetic" and record["settings"]["algorithm.total_timesteps"] == 256
    old_checkpoints = sorted(os.listdir(out / "checkpoints"))

    # the same command again: a finished run with the same settings is repeated, its old results replaced
    (out / "report.json").write_text("{}")  # stands for the old results
    capsys.readouterr()
    assert main(first) == 0
    assert "(a finished run with the same settings, run again)" in caplog.text  # a stage line (sb3_rlhf.progress)
    assert json.loads((out / "report.json").read_text())["timesteps"] > 0
    assert json.loads((out / "run.json").read_text())["finished"] is True
    # another run in it is refused, naming what is there and the flags
    capsys.readouterr()
    longer = [*first, "--set", "algorithm.total_timesteps=128"]
    assert main(longer) == 2
    err = capsys.readouterr().err
    assert f"{out} holds a ppo run of tiny_synthetic (256 timesteps)" in err
    assert "checkpoints/" in err and "--overwrite" in err and "--resume" in err
    assert main([*longer, "--dry-run"]) == 2  # the dry run makes the same check, and writes nothing
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert main([*longer, "--dry-run", "--overwrite"]) == 0 and (out / "report.json").exists()
    # a run that started with these settings and did not finish is not "finished alike"
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**record, "finished": False}))
    assert main(longer) == 2 and "pass --overwrite" in capsys.readouterr().err
    # --overwrite replaces it: none of the old checkpoints is kept, the new ones are not pruned by them
    assert main([*longer, "--overwrite"]) == 0
    new_checkpoints = sorted(os.listdir(out / "checkpoints"))
    timesteps = json.loads((out / "report.json").read_text())["timesteps"]
    assert new_checkpoints[-1] == f"checkpoint_{timesteps:012d}" and old_checkpoints[-1] not in new_checkpoints
    assert json.loads((out / "run.json").read_text())["settings"]["algorithm.total_timesteps"] == 128


def test_resume_continues_only_the_recorded_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main([*TINY, "--out", str(out), "--resume", "--set", "kl.coef=0.5", "--set", "policy.top_k=5"]) == 2
    err = capsys.readouterr().err
    assert "these settings differ from its run.json: kl.coef 0.02 -> 0.5; policy.top_k 0 -> 5" in err
    assert main([*TINY, "--out", str(out), "--resume", "--algorithm", "grpo"]) == 2
    err = capsys.readouterr().err
    assert "holds a ppo run of tiny_synthetic (256 timesteps), not a grpo run of tiny_synthetic" in err
    assert "--algorithm ppo" in err and "AttributeError" not in err
    assert main([*TINY, "--out", str(out), "--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    # settings the run never reads: another algorithm's table, a default written out
    for harmless in (["algorithm.dpo.beta=0.5"], ["algorithm.gamma=1.0"], ["evaluation.n_prompts=3"]):
        claim_run_folder(load_task("tiny_synthetic", [*TINY_SETTINGS, *harmless]), str(out), resume=True)
    # evaluate takes the recorded run only, as resume does
    assert main(["evaluate", "tiny_synthetic", "--out", str(out), *TINY[3:], "--set", "kl.coef=0.5"]) == 2
    assert "evaluate takes the run in" in capsys.readouterr().err
    assert main(["train", "tiny_synthetic", "--out", str(tmp_path / "empty"), "--resume", "--dry-run"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    # what a resumed run honours: a longer budget, other checkpoint and evaluation settings
    more = [
        *TINY,
        "--out",
        str(out),
        "--resume",
        "--set",
        "algorithm.total_timesteps=600",
        "--set",
        "checkpoint.keep=3",
    ]
    assert main(more) == 0
    assert json.loads((out / "report.json").read_text())["timesteps"] >= 600


def test_a_tiny_base_model_is_rebuilt_when_its_settings_change(tmp_path):
    from sb3_rlhf.tasks.stages import TINY_SETTINGS_FILE, policy_model_path

    task = load_task("tiny_synthetic")
    path = policy_model_path(task, str(tmp_path))
    config = json.loads((tmp_path / "base_model" / "config.json").read_text())
    assert config["hidden_size"] == 64
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert policy_model_path(task, str(tmp_path)) == path  # the same settings: reused
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    wider = dataclasses.replace(task, policy=dataclasses.replace(task.policy, tiny_hidden_size=32))
    policy_model_path(wider, str(tmp_path))
    assert json.loads((tmp_path / "base_model" / "config.json").read_text())["hidden_size"] == 32
    fewer_words = dataclasses.replace(task, policy=dataclasses.replace(task.policy, tiny_words=["the", "cat"]))
    policy_model_path(fewer_words, str(tmp_path))
    assert json.loads((tmp_path / "base_model" / TINY_SETTINGS_FILE).read_text())["words"] == ["the", "cat"]


def test_task_settings_name_every_key_as_a_task_file_does():
    settings = task_settings(load_task("imdb_positive"))
    for key in (
        "kl.coef",
        "algorithm.total_timesteps",
        "algorithm.learning_rate",
        "algorithm.clip_range",
        "task.algorithm",
        "task.seed",
        "reward.train.path",
        "judge.window_words",
        "policy.lora.r",
    ):
        assert key in settings, key


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints"),
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors'
    ],
)
def test_a_full_disk_ends_in_one_line(error, monkeypatch, capsys):
    import sb3_rlhf.tasks

    def full_disk(*args, **kwargs):
        raise error

    monkeypatch.setattr(sb3_rlhf.tasks, "run_task", full_disk)
    assert main(["train", "tiny_synthetic", "--out", "runs/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sb3-rlhf train: error: ") and err.count("\n") == 1
    assert "no space left on the device: free some, or write elsewhere (--out" in err


def test_a_write_refused_by_the_system_ends_in_one_line(tmp_path):
    """A real refused write, through transformers and safetensors (which report it without an errno): the file
    size limit stands in for a full disk, which a test cannot make."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    done = subprocess.run(
        [sys.executable, "-m", "sb3_rlhf.cli", "train", "tiny_synthetic", "--out", "run", "--no-progress-bar"],
        cwd=tmp_path,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "sb3-rlhf train: error: a file outgrew the size this process may write (ulimit -f)" in done.stderr
    assert "Traceback" not in done.stderr


def test_generate_on_a_run_folder_names_its_policy(tmp_path, capsys):
    (tmp_path / "run" / "policy").mkdir(parents=True)
    (tmp_path / "run" / "policy" / "config.json").write_text("{}")
    assert main(["generate", "--model", str(tmp_path / "run"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"is a run folder, not a model folder: its trained policy is '{tmp_path / 'run' / 'policy'}'" in err


def test_none_is_none_where_a_key_takes_it_and_sections_are_not_made():
    assert parse_override("algorithm.clip_range_vf=none") == ("algorithm.clip_range_vf", None)  # unclipped
    assert parse_override("algorithm.learning_rate=.5") == ("algorithm.learning_rate", 0.5)
    assert parse_override("algorithm.dpo.beta=.1") == ("algorithm.dpo.beta", 0.1)
    task = load_task("tiny_synthetic", ["judge.share=none", "reward.train.max_pairs=none"])
    assert task.judge is None and task.reward.train is None  # nothing to leave out: no section made
    assert load_task("tiny_synthetic", ["algorithm.target_kl=none"]).algorithm_settings()["target_kl"] is None


def test_an_old_name_in_the_file_gives_way_to_the_new_one_on_the_command_line(tmp_path):
    with open(ready_tasks()["tiny_synthetic"]) as f:
        old = f.read().replace("test_size = 0.25", "eval_size = 0.25")
    (tmp_path / "old.toml").write_text(old)
    with pytest.warns(FutureWarning, match="prompts.eval_size"):
        assert load_task(str(tmp_path / "old.toml")).prompts.test_size == 0.25
    assert load_task(str(tmp_path / "old.toml"), ["prompts.test_size=0.5"]).prompts.test_size == 0.5


def test_a_record_of_another_version_is_compared_on_what_both_know(tmp_path):
    from sb3_rlhf.tasks.folders import run_record, write_record

    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint_000000000010").mkdir(parents=True)
    for name in ("training_state.json", "model.zip"):  # what makes a checkpoint complete (not loaded here)
        (out / "checkpoints" / "checkpoint_000000000010" / name).write_text("{}")
    task = load_task("tiny_synthetic")
    record = run_record(task)
    older = {**record, "version": "0.0.9", "settings": {**record["settings"], "algorithm.gone": 1}}
    older["settings"].pop("algorithm.clip_range")  # a setting that came later
    write_record(str(out), older)
    claim_run_folder(task, str(out), resume=True)  # nothing both know differs: no refusal, no warning
    older["settings"]["algorithm.n_epochs"] = 1  # a default that changed, say
    write_record(str(out), older)
    with pytest.warns(UserWarning, match="was written by sb3_rlhf 0.0.9, this is .*algorithm.n_epochs 1 -> 4"):
        claim_run_folder(task, str(out), resume=True)
    write_record(str(out), {**record, "settings": {**record["settings"], "algorithm.n_epochs": 1}})
    with pytest.raises(ValueError, match="algorithm.n_epochs 1 -> 4. Give the recorded values"):
        claim_run_folder(task, str(out), resume=True)  # the same version: refused
    # written out as the run reads it: the estimator's default, and the memory settings a resume may change
    for same in (["kl.estimator=k1"], ["algorithm.generation_batch_size=8", "algorithm.micro_batch_tokens=64"]):
        write_record(str(out), record)
        claim_run_folder(load_task("tiny_synthetic", same), str(out), resume=True)


def test_a_resumed_run_takes_the_memory_settings_it_is_given(tmp_path, monkeypatch):
    from sb3_rlhf import RLHFPPO
    from sb3_rlhf.tasks import run_task

    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    seen = {}
    load = RLHFPPO.load_checkpoint.__func__

    def recording(cls, path, env, device="auto", **kwargs):
        seen.update(kwargs)
        return load(cls, path, env, device, **kwargs)

    monkeypatch.setattr(RLHFPPO, "load_checkpoint", classmethod(recording))
    task = load_task("tiny_synthetic", [*TINY_SETTINGS, "algorithm.generation_batch_size=4"])
    run_task(task, str(out), progress_bar=False, resume=True)
    assert seen == {"generation_batch_size": 4}


def test_dpo_under_several_processes_is_refused_before_the_folder_is_touched(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    (out / "policy").mkdir(parents=True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "tiny_synthetic", "--algorithm", "dpo", "--out", str(out), "--overwrite"]) == 2
    assert "several processes train the online algorithms" in capsys.readouterr().err
    assert (out / "policy").is_dir() and not (out / "run.json").exists()


def test_overwrite_replaces_the_old_runs_curves_too(tmp_path):
    out = tmp_path / "run"
    assert main([*TINY, "--out", str(out)]) == 0
    old_logs = set(os.listdir(out / "tensorboard"))
    assert main([*TINY, "--out", str(out), "--set", "kl.coef=0.1", "--overwrite"]) == 0
    assert set(os.listdir(out / "tensorboard")) == old_logs  # the new run's, under the same name: the old ones gone
