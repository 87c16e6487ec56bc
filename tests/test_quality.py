"""Issue 15, item 1: text-quality measures and a second judge in every evaluation, and in TensorBoard."""

import csv
import glob
import math
import os

import numpy as np
import pytest
import torch as th
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sb3_rlhf import TokenGenerationEnv
from sb3_rlhf.common.evaluation import evaluate_policy, paired_preference, report_markdown, student_t_quantile
from sb3_rlhf.common.forward import response_logprobs
from sb3_rlhf.common.judge import BagOfWordsJudge
from sb3_rlhf.common.quality import distinct_n, repeated_ngram_rate, text_quality, words
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.common.sequences import zero_padding
from sb3_rlhf.rewards import RewardFunctionWrapper
from sb3_rlhf.rewards.rules import share_of_good
from sb3_rlhf.tasks import load_task, parse_task
from sb3_rlhf.tasks.data import labelled_halves, reward_training_pairs
from sb3_rlhf.tasks.run import prepare, run_task
from tests.helpers import make_policy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ["good", "happy", "great", "lovely", "fun"]
NEGATIVE = ["bad", "sad", "awful", "dull", "boring"]
NEUTRAL = ["the", "a", "cat", "dog", "sat", "ran", "on", "mat", "log", "it", "was", "then"]


def reviews(n: int, mood: list[str], seed: int) -> list[str]:
    """Texts of neutral words with a few words of one mood: a labelled set a bag of words separates."""
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.permutation([*rng.choice(NEUTRAL, 8), *rng.choice(mood, int(rng.integers(1, 3)))]))
        for _ in range(n)
    ]


def test_words_distinct_n_and_repeated_ngrams_by_hand():
    assert words("The cat, the CAT!") == ["the", "cat", ",", "the", "cat", "!"]
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    # "a b a b a b": 5 bigrams, 2 distinct -> 0.6; "x y z": 0; "x" has no bigram and is left out
    assert repeated_ngram_rate(["a b a b a b", "x y z", "x"], 2) == pytest.approx(0.3)
    assert text_quality([]) == {"distinct_1": 0.0, "distinct_2": 0.0, "repeated_2gram_rate": 0.0}
    looping = text_quality(["good good good good good good"] * 4)
    varied = text_quality(["the cat sat on the mat", "a dog ran under a log", "it was big and then small"])
    assert looping["distinct_2"] < 0.1 < 0.9 < varied["distinct_2"] and looping["repeated_2gram_rate"] > 0.7


def test_bag_of_words_judge_learns_saves_and_loads(tmp_path):
    judge = BagOfWordsJudge.fit(reviews(200, POSITIVE, 0), reviews(200, NEGATIVE, 1))
    held_out_positive, held_out_negative = reviews(100, POSITIVE, 2), reviews(100, NEGATIVE, 3)
    assert judge.accuracy(held_out_positive, held_out_negative) > 0.95
    assert judge.positive_share(held_out_positive) > 0.9 and judge.positive_share(held_out_negative) < 0.1
    assert judge.positive_share(["it was good good great fun"]) == 1.0
    assert set(judge.vocabulary) >= {"good", "bad", "the cat"}  # unigrams and bigrams
    judge.save(str(tmp_path / "judge"))
    loaded = BagOfWordsJudge.load(str(tmp_path / "judge"))
    assert np.array_equal(loaded.probabilities(held_out_negative), judge.probabilities(held_out_negative))
    # refit gives the same judge: no random state
    again = BagOfWordsJudge.fit(reviews(200, POSITIVE, 0), reviews(200, NEGATIVE, 1))
    assert th.equal(again.weight, judge.weight)
    with pytest.raises(ValueError, match="texts of both labels"):
        BagOfWordsJudge.fit(["good"], [])
    with pytest.raises(FileNotFoundError, match=r"no judge.*\[judge\]"):
        BagOfWordsJudge.load(str(tmp_path))


def write_reviews(path, n: int = 120) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i, (p, q) in enumerate(zip(reviews(n, POSITIVE, 10), reviews(n, NEGATIVE, 11))):
            writer.writerow([p, "positive"])
            writer.writerow([q, "negative"])
    return str(path)


def judged_task(data: str, backbone: str, **judge) -> dict:
    return {
        "task": {"name": "judged", "seed": 0},
        "policy": {"model": "tiny", "tiny_words": [*NEUTRAL, *POSITIVE, *NEGATIVE]},
        "prompts": {"source": "inline", "texts": ["the cat", "a dog ran", "it was", "the log"], "test_size": 2},
        "generation": {"max_prompt_tokens": 4, "max_new_tokens": 6},
        "reward": {
            "train": {
                "path": data,
                "format": "labels",
                "backbone": backbone,
                "n_epochs": 0,
                "linear_probe_init": True,
                "test_size": 10,
                "max_length": 16,
            }
        },
        "algorithm": {"total_timesteps": 48, "n_episodes": 4, "batch_size": 4, "n_epochs": 2, "learning_rate": 0.05},
        "evaluation": {"n_prompts": 2, "every": 1},
        "judge": judge,
    }


def test_judge_share_is_disjoint_from_the_reward_models_texts(tmp_path):
    stage = parse_task(judged_task(write_reviews(tmp_path / "r.csv"), "unused")).reward.train
    (rm_pos, rm_neg), (judge_pos, judge_neg), _ = labelled_halves(stage, 0.5, seed=0)
    assert len(judge_pos) == len(rm_pos) == 60 and len(judge_neg) == len(rm_neg) == 60
    assert not set(rm_pos + rm_neg) & set(judge_pos + judge_neg)
    pairs, _ = reward_training_pairs(stage, seed=0, judge_share=0.5)
    seen = {p.chosen for p in pairs} | {p.rejected for p in pairs}
    assert seen == set(rm_pos + rm_neg)  # the reward model never sees the judge's texts
    assert labelled_halves(stage, 0.5, seed=0)[1] == (judge_pos, judge_neg)  # the same split every time


def test_a_task_trains_its_judge_and_reports_it_in_the_evaluations(tmp_path, model_path, monkeypatch):
    data = write_reviews(tmp_path / "r.csv")
    task = parse_task(judged_task(data, model_path, share=0.3, test_size=0.25))
    out = tmp_path / "run"
    fitted_on = []
    fit = BagOfWordsJudge.fit.__func__

    sides = []  # (positives, negatives) of each fit

    def recording_fit(cls, positives, negatives, *args, **kwargs):
        fitted_on.append(positives + negatives)
        sides.append((positives, negatives))
        return fit(cls, positives, negatives, *args, **kwargs)

    monkeypatch.setattr(BagOfWordsJudge, "fit", classmethod(recording_fit))
    results = run_task(task, str(out), progress_bar=False)
    judge = results["judge"]
    assert judge["accuracy"] > 0.9 and judge["n_train"] == 2 * 27 and judge["n_test"] == 2 * 9  # 36 of 120 aside
    _, (aside_pos, aside_neg), _ = labelled_halves(task.reward.train, 0.3, seed=0)
    assert len(fitted_on) == 1 and set(fitted_on[0]) < set(aside_pos + aside_neg)  # the set-aside texts only
    assert BagOfWordsJudge.load(str(out / "judge")).accuracy(reviews(50, POSITIVE, 5), reviews(50, NEGATIVE, 6)) > 0.9
    for policy in ("initial", "trained"):
        assert 0 <= results[policy]["judge_positive_share"] <= 1
        assert results[policy]["reference_perplexity"] > 1 and 0 < results[policy]["distinct_2"] <= 1
    report = (out / "report.md").read_text()
    assert "second judge: positive" in report and "distinct-2" in report
    # evaluation.every: held-out evaluations during training, in TensorBoard
    events = EventAccumulator(glob.glob(str(out / "tensorboard" / "judged_1" / "events.*"))[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/distinct_2", "eval/judge_positive_share", "eval/reference_perplexity", "eval/score"} <= tags
    # the trained policy's point is written: the final report's evaluation (same prompts, same seed)
    assert events.Scalars("eval/score")[-1].value == pytest.approx(results["trained"]["score"], rel=1e-5)
    assert events.Scalars("eval/score")[0].value == pytest.approx(results["initial"]["score"], rel=1e-5)
    assert results["trained"]["score"] != results["initial"]["score"]  # it trained: the two points differ
    # resuming or re-evaluating reuses the saved judge, with its metrics
    prepared, _ = prepare(task, str(out), train_reward_model=False)
    assert prepared.judge is not None and prepared.judge_metrics == judge and len(fitted_on) == 1
    # other judge settings: fitted again on the same texts; another share: the reward model's texts would overlap
    prepared, _ = prepare(parse_task(judged_task(data, model_path, share=0.3, test_size=0.25, C=0.5)), str(out), False)
    assert len(fitted_on) == 2 and prepared.judge_metrics["C"] == 0.5 and fitted_on[1] == fitted_on[0]
    # window_words: fitted on consecutive 4-word windows of the same training texts (a tail under 2 words joins the
    # window before it), as many of each label, instead of on whole texts
    prepared, _ = prepare(
        parse_task(judged_task(data, model_path, share=0.3, test_size=0.25, window_words=4)), str(out), False
    )
    assert len(fitted_on) == 3 and prepared.judge_metrics["window_words"] == 4
    (window_pos, window_neg), (text_pos, text_neg) = sides[2], sides[0]
    assert len(window_pos) == len(window_neg) == prepared.judge_metrics["n_train_windows"] / 2
    for windows, texts in ((window_pos, text_pos), (window_neg, text_neg)):
        assert len(windows) > len(texts) and all(2 <= len(w.split()) <= 5 for w in windows)
        assert all(any(w in " ".join(t.split()) for t in texts) for w in windows)  # cut from the texts of its label
    with pytest.raises(ValueError, match="the judge's texts would overlap its own"):
        prepare(parse_task(judged_task(data, model_path, share=0.5)), str(out), False)


def test_judge_windows_and_balance():
    from sb3_rlhf.tasks.stages import _balanced, _windows

    # consecutive windows; a tail under half a window joins the one before; an empty text gives none
    assert _windows(["a b c d e f g h i", "", "x y"], 4) == ["a b c d", "e f g h i", "x y"]
    assert _windows(["a b c d e f"], 4) == ["a b c d", "e f"]
    positives, negatives = _balanced(list("abcdefg"), list("xyz"), seed=0)
    assert negatives == list("xyz") and len(positives) == 3 and positives == sorted(positives)
    assert set(positives) < set("abcdefg") and _balanced(list("abcdefg"), list("xyz"), seed=0)[0] == positives


def test_a_judge_needs_labelled_reward_data():
    data = judged_task("r.csv", "unused", share=0.5)
    data["reward"]["train"]["format"] = "pairs"
    with pytest.raises(ValueError, match=r"\[judge\] is trained on a share of \[reward.train\]'s labelled texts"):
        parse_task(data)
    data = judged_task("r.csv", "unused", share=1.5)
    with pytest.raises(ValueError, match=r"judge.share must be > 0 and < 1, got 1.5"):
        parse_task(data)
    with pytest.raises(ValueError, match="judge.window_words must be >= 0"):
        parse_task(judged_task("r.csv", "unused", window_words=-1))
    data = judged_task("r.csv", "unused")
    data["evaluation"]["every"] = 0
    with pytest.raises(ValueError, match="evaluation.every must be >= 1, got 0"):
        parse_task(data)


def test_evaluation_reports_quality_and_reference_perplexity_at_temperature_one(tokenizer, model_path):
    stops = [i for i in tokenizer.convert_tokens_to_ids(list(tokenizer.get_vocab())[:8]) if i != tokenizer.pad_token_id]
    env = RewardFunctionWrapper(
        TokenGenerationEnv(["the cat", "a dog", "it was"], tokenizer, 4, 6, stop_token_ids=stops), fn=share_of_good
    )
    policy = make_policy(env.unwrapped, model_path, temperature=0.7)
    reference = policy.make_reference_model()
    judge = BagOfWordsJudge.fit(["good happy", "good cat"], ["bad sad", "bad dog"], min_count=1)
    metrics, texts, scores = evaluate_policy(
        policy, reference, env.unwrapped, [env], seed=3, samples_per_prompt=4, judge=judge
    )
    assert {k: metrics[k] for k in text_quality(texts)} == text_quality(texts)
    assert len(scores) == len(texts) == 12 and np.mean(scores) == pytest.approx(metrics["score"])
    # prompt by prompt (each prompt's 4 samples together), each its response's score
    assert scores == pytest.approx(share_of_good([], texts))
    assert metrics["judge_positive_share"] == judge.positive_share(texts)
    # the perplexity is the reference's own (temperature 1), over every real response token: recomputed here
    th.manual_seed(3)
    indices = np.repeat(np.arange(3), 4)
    batch = RolloutEngine().sample_episodes(policy, env.unwrapped, list(indices), with_values=False)[0]
    assert batch.completions == texts and (batch.lengths < 6).any()  # padding after a stop is left out
    with th.no_grad():
        ref = response_logprobs(
            reference, batch.input_ids, batch.attention_mask, batch.response_length, 1.0, policy.n_actions
        )
    expected = math.exp(-float(zero_padding(ref, batch.response_mask).sum()) / int(batch.response_mask.sum()))
    assert metrics["reference_perplexity"] == pytest.approx(expected, rel=1e-5)
    report = report_markdown("t", {"initial": metrics, "trained": metrics, "samples": []}, 3)
    assert f"{metrics['distinct_2']:.3f}" in report and "second judge" in report


def test_the_main_job_has_a_judge_and_evaluates_during_training():
    task = load_task(os.path.join(ROOT, "envs", "imdb_positive.toml"))
    assert task.judge is not None and task.evaluation.every is not None


def test_paired_preference_of_the_trained_responses():
    # differences 1, 0, -1, 1: two wins, one tie (half), one loss
    paired = paired_preference([0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 2.0])
    assert paired["win_rate"] == pytest.approx(2.5 / 4)
    sigmoid = 1 / (1 + math.exp(-1.0))
    assert paired["bradley_terry_preference"] == pytest.approx((2 * sigmoid + 0.5 + (1 - sigmoid)) / 4)
    half_width = 3.182446 * np.std([1.0, 0.0, -1.0, 1.0], ddof=1) / 2  # Student's t, 3 degrees of freedom
    assert paired["mean_difference"] == pytest.approx(0.25)
    assert (paired["ci95_low"], paired["ci95_high"]) == pytest.approx((0.25 - half_width, 0.25 + half_width))
    metrics = {"score": 0.0, "kl": 0.0, "response_length": 4.0, "eos_fraction": 0.0}
    metrics |= {"distinct_1": 1.0, "distinct_2": 1.0, "repeated_2gram_rate": 0.0, "reference_perplexity": 9.0}
    report = report_markdown("t", {"initial": metrics, "trained": metrics, "paired": paired, "samples": []}, 4)
    assert "higher on 62% of them; mean difference +0.2500" in report
    with pytest.raises(ValueError, match="same prompts for both policies"):
        paired_preference([0.0, 1.0, 2.0], [0.0, 1.0])


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706205), (3, 3.182446), (63, 1.998341), (10_000, 1.960201)])
def test_student_t_quantiles_match_the_tables(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=2e-5)
