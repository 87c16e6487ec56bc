"""Tokenizer checks shared by the env, the policy and the reward wrappers."""

from __future__ import annotations

from typing import Any

import torch as th
from transformers import PreTrainedTokenizerBase

from sb3_rlhf.common.data import prompt_messages

DEFAULT_PAD_TOKEN = "<|pad|>"


def check_vocabulary(model: Any, n_tokens: int, what: str = "the tokenizer") -> None:
    """Refuse a model whose embedding table is smaller than the tokenizer: its ids would index past the end.

    :param model: a transformers model (anything with ``get_input_embeddings``).
    :param n_tokens: ``len(tokenizer)``.
    """
    vocab = model.get_input_embeddings().num_embeddings
    if vocab < n_tokens:
        raise ValueError(
            f"{what} has {n_tokens} tokens but the model's vocabulary has {vocab}: they do not belong together; "
            "use the model's own tokenizer, or resize it with model.resize_token_embeddings(len(tokenizer)) and "
            "save it again"
        )


def check_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    """Refuse a tokenizer that cannot batch episodes: it needs an EOS token and a pad token distinct from EOS.

    Pad must differ from EOS: responses are right-padded after EOS, and a pad equal to EOS would make
    "the model stopped" and "this is padding" the same token.

    :raises TypeError: not a Hugging Face tokenizer.
    :raises ValueError: no EOS, no pad, or pad == EOS, with the fix in the message.
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            f"tokenizer must be a Hugging Face tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}: "
            "load one with transformers.AutoTokenizer.from_pretrained(path)"
        )
    fix = (
        "add a dedicated pad token with sb3_rlhf.add_pad_token(tokenizer, model) "
        "(it resizes the model's embeddings; save both and load the model from the new path)"
    )
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token: set tokenizer.eos_token so episodes can terminate")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer has no pad token: {fix}")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"tokenizer's pad token equals its EOS token ({tokenizer.eos_token!r}, id {tokenizer.eos_token_id}): "
            f"padding would be read as the end of a response; {fix}"
        )
    return tokenizer


#: special tokens that may serve as padding when a tokenizer pads with EOS, in order of preference
SPARE_PAD_TOKENS = ("<|endoftext|>", "<pad>", "[PAD]", "<|pad|>", "<unk>", "[UNK]")


def use_spare_pad_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """When ``tokenizer`` has no pad token or pads with EOS, make one of its own special tokens that is not EOS
    (:data:`SPARE_PAD_TOKENS`, in that order) the pad token: no new token, so no embedding resize.

    :return: the token now used for padding, or ``None`` when nothing changed (a distinct pad already, or no spare).
    """
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id not in (None, tokenizer.eos_token_id):
        return None
    special = set(tokenizer.all_special_tokens)
    for token in SPARE_PAD_TOKENS:
        if token in special and tokenizer.convert_tokens_to_ids(token) != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            return token
    return None


def add_pad_token(tokenizer: PreTrainedTokenizerBase, model: Any = None, pad_token: str = DEFAULT_PAD_TOKEN) -> int:
    """Give ``tokenizer`` a pad token distinct from EOS, resizing ``model``'s embeddings to match.

    :param tokenizer: tokenizer to modify in place.
    :param model: optional ``PreTrainedModel`` whose token embeddings grow to ``len(tokenizer)``.
    :param pad_token: the new pad token's text.
    :return: the pad token id.
    """
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    if model is not None:
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token_id


def encode_keep_end(tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, cut **from the left** to ``max_length``:
    the end of a conversation (the answer being judged) is the part a reward model must see."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def pad_right(rows: list[list[int]], pad_token_id: int, device: th.device | str = "cpu") -> tuple[th.Tensor, th.Tensor]:
    """Right-padded ``input_ids (batch, longest) int64`` and ``attention_mask`` from lists of ids."""
    width = max(len(r) for r in rows)
    input_ids = th.full((len(rows), width), pad_token_id, dtype=th.long)
    attention_mask = th.zeros((len(rows), width), dtype=th.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = th.as_tensor(row, dtype=th.long)
        attention_mask[i, : len(row)] = 1
    return input_ids.to(device), attention_mask.to(device)


#: label of the positions a loss ignores (the prompt, padding), as in transformers
IGNORE_INDEX = -100


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    max_length: int,
    chat_template: bool,
    add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one prompt and response; labels are :data:`IGNORE_INDEX` on the prompt.

    With ``chat_template`` the prompt is a user turn followed by the assistant header (an HH transcript goes in
    as its turns, as the task prompts do, see :func:`~sb3_rlhf.common.data.prompt_messages`). The response (and
    EOS when ``add_eos``) is kept up to ``max_length - 1`` tokens; the prompt is cut from the left to fit.
    """
    if chat_template:
        prompt_ids = tokenizer.apply_chat_template(
            prompt_messages(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos:
        response_ids = response_ids + [tokenizer.eos_token_id]
    response_ids = response_ids[: max_length - 1]
    prompt_ids = list(prompt_ids)[-(max_length - len(response_ids)) :]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def collate_right_padded(
    examples: list[tuple[list[int], list[int]]], pad_token_id: int
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """Right-pad ``(input_ids, labels)`` examples: ``input_ids``, ``attention_mask``, ``labels``, each
    ``(batch, longest)`` int64 (labels :data:`IGNORE_INDEX` on padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = th.full((len(examples), width), pad_token_id, dtype=th.long)
    labels = th.full((len(examples), width), IGNORE_INDEX, dtype=th.long)
    attention_mask = th.zeros((len(examples), width), dtype=th.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = th.as_tensor(ids)
        labels[row, : len(labs)] = th.as_tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask, labels


def labelled_token_logprobs(logits: th.Tensor, labels: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Summed log-probability of the labelled tokens of each row and their count.

    :param logits: ``(batch, L, vocab)`` from a forward over ``input_ids``; token ``t`` is predicted at ``t − 1``.
    :param labels: ``(batch, L)`` int64, :data:`IGNORE_INDEX` where nothing is scored.
    :return: ``(batch,)`` float32 sums and ``(batch,)`` int64 counts.
    """
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    log_probs = th.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logprobs = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logprobs * scored).sum(-1), scored.sum(-1)
