"""Tensor helpers for batches of token sequences: positions, masks, log-probabilities, masked statistics.

Layout used everywhere in the fast path: ``input_ids = [prompt (left-padded, P) | response (right-padded, T)]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch as th


def position_ids_from_mask(attention_mask: th.Tensor) -> th.Tensor:
    """Position ids that skip padding, so a left-padded prompt starts at position 0.

    :param attention_mask: ``(batch, seq_len)`` 0/1 mask.
    :return: ``(batch, seq_len)`` int64 positions (padding positions get 0).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask_until_stop(response_ids: th.Tensor, stop_token_ids: Sequence[int]) -> tuple[th.Tensor, th.Tensor]:
    """Mask of the real response tokens: everything up to and including the first stop token.

    ``generate`` pads after EOS; the mask is derived from the stop tokens, never from the pad id.

    :param response_ids: ``(batch, T)`` int64 generated tokens.
    :param stop_token_ids: token ids that end an episode (EOS and any extra stop tokens).
    :return: ``(mask (batch, T) bool, terminated (batch,) bool)``; ``terminated`` is True where a stop token was sampled.
    """
    is_stop = th.isin(response_ids, th.as_tensor(list(stop_token_ids), device=response_ids.device))
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()
    mask = stops_before == 0
    terminated = is_stop.any(-1)
    return mask, terminated


def logprobs_of_tokens(logits: th.Tensor, tokens: th.Tensor) -> th.Tensor:
    """log softmax(logits)[token], computed in float32.

    :param logits: ``(..., vocab)`` already temperature-scaled.
    :param tokens: ``(...)`` int64.
    """
    log_probs = th.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: th.Tensor) -> th.Tensor:
    """Entropy H = logsumexp(z) - sum softmax(z) z, per position, in float32. ``(..., vocab) -> (...)``."""
    logits = logits.float()
    probs = th.softmax(logits, dim=-1)
    return th.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


#: the largest float32 ``(batch, positions, vocab)`` block :func:`logprobs_and_entropy` materialises at once (256 MiB)
LOGITS_CHUNK_BYTES = 2**28


def _scaled(logits: th.Tensor, temperature: float) -> th.Tensor:
    logits = logits.float()  # before scaling: bf16 logits divided by a temperature lose the digits PPO's ratio needs
    return logits if temperature == 1.0 else logits / temperature


class _ChunkedLogprobsAndEntropy(th.autograd.Function):
    """log softmax(z / τ)[token] and the entropy of softmax(z / τ), computed ``positions`` at a time in float32
    from the model's logits, in the forward pass and again in the backward pass, which writes each chunk's
    gradient straight into one buffer of the logits' shape and dtype: the memory beyond the model's logits and that
    buffer is a few float32 chunks' worth of temporaries, and nothing of a chunk is kept between the passes.

    With ``z`` the scaled logits, ``p = softmax(z)``, ``lp = z_a − logsumexp(z)`` and ``H = logsumexp(z) − Σ p z``:
    ``∂lp/∂z = onehot(a) − p`` and ``∂H/∂z = −p (z − Σ p z)``; both divided by τ for the model's logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: th.Tensor, tokens: th.Tensor, temperature: float, positions: int, with_entropy: bool
    ) -> tuple[th.Tensor, th.Tensor]:
        logprob_chunks, entropy_chunks = [], []
        for start in range(0, logits.shape[1], positions):
            z = _scaled(logits[:, start : start + positions], temperature)
            logprob_chunks.append(logprobs_of_tokens(z, tokens[:, start : start + positions]))
            if with_entropy:
                entropy_chunks.append(entropy_from_logits(z))
        ctx.save_for_backward(logits, tokens)
        ctx.temperature, ctx.positions = temperature, positions
        ctx.set_materialize_grads(False)  # an output nothing differentiates (the entropy at ent_coef 0) costs nothing
        entropy = th.cat(entropy_chunks, dim=1) if with_entropy else logits.new_zeros(0, dtype=th.float32)
        return th.cat(logprob_chunks, dim=1), entropy

    @staticmethod
    def backward(ctx: Any, grad_logprobs: th.Tensor | None, grad_entropy: th.Tensor | None) -> tuple[Any, ...]:  # type: ignore[override]
        logits, tokens = ctx.saved_tensors
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None
        grad = th.empty_like(logits)
        for start in range(0, logits.shape[1], ctx.positions):
            end = start + ctx.positions
            z = _scaled(logits[:, start:end], ctx.temperature)
            p = th.softmax(z, dim=-1)
            chunk = th.zeros_like(z)
            if grad_logprobs is not None:  # ∂lp/∂z = onehot(a) − p
                g = grad_logprobs[:, start:end].unsqueeze(-1)
                chunk -= g * p
                chunk.scatter_add_(-1, tokens[:, start:end].unsqueeze(-1), g)
            if grad_entropy is not None and grad_entropy.numel():  # ∂H/∂z = −p (z − Σ p z)
                expected = (p * z).sum(-1, keepdim=True)
                chunk -= grad_entropy[:, start:end].unsqueeze(-1) * p * (z - expected)
            grad[:, start:end] = chunk / ctx.temperature if ctx.temperature != 1.0 else chunk
        return grad, None, None, None, None


def logprobs_and_entropy(
    logits: th.Tensor,
    tokens: th.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    chunk_bytes: int | None = None,
) -> tuple[th.Tensor, th.Tensor | None]:
    """log softmax(z / τ)[token] and the entropy of softmax(z / τ) at every position, in float32, from the model's
    own logits (bf16 or float32) in chunks of positions, so that no float32 ``(batch, T, vocab)`` copy exists.

    Each chunk is cast, scaled and normalised in one autograd function (:class:`_ChunkedLogprobsAndEntropy`)
    that recomputes it in the backward pass and writes its gradient into one buffer of the logits' shape: the
    memory beyond the model's logits (and their gradient) is a few float32 chunks' worth of temporaries. Logits that fit in
    ``chunk_bytes`` as float32 go in one piece, as plain autograd operations.

    :param logits: ``(batch, T, vocab)`` the model's logits for each response token, not yet scaled.
    :param tokens: ``(batch, T)`` int64.
    :param temperature: τ.
    :param with_entropy: also compute the entropy.
    :param entropy_grad: keep the entropy in the autograd graph (else it is computed without one).
    :param chunk_bytes: the float32 size of one chunk (default :data:`LOGITS_CHUNK_BYTES`).
    :return: ``logprobs (batch, T)`` and ``entropy (batch, T) | None``, float32.
    """
    batch, length, vocab = logits.shape
    positions = max(1, (chunk_bytes or LOGITS_CHUNK_BYTES) // max(1, batch * vocab * 4))
    if positions >= length:
        scaled = _scaled(logits, temperature)
        logprobs = logprobs_of_tokens(scaled, tokens)  # first: the gradients into `scaled` add up in this order
        entropy = None
        if with_entropy:
            with th.set_grad_enabled(entropy_grad and th.is_grad_enabled()):
                entropy = entropy_from_logits(scaled)
        return logprobs, entropy
    logprobs, entropy = _ChunkedLogprobsAndEntropy.apply(logits, tokens, temperature, positions, with_entropy)
    if not with_entropy:
        return logprobs, None
    return logprobs, entropy if entropy_grad else entropy.detach()


def zero_padding(values: th.Tensor, mask: th.Tensor) -> th.Tensor:
    """``values`` with 0 at the positions where ``mask`` is false, whatever they held there (inf, NaN).

    Padding is selected away, never multiplied by 0: ``inf · 0`` and ``NaN · 0`` are NaN. Apply it to a loss's
    inputs before any ``exp``/product, so that the gradient at padded positions is 0 as well: ``th.where``
    passes 0 to a discarded branch, and ``0 · ∂exp(1e4)`` would again be NaN.

    :param values: ``(batch, T)`` (or any shape ``mask`` broadcasts to).
    :param mask: bool or 0/1, the real positions.
    """
    return th.where(mask.bool(), values, th.zeros((), dtype=values.dtype, device=values.device))


@dataclass(frozen=True)
class _MinibatchCounts:
    tokens: th.Tensor  # 0-d: real response tokens of the whole minibatch
    sequences: int  # its responses


_MINIBATCH: ContextVar[_MinibatchCounts | None] = ContextVar("sb3_rlhf_minibatch_counts", default=None)


@contextlib.contextmanager
def minibatch_normalizers(response_mask: th.Tensor) -> Iterator[None]:
    """Inside this context the loss helpers (:func:`masked_mean`, :func:`masked_aggregate`,
    :func:`mean_over_sequences`) divide by the counts of the whole minibatch whose ``response_mask`` this is,
    instead of those of the tensors they see. The update computes a minibatch split into micro-batches this way:
    each micro-batch's loss and diagnostics are then its share of the minibatch's, and their plain sum is exactly
    the minibatch's, whatever mix of per-token and per-sequence means a loss has (PPO's value loss, GRPO's
    sequence mean beside a per-token entropy bonus, P3O's mean over pairs).

    :param response_mask: ``(batch, T)`` the whole minibatch's real response tokens.
    """
    token = _MINIBATCH.set(_MinibatchCounts(response_mask.sum().clamp(min=1), response_mask.shape[0]))
    try:
        yield
    finally:
        _MINIBATCH.reset(token)


def masked_mean(values: th.Tensor, mask: th.Tensor) -> th.Tensor:
    """Mean over the positions where ``mask`` is true; padding never enters a statistic, even inf or NaN. Inside
    :func:`minibatch_normalizers`, the sum is divided by the whole minibatch's token count."""
    counts = _MINIBATCH.get()
    denominator = mask.sum() if counts is None else counts.tokens
    return zero_padding(values, mask).sum() / denominator.to(values.dtype).clamp(min=1.0)


def mean_over_sequences(values: th.Tensor, n_sequences: int) -> th.Tensor:
    """The mean of ``values``, sequence-level quantities of ``n_sequences`` responses (one entry per response, or
    one per pair of them). Inside :func:`minibatch_normalizers`: the same mean over the whole minibatch's
    responses, of which these are ``n_sequences``."""
    counts = _MINIBATCH.get()
    if counts is None:
        return values.mean()
    return values.sum() / (values.numel() * counts.sequences / n_sequences)


#: How a per-token loss becomes one number: ``"token"`` averages over every real token of the batch (PPO,
#: DAPO); ``"sequence"`` averages each sequence over its own tokens, then over sequences (GRPO's ``1/|o_i|``).
LOSS_AGGREGATIONS = ("token", "sequence")


def masked_aggregate(values: th.Tensor, mask: th.Tensor, aggregation: str = "token") -> th.Tensor:
    """Reduce ``(batch, T)`` per-token values to a scalar over the real tokens (see :data:`LOSS_AGGREGATIONS`)."""
    if aggregation == "token":
        return masked_mean(values, mask)
    if aggregation == "sequence":
        per_sequence = zero_padding(values, mask).sum(-1) / mask.sum(-1).to(values.dtype).clamp(min=1.0)
        return mean_over_sequences(per_sequence, values.shape[0])
    raise ValueError(f"unknown loss aggregation {aggregation!r}: use one of {LOSS_AGGREGATIONS}")


def masked_whiten(values: th.Tensor, mask: th.Tensor, eps: float = 1e-8) -> th.Tensor:
    """(x - mean) / std over the masked positions; masked-out positions come back as 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return th.where(mask.bool(), (values - mean) * th.rsqrt(var + eps), th.zeros_like(values))


def pack_bool(mask: th.Tensor) -> th.Tensor:
    """A bool tensor packed eight entries to a byte along its last dimension: ``(..., V) -> (..., ceil(V / 8))``
    uint8 (an action mask of every response step over a whole vocabulary is kept at one bit per token)."""
    width = mask.shape[-1]
    padded = th.nn.functional.pad(mask.to(th.uint8), (0, -width % 8)).view(*mask.shape[:-1], -1, 8)
    bits = th.arange(8, device=mask.device, dtype=th.uint8)
    return (padded << bits).sum(-1, dtype=th.uint8)


def unpack_bool(packed: th.Tensor, width: int) -> th.Tensor:
    """The inverse of :func:`pack_bool`: ``(..., ceil(width / 8))`` uint8 -> ``(..., width)`` bool."""
    bits = th.arange(8, device=packed.device, dtype=th.uint8)
    return ((packed.unsqueeze(-1) >> bits) & 1).flatten(-2)[..., :width].bool()


_BITS_SET = th.tensor([bin(byte).count("1") for byte in range(256)], dtype=th.int64)


def count_packed(packed: th.Tensor) -> th.Tensor:
    """How many entries of a :func:`pack_bool` tensor are True: ``(..., bytes)`` uint8 -> ``(...)`` int64, counted
    byte by byte without unpacking (the padding bits are 0)."""
    return _BITS_SET.to(packed.device)[packed.long()].sum(-1)
