import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from sb3_rlhf import TokenGenerationEnv, add_pad_token
from sb3_rlhf.common.tiny import tiny_tokenizer
from sb3_rlhf.envs import ENV_ID
from tests.helpers import WORDS


def test_gymnasium_and_sb3_checkers_pass(env):
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=True)


def test_registered_with_string_entry_point(prompts, tokenizer):
    env = gym.make(ENV_ID, prompts=prompts, tokenizer=tokenizer, max_prompt_tokens=8, max_new_tokens=4)
    obs, _ = env.reset(seed=0)
    assert isinstance(env.unwrapped, TokenGenerationEnv)
    assert env.observation_space.contains(obs)


def test_observation_is_left_padded_window(env, tokenizer):
    obs, info = env.reset(seed=3)
    prompt_ids = env.prompt_token_ids[info["prompt_index"]]
    window = env.max_prompt_tokens + env.max_new_tokens
    assert obs["input_ids"].shape == (window,) and obs["input_ids"].dtype == np.int64
    assert obs["input_ids"][-len(prompt_ids) :].tolist() == prompt_ids
    assert obs["attention_mask"].sum() == len(prompt_ids)
    assert (obs["input_ids"][: window - len(prompt_ids)] == tokenizer.pad_token_id).all()
    token = tokenizer.convert_tokens_to_ids("cat")
    obs, reward, terminated, truncated, info = env.step(token)
    assert obs["input_ids"][-1] == token and obs["input_ids"][-2] == prompt_ids[-1]
    assert obs["attention_mask"].sum() == len(prompt_ids) + 1
    assert (reward, terminated, truncated, info) == (0.0, False, False, {})


def test_eos_terminates_and_max_new_tokens_truncates(env, tokenizer):
    env.reset(seed=0, options={"prompt_index": 2})
    cat = tokenizer.convert_tokens_to_ids("cat")
    env.step(cat)
    _, _, terminated, truncated, info = env.step(tokenizer.eos_token_id)
    assert terminated and not truncated
    assert info["prompt"] == env.prompts[2]
    assert info["completion"] == "cat"
    assert info["completion_ids"] == [cat, tokenizer.eos_token_id]
    assert info["truncated_response"] is False
    with pytest.raises(RuntimeError, match="reset"):
        env.step(cat)

    env.reset(options={"prompt_index": 2})
    for i in range(env.max_new_tokens):
        _, _, terminated, truncated, info = env.step(cat)
        assert terminated is False
        assert truncated == (i == env.max_new_tokens - 1)
    assert info["completion"] == " ".join(["cat"] * env.max_new_tokens)
    assert info["truncated_response"] is True


def test_without_stop_at_eos_responses_run_to_the_limit(prompts, tokenizer, model_path):
    """stop_at_eos=False: EOS is an ordinary token, in env.step and in the batched generation alike."""
    from tests.helpers import generate_batch, make_policy

    env = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=4, stop_at_eos=False)
    assert tokenizer.eos_token_id not in env.stop_token_ids
    env.reset(seed=0)
    for i in range(4):
        _, _, terminated, truncated, _ = env.step(tokenizer.eos_token_id)
        assert not terminated and truncated == (i == 3)
    policy = make_policy(env, model_path, temperature=50.0)  # near-uniform: EOS is drawn now and then
    batch = generate_batch(policy, env, list(range(16)))
    assert (batch.lengths == 4).all() and not batch.terminated.any()
    assert (batch.response_ids == tokenizer.eos_token_id).any()  # drawn, without ending a response


def test_prompts_sampled_with_np_random(env):
    first = [env.reset(seed=7)[1]["prompt_index"]] + [env.reset()[1]["prompt_index"] for _ in range(20)]
    second = [env.reset(seed=7)[1]["prompt_index"]] + [env.reset()[1]["prompt_index"] for _ in range(20)]
    assert first == second
    assert len(set(first)) > 5
    env.reset(seed=11)
    batch_a = env.sample_prompt_indices(16)
    env.reset(seed=11)
    assert (env.sample_prompt_indices(16) == batch_a).all()


def test_prompt_batch_is_left_padded(env, tokenizer):
    ids, mask = env.prompt_batch([0, 1, 2])
    width = max(len(env.prompt_token_ids[i]) for i in range(3))
    assert ids.shape == mask.shape == (3, width)
    for row in range(3):
        tokens = env.prompt_token_ids[row]
        assert ids[row, width - len(tokens) :].tolist() == tokens
        assert mask[row].sum() == len(tokens) and mask[row, -1] == 1


def test_long_prompt_truncated_from_left_with_one_warning(tokenizer):
    long_prompt = " ".join(WORDS[:12])
    with pytest.warns(UserWarning, match="1 of 2 prompts .* truncated from the left") as record:
        env = TokenGenerationEnv([long_prompt, "the cat"], tokenizer, max_prompt_tokens=4, max_new_tokens=2)
    assert len(record) == 1
    assert env.prompt_texts[0] == " ".join(WORDS[8:12])
    assert len(env.prompt_token_ids[0]) == 4


def special_tokens_tokenizer(template: str):
    """The tiny word-level tokenizer with a post-processor that adds ``<bos>`` (and ``<sep>``) as ``template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", "<bos>", "<sep>", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<bos>", 3), ("<sep>", 4)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        bos_token="<bos>",
        sep_token="<sep>",
    )


@pytest.mark.parametrize("template", ["<bos> $A", "<bos> $A <sep>"])
def test_left_truncation_keeps_the_special_tokens_the_tokenizer_adds(template):
    tokenizer = special_tokens_tokenizer(template)
    long_prompt = " ".join(WORDS[:12])
    with pytest.warns(UserWarning, match="1 of 2 prompts"):
        env = TokenGenerationEnv([long_prompt, "the cat"], tokenizer, max_prompt_tokens=5, max_new_tokens=2)
    suffix = [tokenizer.sep_token_id] if "<sep>" in template else []
    words = tokenizer(" ".join(WORDS[12 - 4 + len(suffix) : 12]), add_special_tokens=False)["input_ids"]
    assert env.prompt_token_ids[0] == [tokenizer.bos_token_id, *words, *suffix]
    assert env.prompt_token_ids[1] == tokenizer("the cat")["input_ids"]  # a short prompt is untouched
    assert env.prompt_texts[0] == " ".join(WORDS[12 - 4 + len(suffix) : 12])
    obs, _ = env.reset(options={"prompt_index": 0})
    assert obs["input_ids"][-5:].tolist() == env.prompt_token_ids[0]
    # without the tokenizer's special tokens, the cut is the plain last max_prompt_tokens tokens
    with pytest.warns(UserWarning, match="1 of 1 prompts"):
        plain = TokenGenerationEnv([long_prompt], tokenizer, 5, 2, add_special_tokens=False)
    assert plain.prompt_token_ids[0] == tokenizer(" ".join(WORDS[7:12]), add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="leaves no room for prompt text besides the .* special tokens"):
        TokenGenerationEnv([long_prompt], tokenizer, max_prompt_tokens=len(suffix) + 1, max_new_tokens=2)


def test_render_ansi(prompts, tokenizer):
    env = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=4, render_mode="ansi")
    env.reset(options={"prompt_index": 0})
    env.step(tokenizer.convert_tokens_to_ids("dog"))
    assert env.render() == env.prompts[0] + "dog"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(prompts=[]), ValueError, "prompts is empty"),
        (dict(prompts="the cat"), TypeError, "list of strings"),
        (dict(prompts=["the cat", "  "]), ValueError, r"index \[1\]"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive integer"),
        (dict(tokenizer="/no/such/tokenizer"), FileNotFoundError, "does not exist"),
        (dict(tokenizer=object()), TypeError, "Hugging Face tokenizer"),
    ],
)
def test_bad_arguments_get_clear_errors(tokenizer, kwargs, error, match):
    arguments = dict(prompts=["the cat"], tokenizer=tokenizer, max_prompt_tokens=8, max_new_tokens=4) | kwargs
    with pytest.raises(error, match=match):
        TokenGenerationEnv(**arguments)


def test_tokenizer_without_pad_or_with_pad_equal_eos_is_refused_and_fixable():
    tokenizer = tiny_tokenizer(WORDS)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token.*add_pad_token"):
        TokenGenerationEnv(["the cat"], tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    with pytest.raises(ValueError, match="pad token equals its EOS token"):
        TokenGenerationEnv(["the cat"], tokenizer)
    from sb3_rlhf.common.tiny import tiny_causal_lm

    model = tiny_causal_lm(len(tokenizer))
    pad_id = add_pad_token(tokenizer, model)
    assert pad_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    env = TokenGenerationEnv(["the cat"], tokenizer)
    assert env.pad_token_id == pad_id


def test_out_of_vocabulary_action_and_step_before_reset(env):
    with pytest.raises(RuntimeError, match="reset"):
        env.step(3)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="token id in"):
        env.step(env.n_actions)
    with pytest.raises(ValueError, match="token id in"):
        env.step(-1)
    with pytest.raises(IndexError, match="out of range"):
        env.reset(options={"prompt_index": 10_000})
