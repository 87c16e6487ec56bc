"""Action masks for token generation: which tokens the policy may emit next.

A *mask source* answers, for a batch of left-padded sequences (the prompt followed by the ``n_generated`` tokens
of the response so far), which tokens are allowed next: a bool tensor ``(batch, n_actions)``. Sources compose by
intersection in :class:`ActionMask`, which the env exposes as ``TokenGenerationEnv.action_masks()`` in
sb3-contrib's protocol (what ``MaskablePPO`` reads) and which a logits processor can apply inside ``generate()``.

Sources: :class:`AllowedTokens` (only these ids), :class:`BannedTokens` (never these ids), :class:`WordVocabulary`
(responses made only of words from a list) and :class:`TopPMask` (the top-p/top-k tokens of a causal LM, NLPO's
masking policy).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch as th
from transformers import PreTrainedTokenizerBase

from sb3_rlhf.common.forward import accepts_logits_to_keep, response_logits
from sb3_rlhf.common.sequences import position_ids_from_mask
from sb3_rlhf.common.tokenizers import check_vocabulary
from sb3_rlhf.common.truncation import check_truncation, truncate_logits


class MaskSource:
    """Base class of mask sources: :meth:`__call__` says which tokens are allowed next."""

    def __call__(self, input_ids: th.Tensor, attention_mask: th.Tensor, n_generated: int) -> th.Tensor:
        """:param input_ids: ``(batch, L)`` int64, left-padded: the prompt, then the response so far.
        :param attention_mask: ``(batch, L)``, 1 on real tokens.
        :param n_generated: how many of the last tokens are the response so far (the same for the whole batch).
        :return: ``(batch, n_actions)`` bool, True where a token is allowed.
        """
        raise NotImplementedError

    def bind(self, n_actions: int) -> None:
        """Called once by :class:`ActionMask` with the env's vocabulary size, before any mask is asked for: check
        that the source fits it (and raise a ``ValueError`` naming the problem if not)."""

    def reset(self) -> None:
        """Forget what earlier calls kept (a model's KV cache): called when a generation ends."""

    def teacher_forced(self, input_ids: th.Tensor, attention_mask: th.Tensor, response_length: int) -> th.Tensor:
        """The masks at every step of whole responses: ``(batch, T, n_actions)`` for ``[prompt | response (T)]``,
        entry ``t`` the mask after the first ``t`` response tokens. This default asks :meth:`__call__` step by step;
        sources that can do it in one pass (a model's one forward) override it."""
        width = input_ids.shape[1] - response_length
        return th.stack(
            [self(input_ids[:, : width + t], attention_mask[:, : width + t], t) for t in range(response_length)], 1
        )


def _token_ids(ids: Iterable[int], name: str) -> list[int]:
    out = [int(i) for i in ids]
    if not out:
        raise ValueError(f"{name} got no token ids: give at least one")
    return sorted(set(out))


def _check_in_vocabulary(ids: Sequence[int], n_actions: int, name: str) -> None:
    bad = [i for i in ids if not 0 <= i < n_actions]
    if bad:
        raise ValueError(f"{name}: token ids {bad[:5]} are outside the vocabulary [0, {n_actions})")


class _TokenList(MaskSource):
    """A fixed set of token ids, allowed (``allows = True``) or banned, the same at every step."""

    allows: bool

    def __init__(self, token_ids: Iterable[int]) -> None:
        self.token_ids = _token_ids(token_ids, type(self).__name__)

    def bind(self, n_actions: int) -> None:
        _check_in_vocabulary(self.token_ids, n_actions, type(self).__name__)
        self._row = th.full((n_actions,), not self.allows, dtype=th.bool)
        self._row[self.token_ids] = self.allows

    def __call__(self, input_ids: th.Tensor, attention_mask: th.Tensor, n_generated: int) -> th.Tensor:
        return self._row.to(input_ids.device).expand(input_ids.shape[0], -1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.token_ids)} ids)"


class AllowedTokens(_TokenList):
    """Only these token ids (EOS is added back by :class:`ActionMask` unless it masks EOS on purpose).

    :param token_ids: the allowed ids.
    """

    allows = True


class BannedTokens(_TokenList):
    """Never these token ids, e.g. ``BannedTokens(tokenizer.convert_tokens_to_ids(["<unk>"]))``.

    :param token_ids: the banned ids.
    """

    allows = False

    def bind(self, n_actions: int) -> None:
        if len(self.token_ids) == n_actions:
            raise ValueError(f"BannedTokens bans all {n_actions} tokens of the vocabulary: nothing is left to emit")
        super().bind(n_actions)


class WordVocabulary(MaskSource):
    """Responses made only of words from a list: each word as the tokenizer spells it after a space (``" cat"``),
    words one after another. At every step the allowed tokens are those that continue a word of the list or, once
    a word is complete, start the next one. EOS stays allowed at every step (:class:`ActionMask` keeps it), so a
    response may end inside its last word, as one cut at ``max_new_tokens`` may.

    The tokens of every word are those of its own tokenization, so no other word can be assembled from pieces.

    :param words: the vocabulary, e.g. ``["good", "great", "fine"]``.
    :param tokenizer: the env's tokenizer.
    """

    def __init__(self, words: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> None:
        self.words = list(dict.fromkeys(w.strip() for w in words if w.strip()))
        if not self.words:
            raise ValueError("WordVocabulary got no words: give at least one non-empty word")
        # a trie over the words' token sequences: node -> {token: child}; ``ends`` holds the nodes that end a word
        self._children: list[dict[int, int]] = [{}]
        self._ends: set[int] = set()
        for word in self.words:
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"WordVocabulary: the word {word!r} tokenizes to no tokens")
            node = 0
            for token in ids:
                if int(token) not in self._children[node]:
                    self._children.append({})
                    self._children[node][int(token)] = len(self._children) - 1
                node = self._children[node][int(token)]
            self._ends.add(node)

    def bind(self, n_actions: int) -> None:
        tokens = [t for children in self._children for t in children]
        _check_in_vocabulary(tokens, n_actions, "WordVocabulary (the tokenizer is not the env's?)")
        self.n_actions = n_actions

    def _states(self, response: Sequence[int]) -> set[int]:
        """The trie nodes the response can be at (a set: a complete word may also be the prefix of a longer one)."""
        states = {0}
        for token in response:
            following = set()
            for node in states:
                if token in self._children[node]:
                    following.add(self._children[node][token])
                if node in self._ends and token in self._children[0]:
                    following.add(self._children[0][token])
            states = following
            if not states:
                break  # a token outside the vocabulary (EOS, or one emitted without the mask): nothing continues it
        return states

    def __call__(self, input_ids: th.Tensor, attention_mask: th.Tensor, n_generated: int) -> th.Tensor:
        mask = th.zeros(input_ids.shape[0], self.n_actions, dtype=th.bool)
        responses = input_ids[:, input_ids.shape[1] - n_generated :].tolist() if n_generated else [[]] * len(mask)
        for row, response in enumerate(responses):
            allowed: set[int] = set()
            for node in self._states(response):
                allowed.update(self._children[node])
                if node in self._ends:
                    allowed.update(self._children[0])
            mask[row, list(allowed)] = True
        return mask.to(input_ids.device)

    def __repr__(self) -> str:
        return f"WordVocabulary({len(self.words)} words)"


class TopPMask(MaskSource):
    """The tokens a causal LM finds most probable next: the smallest set whose probability reaches ``top_p``
    (after ``top_k``), widened to the ``min_tokens_to_keep`` most probable, the masking policy of NLPO (Ramamurthy
    et al. 2022; :class:`~sb3_rlhf.nlpo.NLPO` keeps a synchronised copy of the policy for it).

    Asked step by step for growing sequences (inside ``generate()``, or by the env), it keeps the model's KV cache
    between calls, so a response of T tokens costs one forward of the prompt and one of each new token, as
    ``generate()`` itself; anything else (another batch, a new response) starts over. Call :meth:`reset` after
    changing the model's weights (the cache would still hold the old ones' keys and values).

    :param model: a causal LM on the env's vocabulary.
    :param top_p: nucleus mass kept (NLPO's default 0.9).
    :param top_k: keep at most this many tokens first (0: no limit).
    :param temperature: the model's logits are divided by it before the nucleus is taken.
    :param min_tokens_to_keep: always allow at least this many most probable tokens (RL4LMs' NLPO configs
        use 100 on GPT-2's vocabulary; 1: the nucleus alone).
    """

    def __init__(
        self, model: Any, top_p: float = 0.9, top_k: int = 0, temperature: float = 1.0, min_tokens_to_keep: int = 1
    ) -> None:
        check_truncation(top_k, top_p)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")
        self.model, self.top_p, self.top_k, self.temperature = model, float(top_p), int(top_k), float(temperature)
        self.min_tokens_to_keep = min_tokens_to_keep
        self.n_actions: int | None = None  # bound to the env's vocabulary: a model's may be padded larger
        self._cached_ids: th.Tensor | None = None  # the sequences the KV cache holds
        self._past: Any = None

    def bind(self, n_actions: int) -> None:
        check_vocabulary(self.model, n_actions, "the env's tokenizer")
        self.n_actions = n_actions

    def reset(self) -> None:
        """Drop the KV cache (the algorithm calls it when a generation ends and when the model's weights change)."""
        self._cached_ids, self._past = None, None

    @th.no_grad()
    def __call__(self, input_ids: th.Tensor, attention_mask: th.Tensor, n_generated: int) -> th.Tensor:
        device = next(self.model.parameters()).device
        ids, attention = input_ids.to(device), attention_mask.to(device)
        positions = position_ids_from_mask(attention)
        cached = self._cached_ids
        if (
            cached is not None
            and n_generated > 0
            and cached.shape[0] == ids.shape[0]
            and cached.shape[1] + 1 == ids.shape[1]
            and th.equal(cached, ids[:, :-1])
        ):  # one token more than last time: only its forward, on the cache
            out = self.model(
                input_ids=ids[:, -1:],
                attention_mask=attention,
                position_ids=positions[:, -1:],
                past_key_values=self._past,
                use_cache=True,
            )
        else:
            kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
            out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, **kwargs)
        self._cached_ids, self._past = ids, out.past_key_values
        return self.mask_of_logits(out.logits[:, -1, : self.n_actions]).to(input_ids.device)

    @th.no_grad()
    def teacher_forced(self, input_ids: th.Tensor, attention_mask: th.Tensor, response_length: int) -> th.Tensor:
        """Every step's nucleus from one forward of the model over the whole sequences."""
        device = next(self.model.parameters()).device
        logits, _ = response_logits(
            self.model,
            input_ids.to(device),
            attention_mask.to(device),
            response_length,
            1.0,
            self.n_actions or self.model.get_output_embeddings().weight.shape[0],
        )
        return self.mask_of_logits(logits).to(input_ids.device)

    def mask_of_logits(self, logits: th.Tensor) -> th.Tensor:
        """The nucleus of next-token ``logits`` ``(..., n_actions)``, as the policy truncates its own, with at least
        the ``min_tokens_to_keep`` most probable tokens."""
        logits = logits.float() / self.temperature
        allowed = th.isfinite(truncate_logits(logits, self.top_k, self.top_p))
        if self.min_tokens_to_keep > 1:
            k = min(self.min_tokens_to_keep, logits.shape[-1])
            allowed.scatter_(-1, logits.topk(k, dim=-1).indices, True)
        return allowed

    def __repr__(self) -> str:
        return f"TopPMask(top_p={self.top_p}, top_k={self.top_k}, min_tokens_to_keep={self.min_tokens_to_keep})"


class ActionMask:
    """The intersection of mask sources, with the tokens that end a response always allowed unless asked.

    :param sources: the mask sources; a token is allowed when every source allows it.
    :param n_actions: the vocabulary size (the env's action space).
    :param keep_token_ids: tokens allowed whatever the sources say (the env passes EOS and its stop tokens).
    """

    def __init__(
        self, sources: Sequence[MaskSource] | MaskSource, n_actions: int, keep_token_ids: Sequence[int] = ()
    ) -> None:
        if isinstance(sources, MaskSource):
            sources = [sources]
        bad = [s for s in sources if not isinstance(s, MaskSource)]
        if not sources or bad:
            # a MaskSource, not any callable: the update needs its teacher_forced() masks of whole responses
            raise TypeError(
                "mask_sources must be a non-empty list of mask sources (AllowedTokens, BannedTokens, WordVocabulary, "
                f"TopPMask, or a MaskSource subclass), got {bad[:1] or sources!r}"
            )
        self.sources = list(sources)
        self.n_actions = int(n_actions)
        self.keep_token_ids = list(keep_token_ids)
        for source in self.sources:
            source.bind(self.n_actions)

    def __call__(self, input_ids: th.Tensor, attention_mask: th.Tensor, n_generated: int) -> th.Tensor:
        """``(batch, n_actions)`` bool: the tokens allowed after each sequence. Raises ``ValueError`` when a source
        returns a mask of the wrong shape or dtype, or when no token is left for a sequence."""
        return self._combine(
            [source(input_ids, attention_mask, n_generated) for source in self.sources],
            (input_ids.shape[0], self.n_actions),
            n_generated,
        )

    def reset(self) -> None:
        """Let every source forget what earlier calls kept (:meth:`MaskSource.reset`)."""
        for source in self.sources:
            source.reset()

    def teacher_forced(self, input_ids: th.Tensor, attention_mask: th.Tensor, response_length: int) -> th.Tensor:
        """``(batch, T, n_actions)`` bool: the masks at every step of whole responses ``[prompt | response (T)]``
        (see :meth:`MaskSource.teacher_forced`)."""
        return self._combine(
            [source.teacher_forced(input_ids, attention_mask, response_length) for source in self.sources],
            (input_ids.shape[0], response_length, self.n_actions),
        )

    def _combine(self, masks: list[th.Tensor], expected: tuple[int, ...], n_generated: int | None = None) -> th.Tensor:
        """The sources' masks checked and intersected, the kept tokens added; ``n_generated`` names the step of a
        ``(batch, n_actions)`` mask (a ``(batch, T, n_actions)`` one gives each position's own)."""
        mask = None
        for source, allowed in zip(self.sources, masks):
            if not isinstance(allowed, th.Tensor) or allowed.dtype != th.bool or tuple(allowed.shape) != expected:
                got = (
                    f"{allowed.dtype} of shape {tuple(allowed.shape)}"
                    if isinstance(allowed, th.Tensor)
                    else type(allowed).__name__
                )
                raise ValueError(
                    f"mask source {source!r} returned {got}: a mask source must return a torch.bool tensor of shape "
                    f"{expected} ((batch, n_actions) per step), True where a token is allowed"
                )
            mask = allowed.clone() if mask is None else mask & allowed.to(mask.device)
        assert mask is not None  # at least one source, checked in __init__
        if self.keep_token_ids:
            mask[..., self.keep_token_ids] = True
        empty = (~mask.any(-1)).nonzero()
        if len(empty):
            step = int(empty[0, 1]) if mask.dim() == 3 else n_generated
            raise ValueError(
                f"the action mask allows no token at step {step} of the response (sequence {int(empty[0, 0])} of the "
                f"batch; sources {self.sources}): widen a source, or keep EOS allowed so that the response can end"
            )
        return mask
