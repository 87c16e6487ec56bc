"""TokenGenerationEnv: a Gymnasium environment whose states are token sequences and whose actions are tokens."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, cast

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces
from transformers import PreTrainedTokenizerBase

from sb3_rlhf.common.models import load_tokenizer
from sb3_rlhf.common.tokenizers import check_tokenizer
from sb3_rlhf.envs.masks import ActionMask, MaskSource


class TokenGenerationEnv(gym.Env):
    """Generate a response to a prompt one token at a time.

    * **Observation**: ``{"input_ids": (L,) int64, "attention_mask": (L,) int64}`` with
      ``L = max_prompt_tokens + max_new_tokens``: the prompt followed by the tokens generated so far,
      **left-padded** (right-aligned) so that the newest token is always at position ``L - 1``.
    * **Action**: the next token, ``Discrete(len(tokenizer))``.
    * **Reward**: 0 here. Rewards come from wrappers in :mod:`sb3_rlhf.rewards` (reward function, reward model,
      KL penalty), so the same env serves every reward.
    * **End of episode**: sampling EOS (or any ``stop_token_ids``) is *termination*: the model finished its
      answer. Reaching ``max_new_tokens`` is *truncation*: the answer was cut off. Reward wrappers score the
      response in both cases at its last token, and :class:`sb3_rlhf.RLHFPPO` ends the return there (no
      bootstrap, see :class:`sb3_rlhf.buffers.SequenceRolloutBuffer`); ``info["truncated_response"]`` tells
      the two apart.
    * At the end of an episode ``info`` carries ``prompt``, ``completion`` (decoded texts), ``prompt_index``
      and ``completion_ids``.

    Prompts longer than ``max_prompt_tokens`` are truncated **from the left** (the end of a prompt is the part
    the response continues), with one warning naming how many prompts were cut; the special tokens the
    tokenizer adds (e.g. BOS) stay in place.

    :param prompts: the prompt texts; an episode starts from one sampled uniformly with ``self.np_random``.
    :param tokenizer: a Hugging Face tokenizer, or the folder, packaged name or hub id of one, with a pad token distinct from EOS.
    :param max_prompt_tokens: longest prompt, in tokens.
    :param max_new_tokens: longest response, in tokens.
    :param stop_token_ids: extra tokens that end a response besides the tokenizer's EOS.
    :param add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to prompts.
    :param render_mode: ``None`` or ``"ansi"`` (the prompt and response so far as text).
    :param reward_prompts: what reward models read as each prompt, when it differs from what the policy reads:
        e.g. the plain HH transcript behind a chat-templated prompt (a reward model trained on HH text then
        scores ``reward_prompt + " " + response``, see :attr:`~sb3_rlhf.common.generation.GenerationBatch.reward_texts`).
        One per prompt; ``None``: reward models read the episode's own text.
    :param stop_at_eos: ``False``: EOS is an ordinary token and responses run to ``max_new_tokens`` (or a
        ``stop_token_ids`` token): fixed-length responses, as benchmarks and some peers' PPO use.
    :param mask_sources: action masks (:mod:`sb3_rlhf.envs.masks`: :class:`~sb3_rlhf.envs.masks.AllowedTokens`,
        :class:`~sb3_rlhf.envs.masks.BannedTokens`, :class:`~sb3_rlhf.envs.masks.WordVocabulary`,
        :class:`~sb3_rlhf.envs.masks.TopPMask`): a token is allowed when every source allows it.
        :meth:`action_masks` gives the current mask in sb3-contrib's protocol (``MaskablePPO`` reads it); the
        env itself accepts every token id in ``step()``, as sb3-contrib's envs do, so env checkers and unmasked
        algorithms run on it unchanged.
    :param mask_eos: let the masks remove the stop tokens (EOS among them unless ``stop_at_eos=False``) too. By
        default they are always allowed, so a response can always end; with ``stop_at_eos=True`` a masked EOS
        would cut every response at ``max_new_tokens``, which is refused.
    """

    metadata = {"render_modes": ["ansi"]}
    observation_space: spaces.Dict
    action_space: spaces.Discrete

    def __init__(
        self,
        prompts: Sequence[str],
        tokenizer: PreTrainedTokenizerBase | str,
        max_prompt_tokens: int = 64,
        max_new_tokens: int = 32,
        stop_token_ids: Sequence[int] | None = None,
        add_special_tokens: bool = True,
        render_mode: str | None = None,
        reward_prompts: Sequence[str] | None = None,
        stop_at_eos: bool = True,
        mask_sources: Sequence[MaskSource] | MaskSource | None = None,
        mask_eos: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = check_tokenizer(tokenizer)
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of strings, e.g. prompts=['Once upon a time', ...]")
        if len(prompts) == 0:
            raise ValueError("prompts is empty: give at least one prompt text")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"prompts must be non-empty strings; prompt(s) at index {bad[:5]} are not")
        for name, value in (("max_prompt_tokens", max_prompt_tokens), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")

        if reward_prompts is not None and (
            isinstance(reward_prompts, str)
            or len(reward_prompts) != len(prompts)
            or not all(isinstance(p, str) for p in reward_prompts)
        ):
            raise ValueError(f"reward_prompts must be {len(prompts)} strings, one for each prompt")

        self.prompts = list(prompts)
        self.reward_prompts = list(reward_prompts) if reward_prompts is not None else None
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.render_mode = render_mode
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        stops = [self.eos_token_id] if stop_at_eos else []
        self.stop_token_ids = tuple(dict.fromkeys([*stops, *(int(t) for t in (stop_token_ids or ()))]))
        self.n_actions = len(self.tokenizer)
        if self.pad_token_id in self.stop_token_ids:
            raise ValueError("stop_token_ids must not contain the pad token")

        self.prompt_token_ids, self.prompt_texts = self._tokenize_prompts(add_special_tokens)
        window = self.max_prompt_tokens + self.max_new_tokens
        self.observation_space = spaces.Dict(
            {
                "input_ids": spaces.Box(low=0, high=self.n_actions - 1, shape=(window,), dtype=np.int64),
                "attention_mask": spaces.Box(low=0, high=1, shape=(window,), dtype=np.int64),
            }
        )
        self.action_space = spaces.Discrete(self.n_actions)
        self._prompt_index = -1
        self._response: list[int] = []
        self.mask_eos = bool(mask_eos)
        self.action_mask: ActionMask | None = None
        if mask_sources is not None:
            if self.mask_eos and stop_at_eos:
                raise ValueError(
                    "mask_eos=True lets the mask remove EOS, which ends responses in this env (stop_at_eos=True): a "
                    f"response whose EOS is masked runs to max_new_tokens={self.max_new_tokens} and is cut off; build "
                    "the env with stop_at_eos=False for fixed-length responses, or leave mask_eos=False"
                )
            keep = [] if self.mask_eos else self.stop_token_ids  # EOS among them where it ends responses
            self.action_mask = ActionMask(mask_sources, self.n_actions, keep)
        elif mask_eos:
            raise ValueError("mask_eos=True without mask_sources masks nothing: give mask_sources, or drop mask_eos")

    def _tokenize_prompts(self, add_special_tokens: bool) -> tuple[list[list[int]], list[str]]:
        encoded = self.tokenizer(self.prompts, add_special_tokens=add_special_tokens)["input_ids"]
        token_ids, texts, n_cut = [], [], 0
        for i, (ids, text) in enumerate(zip(encoded, self.prompts)):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} ({text[:40]!r}) tokenizes to no tokens")
            if len(ids) > self.max_prompt_tokens:
                ids = self._cut_from_left(ids, text, add_special_tokens)
                text = cast(str, self.tokenizer.decode(ids, skip_special_tokens=True))  # one sequence: one string
                n_cut += 1
            token_ids.append(list(ids))
            texts.append(text)
        if n_cut:
            warnings.warn(
                f"{n_cut} of {len(encoded)} prompts are longer than max_prompt_tokens={self.max_prompt_tokens} "
                "and were truncated from the left; raise max_prompt_tokens to keep them whole",
                stacklevel=3,
            )
        return token_ids, texts

    def _cut_from_left(self, ids: list[int], text: str, add_special_tokens: bool) -> list[int]:
        """The last ``max_prompt_tokens`` tokens of a prompt, keeping the special tokens the tokenizer added
        around it (BOS, [CLS] ... [SEP]): the model was trained to see them, whatever is cut from the text."""
        plain = self.tokenizer(text, add_special_tokens=False)["input_ids"] if add_special_tokens else ids
        # where the text's own tokens sit among ``ids``: the rest are the added prefix and suffix
        start = next((i for i in range(len(ids) - len(plain) + 1) if ids[i : i + len(plain)] == plain), None)
        if start is None or not plain:  # the tokenizer merged added tokens into the text: cut plainly
            return ids[-self.max_prompt_tokens :]
        prefix, suffix = ids[:start], ids[start + len(plain) :]
        keep = self.max_prompt_tokens - len(prefix) - len(suffix)
        if keep < 1:
            raise ValueError(
                f"max_prompt_tokens={self.max_prompt_tokens} leaves no room for prompt text besides the "
                f"{len(prefix) + len(suffix)} special tokens the tokenizer adds: raise max_prompt_tokens"
            )
        return prefix + plain[-keep:] + suffix

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        """Start an episode from a random prompt, or from ``options={"prompt_index": i}``."""
        super().reset(seed=seed)
        if options and "prompt_index" in options:
            index = int(options["prompt_index"])
            if not 0 <= index < len(self.prompts):
                raise IndexError(f"prompt_index {index} is out of range for {len(self.prompts)} prompts")
        else:
            index = int(self.np_random.integers(len(self.prompts)))
        self._prompt_index = index
        self._response = []
        return self._observation(), {"prompt_index": index}

    def step(self, action: int | np.integer | np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        """Append one token to the response (Gymnasium's ``step``).

        :param action: a token id in ``[0, n_actions)``.
        :return: the observation, reward 0 (the reward wrappers add theirs), ``terminated`` on a stop token,
            ``truncated`` at ``max_new_tokens``, and at the episode's end an info with the prompt and completion.
        """
        if self._prompt_index < 0:
            raise RuntimeError("call reset() before step()")
        if len(self._response) >= self.max_new_tokens or (self._response and self._response[-1] in self.stop_token_ids):
            raise RuntimeError("the episode has ended: call reset() before step()")
        array = np.asarray(action)
        is_one_integer = array.size == 1 and array.ndim <= 1 and np.issubdtype(array.dtype, np.integer)
        token = int(array.item()) if is_one_integer else None
        if token is None or not self.action_space.contains(token):
            raise ValueError(f"action must be one integer token id in [0, {self.n_actions}), got {action!r}")
        self._response.append(token)
        terminated = token in self.stop_token_ids
        truncated = not terminated and len(self._response) >= self.max_new_tokens
        info: dict[str, Any] = {}
        if terminated or truncated:
            info = self.episode_info(self._prompt_index, self._response, truncated)
        return self._observation(), 0.0, terminated, truncated, info

    def action_masks(self) -> np.ndarray:
        """The tokens allowed as the next action, ``(n_actions,)`` bool (sb3-contrib's ``action_masks()``
        protocol): every token without ``mask_sources``."""
        if self._prompt_index < 0:
            raise RuntimeError("call reset() before action_masks()")
        if self.action_mask is None:
            return np.ones(self.n_actions, dtype=bool)
        observation = self._observation()
        mask = self.action_mask(
            th.as_tensor(observation["input_ids"])[None],
            th.as_tensor(observation["attention_mask"])[None],
            len(self._response),
        )
        return mask[0].cpu().numpy()

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self.prompt_texts[self._prompt_index] + self.decode_completion(self._response)
        return None

    def _observation(self) -> dict[str, np.ndarray]:
        tokens = self.prompt_token_ids[self._prompt_index] + self._response
        window = cast(spaces.Box, self.observation_space["input_ids"]).shape[0]
        input_ids = np.full(window, self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros(window, dtype=np.int64)
        input_ids[window - len(tokens) :] = tokens
        attention_mask[window - len(tokens) :] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ------------------------------------------------------------------ batched fast path
    def sample_prompt_indices(self, n: int, shard: int = 0, n_shards: int = 1) -> np.ndarray:
        """``n`` prompt indices drawn with ``self.np_random``, as ``reset()`` draws them.

        :param shard: draw only from the prompts ``shard, shard + n_shards, ...`` (rank ``shard`` of ``n_shards``
            in a distributed run: the ranks see disjoint prompts).
        :param n_shards: how many shards the prompts are split into.
        """
        if n_shards == 1:
            return self.np_random.integers(len(self.prompts), size=n)
        if len(self.prompts) < n_shards:
            raise ValueError(
                f"{len(self.prompts)} prompts cannot be split between {n_shards} processes: give more prompts"
            )
        indices = np.arange(shard, len(self.prompts), n_shards)
        return indices[self.np_random.integers(len(indices), size=n)]

    def prompt_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded prompts for a batch of episodes.

        :return: ``input_ids (n, P) int64`` and ``attention_mask (n, P) int64``, ``P`` the longest prompt.
        """
        rows = [self.prompt_token_ids[int(i)] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows), width), dtype=np.int64)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row) :] = row
            attention_mask[b, width - len(row) :] = 1
        return input_ids, attention_mask

    def decode_completion(self, token_ids: Sequence[int]) -> str:
        """The response text, special tokens (EOS) dropped."""
        return cast(str, self.tokenizer.decode(list(token_ids), skip_special_tokens=True))  # one sequence: one string

    def episode_info(self, prompt_index: int, completion_ids: Sequence[int], truncated: bool) -> dict[str, Any]:
        """The end-of-episode ``info`` dict, shared by ``step()`` and the fast path."""
        return {
            "prompt_index": int(prompt_index),
            "prompt": self.prompt_texts[prompt_index],
            "completion": self.decode_completion(completion_ids),
            "completion_ids": list(completion_ids),
            "truncated_response": bool(truncated),
        }
