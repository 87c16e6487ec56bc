"""DPOTrainer: learns the preferred responses, the reference is right in every mode, save/load, bad input."""

import json
import math
import os

import pytest
import torch as th
from transformers import AutoModelForCausalLM

from sb3_rlhf.common.data import PreferencePair
from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer
from sb3_rlhf.dpo import DPOTrainer
from tests.helpers import WORDS, toy_dpo_pairs


def make(model_path, **kwargs):
    settings = dict(learning_rate=1e-3, batch_size=8, n_epochs=3, beta=0.1, seed=0)
    settings.update(kwargs)
    return DPOTrainer(model_path, None, toy_dpo_pairs(64), toy_dpo_pairs(32, seed=1), **settings)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_learns_to_prefer_the_chosen_responses(model_path, loss_type):
    trainer = make(model_path, loss_type=loss_type)
    before = trainer.evaluate()
    if loss_type == "sigmoid":
        assert before["loss"] == pytest.approx(math.log(2), abs=1e-5)  # π = π_ref at the start: h = 0
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    trainer.learn()
    after = trainer.evaluate()
    assert after["rewards/accuracies"] > 0.9, after
    assert after["rewards/margins"] > 0.02, after
    assert after["loss"] < before["loss"]
    assert after["rewards/chosen"] > 0 > after["rewards/rejected"]


def test_the_reference_is_the_same_in_every_mode(model_path):
    """Precomputed once, a frozen copy, or the adapter-disabled LoRA backbone: the same log π_ref."""
    precomputed = make(model_path)
    copied = make(model_path, precompute_ref_logprobs=False)
    assert copied.ref_model is not None and precomputed.ref_model is None
    lora = make(model_path, precompute_ref_logprobs=False, lora={"r": 4})
    assert lora.ref_model is None  # no second copy of the weights
    pairs = precomputed.train_examples[:8]
    expected = precomputed._reference_logps(pairs)
    stripped = [p._replace(ref_chosen=None, ref_rejected=None) for p in pairs]
    for other in (copied, lora):
        other.learn(n_epochs=1)  # the reference must not move with the policy
        got = other._reference_logps(stripped)
        assert th.allclose(got[0], expected[0], atol=1e-4) and th.allclose(got[1], expected[1], atol=1e-4)
    trainable = {n for n, p in lora.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_save_load_round_trip(model_path, tmp_path):
    trainer = make(model_path, n_epochs=1, lora={"r": 4})
    trainer.learn()
    trainer.save(tmp_path / "dpo")
    with open(tmp_path / "dpo" / "dpo_config.json") as f:
        config = json.load(f)
    assert config["beta"] == 0.1 and config["num_steps"] == trainer.num_steps and config["reference"] == model_path
    # the merged export loads in plain transformers and computes what the trained model computes
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")
    ids = th.tensor([[1, 5, 6, 7]])
    with th.no_grad():
        assert th.allclose(plain(ids).logits, trainer.model(ids).logits, atol=1e-4)
    resumed = DPOTrainer.load(str(tmp_path / "dpo"), toy_dpo_pairs(16), learning_rate=1e-3)
    assert resumed.num_steps == trainer.num_steps and resumed.beta == 0.1
    assert resumed.reference_path == model_path  # the original reference, not the trained model
    resumed.learn(n_epochs=1)
    assert resumed.num_steps > trainer.num_steps
    with pytest.raises(FileNotFoundError, match="dpo_config.json"):
        DPOTrainer.load(model_path, toy_dpo_pairs(4))


def test_bad_input_gets_clear_errors(model_path, tmp_path):
    pairs = toy_dpo_pairs(4)
    with pytest.raises(ValueError, match="train_pairs is empty"):
        DPOTrainer(model_path, None, [])
    for beta in (0.0, -1.0):
        with pytest.raises(ValueError, match="beta must be > 0"):
            DPOTrainer(model_path, None, pairs, beta=beta)
    with pytest.raises(ValueError, match="loss_type"):
        DPOTrainer(model_path, None, pairs, loss_type="hinge2")
    with pytest.raises(TypeError, match="not a PreferencePair"):
        DPOTrainer(model_path, None, [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(ValueError, match=r"train_pairs\[1\] has an empty or missing chosen/rejected"):
        DPOTrainer(model_path, None, [pairs[0], PreferencePair("the", "", "bad")])
    no_pad = tiny_tokenizer(WORDS)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        DPOTrainer(tiny_causal_lm(len(WORDS) + 4, "llama"), no_pad, pairs)
    with pytest.raises(FileNotFoundError):
        DPOTrainer(os.path.join(tmp_path, "missing"), None, pairs)


def test_pairs_from_policy_samples_are_labelled_by_the_reward(tokenizer, model_path):
    from sb3_rlhf import TokenGenerationEnv
    from sb3_rlhf.dpo.sampled_pairs import pairs_from_policy_samples
    from sb3_rlhf.rewards import RewardFunctionWrapper
    from tests.helpers import make_policy, make_prompts, share_of_good

    env = RewardFunctionWrapper(TokenGenerationEnv(make_prompts(10), tokenizer, 8, 6), fn=share_of_good)
    policy = make_policy(env, model_path)
    pairs, counts = pairs_from_policy_samples(policy, env.unwrapped, [env], pairs_per_prompt=8, n_prompts=3)
    assert counts["samples"] == 3 * 8 * 2
    assert counts["pairs"] + counts["ties"] + counts["empty"] == 3 * 8 == len(pairs) + counts["ties"] + counts["empty"]
    assert pairs and {p.prompt for p in pairs} <= set(env.unwrapped.prompt_texts[:3])
    for pair in pairs:  # the chosen response scores higher under the same reward
        chosen, rejected = share_of_good([pair.prompt] * 2, [pair.chosen, pair.rejected])
        assert chosen > rejected
    again, _ = pairs_from_policy_samples(policy, env.unwrapped, [env], pairs_per_prompt=8, n_prompts=3)
    assert again == pairs  # seeded
    with pytest.raises(ValueError, match="n_prompts"):
        pairs_from_policy_samples(policy, env.unwrapped, [env], n_prompts=0)
