"""Tiny random models and a word-level tokenizer built in memory: for tests, smoke runs and examples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from sb3_rlhf.common.models import causal_lm_from_config
from sb3_rlhf.common.progress import without_transformers_bars

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
#: the vocabulary of the tiny demo, test and benchmark models
TINY_WORDS = "the a cat dog sat ran on under mat log good bad happy sad big small and then it was".split()


def tiny_prompts(n: int, seed: int = 0, min_words: int = 1, max_words: int = 5) -> list[str]:
    """``n`` prompts of ``min_words`` to ``max_words`` random :data:`TINY_WORDS`, seeded."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(TINY_WORDS, size=rng.integers(min_words, max_words + 1))) for _ in range(n)]


def tiny_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` with ``<pad>`` (id 0), ``<eos>`` (1) and ``<unk>`` (2)."""
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(
    vocab_size: int,
    architecture: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    max_positions: int = 128,
    pad_token_id: int = 0,
    eos_token_id: int = 1,
) -> PretrainedConfig:
    """Config of a small causal LM (``"llama"`` or ``"gpt2"``)."""
    if architecture == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_positions,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=None,
            tie_word_embeddings=True,
        )
    if architecture == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            bos_token_id=eos_token_id,
        )
    raise ValueError(f"architecture must be 'llama' or 'gpt2', got {architecture!r}")


def tiny_causal_lm(vocab_size: int, architecture: str = "llama", seed: int = 0, **config_kwargs) -> PreTrainedModel:
    """A randomly initialised tiny causal LM (deterministic for a seed)."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return causal_lm_from_config(tiny_config(vocab_size, architecture, **config_kwargs))


@without_transformers_bars
def save_tiny_model(
    folder: str, words: Sequence[str], architecture: str = "llama", seed: int = 0, **config_kwargs
) -> PreTrainedTokenizerFast:
    """Save a tiny random causal LM and its word-level tokenizer over ``words`` to ``folder`` (``save_pretrained``
    layout: a model folder like any other); return the tokenizer."""
    tokenizer = tiny_tokenizer(words)
    tiny_causal_lm(len(tokenizer), architecture, seed=seed, **config_kwargs).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer
