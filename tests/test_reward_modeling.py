import math

import pytest
import torch as th
from transformers import AutoModel, AutoTokenizer, LlamaForSequenceClassification

from sb3_rlhf import TokenGenerationEnv
from sb3_rlhf.common.data import PreferencePair, train_test_split
from sb3_rlhf.common.tiny import tiny_config, tiny_tokenizer
from sb3_rlhf.reward_modeling import RewardModel, RewardModelTrainer, bradley_terry_loss, load_reward_model
from sb3_rlhf.rewards import RewardModelWrapper
from tests.helpers import WORDS, generate_batch, make_policy, tiny_bert, toy_reward_pairs


def test_bradley_terry_loss_against_hand_computation():
    chosen, rejected = th.tensor([1.0, 0.0]), th.tensor([0.0, 2.0])

    def nll(x):
        return -math.log(1 / (1 + math.exp(-x)))

    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((nll(1.0) + nll(-2.0)) / 2)
    margins = th.tensor([0.5, 0.0])
    assert bradley_terry_loss(chosen, rejected, margins).item() == pytest.approx((nll(0.5) + nll(-2.0)) / 2)
    centered = bradley_terry_loss(chosen, rejected, center_coef=0.1).item()
    assert centered == pytest.approx((nll(1.0) + nll(-2.0)) / 2 + 0.1 * (1.0**2 + 2.0**2) / 2)


def test_separable_toy_set_reaches_full_accuracy(tokenizer):
    train, test = train_test_split(toy_reward_pairs(240), 40, seed=0)
    model = RewardModel(tiny_bert(len(tokenizer)))
    assert model.pooling == "mean"
    trainer = RewardModelTrainer(
        model, tokenizer, train, test, learning_rate=3e-3, batch_size=16, n_epochs=4, max_length=32
    )
    before = trainer.evaluate()
    trainer.learn()
    after = trainer.evaluate()
    # a new head scores every text about the same: the loss starts near log 2
    assert before["loss"] > 0.6
    assert after["accuracy"] >= 0.975
    assert after["loss"] < 0.1 and after["margin"] > 2.0


def test_causal_backbone_uses_last_token_and_learns(model_path, tokenizer):
    train, test = train_test_split(toy_reward_pairs(200, seed=1), 40, seed=0)
    trainer = RewardModelTrainer(
        model_path,
        None,
        train,
        test,
        learning_rate=3e-3,
        head_learning_rate=1e-2,
        batch_size=16,
        n_epochs=4,
        max_length=32,
    )
    assert isinstance(trainer.model, RewardModel) and trainer.model.pooling == "last"
    assert len(trainer.parameter_groups()) == 2
    trainer.learn()
    assert trainer.evaluate()["accuracy"] >= 0.9


def test_linear_probe_fits_the_head_on_frozen_features(tokenizer):
    train, test = train_test_split(toy_reward_pairs(120, seed=3), 40, seed=0)
    model = RewardModel(tiny_bert(len(tokenizer), seed=1))
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer = RewardModelTrainer(model, tokenizer, train, test, max_length=32)
    probe = trainer.fit_linear_probe()
    assert probe["train_accuracy"] == 1.0 and probe["l2"] in (1e-4, 1e-3, 1e-2, 1e-1)
    assert trainer.evaluate()["accuracy"] == 1.0
    for name, tensor in model.backbone.state_dict().items():
        assert th.equal(tensor, backbone_before[name]), name
    # the head scores exactly w·(pooled features)
    differences = trainer.pooled_differences(test)
    chosen, rejected = trainer.score_pairs(test)
    th.testing.assert_close(chosen - rejected, differences @ model.head.weight[0].detach(), atol=1e-4, rtol=0)


def test_pooling_reads_only_real_tokens(tokenizer):
    model = RewardModel(tiny_bert(len(tokenizer)), pooling="last").eval()
    ids = th.tensor([[5, 6, 7, 0, 0]])
    padded = model(input_ids=ids, attention_mask=th.tensor([[1, 1, 1, 0, 0]])).logits
    exact = model(input_ids=ids[:, :3], attention_mask=th.ones(1, 3, dtype=th.long)).logits
    th.testing.assert_close(padded, exact, atol=1e-5, rtol=0)
    model.pooling = "mean"
    th.testing.assert_close(
        model(input_ids=ids, attention_mask=th.tensor([[1, 1, 1, 0, 0]])).logits,
        model(input_ids=ids[:, :3]).logits,
        atol=1e-5,
        rtol=0,
    )


def test_save_load_round_trip_and_wrapper_by_path(tokenizer, model_path, tmp_path, prompts):
    pairs = toy_reward_pairs(64)
    trainer = RewardModelTrainer(
        RewardModel(tiny_bert(len(tokenizer))), tokenizer, pairs, learning_rate=1e-3, batch_size=16
    )
    trainer.learn()
    trainer.save(str(tmp_path / "rm"))
    loaded = load_reward_model(str(tmp_path / "rm"))
    assert isinstance(loaded, RewardModel)
    reloaded = RewardModelTrainer.load(str(tmp_path / "rm"), pairs)
    for a, b in zip(trainer.score_pairs(pairs), reloaded.score_pairs(pairs)):
        assert th.equal(a, b)

    # the RL wrapper loads it by path and scores what the trainer scores
    env = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    wrapper = RewardModelWrapper(env, str(tmp_path / "rm"), max_length=trainer.max_length)
    batch = generate_batch(make_policy(env, model_path), wrapper, list(range(6)))
    scores = wrapper.batch_rewards(batch).sum(-1)
    texts = batch.texts
    expected, _ = trainer.score_pairs([PreferencePair("", t, t + " x") for t in texts])
    th.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["reward_model", "sequence_classifier"])
def test_wrapper_cuts_texts_to_the_saved_training_length_unless_told(kind, tokenizer, model_path, tmp_path, prompts):
    if kind == "reward_model":
        model = RewardModel(tiny_bert(len(tokenizer)))
    else:
        config = tiny_config(len(tokenizer))
        config.num_labels = 1
        th.manual_seed(0)
        model = LlamaForSequenceClassification(config)
    # a training length shorter than the episodes (8 prompt + up to 6 response tokens), so that it matters
    trainer = RewardModelTrainer(model, tokenizer, toy_reward_pairs(8), max_length=6, n_epochs=0)
    folder = str(tmp_path / "rm")
    trainer.save(folder)
    env = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=6)
    wrapper = RewardModelWrapper(env, folder)  # max_length not given: the saved one
    assert wrapper.max_length == 6
    batch = generate_batch(make_policy(env, model_path), wrapper, list(range(6)))
    assert max(len(tokenizer(t)["input_ids"]) for t in batch.texts) > 6  # the cut is exercised
    expected, _ = trainer.score_pairs([PreferencePair("", t, t) for t in batch.texts])
    th.testing.assert_close(wrapper.score(batch), expected, atol=1e-5, rtol=0)
    # an explicit max_length wins (a task's [reward] max_length), and cuts differently
    explicit = RewardModelWrapper(env, folder, max_length=14)
    assert explicit.max_length == 14
    assert not th.allclose(explicit.score(batch), expected, atol=1e-4)
    if kind == "reward_model":  # a RewardModel loaded by from_pretrained carries its length as an object too
        loaded = RewardModel.from_pretrained(folder)
        assert loaded.max_length == 6
        assert RewardModelWrapper(env, loaded, reward_tokenizer=tokenizer).max_length == 6
    # a model saved without its training length (its own save_pretrained, not the trainer's save): 512
    foreign = str(tmp_path / "foreign")
    model.save_pretrained(foreign)
    tokenizer.save_pretrained(foreign)
    assert RewardModelWrapper(env, foreign).max_length == 512
    with pytest.raises(ValueError, match="max_length must be a positive number of tokens"):
        RewardModelWrapper(env, folder, max_length=0)


def test_sequence_classifier_as_reward_model(tokenizer):
    config = tiny_config(len(tokenizer))
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    trainer = RewardModelTrainer(
        model, tokenizer, toy_reward_pairs(32), toy_reward_pairs(16, seed=2), learning_rate=1e-3, batch_size=8
    )
    trainer.learn()
    assert set(trainer.evaluate()) == {"accuracy", "loss", "mean", "std", "margin"}


def test_reward_trainer_bad_input(tokenizer):
    no_pad = tiny_tokenizer(WORDS)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        RewardModelTrainer(RewardModel(tiny_bert(len(tokenizer))), no_pad, toy_reward_pairs(4))
    with pytest.raises(ValueError, match="train_pairs is empty"):
        RewardModelTrainer(RewardModel(tiny_bert(len(tokenizer))), tokenizer, [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RewardModelTrainer("/no/such/backbone", tokenizer, toy_reward_pairs(4))
    with pytest.raises(ValueError, match="pooling"):
        RewardModel(tiny_bert(len(tokenizer)), pooling="max")


@pytest.mark.real_model
def test_packaged_minilm_backbone_scores_hh_pairs():
    from sb3_rlhf.common.data import find_data_file, load_preference_pairs
    from sb3_rlhf.common.models import packaged_model_path

    try:
        path = packaged_model_path("all-MiniLM-L6-v2")
    except (ImportError, FileNotFoundError) as missing:
        pytest.skip(str(missing))
    data = find_data_file("hh_harmless_base_test.jsonl.gz")  # shipped with the package
    pairs, _ = load_preference_pairs(data)
    trainer = RewardModelTrainer(path, None, pairs[:8], pairs[8:16], max_length=64)
    assert isinstance(trainer.model, RewardModel) and trainer.model.pooling == "mean"
    trainer.fit_linear_probe()
    # the reported metrics are the model's own: MiniLM's mean-pooled sentence embedding of each text alone (no
    # padding), cut from the left to 64 tokens, through the head
    backbone, backbone_tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    backbone_tokenizer.truncation_side = "left"
    head = trainer.model.head

    @th.no_grad()
    def score(text: str) -> float:
        inputs = backbone_tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
        return head(backbone(**inputs).last_hidden_state.mean(1)).item()

    chosen = th.tensor([score(p.prompt + p.chosen) for p in pairs[8:16]])
    rejected = th.tensor([score(p.prompt + p.rejected) for p in pairs[8:16]])
    assert max(len(backbone_tokenizer(p.prompt + p.chosen)["input_ids"]) for p in pairs[8:16]) > 64  # cut exercised
    metrics = trainer.evaluate()
    assert metrics["accuracy"] == pytest.approx((chosen > rejected).float().mean().item(), abs=1e-6)
    assert metrics["margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-4)
    assert metrics["loss"] == pytest.approx(bradley_terry_loss(chosen, rejected).item(), abs=1e-4)
    assert metrics["std"] == pytest.approx(th.cat([chosen, rejected]).std().item(), abs=1e-4) and metrics["std"] > 0


@pytest.mark.real_model
def test_packaged_minilm_probe_ranks_unseen_words_on_held_out_pairs():
    """A linear probe on MiniLM's frozen features learns "praise over criticism" from some adjectives and ranks
    held-out sentences with other adjectives: the held-out set shares no adjective with the training set, so only
    the backbone's features, pooled and read by the fitted head, can rank it."""
    from sb3_rlhf.common.models import packaged_model_path

    try:
        path = packaged_model_path("all-MiniLM-L6-v2")
    except (ImportError, FileNotFoundError) as missing:
        pytest.skip(str(missing))
    subjects = ["The film", "The movie", "The acting", "The story", "The music", "The ending", "The cast", "The plot"]
    praise = ["wonderful", "brilliant", "delightful", "excellent", "superb", "lovely"]
    criticism = ["awful", "terrible", "dreadful", "horrible", "boring", "dull"]

    def pairs(good: list[str], bad: list[str]) -> list[PreferencePair]:
        return [PreferencePair("", f"{s} was {g}.", f"{s} was {b}.") for s in subjects for g in good for b in bad]

    train, test = pairs(praise[:3], criticism[:3]), pairs(praise[3:], criticism[3:])
    trainer = RewardModelTrainer(path, None, train, test, max_length=32, seed=0)
    probe = trainer.fit_linear_probe()
    after = trainer.evaluate()
    assert probe["train_accuracy"] == 1.0
    # 72 held-out pairs: chance is 0.5 ± 0.06
    assert after["accuracy"] >= 0.95 and after["margin"] > 1.0, after
