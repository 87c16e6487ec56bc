import math

import numpy as np
import pytest
import torch as th
from transformers import BertConfig, BertForSequenceClassification

from sb3_rlhf.common.kl_controllers import AdaptiveKLController, FixedKLController
from sb3_rlhf.common.tiny import tiny_config, tiny_tokenizer
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper, RewardModelWrapper, kl_estimate, reward_wrappers
from tests.helpers import (
    WORDS,
    build_hub_cache,
    generate_batch,
    make_policy,
    replay_through_step,
    share_of_good,
    tiny_classifier,
    tiny_reward_model,
)


def test_function_wrapper_step_and_batch_agree(env, tokenizer, model_path):
    wrapped = RewardFunctionWrapper(env, fn=share_of_good)
    policy = make_policy(env, model_path)
    batch = generate_batch(policy, wrapped, list(range(12)))
    batch_rewards = wrapped.batch_rewards(batch).numpy()
    step_rewards, infos = replay_through_step(wrapped, batch)
    np.testing.assert_allclose(step_rewards, batch_rewards, atol=1e-6)
    expected = share_of_good(batch.prompts, batch.completions)
    np.testing.assert_allclose(batch_rewards.sum(-1), expected, atol=1e-6)
    # the score sits on the last real token only
    last = batch.lengths - 1
    assert (np.count_nonzero(batch_rewards, axis=1) <= 1).all()
    for row, (score, info) in enumerate(zip(expected, infos)):
        assert batch_rewards[row, last[row]] == pytest.approx(score)
        assert info["reward_terms"]["reward_fn"] == pytest.approx(score)


def test_reward_model_with_own_tokenizer_step_and_batch_agree(env, model_path):
    reward_tokenizer = tiny_tokenizer(list(reversed(WORDS)))  # a different vocabulary: the text path
    reward_model = tiny_reward_model(len(reward_tokenizer))
    wrapped = RewardModelWrapper(env, reward_model, reward_tokenizer=reward_tokenizer, batch_size=5)
    policy = make_policy(env, model_path)
    batch = generate_batch(policy, wrapped, list(range(12)))
    batch_rewards = wrapped.batch_rewards(batch).numpy()
    step_rewards, _ = replay_through_step(wrapped, batch)
    np.testing.assert_allclose(step_rewards, batch_rewards, atol=1e-5)
    # the same numbers as scoring each decoded text on its own
    for row, text in enumerate(batch.texts):
        inputs = reward_tokenizer(text, return_tensors="pt")
        with th.no_grad():
            expected = reward_model(**inputs).logits[0, 0].item()
        assert batch_rewards[row].sum() == pytest.approx(expected, abs=1e-5)


def test_reward_model_sharing_policy_token_ids(env, tokenizer, model_path, tmp_path):
    reward_model = tiny_reward_model(len(tokenizer))
    wrapped = RewardModelWrapper(env, reward_model)  # no reward tokenizer: reads the policy's ids
    policy = make_policy(env, model_path)
    batch = generate_batch(policy, wrapped, list(range(10)))
    batch_rewards = wrapped.batch_rewards(batch).numpy()
    step_rewards, _ = replay_through_step(wrapped, batch)
    np.testing.assert_allclose(step_rewards, batch_rewards, atol=1e-5)
    for row in range(batch.batch_size):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].unsqueeze(0)
        with th.no_grad():
            expected = reward_model(input_ids=ids).logits[0, 0].item()
        assert batch_rewards[row].sum() == pytest.approx(expected, abs=1e-5)
    # by path, with its tokenizer found beside it: the text path, same scores as the model object with that tokenizer
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    by_path = RewardModelWrapper(env, str(tmp_path / "rm"))
    assert by_path.reward_tokenizer is not None
    text_path = RewardModelWrapper(env, reward_model, reward_tokenizer=tokenizer)
    np.testing.assert_allclose(by_path.batch_rewards(batch).numpy(), text_path.batch_rewards(batch).numpy(), atol=1e-6)


def test_decoder_classifier_with_its_own_pad_id_reads_the_last_real_token(env, tokenizer, model_path):
    from transformers import LlamaForSequenceClassification

    # a decoder classifier whose config names a pad id the policy never uses (one past the policy's vocabulary)
    foreign_pad = len(tokenizer) + 2
    config = tiny_config(len(tokenizer) + 3, "llama", pad_token_id=foreign_pad)
    config.num_labels = 1
    th.manual_seed(0)
    reward_model = LlamaForSequenceClassification(config).eval()
    wrapped = RewardModelWrapper(env, reward_model)  # shared token ids
    policy = make_policy(env, model_path)
    batch = generate_batch(policy, wrapped, list(range(10)))
    assert len(set(batch.lengths.tolist())) > 1  # responses of several lengths: the batch has padding
    scores = wrapped.score(batch)
    for row in range(batch.batch_size):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].unsqueeze(0)  # this episode alone, unpadded
        with th.no_grad():
            expected = reward_model(input_ids=ids).logits[0, 0].item()
        assert scores[row].item() == pytest.approx(expected, abs=1e-5), row
    assert reward_model.config.pad_token_id == foreign_pad  # the user's model is as it was outside scoring


@pytest.fixture
def sentiment_folder(tmp_path, tokenizer) -> str:
    folder = tmp_path / "sentiment"
    tiny_classifier(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_classifier_label_scores_equal_hand_computed_values(env, tokenizer, model_path, sentiment_folder):
    classifier = tiny_classifier(len(tokenizer))  # the same seed: the folder's weights
    batch = generate_batch(make_policy(env, model_path), env, list(range(10)))
    with th.no_grad():
        z = [classifier(**tokenizer(text, return_tensors="pt")).logits[0].tolist() for text in batch.texts]
    z_neg, z_pos = np.array(z).T
    expected = {
        "logit": z_pos,
        "probability": np.exp(z_pos) / (np.exp(z_neg) + np.exp(z_pos)),
        "logit_margin": z_pos - z_neg,
    }
    got = {}
    for score, values in expected.items():
        wrapped = RewardModelWrapper(env, sentiment_folder, label="POSITIVE", score=score)
        got[score] = wrapped.batch_rewards(batch).sum(-1).numpy()
        np.testing.assert_allclose(got[score], values, atol=1e-5, err_msg=score)
    assert ((got["probability"] > 0) & (got["probability"] < 1)).all()
    assert np.abs(got["logit_margin"] - got["logit"]).max() > 1e-3  # the modes differ
    # by index and case-insensitively: the same label; the other label's margin is the opposite
    margin = {
        label: RewardModelWrapper(env, classifier, reward_tokenizer=tokenizer, label=label, score="logit_margin")
        for label in (1, "positive", "NEGATIVE")
    }
    assert [w.label_index for w in margin.values()] == [1, 1, 0]
    for label, sign in ((1, 1.0), ("positive", 1.0), ("NEGATIVE", -1.0)):
        np.testing.assert_allclose(
            margin[label].batch_rewards(batch).sum(-1).numpy(), sign * (z_pos - z_neg), atol=1e-5
        )


def test_logit_margin_is_the_log_odds_of_the_label(env, tokenizer):
    logits = th.tensor([[0.3, -1.2, 2.0], [5.0, 4.0, -3.0]])
    three = tiny_classifier(len(tokenizer), {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"})
    wrapped = RewardModelWrapper(env, three, reward_tokenizer=tokenizer, label="NEUTRAL", score="logit_margin")
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(-1, keepdims=True)
    np.testing.assert_allclose(wrapped.label_score(logits).numpy(), np.log(p[:, 1] / (1 - p[:, 1])), rtol=1e-5)
    # a multi-label classifier (e.g. toxicity): each label is its own sigmoid, independent of the others
    multi = tiny_classifier(len(tokenizer), {0: "toxic", 1: "insult"}, problem_type="multi_label_classification")
    wrapped = RewardModelWrapper(env, multi, reward_tokenizer=tokenizer, label="toxic", score="probability")
    np.testing.assert_allclose(wrapped.label_score(logits[:, :2]).numpy(), 1 / (1 + np.exp(-logits[:, 0].numpy())))


def test_classifier_label_errors_name_the_labels(env, tokenizer):
    classifier = tiny_classifier(len(tokenizer))
    with pytest.raises(ValueError, match=r"classifier with 2 labels \['NEGATIVE', 'POSITIVE'\]: pass label="):
        RewardModelWrapper(env, classifier, reward_tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"has labels \['NEGATIVE', 'POSITIVE'\]; label 'JOY' is not one of them"):
        RewardModelWrapper(env, classifier, reward_tokenizer=tokenizer, label="JOY")
    with pytest.raises(ValueError, match=r"label index 2 is out of range: .* 2 labels"):
        RewardModelWrapper(env, classifier, reward_tokenizer=tokenizer, label=2)
    with pytest.raises(ValueError, match="score must be one of"):
        RewardModelWrapper(env, classifier, reward_tokenizer=tokenizer, label=1, score="prob")
    with pytest.raises(ValueError, match="revision='main' applies to a reward model given by hub id"):
        RewardModelWrapper(env, classifier, reward_tokenizer=tokenizer, label=1, revision="main")
    with pytest.raises(ValueError, match=r"one score \(num_labels=1\): leave label unset"):
        RewardModelWrapper(env, tiny_reward_model(len(tokenizer)), label="POSITIVE")
    assert RewardModelWrapper(env, tiny_reward_model(len(tokenizer)), label=0).label_index == 0
    twins = tiny_classifier(len(tokenizer), {0: "pos", 1: "Pos"})
    with pytest.raises(ValueError, match=r"label 'POS' matches \['pos', 'Pos'\] only up to case"):
        RewardModelWrapper(env, twins, reward_tokenizer=tokenizer, label="POS")
    assert RewardModelWrapper(env, twins, reward_tokenizer=tokenizer, label="Pos").label_index == 1  # exact first


def test_hub_sentiment_classifier_by_id_offline(env, model_path, sentiment_folder, tmp_path, monkeypatch):
    import huggingface_hub

    home = tmp_path / "hf_home"
    commit = build_hub_cache(home, "org/tiny-sentiment", sentiment_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    by_id = RewardModelWrapper(env, "org/tiny-sentiment", label="POSITIVE", score="logit_margin")
    assert by_id.reward_tokenizer is not None  # found in the snapshot, beside the weights
    pinned = RewardModelWrapper(env, "org/tiny-sentiment", label="POSITIVE", score="logit_margin", revision=commit)
    by_folder = RewardModelWrapper(env, sentiment_folder, label="POSITIVE", score="logit_margin")
    batch = generate_batch(make_policy(env, model_path), env, list(range(6)))
    expected = by_folder.batch_rewards(batch).numpy()
    np.testing.assert_allclose(by_id.batch_rewards(batch).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(pinned.batch_rewards(batch).numpy(), expected, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="at revision 'v9'"):
        RewardModelWrapper(env, "org/tiny-sentiment", label="POSITIVE", revision="v9")


def test_kl_wrapper_step_and_batch_agree_and_start_at_zero(env, gpt2_path, tokenizer):
    policy = make_policy(env, gpt2_path, temperature=0.7)
    wrapped = KLPenaltyWrapper(env, coef=0.3, policy=policy)
    batch = generate_batch(policy, wrapped, list(range(12)))
    rewards = wrapped.batch_rewards(batch)
    # the reference is the initial policy: KL is exactly 0 before training
    assert rewards.abs().max().item() < 1e-6
    with th.no_grad():
        for p in policy.actor.parameters():
            p.add_(0.05 * th.randn_like(p))
    batch = generate_batch(policy, wrapped, list(range(12)), seed=1)
    batch_rewards = wrapped.batch_rewards(batch).numpy()
    assert np.abs(batch_rewards).max() > 1e-3
    step_rewards, infos = replay_through_step(wrapped, batch)
    np.testing.assert_allclose(step_rewards, batch_rewards, atol=1e-4)
    assert (batch_rewards[~batch.response_mask.numpy()] == 0).all()
    assert "kl_penalty" in infos[0]["reward_terms"]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("garbage", [(-1e4, 1e4), (float("nan"), 0.0)])
def test_batch_kl_is_finite_and_unchanged_by_garbage_at_padding(env, model_path, estimator, garbage):
    import dataclasses

    policy = make_policy(env, model_path)
    wrapped = KLPenaltyWrapper(env, coef=0.1, estimator=estimator, policy=policy)
    batch = generate_batch(policy, wrapped, list(range(12)))
    padding = ~batch.response_mask
    assert padding.any()
    ref = wrapped.reference_logprobs(batch) - 0.1 * batch.response_mask  # a reference a little away from π
    clean = wrapped.batch_kl(batch, ref)
    # where there is no token: a log-ratio log π_ref − log π of 2e4 (k3's exp overflows), or NaN
    policy_pad, ref_pad = garbage
    dirty_batch = dataclasses.replace(batch, logprobs=th.where(padding, th.tensor(policy_pad), batch.logprobs))
    dirty = wrapped.batch_kl(dirty_batch, th.where(padding, th.tensor(ref_pad), ref))
    assert th.isfinite(dirty).all() and (dirty[padding] == 0).all()
    th.testing.assert_close(dirty, clean)
    assert clean.abs().sum() > 0


def test_kl_reference_by_path(env, model_path):
    policy = make_policy(env, model_path)
    wrapped = KLPenaltyWrapper(env, coef=1.0, ref_model=model_path, policy=policy)
    assert wrapped.ref_model is not policy.actor and not any(p.requires_grad for p in wrapped.ref_model.parameters())
    batch = generate_batch(policy, wrapped, list(range(6)))
    assert wrapped.batch_rewards(batch).abs().max().item() < 1e-6


def test_wrappers_stack_and_terms_add_up(env, model_path):
    stacked = KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), coef=0.1)
    policy = make_policy(env, model_path)
    stacked.bind(policy)
    with th.no_grad():
        for p in policy.actor.parameters():
            p.add_(0.05 * th.randn_like(p))
    names = [w.name for w in reward_wrappers(stacked)]
    assert names == ["kl_penalty", "reward_fn"]
    batch = generate_batch(policy, stacked, list(range(8)))
    total = sum(w.batch_rewards(batch) for w in reward_wrappers(stacked)).numpy()
    step_rewards, infos = replay_through_step(stacked, batch)
    np.testing.assert_allclose(step_rewards, total, atol=1e-4)
    assert set(infos[0]["reward_terms"]) == {"kl_penalty", "reward_fn"}


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda p, c: [0.0] * (len(c) + 1), "returned 4 value"),
        (lambda p, c: [float("nan")] * len(c), "non-finite"),
        (lambda p, c: "good", "list of floats|one float per completion"),
    ],
)
def test_bad_reward_function_output(env, model_path, fn, match):
    wrapped = RewardFunctionWrapper(env, fn=fn)
    batch = generate_batch(make_policy(env, model_path), wrapped, [0, 1, 2])
    with pytest.raises((ValueError, TypeError), match=match):
        wrapped.batch_rewards(batch)


def test_reward_wrapper_errors(env, tokenizer, model_path):
    with pytest.raises(TypeError, match="callable"):
        RewardFunctionWrapper(env, fn=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardModelWrapper(env, "/no/such/reward_model")
    two_labels = BertForSequenceClassification(
        BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_labels=2)
    )
    with pytest.raises(ValueError, match="2 labels .*pass label="):
        RewardModelWrapper(env, two_labels)
    with pytest.raises(ValueError, match="vocabulary .* smaller"):
        RewardModelWrapper(env, tiny_reward_model(5))
    on_meta = RewardModelWrapper(env, tiny_reward_model(len(tokenizer)).to("meta"))
    with pytest.raises(ValueError, match="reward model is on meta but the policy runs on cpu"):
        on_meta.bind(make_policy(env, model_path))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        KLPenaltyWrapper(env, estimator="k4")
    with pytest.raises(RuntimeError, match="no policy"):
        unbound = KLPenaltyWrapper(env)
        unbound.reset(seed=0)
        unbound.step(3)


def test_kl_estimators():
    logp = th.tensor([-1.0, -2.0, -0.5])
    ref = th.tensor([-1.5, -1.0, -0.5])
    log_r = ref - logp
    th.testing.assert_close(kl_estimate(logp, ref, "k1"), -log_r)
    th.testing.assert_close(kl_estimate(logp, ref, "k2"), 0.5 * log_r**2)
    th.testing.assert_close(kl_estimate(logp, ref, "k3"), th.exp(log_r) - 1 - log_r)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()


def test_adaptive_kl_controller_follows_ziegler():
    controller = AdaptiveKLController(coef=0.1, target=6.0, horizon=1000)
    controller.update(current_kl=9.0, n_steps=100)  # error = clip(9/6 - 1) = 0.2 (clipped from 0.5)
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    controller.update(current_kl=5.4, n_steps=100)  # error = -0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05


def test_adaptive_kl_controller_proportional_term():
    controller = AdaptiveKLController(coef=0.1, target=6.0, horizon=1000, proportional_gain=2.0)
    controller.update(current_kl=9.0, n_steps=100)  # e = 0.5: the integral as Ziegler's, then × exp(2 · 0.5)
    integral = 0.1 * (1 + 0.2 * 100 / 1000)
    assert (controller.integral, controller.value) == pytest.approx((integral, integral * math.exp(1.0)))
    controller.update(current_kl=30.0, n_steps=100)  # e = 4, the proportional term clipped at 1
    integral *= 1 + 0.2 * 100 / 1000
    assert controller.value == pytest.approx(integral * math.exp(2.0))
    controller.update(current_kl=0.0, n_steps=100)  # e = -1
    integral *= 1 - 0.2 * 100 / 1000
    assert controller.value == pytest.approx(integral * math.exp(-2.0))
    # a checkpoint restores both; one written before the proportional term holds β alone
    restored = AdaptiveKLController(coef=1.0, target=6.0, horizon=1000, proportional_gain=2.0)
    restored.load_state_dict(controller.state_dict())
    assert (restored.value, restored.integral) == (controller.value, controller.integral)
    restored.load_state_dict({"coef": 0.3})
    assert (restored.value, restored.integral) == (0.3, 0.3)
    with pytest.raises(ValueError, match="proportional_gain"):
        AdaptiveKLController(coef=0.1, target=6.0, horizon=1000, proportional_gain=-1.0)


def test_adaptive_kl_in_wrapper_moves_beta_towards_target(env, model_path):
    policy = make_policy(env, model_path)
    wrapped = KLPenaltyWrapper(env, coef=0.1, target=1e-3, horizon=100, policy=policy)
    with th.no_grad():
        for p in policy.actor.parameters():
            p.add_(0.1 * th.randn_like(p))
    wrapped.on_rollout_start()
    batch = generate_batch(policy, wrapped, list(range(16)))
    wrapped.batch_rewards(batch)
    assert wrapped.rollout_stats()["kl"] > 1e-3
    wrapped.on_rollout_end()
    assert wrapped.coef == pytest.approx(0.1 * (1 + 0.2 * 16 / 100))


def test_tiny_config_gpt2_has_padded_vocab(tokenizer):
    config = tiny_config(len(tokenizer) + 5, "gpt2")
    assert config.vocab_size == len(tokenizer) + 5
