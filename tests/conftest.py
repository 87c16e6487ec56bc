"""Tiny models and tokenizers built in memory; no downloads."""

from __future__ import annotations

import pytest
import torch as th

from sb3_rlhf import TokenGenerationEnv
from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer
from tests.helpers import WORDS, make_prompts


@pytest.fixture(autouse=True)
def _threads() -> None:
    th.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer(WORDS)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory, tokenizer) -> str:
    """A tiny random Llama saved with save_pretrained (safetensors), as a user's local model folder."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_causal_lm(len(tokenizer), "llama", seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def gpt2_path(tmp_path_factory, tokenizer) -> str:
    """A tiny GPT-2 whose vocabulary is larger than the tokenizer (padded vocab) and has dropout."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_causal_lm(len(tokenizer) + 5, "gpt2", seed=1).save_pretrained(path)
    return str(path)


@pytest.fixture
def prompts() -> list[str]:
    return make_prompts()


@pytest.fixture
def env(prompts, tokenizer) -> TokenGenerationEnv:
    return TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=6)
