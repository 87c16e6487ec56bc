"""Top-k and top-p truncation of next-token logits: one function for sampling, log-probs and action masks."""

from __future__ import annotations

import torch as th


def truncate_logits(logits: th.Tensor, top_k: int = 0, top_p: float = 1.0, keep: th.Tensor | None = None) -> th.Tensor:
    """Top-k, then top-p (nucleus) truncation: the logits of the tokens outside get -inf, so that a softmax
    renormalises over the rest. The same function shapes the distribution ``generate()`` samples from and the
    teacher-forced log-probs, so both are the one truncated policy.

    :param logits: ``(..., vocab)`` float32, temperature-scaled.
    :param top_k: keep the ``top_k`` largest logits (ties with the k-th included); 0 keeps all.
    :param top_p: then keep the smallest set of most probable tokens whose probability reaches ``top_p``; 1 keeps all.
    :param keep: ``(...)`` int64 token ids that stay in whatever their rank: the tokens actually sampled. Float noise
        between the KV-cached forward of ``generate()`` and a teacher-forced forward (or a PPO update) can move a
        token from the edge of the nucleus to just outside, and its log-prob must stay finite (else the PPO ratio
        and the KL reward are NaN or infinite).
    :return: ``(..., vocab)`` float32 logits, -inf outside the kept set.
    """
    if top_k == 0 and top_p >= 1.0:
        return logits
    with th.no_grad():  # the choice of the set is not differentiated; the kept logits are
        drop = th.zeros_like(logits, dtype=th.bool)
        if 0 < top_k < logits.shape[-1]:
            drop |= logits < logits.topk(top_k, dim=-1).values[..., -1:]
        if top_p < 1.0:
            # stable sort: tied tokens are ranked by id, the same way in every pass
            sorted_logits, order = logits.masked_fill(drop, -float("inf")).sort(dim=-1, descending=True, stable=True)
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above; 0 for the first
            drop |= th.empty_like(drop).scatter_(-1, order, mass_before >= top_p)
        if keep is not None:
            drop.scatter_(-1, keep.unsqueeze(-1), False)
    return logits.masked_fill(drop, -float("inf"))


def check_truncation(top_k: int, top_p: float) -> None:
    """Refuse top-k/top-p settings :func:`truncate_logits` cannot take, naming the neutral values."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 keeps every token), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a probability in (0, 1] (1.0 keeps every token), got {top_p!r}")
