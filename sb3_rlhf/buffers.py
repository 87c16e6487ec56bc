"""Rollout storage for language episodes: one storage base (add, merge, minibatches by episodes or by token
budget) and its two kinds of advantage, GAE over response tokens (:class:`SequenceRolloutBuffer`, RLHFPPO) and
sequence advantages from groups of responses to one prompt (:class:`GroupRolloutBuffer`, RLOO, GRPO, P3O)."""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NamedTuple

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer

from sb3_rlhf.common.distributed import masked_whiten_over_ranks
from sb3_rlhf.common.sequences import zero_padding


class SequenceBatch(NamedTuple):
    """A minibatch of sequences for the PPO update, trimmed to its own longest prompt and response.

    ``input_ids``/``attention_mask``: ``(batch, P + T)`` int64; every other tensor is ``(batch, T)``:
    ``response_mask`` bool; ``old_logprobs``, ``old_values`` (V(s_t); ``None`` for critic-free algorithms),
    ``advantages``, ``returns`` float32;
    ``ref_logprobs`` (log π_ref, for algorithms with the KL in their loss) or ``None``; ``action_masks``
    ``(batch, T, ceil(n_actions / 8))`` uint8, the packed masks the tokens were sampled under, or ``None``.
    """

    input_ids: th.Tensor
    attention_mask: th.Tensor
    response_mask: th.Tensor
    old_logprobs: th.Tensor
    old_values: th.Tensor | None
    advantages: th.Tensor
    returns: th.Tensor
    ref_logprobs: th.Tensor | None = None
    action_masks: th.Tensor | None = None


def _pad(tensors: list[th.Tensor], width: int, value: float, left: bool) -> th.Tensor:
    """Pad each tensor's second dimension to ``width`` and stack the batches (the dimensions after it are kept)."""
    padded = []
    for t in tensors:
        pad = (width - t.shape[1], 0) if left else (0, width - t.shape[1])
        padded.append(th.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + pad, value=value))
    return th.cat(padded)


def token_budget_spans(
    prompt_lengths: list[int], response_lengths: list[int], max_tokens: int, unit: int = 1, max_rows: int | None = None
) -> list[tuple[int, int]]:
    """Consecutive spans ``(start, end)`` of rows, of whole units of ``unit`` rows, each of at most ``max_rows`` rows
    and ``max_tokens`` tokens counted as a forward pass sees them: rows × (longest prompt + longest response) of the
    span. Rows join the current span while it stays within both limits (dynamic batching, as ``--max-tokens`` in
    fairseq); a unit over the limits on its own forms a span alone.

    :param prompt_lengths: each row's prompt length, in order; the same for ``response_lengths``.
    """
    n = len(prompt_lengths)
    spans, start, end, longest_prompt, longest_response = [], 0, 0, 0, 0
    for unit_start in range(0, n, unit):
        unit_end = min(unit_start + unit, n)
        prompt = max(longest_prompt, *prompt_lengths[unit_start:unit_end])
        response = max(longest_response, *response_lengths[unit_start:unit_end])
        rows = unit_end - start
        fits = (max_rows is None or rows <= max_rows) and rows * (prompt + response) <= max_tokens
        if end > start and not fits:  # close the current span; this unit opens the next
            spans.append((start, end))
            start = unit_start
            prompt = max(prompt_lengths[unit_start:unit_end])
            response = max(response_lengths[unit_start:unit_end])
        end, longest_prompt, longest_response = unit_end, prompt, response
    spans.append((start, end))
    return spans


def split_minibatch(
    batch: SequenceBatch, max_tokens: int, unit: int = 1, n_parts: int | None = None
) -> list[SequenceBatch]:
    """Split a minibatch into micro-batches of whole units (episodes, or groups of ``unit`` consecutive rows) of
    at most ``max_tokens`` tokens each, counted as the forward pass sees them (rows × (longest prompt + longest
    response) of the micro-batch), each trimmed of the columns that are padding in all its rows. A unit longer
    than the budget on its own forms a micro-batch alone. The update accumulates their gradients into one optimizer
    step, so the step is the minibatch's (:meth:`~sb3_rlhf.common.on_policy_algorithm.RLHFOnPolicyAlgorithm.train`).

    :param batch: the minibatch, ``(rows, P + T)``.
    :param max_tokens: the token budget of one micro-batch.
    :param unit: rows that must stay together (a group of responses to one prompt).
    :param n_parts: at least this many micro-batches (at most the number of units): where the budget makes fewer,
        the micro-batch of the most units is halved until there are (the ranks of a distributed run split alike).
    """
    rows, width = batch.input_ids.shape  # a minibatch comes trimmed to its longest prompt and response
    if rows * width <= max_tokens and not n_parts:
        return [batch]
    response_length = batch.response_mask.shape[1]
    prompt_width = width - response_length
    # read on the host once: the splits and trims follow from them
    prompt_lengths = batch.attention_mask[:, :prompt_width].sum(-1).tolist()
    response_lengths = batch.response_mask.sum(-1).tolist()
    spans = token_budget_spans(prompt_lengths, response_lengths, max_tokens, unit)
    while n_parts is not None and len(spans) < n_parts:
        start, end = max(spans, key=lambda span: span[1] - span[0])  # each half is within the budget too
        if end - start <= unit:
            break  # one unit each: no more parts to make
        middle = start + (end - start) // unit // 2 * unit
        at = spans.index((start, end))
        spans[at : at + 1] = [(start, middle), (middle, end)]
    micro_batches = []
    for start, end in spans:
        longest_prompt = max(prompt_lengths[start:end])
        longest_response = max(response_lengths[start:end])
        columns = slice(prompt_width - longest_prompt, prompt_width + longest_response)
        fields: dict[str, Any] = {}
        for name, tensor in batch._asdict().items():
            sequence_wide = name in ("input_ids", "attention_mask")
            fields[name] = (
                None if tensor is None else tensor[start:end, columns if sequence_wide else slice(longest_response)]
            )
        micro_batches.append(SequenceBatch(**fields))
    return micro_batches


class BaseSequenceBuffer(BaseBuffer):
    """Rollout storage for language episodes: one row per episode, one column per response token.

    Episodes arrive in chunks (one per ``generate()`` call) and are padded together when the rollout is complete:
    prompts on the left, responses on the right. A subclass fills :attr:`advantages` and :attr:`returns` from
    the stored rewards; :meth:`get` then yields minibatches of whole episodes (or whole groups, :attr:`_unit`).

    :param buffer_size: episodes per rollout.
    :param observation_space: the env's observation space (SB3 signature).
    :param action_space: the env's action space (SB3 signature).
    :param device: where minibatches are returned.
    :param n_envs: number of SB3 envs (1: the fast path batches episodes itself).
    """

    #: rows that must stay in one minibatch (a group of responses to one prompt in GroupRolloutBuffer)
    _unit = 1
    # the merged rollout, ``(n_episodes, P)`` / ``(n_episodes, T)`` (``values``: ``T + 1``), set by _merge()
    prompt_ids: th.Tensor
    prompt_mask: th.Tensor
    response_ids: th.Tensor
    response_mask: th.Tensor
    logprobs: th.Tensor
    values: th.Tensor | None
    rewards: th.Tensor
    terminated: th.Tensor
    ref_logprobs: th.Tensor | None
    action_masks: th.Tensor | None
    #: set by the subclass's advantage computation, ``(n_episodes, T)``
    advantages: th.Tensor | None
    returns: th.Tensor

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
    ) -> None:
        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs)
        self.reset()

    def reset(self) -> None:
        super().reset()
        self._chunks: dict[str, list[th.Tensor]] = {}
        self.n_episodes = 0
        self.advantages: th.Tensor | None = None

    def add(  # type: ignore[override]
        self,
        prompt_ids: th.Tensor,
        prompt_mask: th.Tensor,
        response_ids: th.Tensor,
        response_mask: th.Tensor,
        logprobs: th.Tensor,
        values: th.Tensor | None,
        rewards: th.Tensor,
        terminated: th.Tensor,
        ref_logprobs: th.Tensor | None = None,
        action_masks: th.Tensor | None = None,
    ) -> None:
        """Store a chunk of finished episodes.

        :param prompt_ids: ``(batch, P)`` int64, left-padded.
        :param prompt_mask: ``(batch, P)`` int64.
        :param response_ids: ``(batch, T)`` int64, right-padded.
        :param response_mask: ``(batch, T)`` bool.
        :param logprobs: ``(batch, T)`` log π_old of the response tokens.
        :param values: ``(batch, T + 1)`` V(s_0)..V(s_T), or ``None`` (no value function).
        :param rewards: ``(batch, T)`` summed reward terms per token.
        :param terminated: ``(batch,)`` bool, True where the response ended with a stop token.
        :param ref_logprobs: ``(batch, T)`` log π_ref of the response tokens, kept for losses with a KL term.
        :param action_masks: ``(batch, T, ceil(n_actions / 8))`` uint8, the packed masks the tokens were sampled
            under (a policy with an action mask), for the update's log-probs.
        """
        tensors = dict(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            logprobs=logprobs,
            rewards=rewards,
            terminated=terminated.unsqueeze(-1),
        )
        # optional columns: present in every chunk of a rollout or in none
        for key, optional in (("values", values), ("ref_logprobs", ref_logprobs), ("action_masks", action_masks)):
            if optional is not None:
                tensors[key] = optional
        for key, value in tensors.items():
            self._chunks.setdefault(key, []).append(value.detach())
        self.n_episodes += prompt_ids.shape[0]
        self.pos = min(self.n_episodes, self.buffer_size)
        self.full = self.n_episodes >= self.buffer_size

    def _merge(self) -> None:
        c = self._chunks
        p_width = max(t.shape[1] for t in c["prompt_ids"])
        t_width = max(t.shape[1] for t in c["response_ids"])
        self.prompt_ids = _pad(c["prompt_ids"], p_width, 0, left=True)
        self.prompt_mask = _pad(c["prompt_mask"], p_width, 0, left=True)
        self.response_ids = _pad(c["response_ids"], t_width, 0, left=False)
        self.response_mask = _pad(c["response_mask"], t_width, False, left=False)
        self.logprobs = _pad(c["logprobs"], t_width, 0.0, left=False)
        self.values = _pad(c["values"], t_width + 1, 0.0, left=False) if "values" in c else None
        self.rewards = _pad(c["rewards"], t_width, 0.0, left=False)
        self.terminated = th.cat(c["terminated"]).squeeze(-1)
        self.ref_logprobs = _pad(c["ref_logprobs"], t_width, 0.0, left=False) if "ref_logprobs" in c else None
        self.action_masks = _pad(c["action_masks"], t_width, 0, left=False) if "action_masks" in c else None

    def get(  # type: ignore[override]
        self, batch_size: int | None = None, max_tokens: int | None = None
    ) -> Generator[SequenceBatch, None, None]:
        """Minibatches of up to ``batch_size`` episodes in a random order (``torch`` RNG).

        :param max_tokens: token budget of a minibatch, counted as the forward pass sees it: episodes × (longest
            prompt + longest response) of the minibatch. Episodes join the current minibatch in the shuffled
            order while it stays within both limits, so long responses make smaller minibatches and the memory
            of one forward stays bounded (dynamic batching, as ``--max-tokens`` in fairseq). An episode (or a
            group of :class:`GroupRolloutBuffer`) longer than the budget on its own forms a minibatch alone.
        """
        if self.advantages is None:
            raise RuntimeError(
                "compute the advantages (compute_returns_and_advantage() or compute_group_advantages()) before get()"
            )
        n = self.prompt_ids.shape[0]
        batch_size = batch_size or n
        # read on the host once: each minibatch's shape follows from them without a device sync of its own
        prompt_lengths = self.prompt_mask.sum(-1).tolist()
        response_lengths = self.response_mask.sum(-1).tolist()
        order = self._episode_order().tolist()
        for rows in self._minibatch_indices(order, batch_size, max_tokens, prompt_lengths, response_lengths):
            longest_prompt = max(prompt_lengths[i] for i in rows)
            longest_response = max(response_lengths[i] for i in rows)
            yield self._get_samples(rows, longest_prompt, longest_response)

    def _episode_order(self) -> th.Tensor:
        return th.randperm(self.prompt_ids.shape[0])

    def _minibatch_indices(
        self,
        order: list[int],
        batch_size: int,
        max_tokens: int | None,
        prompt_lengths: list[int],
        response_lengths: list[int],
    ) -> list[list[int]]:
        """Split the episode order into minibatches of at most ``batch_size`` rows and ``max_tokens`` tokens.

        :param prompt_lengths: each episode's prompt length (in storage order); the same for ``response_lengths``.
        """
        if max_tokens is None:
            return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
        prompt_lengths = [prompt_lengths[i] for i in order]
        response_lengths = [response_lengths[i] for i in order]
        spans = token_budget_spans(prompt_lengths, response_lengths, max_tokens, self._unit, batch_size)
        return [order[start:end] for start, end in spans]

    def _get_samples(  # type: ignore[override]
        self, rows: list[int], longest_prompt: int, longest_response: int
    ) -> SequenceBatch:
        """The episodes ``rows``, trimmed of the columns that are padding in every row (prompts are left-padded,
        so the longest prompt decides the first column kept, the longest response the last)."""
        index = th.as_tensor(rows, device=self.prompt_ids.device)
        prompt_mask = self.prompt_mask[index]
        response_mask = self.response_mask[index]
        p_start, t_end = self.prompt_mask.shape[1] - longest_prompt, longest_response
        input_ids = th.cat([self.prompt_ids[index, p_start:], self.response_ids[index, :t_end]], dim=1)
        attention_mask = th.cat([prompt_mask[:, p_start:], response_mask[:, :t_end].long()], dim=1)
        assert self.advantages is not None  # checked by get()
        return SequenceBatch(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            response_mask=response_mask[:, :t_end].to(self.device),
            old_logprobs=self.logprobs[index, :t_end].to(self.device),
            old_values=None if self.values is None else self.values[index, :t_end].to(self.device),
            advantages=self.advantages[index, :t_end].to(self.device),
            returns=self.returns[index, :t_end].to(self.device),
            ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[index, :t_end].to(self.device),
            action_masks=None if self.action_masks is None else self.action_masks[index, :t_end].to(self.device),
        )


class SequenceRolloutBuffer(BaseSequenceBuffer):
    """The rollout storage of RLHFPPO: generalised advantage estimation over the response tokens of each episode
    (the value head's estimates), then, optionally, advantages whitened over all real tokens of the rollout.

    The return ends at the last response token, whether the episode terminated (EOS) or was truncated at
    ``max_new_tokens``: the reward wrappers score a truncated response at its last token, nothing follows it,
    and V(s_T) of a cut-off state is never trained, so bootstrapping from it would add an untrained guess to
    a complete return. ``bootstrap_truncated=True`` restores the time-limit convention (add γ·V(s_T)).

    :param buffer_size: episodes per rollout.
    :param observation_space: the env's observation space (SB3 signature).
    :param action_space: the env's action space (SB3 signature).
    :param device: where minibatches are returned.
    :param n_envs: number of SB3 envs (1: the fast path batches episodes itself).
    :param gamma: discount γ (1.0 is usual for language).
    :param gae_lambda: GAE λ.
    :param bootstrap_truncated: bootstrap truncated responses from V(s_T).
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        gamma: float = 1.0,
        gae_lambda: float = 0.95,
        bootstrap_truncated: bool = False,
    ) -> None:
        self.gamma = gamma
        self.gae_lambda = gae_lambda
        self.bootstrap_truncated = bootstrap_truncated
        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs)

    def compute_returns_and_advantage(self, normalize_advantage: bool = True) -> None:  # type: ignore[override]
        """Generalised advantage estimation over response tokens (Schulman et al. 2016):

        δ_t = r_t + γ·V(s_{t+1})·[t+1 < len] − V(s_t),   Â_t = δ_t + γλ·Â_{t+1}·[t+1 < len],   R_t = Â_t + V(s_t)

        The term after the last token is γ·V(s_len) only for truncated responses with ``bootstrap_truncated``.
        """
        self._merge()
        mask = self.response_mask
        n, length = mask.shape
        lengths = mask.long().sum(-1)
        is_last = th.arange(length, device=mask.device).unsqueeze(0) == (lengths - 1).unsqueeze(-1)
        # Padding is selected away, never multiplied by 0 (inf·0 and NaN·0 are NaN): what a padded
        # position holds never reaches a real one.
        assert self.values is not None, "GAE needs the values of the rollout"
        values = zero_padding(self.values[:, :-1], mask)
        rewards = zero_padding(self.rewards, mask)
        bootstrap = (~self.terminated & self.bootstrap_truncated).unsqueeze(-1)
        # V(s_{t+1}) inside the response; after its last token only when bootstrapping
        next_values = zero_padding(self.values[:, 1:], mask & (~is_last | bootstrap))

        advantages = th.zeros_like(values)
        last_gae = th.zeros(n, device=mask.device)
        for t in reversed(range(length)):
            delta = rewards[:, t] + self.gamma * next_values[:, t] - values[:, t]
            carried = th.where(is_last[:, t], th.zeros_like(last_gae), last_gae)  # nothing after the last token
            last_gae = delta + self.gamma * self.gae_lambda * carried
            advantages[:, t] = zero_padding(last_gae, mask[:, t])
        self.returns = zero_padding(advantages + values, mask)
        self.advantages = masked_whiten_over_ranks(advantages, mask) if normalize_advantage else advantages


class GroupRolloutBuffer(BaseSequenceBuffer):
    """Rollout storage for critic-free algorithms that sample ``group_size`` responses per prompt (RLOO, GRPO,
    P3O). Episodes arrive group by group (consecutive rows share a prompt); advantages are per sequence,
    computed from the group's returns, and broadcast over the response tokens; minibatches hold whole groups.

    :param buffer_size: episodes per rollout.
    :param observation_space: the env's observation space (SB3 signature).
    :param action_space: the env's action space (SB3 signature).
    :param device: where minibatches are returned.
    :param n_envs: number of SB3 envs (1: the fast path batches episodes itself).
    :param group_size: responses per prompt (``k``).
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        group_size: int = 2,
    ) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        self.group_size = group_size
        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs)

    def compute_group_advantages(
        self, estimator: Callable[[th.Tensor], th.Tensor], normalize_advantage: bool = False
    ) -> None:
        """Sequence returns R_i = Σ_t r_t, advantages ``estimator(R.view(n_groups, k))``, optionally whitened
        over the rollout's episodes (each counted once), then spread over each response's tokens."""
        self._merge()
        n = self.prompt_ids.shape[0]
        if n % self.group_size:
            raise RuntimeError(f"{n} episodes do not split into groups of {self.group_size}")
        mask = self.response_mask
        self.sequence_returns = zero_padding(self.rewards, mask).sum(-1)
        advantages = estimator(self.sequence_returns.view(-1, self.group_size)).reshape(n)
        if normalize_advantage:
            advantages = masked_whiten_over_ranks(advantages, th.ones_like(advantages, dtype=th.bool))
        self.sequence_advantages = advantages
        self.advantages = zero_padding(advantages.unsqueeze(-1).expand_as(mask), mask)
        self.returns = zero_padding(self.sequence_returns.unsqueeze(-1).expand_as(mask), mask)

    @property
    def _unit(self) -> int:  # type: ignore[override]
        return self.group_size

    def _episode_order(self) -> th.Tensor:
        # whole groups, in a random order, each group's rows kept together
        k = self.group_size
        groups = th.randperm(self.prompt_ids.shape[0] // k)
        return (groups.unsqueeze(-1) * k + th.arange(k)).reshape(-1)
