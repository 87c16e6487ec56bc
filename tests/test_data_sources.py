"""Where prompts and preference data come from: data sets by hub name (offline, through local parquet files and
through ``datasets``' own cache), the data shipped inside the package, and chat-templated prompts whose reward
model still reads plain text."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch as th

from sb3_rlhf.common.data import load_hub_dataset, messages_to_hh, prompt_messages, train_test_split
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer
from sb3_rlhf.common.tokenizers import encode_keep_end, encode_prompt_response
from sb3_rlhf.envs.token_generation import TokenGenerationEnv
from sb3_rlhf.rewards import RewardModelWrapper
from sb3_rlhf.tasks.config import PromptsSection, parse_task
from sb3_rlhf.tasks.data import (
    conversation_key,
    load_prompt_forms,
    load_prompts,
    policy_conversations,
    reward_training_pairs,
    split_prompts,
    split_reward_pairs,
)
from sb3_rlhf.tasks.run import prepare
from tests.helpers import WORDS, copy_of_repository, tiny_bert, tiny_reward_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = "\n\nHuman: the cat sat\n\nAssistant: a dog ran\n\nHuman: it was good\n\nAssistant:"
HH_PAIRS = [
    {"chosen": HH + " happy dog", "rejected": HH + " bad dog"},
    {"chosen": "\n\nHuman: the mat\n\nAssistant: good", "rejected": "\n\nHuman: the mat\n\nAssistant: sad"},
]
#: a chat template over whole words, so the tiny word-level tokenizer reads what it renders
TEMPLATE = (
    "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant{% endif %}"
)


def task_dict(prompts: dict, reward_train: dict | None = None, **sections) -> dict:
    reward = {"train": {"backbone": "unused", **reward_train}} if reward_train else {"function": "m:f"}
    return {
        "task": {"name": "t"},
        "policy": {"model": "tiny", "tiny_words": ["a"]},
        "prompts": prompts,
        "reward": reward,
        "algorithm": {"total_timesteps": 8},
        **sections,
    }


# ---------------------------------------------------------------------------------------------- hub data sets
def test_hub_prompts_and_pairs_from_local_parquet_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    conversations = datasets.Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                [{"role": "system", "content": "be kind"}, {"role": "user", "content": "a joke?"}],
            ]
        }
    )
    conversations.to_parquet(str(tmp_path / "prompts.parquet"))
    prefs = datasets.Dataset.from_dict(
        {
            "question": ["Q1", "Q2"],
            "good": ["A1", "A2"],
            "bad": ["B1", "B2"],
        }
    )
    os.makedirs(tmp_path / "prefs")
    prefs.to_parquet(str(tmp_path / "prefs" / "train.parquet"))  # a local folder, as a hub repository lays it out
    task = parse_task(
        task_dict(
            {
                "source": "hub",
                "dataset": "parquet",
                "data_files": str(tmp_path / "prompts.parquet"),
                "column": "messages",
            },
            {
                "source": "hub",
                "dataset": str(tmp_path / "prefs"),
                "prompt_key": "question",
                "chosen_key": "good",
                "rejected_key": "bad",
            },
        )
    )
    # a conversation is kept as HH text up to the assistant's turn (a final assistant answer is dropped)
    assert load_prompts(task.prompts, None) == [
        "\n\nHuman: hi\n\nAssistant:",
        "\n\nSystem: be kind\n\nHuman: a joke?\n\nAssistant:",
    ]
    pairs, report = reward_training_pairs(task.reward.train, seed=0)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("Q1", "A1", "B1"), ("Q2", "A2", "B2")]
    assert report.loaded == 2


def test_hub_labels_by_class_name_and_missing_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    reviews = datasets.Dataset.from_dict(
        {"text": ["great film", "dull film", "fine film", "bad film"], "label": [1, 0, 1, 0]}, features=features
    )
    reviews.to_parquet(str(tmp_path / "reviews.parquet"))
    hub = {"source": "hub", "dataset": "parquet", "data_files": str(tmp_path / "reviews.parquet")}
    labels = {**hub, "format": "labels", "text_column": "text", "label_column": "label", "positive_label": "pos"}
    pairs, _ = reward_training_pairs(
        parse_task(task_dict({"source": "inline", "texts": ["a"]}, labels)).reward.train, 0
    )
    assert {p.chosen for p in pairs} == {"great film", "fine film"}  # "pos" is class 1
    assert {p.rejected for p in pairs} == {"dull film", "bad film"}
    by_index = {**labels, "positive_label": "1"}  # the class index works too
    pairs, _ = reward_training_pairs(
        parse_task(task_dict({"source": "inline", "texts": ["a"]}, by_index)).reward.train, 0
    )
    assert {p.chosen for p in pairs} == {"great film", "fine film"}

    missing = parse_task(task_dict({"source": "inline", "texts": ["a"]}, {**hub, "chosen_key": "better"})).reward.train
    with pytest.raises(ValueError) as error:
        reward_training_pairs(missing, 0)
    message = str(error.value)
    assert "\n" not in message
    assert "no column 'better' (reward.train.chosen_key); its columns are ['text', 'label']" in message
    prompts = parse_task(task_dict({**hub, "column": "prompt"})).prompts
    with pytest.raises(ValueError, match=r"no column 'prompt' \(prompts.column\); its columns are \['text', 'label'\]"):
        load_prompts(prompts, None)


def build_datasets_cache(cache_dir, repo_id: str, records: list[dict], workdir, data_dir: str | None = None) -> None:
    """Lay out ``records`` as ``datasets`` caches a hub data set once loaded online:
    ``<cache>/<namespace>___<name>/<config id>/0.0.0/<hash>/`` with the Arrow file and ``dataset_info.json``,
    which ``load_dataset(repo_id)`` reads offline (``CachedDatasetModuleFactory`` and the ``cache`` builder)."""
    import datasets
    from datasets.packaged_modules.parquet.parquet import Parquet

    namespace, name = repo_id.split("/")
    os.makedirs(workdir, exist_ok=True)
    source = os.path.join(workdir, "train.parquet")
    datasets.Dataset.from_list(records).to_parquet(source)
    # the config id the cache lookup computes: "default", or e.g. "default-data_dir=harmless-base"
    config_kwargs = {"data_dir": data_dir} if data_dir else {}
    config_id = datasets.BuilderConfig("default").create_config_id(config_kwargs=config_kwargs)
    staging = os.path.join(workdir, "staging")
    builder = Parquet(
        cache_dir=staging,
        dataset_name=name,  # the Arrow file is named after it
        config_name="default",
        config_id=config_id,
        data_files={"train": source},
        hash="0123456789abcdef",
    )
    builder.download_and_prepare()
    # a repo id adds its namespace to the folder name; local files cannot carry a repo id, so move it there
    shutil.move(os.path.join(staging, name), os.path.join(cache_dir, f"{namespace}___{name}"))


OFFLINE_SCRIPT = """
import json, sys
from sb3_rlhf.common.data import load_hub_dataset
from sb3_rlhf.tasks.config import parse_task
from sb3_rlhf.tasks.data import load_prompts, reward_training_pairs

task = parse_task(json.loads(sys.argv[1]))
pairs, report = reward_training_pairs(task.reward.train, 0)
result = {"pairs": [[p.prompt, p.chosen, p.rejected] for p in pairs], "prompts": load_prompts(task.prompts, None)}
try:
    load_hub_dataset("org/never-downloaded")
except FileNotFoundError as error:
    result["error"] = str(error)
print(json.dumps(result))
"""


def test_hub_data_set_by_name_offline_from_the_datasets_cache(tmp_path):
    pytest.importorskip("datasets")
    cache = tmp_path / "datasets_cache"
    cache.mkdir()
    build_datasets_cache(cache, "org/hh-mini", HH_PAIRS, tmp_path / "build", data_dir="harmless-base")
    hub = {"source": "hub", "dataset": "org/hh-mini", "data_dir": "harmless-base", "split": "train"}
    task = task_dict({**hub, "column": "chosen"}, dict(hub))
    # datasets reads HF_HUB_OFFLINE and its cache folder at import: a fresh process
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SB3_RLHF"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_DATASETS_CACHE=str(cache))
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, json.dumps(task)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["pairs"] == [[HH, " happy dog", " bad dog"], ["\n\nHuman: the mat\n\nAssistant:", " good", " sad"]]
    assert result["prompts"] == [HH, "\n\nHuman: the mat\n\nAssistant:"]  # the conversations of the chosen column
    error = result["error"]
    assert "\n" not in error
    assert "'org/never-downloaded'" in error and "HF_HUB_OFFLINE=1" in error
    assert "imdb_subset.csv" in error and "hh_harmless_base_test.jsonl.gz" in error


def test_hub_without_the_datasets_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(ImportError, match=r"needs the `datasets` package: pip install datasets"):
        load_hub_dataset("stanfordnlp/imdb")


def test_the_reward_models_held_out_pairs_are_drawn_by_conversation_with_policy_share(tmp_path):
    path = write_conversations(tmp_path / "hh.jsonl.gz", 30)
    prompts = {"source": "file", "format": "hh", "path": path, "test_size": 4}
    pairs_section = {"source": "file", "format": "pairs", "path": path, "test_size": 8}
    shared = parse_task(task_dict(prompts, {**pairs_section, "policy_share": 0.2}))
    assert shared.reward.train.split_by == "conversation"  # resolved where the task is read: run.json says so
    alone = parse_task(task_dict(prompts, pairs_section))
    assert alone.reward.train.split_by == "pair"  # pair by pair, as before
    by_pair = parse_task(task_dict(prompts, {**pairs_section, "policy_share": 0.2, "split_by": "pair"}))
    hub_like = parse_task(task_dict(prompts, {**pairs_section, "split_by": "conversation"}))  # e.g. hub HH pairs

    def keys(pairs):
        return {conversation_key(p.prompt) for p in pairs}

    pairs, _ = reward_training_pairs(alone.reward.train, 0)
    plain = split_reward_pairs(alone.reward.train, pairs, 0)
    assert plain == train_test_split(pairs, 8, 0)
    assert keys(plain[0]) & keys(plain[1])  # what the grouping is for: a conversation's pairs on both sides
    grouped = split_reward_pairs(hub_like.reward.train, pairs, 0)
    assert len(grouped[1]) == 8 == len(keys(grouped[1])) and not keys(grouped[0]) & keys(grouped[1])
    assert len(grouped[0]) == len([p for p in pairs if conversation_key(p.prompt) not in keys(grouped[1])])
    shared_pairs, _ = reward_training_pairs(by_pair.reward.train, 0)
    assert split_reward_pairs(by_pair.reward.train, shared_pairs, 0) == train_test_split(shared_pairs, 8, 0)

    labels = {"source": "file", "format": "labels", "path": "reviews.csv", "split_by": "conversation"}
    with pytest.raises(ValueError, match="reward.train.split_by applies to format = 'pairs': remove it"):
        parse_task(task_dict(prompts, labels))
    with pytest.raises(
        ValueError, match="reward.train.split_by must be one of \\['pair', 'conversation'\\], got 'turn'"
    ):
        parse_task(task_dict(prompts, {**pairs_section, "split_by": "turn"}))

    # a run recorded before the key drew its held-out pairs pair by pair (another reward model): resume and evaluate
    # refuse it as the task reads now, and take it with the split it was made with (--set reward.train.split_by=pair)
    resumes_only_as_recorded(tmp_path, shared, by_pair, "reward.train.split_by", "pair")


@pytest.mark.parametrize(
    "prompts, reward_train, match",
    [
        ({"source": "hub"}, None, "prompts.source = 'hub' needs prompts.dataset"),
        ({"source": "hub", "dataset": "x", "path": "f.csv"}, None, "prompts.path is a file"),
        ({"source": "file", "path": "f.csv", "dataset": "x"}, None, "prompts.dataset names a datasets data set"),
        ({"source": "file", "path": "f.csv", "split": "train"}, None, "prompts.split names a datasets data set"),
        ({"source": "parquet", "path": "f"}, None, "prompts.source must be one of ['inline', 'file', 'hub']"),
        (
            {"source": "inline", "texts": ["a"]},
            {"source": "hub"},
            "reward.train.source = 'hub' needs reward.train.dataset",
        ),
        ({"source": "inline", "texts": ["a"]}, {"source": "file"}, "needs reward.train.path"),
        ({"source": "inline", "texts": ["a"]}, {"source": "hub", "dataset": "x", "format": "ranks"}, "format must be"),
        ({"source": "inline", "texts": ["a"]}, {"source": "labels", "path": "f", "format": "labels"}, "is an old form"),
        ({"source": "inline", "texts": ["a"]}, {"path": "f", "format": "labels", "revision": "v1"}, "revision names"),
    ],
)
def test_data_source_keys_are_checked(prompts, reward_train, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        parse_task(task_dict(prompts, reward_train))


def test_task_files_name_their_public_originals_as_valid_alternatives():
    """Each real task names its public data set in commented ``source = "hub"`` lines; switched on, they parse."""
    for name, dataset in (("imdb_positive", "stanfordnlp/imdb"), ("hh_harmless", "Anthropic/hh-rlhf")):
        path = os.path.join(REPO, "envs", f"{name}.toml")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        data = tomllib.loads("\n".join(lines))
        online, section = {}, None
        for line in lines:
            if line.startswith("["):
                section = line.split("]")[0].strip("[")
            match = re.match(r"#\s{3}(\w+ = .*)$", line)
            if match:
                online.setdefault(section, {}).update(tomllib.loads(match.group(1)))
        assert set(online) == {"prompts", "reward.train"}, name
        assert data["prompts"].get("path") and data["reward"]["train"].get("path")  # shipped data by default
        data["prompts"].pop("path")
        data["prompts"].pop("format", None)  # hh_harmless: the pairs file's conversations; online, a column of them
        data["prompts"].update(online["prompts"])
        data["reward"]["train"].pop("path")
        data["reward"]["train"].pop("policy_share", None)  # hh_harmless: online, two public splits already apart
        data["reward"]["train"].update(online["reward.train"])
        task = parse_task(data, source=path)
        assert task.prompts.source == task.reward.train.source == "hub"
        assert task.prompts.dataset == task.reward.train.dataset == dataset
        if task.reward.train.format == "pairs":  # hh_harmless: held out by conversation online too, no policy_share
            assert task.reward.train.split_by == "conversation" and task.reward.train.policy_share is None


# ---------------------------------------------------------------------------------------------- shipped data
COPY_SCRIPT = """
import dataclasses, glob, json, os
import sb3_rlhf
from sb3_rlhf.common.data import find_data_file
from sb3_rlhf.tasks.config import load_task
from sb3_rlhf.tasks.data import load_prompts, reward_training_pairs

result = {"package": os.path.abspath(sb3_rlhf.__file__), "tasks": {}}
for path in sorted(glob.glob("envs/*.toml")):
    task = load_task(path)
    names = [n for n in (task.prompts.path, task.reward.train.path if task.reward.train else None) if n]
    prompts = load_prompts(dataclasses.replace(task.prompts, chat_template=False), None)
    pairs = reward_training_pairs(task.reward.train, task.seed)[0] if task.reward.train else []
    files = [os.path.abspath(find_data_file(n)) for n in names]
    result["tasks"][path] = {"files": files, "prompts": len(prompts), "pairs": len(pairs)}
print(json.dumps(result))
"""


def test_a_copy_of_the_repository_alone_resolves_every_task_data_file(tmp_path):
    copy = tmp_path / "clone"  # nothing beside it: no ../shared
    copy_of_repository(copy)
    assert (copy / "sb3_rlhf" / "data" / "imdb_subset.csv").is_file()  # the data travels with the repository
    env = {k: v for k, v in os.environ.items() if k != "SB3_RLHF_DATA_DIR"}
    env["PYTHONPATH"] = str(copy)
    done = subprocess.run(
        [sys.executable, "-c", COPY_SCRIPT], cwd=copy, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(copy))
    tasks = result["tasks"]
    assert set(tasks) == {
        os.path.join("envs", f) for f in os.listdir(os.path.join(REPO, "envs")) if f.endswith(".toml")
    }
    shipped = str(copy / "sb3_rlhf" / "data")
    for path, found in tasks.items():
        assert all(os.path.dirname(f) == shipped for f in found["files"]), (path, found)
        assert found["prompts"] > 0
    assert tasks[os.path.join("envs", "imdb_positive.toml")]["pairs"] == 664  # min(716 positive, 664 negative)
    assert tasks[os.path.join("envs", "hh_harmless.toml")]["pairs"] > 2000
    assert len(tasks[os.path.join("envs", "hh_harmless.toml")]["files"]) == 2


# ---------------------------------------------------------------------------------------------- chat
def chat_tokenizer():
    tokenizer = tiny_tokenizer([*WORDS, "user", "assistant", "system"])
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write_hh(path) -> str:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for record in HH_PAIRS:
            f.write(json.dumps(record) + "\n")
    return str(path)


def test_chat_templated_hh_prompts_are_turns_and_the_reward_model_reads_hh_text(tmp_path):
    tokenizer = chat_tokenizer()
    section = PromptsSection(source="file", format="hh", path=write_hh(tmp_path / "hh.jsonl.gz"), chat_template=True)
    templated, plain = load_prompt_forms(section, tokenizer)
    # multi-turn messages through the template, not the flattened transcript as one user turn
    assert templated[0] == "user the cat sat assistant a dog ran user it was good assistant"
    assert plain == [HH, "\n\nHuman: the mat\n\nAssistant:"]
    assert templated[0] == tokenizer.apply_chat_template(
        prompt_messages(HH), add_generation_prompt=True, tokenize=False
    )

    env = TokenGenerationEnv(templated, tokenizer, max_prompt_tokens=32, max_new_tokens=4, reward_prompts=plain)
    # a reward model trained on HH text, with its own vocabulary (the HH speaker names, not the template's roles)
    reward_tokenizer = tiny_tokenizer([*WORDS, "Human:", "Assistant:"])
    reward_model = tiny_reward_model(len(reward_tokenizer))
    wrapped = RewardModelWrapper(env, reward_model, reward_tokenizer=reward_tokenizer)
    completion = tokenizer("happy dog", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = GenerationBatch.from_episode(env, 0, completion)
    assert batch.reward_texts == [HH + " happy dog"]  # the format of HH_PAIRS' chosen transcripts

    def score(text: str) -> float:
        (ids,) = encode_keep_end(reward_tokenizer, [text], wrapped.max_length)
        with th.no_grad():
            return reward_model(input_ids=th.tensor([ids])).logits[0, 0].item()

    expected = score(HH + " happy dog")
    assert wrapped.checked_score(batch).item() == pytest.approx(expected, abs=1e-5)
    assert abs(score(batch.texts[0]) - expected) > 1e-4  # the templated text would score differently
    # the step path scores the same text
    wrapped.reset(options={"prompt_index": 0})
    for token in completion:
        _, _, terminated, truncated, info = wrapped.step(token)
    assert terminated and info["reward_terms"]["reward_model"] == pytest.approx(expected, abs=1e-5)


def test_prepare_gives_the_env_the_plain_prompts_of_a_chat_template(tmp_path):
    tokenizer = chat_tokenizer()
    policy = tmp_path / "policy"
    tiny_causal_lm(len(tokenizer)).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    data = task_dict(
        {
            "source": "file",
            "format": "hh",
            "path": write_hh(tmp_path / "hh.jsonl.gz"),
            "chat_template": True,
            "test_size": 1,
        },
        reward={"function": "sb3_rlhf.rewards.rules:share_of_good"},
    )
    data["policy"] = {"model": str(policy)}
    prepared, _ = prepare(parse_task(data), str(tmp_path / "run"), train_reward_model=False)
    plain_of = {
        tokenizer.apply_chat_template(prompt_messages(p), add_generation_prompt=True, tokenize=False): p
        for p in (HH, "\n\nHuman: the mat\n\nAssistant:")
    }
    for prompts in (prepared.train_prompts, prepared.eval_prompts):
        env = prepared.env(prompts).unwrapped
        assert env.prompts == prompts and set(prompts) <= set(plain_of)
        assert env.reward_prompts == [plain_of[p] for p in prompts]

    data["prompts"]["chat_template"] = False
    prepared, _ = prepare(parse_task(data), str(tmp_path / "run"), train_reward_model=False)
    assert prepared.env(prepared.train_prompts).unwrapped.reward_prompts is None  # the prompts are the plain text
    no_template = tiny_tokenizer(WORDS)
    with pytest.raises(ValueError, match="the policy tokenizer has no chat template"):
        load_prompt_forms(PromptsSection(source="inline", texts=["the cat"], chat_template=True), no_template)


def test_sft_and_dpo_encode_hh_prompts_as_the_env_does():
    """The offline trainers' chat encoding of an HH prompt is the task env's chat-templated prompt, token for
    token, also for a tokenizer that adds BOS to plain text (the template writes the special tokens itself)."""
    from tokenizers.processors import TemplateProcessing

    from sb3_rlhf.tasks.stages import make_env

    tokenizer = chat_tokenizer()
    bos = tokenizer.convert_tokens_to_ids("<unk>")  # stands in for a BOS the tokenizer adds to plain text
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<unk> $A", special_tokens=[("<unk>", bos)])
    assert tokenizer("the cat")["input_ids"][0] == bos
    input_ids, labels = encode_prompt_response(tokenizer, HH, " happy dog", 64, chat_template=True)
    task = parse_task(
        {
            "task": {"name": "chat"},
            "policy": {"model": "tiny", "tiny_words": ["the"]},
            "prompts": {"source": "inline", "texts": [HH], "chat_template": True},
            "generation": {"max_prompt_tokens": 64, "max_new_tokens": 4},
            "reward": {"function": "sb3_rlhf.rewards.rules:share_of_good"},
            "kl": {"coef": 0.0},
            "algorithm": {"total_timesteps": 10},
        }
    )
    templated = tokenizer.apply_chat_template(prompt_messages(HH), add_generation_prompt=True, tokenize=False)
    env = make_env(task, [templated], tokenizer, None).unwrapped
    prompt_ids = env.prompt_token_ids[0]
    assert prompt_ids[0] != bos  # no BOS added on top of the template's own tokens
    assert input_ids[: len(prompt_ids)] == prompt_ids
    assert labels[len(prompt_ids) :] == input_ids[len(prompt_ids) :] and labels[len(prompt_ids) - 1] == -100
    assert messages_to_hh(prompt_messages(HH), add_generation_prompt=True) == HH


# ------------------------------------------------------------------------------------- a conversation split
def write_conversations(path, n: int) -> str:
    """``n`` HH conversations with two pairs each, every third also cut one turn later (HH-RLHF records one
    conversation at several turns: the later cut holds the earlier one's answer)."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in range(n):
            first = f"\n\nHuman: question {i}\n\nAssistant:"
            cuts = [first] + ([f"{first} an answer\n\nHuman: and then?\n\nAssistant:"] if i % 3 == 0 else [])
            for prefix in cuts:
                for good, bad in (("good", "sad"), ("happy", "bad")):
                    f.write(json.dumps({"chosen": f"{prefix} {good}", "rejected": f"{prefix} {bad}"}) + "\n")
    return str(path)


def resumes_only_as_recorded(tmp_path, task, as_before, key: str, before_value: str) -> None:
    """A run of ``task`` recorded before ``key`` existed is read as split ``before_value`` (item by item): resume
    refuses it as ``task`` reads now, and takes it as ``as_before`` (``--set key=before_value``) reads it."""
    from sb3_rlhf.tasks.folders import check_same_run, read_record, run_record, write_record

    before = run_record(task)
    before["settings"].pop(key)
    write_record(str(tmp_path / "old"), before)
    recorded = read_record(str(tmp_path / "old"))
    with pytest.raises(ValueError, match=f"{key} '{before_value}' -> 'conversation'"):
        check_same_run(recorded, run_record(task), "out", "--resume", ())
    check_same_run(recorded, run_record(as_before), "out", "--resume", ())


def test_a_conversation_split_keeps_the_policys_prompts_out_of_the_reward_models_pairs(tmp_path):
    path = write_conversations(tmp_path / "hh.jsonl.gz", 40)
    data = task_dict(
        {"source": "file", "format": "hh", "path": path, "test_size": 4},
        {"source": "file", "format": "pairs", "path": path, "test_size": 10, "policy_share": 0.25},
    )
    task = parse_task(data)
    policy = policy_conversations(task.reward.train, task.seed)
    # a quarter of the 40 conversations, drawn once, with every cut of each: none of theirs on the other side
    keys = {conversation_key(p) for p in policy}
    assert len(keys) == 10 and len(policy) == 10 + sum(int(k.split()[-1]) % 3 == 0 for k in keys)
    assert policy == policy_conversations(task.reward.train, task.seed)  # seeded
    assert policy != policy_conversations(task.reward.train, task.seed + 1)
    pairs, _ = reward_training_pairs(task.reward.train, task.seed)
    assert not {conversation_key(p.prompt) for p in pairs} & keys
    assert len(pairs) == 2 * (30 + sum(i % 3 == 0 for i in range(40)) - sum(int(k.split()[-1]) % 3 == 0 for k in keys))

    rm = tmp_path / "run" / "reward_model"  # as a previous run left it (not trained here)
    rm.mkdir(parents=True)
    (rm / "data_split.json").write_text(json.dumps({"judge_share": 0.0, "seed": 0, "policy_share": 0.25}))
    prepared, _ = prepare(task, str(tmp_path / "run"), train_reward_model=False)
    # the policy's own split is by conversation too: 4 held-out conversations, once each, none of their cuts trained
    train_keys = {conversation_key(p) for p in prepared.train_prompts}
    eval_keys = [conversation_key(p) for p in prepared.eval_prompts]
    assert len(prepared.eval_prompts) == 4 and len(set(eval_keys)) == 4 and not train_keys & set(eval_keys)
    assert train_keys | set(eval_keys) == keys and set(prepared.train_prompts) | set(prepared.eval_prompts) <= policy
    assert len(prepared.train_prompts) == len([p for p in policy if conversation_key(p) in train_keys])
    # a reward model that left other conversations to the policy (or recorded none) is refused
    for recorded in ({"judge_share": 0.0, "seed": 0, "policy_share": 0.5}, {"judge_share": 0.0, "seed": 0}):
        (rm / "data_split.json").write_text(json.dumps(recorded))
        with pytest.raises(ValueError, match="trained with reward.train.policy_share = .* this task asks for 0.25"):
            prepare(task, str(tmp_path / "run"), train_reward_model=False)

    # the plan (--dry-run) reads the same split
    from sb3_rlhf.tasks.plan import plan_task

    tiny_bert(64).save_pretrained(tmp_path / "bert")
    data["reward"]["train"]["backbone"] = str(tmp_path / "bert")
    plan = plan_task(parse_task(data))
    assert plan.data["prompts"]["total"] == len(policy)
    # split by conversation as the run splits: a held-out conversation's other cuts are left out of both
    assert len(prepared.train_prompts) + len(prepared.eval_prompts) < len(policy)
    assert (plan.data["prompts"]["train"], plan.data["prompts"]["held_out"]) == (len(prepared.train_prompts), 4)
    # the reward model's own held-out pairs are drawn by conversation too (policy_share's default): 10
    # conversations tested on one pair each, none of their pairs trained on; the plan reads the same split
    rm_train, rm_test = split_reward_pairs(task.reward.train, pairs, task.seed)
    test_keys = {conversation_key(p.prompt) for p in rm_test}
    assert len(rm_test) == 10 == len(test_keys) and not {conversation_key(p.prompt) for p in rm_train} & test_keys
    assert len(rm_train) == len([p for p in pairs if conversation_key(p.prompt) not in test_keys]) < len(pairs) - 10
    assert (plan.data["reward_pairs"]["train"], plan.data["reward_pairs"]["held_out"]) == (len(rm_train), 10)


def test_the_reward_model_stage_trains_and_tests_on_the_conversation_split(tmp_path, tokenizer):
    from sb3_rlhf.tasks.stages import train_reward_model_stage

    path = write_conversations(tmp_path / "hh.jsonl.gz", 40)
    backbone = tmp_path / "bert"
    tiny_bert(len(tokenizer)).save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    reward_train = {"source": "file", "format": "pairs", "path": path, "test_size": 10, "policy_share": 0.25}
    reward_train |= {"backbone": str(backbone), "n_epochs": 0, "max_length": 32}  # the linear probe alone
    task = parse_task(task_dict({"source": "file", "format": "hh", "path": path, "test_size": 4}, reward_train))
    pairs, _ = reward_training_pairs(task.reward.train, task.seed)
    train, _ = split_reward_pairs(task.reward.train, pairs, task.seed)
    _, info = train_reward_model_stage(task.reward.train, str(tmp_path / "run"), task.seed, "cpu", False)
    # 10 conversations held out, one pair each; their other pairs are in neither count
    assert (info["n_train"], info["n_test"]) == (len(train), 10) and len(train) < len(pairs) - 10


def test_hh_prompts_are_held_out_by_conversation_and_the_run_record_says_so(tmp_path):
    path = write_conversations(tmp_path / "hh.jsonl.gz", 30)
    hh = parse_task(task_dict({"source": "file", "format": "hh", "path": path, "test_size": 6}))
    assert hh.prompts.split_by == "conversation"  # HH pairs' default, resolved where the file is read
    texts = parse_task(task_dict({"source": "inline", "texts": ["a", "b", "c"], "test_size": 1}))
    assert texts.prompts.split_by is None  # others: by prompt, as before (their records unchanged)
    by_prompt = parse_task(
        task_dict({"source": "file", "format": "hh", "path": path, "test_size": 6, "split_by": "prompt"})
    )
    with pytest.raises(ValueError, match="prompts.split_by must be one of \\['prompt', 'conversation'\\], got 'turn'"):
        parse_task(task_dict({"source": "file", "format": "hh", "path": path, "split_by": "turn"}))

    prompts, plain = load_prompt_forms(hh.prompts, None)
    grouped = split_prompts(hh.prompts, prompts, plain, 0)
    plain_split = split_prompts(by_prompt.prompts, prompts, plain, 0)
    assert plain_split == train_test_split(prompts, 6, 0)  # split_by = "prompt": item by item
    assert len(grouped[1]) == 6 and len({conversation_key(p) for p in grouped[1]}) == 6
    assert not {conversation_key(p) for p in grouped[0]} & {conversation_key(p) for p in grouped[1]}
    # a conversation's cuts on both sides of the item-by-item split: what the grouping is for
    assert {conversation_key(p) for p in plain_split[0]} & {conversation_key(p) for p in plain_split[1]}

    # a run recorded before the key drew its held-out prompts prompt by prompt: resume refuses it as the task reads
    # now, and takes it with the split it was made with
    resumes_only_as_recorded(tmp_path, hh, by_prompt, "prompts.split_by", "prompt")


@pytest.mark.parametrize(
    "prompts, reward_train, match",
    [
        ({"format": "texts", "column": "text"}, {}, "give .* format = 'hh', both source = 'file' with the same path"),
        ({"format": "hh"}, {"path": "other.jsonl"}, "with the same path"),
        ({"format": "hh"}, {"policy_share": 1.0}, "policy_share must be > 0 and < 1, got 1.0"),
        ({"format": "hh"}, {"format": "labels", "prompt_key": "prompt"}, "format = 'pairs'"),
        ({"format": "hh"}, {"prompt_key": "context"}, r"default columns; drop \['prompt_key'\]"),
        ({"format": "hh", "first_words": 5}, {}, "prompts.first_words with reward.train.policy_share"),
        ({"format": "hh", "path": "./hh.jsonl"}, {"prompt_key": "x"}, "default columns"),  # ./hh.jsonl is hh.jsonl
    ],
)
def test_a_conversation_split_needs_one_file_of_pairs_read_by_both(prompts, reward_train, match):
    data = task_dict(
        {"source": "file", "path": "hh.jsonl", **prompts},
        {"source": "file", "format": "pairs", "path": "hh.jsonl", "policy_share": 0.5, **reward_train},
    )
    with pytest.raises(ValueError, match=match):
        parse_task(data)
