import fnmatch
import gzip
import json
import os
import tomllib

import pytest

import sb3_rlhf
from sb3_rlhf.common.data import (
    DATA_DIR_ENV,
    PACKAGE_DATA_DIR,
    Demonstration,
    PreferencePair,
    find_data_file,
    hh_to_messages,
    load_demonstrations,
    load_labelled_texts,
    load_preference_pairs,
    load_prompt_texts,
    messages_to_hh,
    pairs_from_labels,
    pairs_from_ranking,
    pairs_from_ratings,
    prompt_messages,
    split_hh_transcript,
    train_test_split,
)

HH = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"


def write_jsonl(path, records, compress=False):
    opener = gzip.open if compress else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return str(path)


def test_split_hh_transcript():
    prompt, answer = split_hh_transcript(HH + " why did the chicken")
    assert prompt == HH and answer == " why did the chicken"
    with pytest.raises(ValueError, match="not an HH transcript"):
        split_hh_transcript("no turns here")


def test_hh_pairs_from_gzip_jsonl_with_counted_skips(tmp_path):
    records = [
        {"chosen": HH + " a good joke", "rejected": HH + " a rude joke"},
        {"chosen": HH + " same", "rejected": HH + " same"},  # identical: skipped
        {"chosen": HH + " ", "rejected": HH + " x"},  # empty answer: skipped
        {"chosen": HH + " a", "rejected": "\n\nHuman: other\n\nAssistant: b"},  # different conversations
        {"chosen": "\n\nHuman: q\n\nAssistant: yes", "rejected": "\n\nHuman: q\n\nAssistant: no"},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl.gz", records, compress=True)
    pairs, report = load_preference_pairs(path)
    assert pairs == [
        PreferencePair(HH, " a good joke", " a rude joke"),
        PreferencePair("\n\nHuman: q\n\nAssistant:", " yes", " no"),
    ]
    assert report.loaded == 2
    assert report.skipped == {
        "identical chosen and rejected": 1,
        "empty text": 1,
        "chosen and rejected continue different conversations": 1,
    }
    assert "3 loaded" not in str(report) and "2 loaded" in str(report)


def test_pairs_with_prompt_column_margin_and_datasets_like_records():
    records = [{"prompt": "Q:", "chosen": " a", "rejected": " b", "score_gap": 2.0}]
    pairs, _ = load_preference_pairs(records, margin_key="score_gap")
    assert pairs == [PreferencePair("Q:", " a", " b", 2.0)]


def test_pairs_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preference_pairs(str(tmp_path / "missing.jsonl"))
    (tmp_path / "fake.jsonl.gz").write_text('{"chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match="not a gzip file"):
        load_preference_pairs(str(tmp_path / "fake.jsonl.gz"))
    (tmp_path / "broken.jsonl").write_text('{"chosen": "a", "rejected": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 .* is not JSON"):
        load_preference_pairs(str(tmp_path / "broken.jsonl"))
    with pytest.raises(
        ValueError, match=r"column\(s\) \['rejected'\] missing; the records have \['answer', 'chosen'\]"
    ):
        load_preference_pairs([{"chosen": "a", "answer": "b"}])
    with pytest.raises(ValueError, match="no usable preference pair"):
        load_preference_pairs([{"chosen": "a", "rejected": "a"}])


def test_ranked_list_expands_to_all_pairs():
    pairs = pairs_from_ranking("p", ["best", "mid", "worst"])
    assert [(p.chosen, p.rejected) for p in pairs] == [("best", "mid"), ("best", "worst"), ("mid", "worst")]
    k = 5
    assert len(pairs_from_ranking("p", [str(i) for i in range(k)])) == k * (k - 1) // 2
    with pytest.raises(ValueError, match="at least 2"):
        pairs_from_ranking("p", ["only"])


def test_ratings_become_pairs_with_margins():
    pairs = pairs_from_ratings("p", ["a", "b", "c", "d"], [1.0, 3.0, 1.0, 2.0])
    assert {(p.chosen, p.rejected, p.margin) for p in pairs} == {
        ("b", "d", 1.0),
        ("b", "a", 2.0),
        ("b", "c", 2.0),
        ("d", "a", 1.0),
        ("d", "c", 1.0),
    }  # a and c tie: no pair


def test_labelled_csv_to_pairs(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        'review,sentiment\n"great<br />film",positive\n"dull",negative\n"fine",positive\n"bad, bad",negative\n,negative\n'
    )
    positives, negatives, report = load_labelled_texts(str(path))
    assert positives == ["great\nfilm", "fine"] and negatives == ["dull", "bad, bad"]
    assert report.skipped == {"empty text": 1}
    pairs = pairs_from_labels(positives, negatives, seed=0)
    assert (
        len(pairs) == 2
        and {p.chosen for p in pairs} == set(positives)
        and {p.rejected for p in pairs} == set(negatives)
    )
    assert pairs == pairs_from_labels(positives, negatives, seed=0)
    with pytest.raises(ValueError, match="missing"):
        load_labelled_texts(str(path), label_column="label")


def test_demonstrations_from_jsonl_and_hh(tmp_path):
    path = write_jsonl(
        tmp_path / "demos.jsonl", [{"prompt": "Q: 1+1?", "response": " 2"}, {"prompt": "Q", "response": " "}]
    )
    demos, report = load_demonstrations(path)
    assert demos == [Demonstration("Q: 1+1?", " 2")] and report.skipped == {"empty text": 1}
    demos, _ = load_demonstrations([{"chosen": HH + " ok", "rejected": HH + " no"}])
    assert demos == [Demonstration(HH, " ok")]


def test_train_test_split_is_deterministic():
    items = list(range(100))
    train, test = train_test_split(items, 20, seed=3)
    assert len(train) == 80 and len(test) == 20 and sorted(train + test) == items
    assert (train, test) == train_test_split(items, 20, seed=3)
    assert train_test_split(items, 20, seed=4) != (train, test)
    assert len(train_test_split(items, 0.25, seed=0)[1]) == 25
    with pytest.raises(ValueError, match="leaves no"):
        train_test_split(items, 100)


def test_a_grouped_split_keeps_groups_whole_and_tests_each_held_out_group_once():
    items = [f"{group}.{cut}" for group in range(30) for cut in range(group % 3 + 1)]  # 1 to 3 items a group
    groups = [item.split(".")[0] for item in items]
    train, test = train_test_split(items, 10, seed=1, groups=groups)
    train_groups, test_groups = {t.split(".")[0] for t in train}, [t.split(".")[0] for t in test]
    assert len(test) == 10 and len(set(test_groups)) == 10 and not train_groups & set(test_groups)
    assert len(train_groups) == 20
    assert sorted(train) == sorted(i for i in items if i.split(".")[0] in train_groups)  # every cut of a train group
    assert (train, test) == train_test_split(items, 10, seed=1, groups=groups)
    assert len(train_test_split(items, 0.2, seed=0, groups=groups)[1]) == 6  # a share of the 30 groups
    # with a key per item it is the plain split, which seeded results rely on (pinned: the split before groups)
    assert train_test_split(list(range(10)), 3, seed=0) == ([4, 6, 2, 7, 3, 5, 9], [0, 8, 1])
    plain = list(range(50))
    assert train_test_split(plain, 7, seed=2, groups=[f"k{i}" for i in plain]) == train_test_split(plain, 7, seed=2)
    with pytest.raises(ValueError, match="leaves no train or no test groups out of 30"):
        train_test_split(items, 30, groups=groups)
    with pytest.raises(ValueError, match="2 group keys for 60 items"):
        train_test_split(items, 3, groups=["a", "b"])


def test_find_data_file(tmp_path, monkeypatch):
    (tmp_path / "x.csv").write_text("a\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert find_data_file("x.csv") == os.path.normpath(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="SB3_RLHF_DATA_DIR"):
        find_data_file("nope.csv")
    # the shipped data comes after $SB3_RLHF_DATA_DIR, which may hold other copies of it
    assert find_data_file("imdb_subset.csv") == os.path.join(PACKAGE_DATA_DIR, "imdb_subset.csv")
    (tmp_path / "imdb_subset.csv").write_text("review,sentiment\n")
    assert find_data_file("imdb_subset.csv") == os.path.normpath(str(tmp_path / "imdb_subset.csv"))


def test_shipped_data_is_package_data_with_its_provenance():
    assert os.path.dirname(PACKAGE_DATA_DIR) == os.path.dirname(os.path.abspath(sb3_rlhf.__file__))
    readme = open(os.path.join(PACKAGE_DATA_DIR, "README.md"), encoding="utf-8").read()
    for needed in (
        "imdb_subset.csv",
        "hh_harmless_base_test.jsonl.gz",
        "Maas",
        "stanfordnlp/imdb",
        "Anthropic/hh-rlhf",
    ):
        assert needed in readme
    assert "MIT" in readme and "offensive" in readme
    with open(os.path.join(os.path.dirname(PACKAGE_DATA_DIR), "..", "pyproject.toml"), "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["sb3_rlhf"]
    shipped = [f for f in os.listdir(PACKAGE_DATA_DIR) if not f.startswith(".")]
    assert sorted(shipped) == ["README.md", "hh_harmless_base_test.jsonl.gz", "imdb_subset.csv"]
    assert all(any(fnmatch.fnmatch(f"data/{f}", pattern) for pattern in package_data) for f in shipped)


def test_real_hh_and_imdb_files_load(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    hh = find_data_file("hh_harmless_base_test.jsonl.gz")
    imdb = find_data_file("imdb_subset.csv")
    assert os.path.dirname(hh) == os.path.dirname(imdb) == PACKAGE_DATA_DIR  # shipped, not ../shared/data
    pairs, report = load_preference_pairs(hh)
    assert report.loaded + sum(report.skipped.values()) == 2312
    assert all(p.prompt.endswith("\n\nAssistant:") and p.chosen != p.rejected for p in pairs)
    positives, negatives, _ = load_labelled_texts(imdb)
    assert (len(positives), len(negatives)) == (716, 664)
    assert not any("<br" in t for t in positives[:50])


def test_hugging_face_datasets_objects():
    datasets = pytest.importorskip("datasets")
    hh = datasets.Dataset.from_dict({"chosen": [HH + " yes", HH + " sure"], "rejected": [HH + " no", HH + " never"]})
    pairs, report = load_preference_pairs(hh)
    assert pairs[1] == PreferencePair(HH, " sure", " never") and report.source == "Dataset"
    demos, _ = load_demonstrations(datasets.Dataset.from_dict({"prompt": ["p"], "response": ["r"]}))
    assert demos == [Demonstration("p", "r")]


def test_hh_transcripts_and_messages_convert_both_ways():
    messages = hh_to_messages(HH)
    assert messages == [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "tell me a joke"},
    ]  # the final empty Assistant turn is the cue to answer, not a message
    assert messages_to_hh(messages, add_generation_prompt=True) == HH
    assert hh_to_messages(HH + " a pun")[-1] == {"role": "assistant", "content": "a pun"}
    assert prompt_messages(HH) == messages
    assert prompt_messages("Once upon a time") == [{"role": "user", "content": "Once upon a time"}]
    with pytest.raises(ValueError, match="not an HH transcript"):
        hh_to_messages("Human: no leading blank line")
    with pytest.raises(ValueError, match="role is one of"):
        messages_to_hh([{"role": "robot", "content": "beep"}])


def test_prompt_texts_from_plain_hh_and_conversational_columns():
    records = [
        {"prompt": "Write a<br />poem"},
        {"prompt": HH + " a pun"},  # a whole transcript: the conversation before the final answer
        {"prompt": [{"role": "user", "content": "hi there"}]},  # TRL's conversational prompt
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # with its answer
        {"prompt": "  "},
        {"prompt": 3},
    ]
    texts, report = load_prompt_texts(records)
    assert texts == [
        "Write a poem",
        HH,
        "\n\nHuman: hi there\n\nAssistant:",
        "\n\nHuman: q\n\nAssistant:",
    ]
    assert report.skipped == {"empty text": 1, "not a text or conversation": 1}
    with pytest.raises(
        ValueError, match=r"column\(s\) \['text'\] missing; the records have \['prompt'\].*prompts.column"
    ):
        load_prompt_texts(records, column="text")


def test_conversational_pairs_explicit_and_implicit_prompt():
    user = {"role": "user", "content": "tell me a joke"}
    explicit = {
        "prompt": [user],
        "chosen": [{"role": "assistant", "content": "a good joke"}],
        "rejected": [{"role": "assistant", "content": "a rude joke"}],
    }
    implicit = {  # TRL's implicit prompt: the shared turns are the prompt
        "chosen": [user, {"role": "assistant", "content": "a good joke"}],
        "rejected": [user, {"role": "assistant", "content": "a rude joke"}],
    }
    mixed = {"prompt": [user], "chosen": "a good joke", "rejected": "a rude joke"}
    no_assistant = {"chosen": [user, user], "rejected": [user, {"role": "user", "content": "x"}]}
    pairs, report = load_preference_pairs([explicit, implicit, mixed, no_assistant])
    expected = PreferencePair("\n\nHuman: tell me a joke\n\nAssistant:", " a good joke", " a rude joke")
    assert pairs == [expected] * 3
    assert report.skipped == {"not a conversation": 1}
    # the same text as the HH transcript of that conversation, split as HH pairs are
    hh, _ = load_preference_pairs(
        [{"chosen": expected.prompt + expected.chosen, "rejected": expected.prompt + expected.rejected}]
    )
    assert hh == [expected]
