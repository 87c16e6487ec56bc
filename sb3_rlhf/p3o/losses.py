"""The P3O objective (Wu et al. 2023, "Pairwise Proximal Policy Optimization: Harnessing Relative Feedback
for LLM Alignment"), on pairs of responses to the same prompt."""

from __future__ import annotations

from typing import NamedTuple

import torch as th

from sb3_rlhf.common.sequences import mean_over_sequences

#: ``"separate"``: each response's log-ratio clipped on its own; ``"joint"``: the pair's log-ratio clipped as a whole.
P3O_CLIPPING = ("separate", "joint")


class P3OLosses(NamedTuple):
    """``loss`` to minimise; the rest are diagnostics (floats)."""

    loss: th.Tensor
    clip_fraction: th.Tensor  # 0-d, read on the host once per update
    weight_clip_fraction: th.Tensor  # 0-d, read on the host once per update


def pairwise_reward_difference(returns: th.Tensor) -> th.Tensor:
    """Δ = R(x, y1) − R(x, y2) for pairs laid out as ``(n_pairs, 2)``.

    With R = r − β·ℓ (the reward model's score and the KL penalty summed over the response, ℓ the summed
    log-ratio log π_old − log π_ref), Δ = (r1 − r2) − β(ℓ1 − ℓ2). A per-prompt shift of the reward cancels.

    :return: ``(n_pairs, 2)``: Δ for the first response of each pair, −Δ for the second.
    """
    if returns.dim() != 2 or returns.shape[1] != 2:
        raise ValueError(f"pairwise returns must be (n_pairs, 2), got {tuple(returns.shape)}")
    delta = returns[:, 0] - returns[:, 1]
    return th.stack([delta, -delta], dim=1)


def p3o_loss(
    logprobs: th.Tensor,
    old_logprobs: th.Tensor,
    delta: th.Tensor,
    clip_range: float,
    weight_clip: float,
    clipping: str = "separate",
) -> P3OLosses:
    """Clipped pairwise policy-gradient loss. Tensors are ``(n_pairs, 2)`` sequence-level quantities.

    Pairs are sampled from π_old. With log ρ_i = log π_θ(y_i|x) − log π_old(y_i|x) (summed over the response's
    tokens), the pairwise policy gradient, importance-weighted from π_old, is

        ∇J = E_{y1,y2 ~ π_old}[ ρ1·ρ2 · Δ/2 · ∇(log ρ1 − log ρ2) ]

    The weight ρ1·ρ2 is held fixed (no gradient) and clipped to [1/c, c]; the trust region clips log-ratios
    pessimistically, as PPO clips ratios:

        separate:  J = E[ w/2 · ( min(Δ·log ρ1, Δ·clip(log ρ1, −ε, ε)) + min(−Δ·log ρ2, −Δ·clip(log ρ2, −ε, ε)) ) ]
        joint:     J = E[ w/2 ·   min(Δ·log(ρ1/ρ2), Δ·clip(log(ρ1/ρ2), −ε, ε)) ]
        w = sg(clip(ρ1·ρ2, 1/c, c)),   loss = −J

    At θ = θ_old (ρ = 1) both give exactly the pairwise policy gradient ½·Δ·∇(log π(y1) − log π(y2)).

    Against the paper and the authors' code (``thwu1/trlx``, ``trlx/trainer/accelerate_p3o_trainer.py`` at
    a87c31e; its loss at lines 213–241). The joint loss gives the authors' gradient (checked on random inputs to
    1.5e-8); the signal, the weight and the sequence-level log-ratios are the paper's. Where this differs:

    - separate clipping: here each response's *summed* log-ratio is clipped to ±ε, the trajectory-level V1 as
      the paper writes it; the authors' code (``clip_tokenwise=True``) clips every token's log-ratio instead, so a
      response may move up to T·ε there: a much wider trust region than this one;
    - the weight bound c: 2 by default here (``weight_clip``), 10 in every example of theirs;
    - scale: here Δ (with its KL term) is divided by its standard deviation over the rollout
      (``normalize_advantage``), which keeps β's weight against the score; theirs clips the reward model's score
      to ±10 and divides it by a running standard deviation before the KL term is added, which changes β's
      effective weight (their optional ``scale_q`` then divides the pair's difference by its minibatch standard
      deviation, as here; off by default);
    - averaging: a mean over pairs of w·J/2 here (theirs with ``avg_tokenwise=False``); their HH example sums over
      pairs and divides by the number of response tokens, without the ½: a learning-rate scale, not a direction;
    - ℓ in Δ: from the rollout policy here (the paper's Algorithm 1), from the current π_θ there;
    - ``clip_fraction`` counts every log-ratio outside ±ε; theirs only those where the clipped branch is taken.

    :param logprobs: ``(n_pairs, 2)`` log π_θ(y_i|x) (with gradient).
    :param old_logprobs: ``(n_pairs, 2)`` log π_old(y_i|x) from the rollout.
    :param delta: ``(n_pairs,)`` Δ = R(y1) − R(y2), already scaled if asked.
    :param clip_range: ε, on log-ratios.
    :param weight_clip: c > 1, the bound of the importance weight ρ1·ρ2.
    :param clipping: ``"separate"`` or ``"joint"``.
    """
    if clipping not in P3O_CLIPPING:
        raise ValueError(f"unknown P3O clipping {clipping!r}: use one of {P3O_CLIPPING}")
    log_ratio = logprobs - old_logprobs  # log ρ1, log ρ2
    weight = th.exp(log_ratio.sum(-1)).detach().clamp(1.0 / weight_clip, weight_clip)
    if clipping == "separate":
        signed = th.stack([delta, -delta], dim=1)  # y1 is pushed up by Δ, y2 by −Δ
        unclipped = signed * log_ratio
        clipped = signed * log_ratio.clamp(-clip_range, clip_range)
        objective = th.min(unclipped, clipped).sum(-1)
        clip_fraction = mean_over_sequences((log_ratio.abs() > clip_range).float(), 2 * len(delta))
    else:
        pair_log_ratio = log_ratio[:, 0] - log_ratio[:, 1]  # log(ρ1/ρ2)
        unclipped = delta * pair_log_ratio
        clipped = delta * pair_log_ratio.clamp(-clip_range, clip_range)
        objective = th.min(unclipped, clipped)
        clip_fraction = mean_over_sequences((pair_log_ratio.abs() > clip_range).float(), 2 * len(delta))
    loss = -mean_over_sequences(weight * objective / 2, 2 * len(delta))
    with th.no_grad():
        products = th.exp(log_ratio.sum(-1))
        weight_clip_fraction = mean_over_sequences(
            ((products < 1.0 / weight_clip) | (products > weight_clip)).float(), 2 * len(delta)
        )
    return P3OLosses(loss, clip_fraction, weight_clip_fraction)
