import gzip
import json
import os

import pytest

from sb3_rlhf.common.data import (
    DATA_DIR_ENV,
    Demonstration,
    PreferencePair,
    find_data_file,
    load_demonstrations,
    load_labelled_texts,
    load_preference_pairs,
    pairs_from_labels,
    pairs_from_ranking,
    pairs_from_ratings,
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


def test_find_data_file(tmp_path, monkeypatch):
    (tmp_path / "x.csv").write_text("a\n")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert find_data_file("x.csv") == os.path.normpath(str(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError, match="SB3_RLHF_DATA_DIR"):
        find_data_file("nope.csv")


@pytest.mark.real_model
def test_real_hh_and_imdb_files_load():
    try:
        hh = find_data_file("hh_harmless_base_test.jsonl.gz")
        imdb = find_data_file("imdb_subset.csv")
    except FileNotFoundError:
        pytest.skip("the shared data files are not on this machine")
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
