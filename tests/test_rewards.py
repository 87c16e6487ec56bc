import numpy as np
import pytest
import torch as th
from transformers import BertConfig, BertForSequenceClassification

from sb3_rlhf.common.kl_controllers import AdaptiveKLController, FixedKLController
from sb3_rlhf.common.tiny import tiny_config, tiny_tokenizer
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper, RewardModelWrapper, kl_estimate, reward_wrappers
from tests.conftest import WORDS, share_of_good
from tests.helpers import generate_batch, make_policy, replay_through_step


def tiny_reward_model(vocab_size: int, seed: int = 0) -> BertForSequenceClassification:
    th.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    return BertForSequenceClassification(config).eval()


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
    with pytest.raises(ValueError, match="num_labels=1"):
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
