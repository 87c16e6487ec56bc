import copy
import os

import pytest
import torch as th
from transformers import AutoModelForCausalLM

from sb3_rlhf import RLHFPPO, TokenGenerationEnv
from sb3_rlhf.common.data import Demonstration
from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer
from sb3_rlhf.rewards import RewardFunctionWrapper
from sb3_rlhf.sft import SFTTrainer
from sb3_rlhf.sft.trainer import IGNORE_INDEX
from tests.helpers import WORDS, share_of_good, toy_demos

TEMPLATE = (
    "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}assistant{% endif %}"
)


def test_loss_only_on_response_tokens(tokenizer, model_path):
    trainer = SFTTrainer(model_path, None, toy_demos(4), learning_rate=1e-3)
    input_ids, labels = trainer.encode(Demonstration("the cat sat", "dog good"))
    assert input_ids == tokenizer("the cat sat dog good")["input_ids"] + [tokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX] * 3 + tokenizer("dog good")["input_ids"] + [tokenizer.eos_token_id]
    # changing the prompt's labels cannot change the loss: it is computed on response tokens only
    batch = trainer._collate([trainer.encode(d) for d in toy_demos(4)])
    loss, _, _ = trainer.training_loss([trainer.encode(d) for d in toy_demos(4)])
    nll, n_tokens = trainer._nll(*batch)
    assert n_tokens == 4 * 2 + 4  # two response words and EOS per demonstration (the first word is the prompt's)
    assert loss.item() == pytest.approx(nll.item() / n_tokens)


def test_truncation_keeps_the_response(model_path):
    trainer = SFTTrainer(model_path, None, toy_demos(2), max_length=5)
    input_ids, labels = trainer.encode(Demonstration("a b c d e f", "dog good"))
    assert len(input_ids) == 5
    assert labels[-3:] != [IGNORE_INDEX] * 3 and labels[:2] == [IGNORE_INDEX] * 2


def test_chat_template_is_applied_when_present(model_path):
    tokenizer = tiny_tokenizer(WORDS + ["user", "assistant"])
    tokenizer.chat_template = TEMPLATE
    model = tiny_causal_lm(len(tokenizer))
    trainer = SFTTrainer(model, tokenizer, toy_demos(2))
    input_ids, labels = trainer.encode(Demonstration("the cat", "dog"))
    expected_prompt = tokenizer("user the cat assistant")["input_ids"]
    assert input_ids[: len(expected_prompt)] == expected_prompt
    assert labels.count(IGNORE_INDEX) == len(expected_prompt)
    plain = SFTTrainer(model, tokenizer, toy_demos(2), chat_template=False)
    assert plain.encode(Demonstration("the cat", "dog"))[0][:2] == tokenizer("the cat")["input_ids"]
    no_template = tiny_tokenizer(WORDS)
    with pytest.raises(ValueError, match="no chat template"):
        SFTTrainer(model, no_template, toy_demos(2), chat_template=True)


def test_perplexity_falls_checkpoints_and_export(model_path, tmp_path, tokenizer):
    trainer = SFTTrainer(
        model_path,
        None,
        toy_demos(200),
        toy_demos(40, seed=1),
        learning_rate=3e-3,
        batch_size=16,
        n_epochs=3,
        checkpoint_dir=str(tmp_path / "ckpt"),
        keep_checkpoints=2,
        tensorboard_log=str(tmp_path / "tb"),
    )
    before = trainer.evaluate()["perplexity"]
    trainer.learn()
    after = trainer.evaluate()["perplexity"]
    assert before > len(tokenizer) / 2  # a random model is about uniform over the vocabulary
    assert after < before / 4
    checkpoints = sorted(os.listdir(tmp_path / "ckpt"))
    assert len(checkpoints) == 2 and all(c.startswith("checkpoint-") for c in checkpoints)
    assert os.listdir(tmp_path / "tb")
    trainer.save(str(tmp_path / "sft"))
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    for name, tensor in exported.state_dict().items():
        assert th.equal(tensor, trainer.model.state_dict()[name]), name
    reloaded = SFTTrainer.load(str(tmp_path / "sft"), toy_demos(4), eval_demos=toy_demos(40, seed=1))
    assert reloaded.evaluate()["perplexity"] == pytest.approx(after, rel=1e-5)
    # the SFT model is the policy of the next stage
    env = RewardFunctionWrapper(
        TokenGenerationEnv(["the cat sat"], str(tmp_path / "sft"), max_new_tokens=4), fn=share_of_good
    )
    model = RLHFPPO(
        "TransformerActorCriticPolicy",
        env,
        n_episodes=4,
        batch_size=2,
        policy_kwargs=dict(model_name_or_path=str(tmp_path / "sft")),
    )
    model.learn(total_timesteps=8)


def test_sft_bad_input(model_path, tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        SFTTrainer(model_path, no_pad, toy_demos(2))
    with pytest.raises(ValueError, match="train_demos is empty"):
        SFTTrainer(model_path, None, [])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SFTTrainer("/no/such/model", tokenizer, toy_demos(2))
