"""GenerationBatch: a batch of finished episodes, as the fast path and the reward wrappers see it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th

from sb3_rlhf.common.sequences import response_mask_until_stop

if TYPE_CHECKING:
    from sb3_rlhf.envs.token_generation import TokenGenerationEnv


@dataclass
class GenerationBatch:
    """Finished episodes laid out as ``[prompt (left-padded, P) | response (right-padded, T)]``.

    :param env: the unwrapped :class:`~sb3_rlhf.TokenGenerationEnv` (tokenizer, texts, stop tokens).
    :param prompt_indices: ``(batch,)`` index of each episode's prompt in ``env.prompts``.
    :param input_ids: ``(batch, P + T)`` int64.
    :param attention_mask: ``(batch, P + T)`` int64: 1 on prompt tokens and real response tokens only.
    :param response_mask: ``(batch, T)`` bool: real response tokens (up to and including the stop token).
    :param terminated: ``(batch,)`` bool: the response ended with a stop token (else it was truncated).
    :param logprobs: ``(batch, T)`` float32 log π_old of each response token at the sampling temperature,
        filled by the algorithm before rewards are computed (the KL penalty needs it).
    :param action_masks: ``(batch, T, ceil(n_actions / 8))`` uint8 or ``None``: under a policy's action mask, the
        mask of every step as the token was sampled under it, packed one bit per token
        (:func:`~sb3_rlhf.common.sequences.unpack_bool`).
    """

    env: TokenGenerationEnv
    prompt_indices: np.ndarray
    input_ids: th.Tensor
    attention_mask: th.Tensor
    response_mask: th.Tensor
    terminated: th.Tensor
    logprobs: th.Tensor | None = None
    action_masks: th.Tensor | None = None
    _infos: list[dict[str, Any]] | None = field(default=None, repr=False)

    @classmethod
    def from_generation(
        cls,
        env: TokenGenerationEnv,
        prompt_indices: Sequence[int] | np.ndarray,
        prompt_ids: th.Tensor,
        prompt_mask: th.Tensor,
        response_ids: th.Tensor,
    ) -> GenerationBatch:
        """Build from ``generate()`` output: masks derived from the stop tokens, padding after them zeroed."""
        if response_ids.shape[1] == 0:
            raise ValueError("generation produced no tokens: max_new_tokens must be >= 1")
        response_mask, terminated = response_mask_until_stop(response_ids, env.stop_token_ids)
        response_ids = th.where(response_mask, response_ids, th.full_like(response_ids, env.pad_token_id))
        return cls(
            env=env,
            prompt_indices=np.asarray(prompt_indices),
            input_ids=th.cat([prompt_ids, response_ids], dim=1),
            attention_mask=th.cat([prompt_mask.long(), response_mask.long()], dim=1),
            response_mask=response_mask,
            terminated=terminated,
        )

    @classmethod
    def from_episode(
        cls, env: TokenGenerationEnv, prompt_index: int, completion_ids: Sequence[int], device: th.device | str = "cpu"
    ) -> GenerationBatch:
        """A batch of one finished episode, as ``step()`` saw it: the step path scores through the same code."""
        prompt_ids, prompt_mask = env.prompt_batch([prompt_index])
        response = th.as_tensor([list(completion_ids)], dtype=th.long, device=device)
        return cls.from_generation(
            env,
            [prompt_index],
            th.as_tensor(prompt_ids, device=device),
            th.as_tensor(prompt_mask, device=device),
            response,
        )

    @property
    def device(self) -> th.device:
        return self.input_ids.device

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_length(self) -> int:
        """``T``, the padded response width."""
        return self.response_mask.shape[1]

    @property
    def prompt_ids(self) -> th.Tensor:
        """``(batch, P)`` int64, left-padded."""
        return self.input_ids[:, : -self.response_length]

    @property
    def prompt_mask(self) -> th.Tensor:
        """``(batch, P)`` int64."""
        return self.attention_mask[:, : -self.response_length]

    @property
    def response_ids(self) -> th.Tensor:
        """``(batch, T)`` int64, pad after the stop token."""
        return self.input_ids[:, -self.response_length :]

    @property
    def lengths(self) -> th.Tensor:
        """``(batch,)`` int64 number of real response tokens (at least 1)."""
        return self.response_mask.long().sum(-1)

    @property
    def infos(self) -> list[dict[str, Any]]:
        """The end-of-episode ``info`` of each episode, as ``env.step()`` returns it (decoded once, lazily)."""
        if self._infos is None:
            ids = self.response_ids.tolist()
            lengths = self.lengths.tolist()
            truncated = (~self.terminated).tolist()
            self._infos = [
                self.env.episode_info(int(p), row[:n], trunc)
                for p, row, n, trunc in zip(self.prompt_indices, ids, lengths, truncated)
            ]
        return self._infos

    @property
    def prompts(self) -> list[str]:
        return [info["prompt"] for info in self.infos]

    @property
    def completions(self) -> list[str]:
        return [info["completion"] for info in self.infos]

    @property
    def texts(self) -> list[str]:
        """Each whole episode (prompt and response) decoded in one piece, special tokens dropped.

        Decoding the whole sequence keeps the space between prompt and response that tokenizers such as
        SentencePiece drop when a response is decoded on its own.
        """
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(self.input_ids.cpu(), self.attention_mask.cpu())]
        return self.env.tokenizer.batch_decode(rows, skip_special_tokens=True)

    @property
    def reward_texts(self) -> list[str]:
        """What a text reward model reads of each episode: :attr:`texts`, or, when the env has
        ``reward_prompts`` (e.g. a chat-templated policy), the plain prompt and the response joined by one space,
        as HH transcripts join ``"\\n\\nAssistant:"`` and the answer: the format such a reward model was trained on,
        not the policy's chat template."""
        reward_prompts = getattr(self.env, "reward_prompts", None)
        if reward_prompts is None:
            return self.texts
        texts = []
        for index, completion in zip(self.prompt_indices, self.completions):
            prompt = reward_prompts[int(index)]
            separator = " " if prompt and not prompt[-1].isspace() else ""
            texts.append(prompt + separator + completion.lstrip())
        return texts

    def right_padded(self) -> tuple[th.Tensor, th.Tensor]:
        """The episodes with their real tokens moved to the front: ``(input_ids, attention_mask)``, each
        ``(batch, P + T)``, padding only on the right (the layout encoder and decoder classifiers both read)."""
        order = th.argsort(1 - self.attention_mask, dim=1, stable=True)
        return self.input_ids.gather(1, order), self.attention_mask.gather(1, order)

    def at_last_token(self, scores: th.Tensor) -> th.Tensor:
        """Place one score per episode on its last real token: ``(batch,) -> (batch, T)``."""
        rewards = th.zeros(self.response_mask.shape, dtype=th.float32, device=self.device)
        rewards[th.arange(self.batch_size, device=self.device), self.lengths - 1] = scores.to(self.device, th.float32)
        return rewards
