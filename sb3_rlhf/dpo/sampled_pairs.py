"""Preference pairs from a policy's own samples, labelled by a reward (on-policy data for DPO)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch as th

from sb3_rlhf.common.data import PreferencePair
from sb3_rlhf.common.evaluation import sample
from sb3_rlhf.envs.token_generation import TokenGenerationEnv
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.rewards.base import RewardWrapper, SequenceRewardWrapper


@th.no_grad()
def pairs_from_policy_samples(
    policy: TransformerActorCriticPolicy,
    env: TokenGenerationEnv,
    scorers: Sequence[RewardWrapper],
    pairs_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    n_prompts: int | None = None,
) -> tuple[list[PreferencePair], dict[str, float]]:
    """Sample two responses per prompt (``pairs_per_prompt`` times) and prefer the higher-scored one.

    ``n_prompts`` limits the prompts to the first ``n_prompts`` of ``env`` (default: all), e.g. to give DPO
    the same number of samples as an online run.

    The score is the sum of the sequence-level reward terms (reward model, reward function). Ties are dropped,
    and so are pairs with an empty response (a stop token first: no text to learn from). Prompts and
    responses are the env's texts.

    :return: the pairs, and counts: ``samples`` (responses generated), ``pairs``, ``ties``, ``empty``.
    """
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    if n_prompts is not None and n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    th.manual_seed(seed)
    indices = np.repeat(np.arange(min(n_prompts or len(env.prompts), len(env.prompts))), 2 * pairs_per_prompt)
    texts, scores = [], []
    for batch in sample(policy, env, indices, batch_size):
        texts += batch.completions
        scores += sum(
            (w.score(batch) for w in scorers if isinstance(w, SequenceRewardWrapper)), th.zeros(batch.batch_size)
        ).tolist()
    pairs, ties, empty = [], 0, 0
    for row in range(0, len(indices), 2):
        (a, score_a), (b, score_b) = (texts[row], scores[row]), (texts[row + 1], scores[row + 1])
        if not a.strip() or not b.strip():
            empty += 1
            continue
        if score_a == score_b or a == b:
            ties += 1
            continue
        chosen, rejected = (a, b) if score_a > score_b else (b, a)
        pairs.append(PreferencePair(env.prompt_texts[indices[row]], chosen, rejected))
    counts = {"samples": float(len(indices)), "pairs": float(len(pairs)), "ties": float(ties), "empty": float(empty)}
    return pairs, counts
