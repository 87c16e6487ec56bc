"""Compare a trained policy with the initial one on held-out prompts: reward score, KL, text quality, a second
judge's verdict, samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th

from sb3_rlhf.common.forward import response_logits
from sb3_rlhf.common.generation import GenerationBatch
from sb3_rlhf.common.judge import BagOfWordsJudge
from sb3_rlhf.common.quality import text_quality
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.common.sequences import logprobs_of_tokens, zero_padding
from sb3_rlhf.envs.token_generation import TokenGenerationEnv
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.rewards.base import RewardWrapper, SequenceRewardWrapper


@th.no_grad()
def sample(
    policy: TransformerActorCriticPolicy,
    env: TokenGenerationEnv,
    indices: Sequence[int] | np.ndarray,
    batch_size: int = 32,
    engine: RolloutEngine | None = None,
) -> list[GenerationBatch]:
    """Responses of ``policy`` to ``env.prompts[indices]``, in batches, with their log-probs filled.

    :param engine: the rollout engine to sample with (a training run's own: its cache setting, its compiled shape
        and what it learnt of a failed compilation); default: one with the default cache, ``batch_size`` rows.
    """
    engine = engine or RolloutEngine(batch_size=batch_size)
    return [
        engine.sample_episodes(policy, env, list(indices[start : start + batch_size]), with_values=False)[0]
        for start in range(0, len(indices), batch_size)
    ]


@th.no_grad()
def evaluate_policy(
    policy: TransformerActorCriticPolicy,
    reference: th.nn.Module,
    env: TokenGenerationEnv,
    scorers: Sequence[RewardWrapper],
    seed: int = 0,
    batch_size: int = 32,
    samples_per_prompt: int = 1,
    judge: BagOfWordsJudge | None = None,
    engine: RolloutEngine | None = None,
) -> tuple[dict[str, float], list[str], list[float]]:
    """Sample ``policy`` ``samples_per_prompt`` times on every prompt of ``env`` (the held-out prompts) and
    score the responses.

    :param reference: the KL reference (a causal LM: the initial policy's actor).
    :param scorers: the task's reward wrappers; their sequence-level terms (reward model, function) are the score.
    :param judge: a second judge (never trained against) of the responses' text.
    :param engine: the rollout engine to sample with (:func:`sample`).
    :return: metrics ``score`` (mean), ``kl`` (mean over responses of Σ_t log π(a_t|s_t) − log π_ref(a_t|s_t), the
        k1 estimate of KL(π‖π_ref) per response), ``response_length``, ``eos_fraction``, the text quality
        (:func:`~sb3_rlhf.common.quality.text_quality`: ``distinct_1``, ``distinct_2``, ``repeated_2gram_rate``),
        ``reference_perplexity`` (exp of the reference model's mean negative log-likelihood per response token, at
        temperature 1: how unusual the text is to the model it started from), with a judge
        ``judge_positive_share``; the completions and their scores (prompt by prompt). The caller's torch RNG is left as it
        was: evaluating during training does not change what training samples next.
    """
    scores, kls, lengths, eos, texts = [], [], [], [], []
    nll, n_tokens = 0.0, 0
    indices = np.repeat(np.arange(len(env.prompts)), samples_per_prompt)
    cuda = [policy.device] if policy.device.type == "cuda" else []
    with th.random.fork_rng(devices=cuda):
        th.manual_seed(seed)
        batches = sample(policy, env, indices, batch_size, engine)
    for batch in batches:
        score = sum(
            (w.score(batch) for w in scorers if isinstance(w, SequenceRewardWrapper)), th.zeros(batch.batch_size)
        )
        # one reference forward: the KL reads its logits at the sampling temperature, the perplexity as they are
        with policy.autocast():  # the policy's precision (its log-probs' own): the KL of an untrained policy is 0
            ref_logits, _ = response_logits(
                reference,
                batch.input_ids,
                batch.attention_mask,
                batch.response_length,
                1.0,
                policy.n_actions,
                packed=policy.packs(reference),
            )
        tokens = batch.input_ids[:, -batch.response_length :]
        ref = logprobs_of_tokens(ref_logits, tokens)  # the reference's own distribution: the perplexity's
        if policy.temperature != 1.0:
            ref_sampled = logprobs_of_tokens(ref_logits / policy.temperature, tokens)
        else:
            ref_sampled = ref
        assert batch.logprobs is not None  # sample() fills them
        kls += zero_padding(batch.logprobs - ref_sampled, batch.response_mask).sum(-1).tolist()
        nll -= float(zero_padding(ref, batch.response_mask).sum())
        n_tokens += int(batch.response_mask.sum())
        scores += score.tolist()
        lengths += batch.lengths.tolist()
        eos += batch.terminated.tolist()
        texts += batch.completions
    metrics = {
        "score": float(np.mean(scores)),
        "kl": float(np.mean(kls)),
        "response_length": float(np.mean(lengths)),
        "eos_fraction": float(np.mean(eos)),
        **text_quality(texts),
        "reference_perplexity": float(np.exp(nll / max(n_tokens, 1))),
    }
    if judge is not None:
        metrics["judge_positive_share"] = judge.positive_share(texts)
    return metrics, texts, scores


def student_t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (``0.5 <= q < 1``) of Student's t distribution with ``df`` degrees of freedom: bisection
    on its CDF, the density integrated numerically (accurate to about 1e-6; no SciPy needed)."""
    if not 0.5 <= q < 1 or df < 1:
        raise ValueError(f"need 0.5 <= q < 1 and df >= 1, got q={q}, df={df}")
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t: float) -> float:
        x = np.linspace(0.0, t, 20_001)
        return 0.5 + float(np.trapezoid(np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df)), x))

    low, high = 0.0, 1.0
    while cdf(high) < q:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cdf(middle) < q else (low, middle)
    return (low + high) / 2


def paired_preference(initial_scores: Sequence[float], trained_scores: Sequence[float]) -> dict[str, float]:
    """How the score prefers the trained policy's response to the initial one's, prompt by prompt (the same
    prompts and sampling seed): the Bradley–Terry preference mean σ(r_trained − r_initial), the share of prompts
    where the trained response scores higher (ties count half), and the mean difference with its 95% interval
    (Student's t over the n paired differences, n − 1 degrees of freedom).
    """
    initial, trained = np.asarray(initial_scores, dtype=float), np.asarray(trained_scores, dtype=float)
    if initial.shape != trained.shape or initial.size < 2:
        raise ValueError(
            f"paired scores need the same prompts for both policies, at least two: got {initial.size} and "
            f"{trained.size}"
        )
    difference = trained - initial
    half_width = student_t_quantile(0.975, difference.size - 1) * difference.std(ddof=1) / np.sqrt(difference.size)
    return {
        "bradley_terry_preference": float(np.mean(1.0 / (1.0 + np.exp(-difference)))),
        "win_rate": float(np.mean((difference > 0) + 0.5 * (difference == 0))),
        "mean_difference": float(difference.mean()),
        "ci95_low": float(difference.mean() - half_width),
        "ci95_high": float(difference.mean() + half_width),
        "n": float(difference.size),
    }


def compare_policies(
    trained: TransformerActorCriticPolicy,
    initial: TransformerActorCriticPolicy,
    env: TokenGenerationEnv,
    scorers: Sequence[RewardWrapper],
    seed: int = 0,
    n_samples_shown: int = 4,
    judge: BagOfWordsJudge | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_policy` for the trained and the initial policy (also the KL reference), same seed.

    :return: ``{"initial": metrics, "trained": metrics, "paired": paired_preference(...), "samples": [...],
        "per_prompt": [...]}``: each held-out prompt (as given, before any cut) with its two scores, for a
        comparison on a subset of the prompts.
    """
    results: dict[str, Any] = {}
    completions, scores = {}, {}
    for name, policy in (("initial", initial), ("trained", trained)):
        results[name], completions[name], scores[name] = evaluate_policy(
            policy, initial.actor, env, scorers, seed, judge=judge
        )
    if len(env.prompts) >= 2:
        results["paired"] = paired_preference(scores["initial"], scores["trained"])
    results["samples"] = [
        {"prompt": env.prompt_texts[i], "initial": completions["initial"][i], "trained": completions["trained"][i]}
        for i in range(min(n_samples_shown, len(env.prompts)))
    ]
    results["per_prompt"] = [
        {"prompt": text, "initial": float(before), "trained": float(after)}
        for text, before, after in zip(env.prompts, scores["initial"], scores["trained"], strict=True)
    ]
    return results


def report_markdown(name: str, results: dict[str, Any], n_prompts: int) -> str:
    """The comparison as a Markdown report."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        f"# {name}: trained policy against the initial one on {n_prompts} held-out prompts",
        "",
        "| policy | mean score | KL to the reference (nats per response) | response length | ends with EOS |",
        "|---|---|---|---|---|",
    ]
    for key in ("initial", "trained"):
        m = results[key]
        lines.append(
            f"| {key} | {m['score']:.4f} | {m['kl']:.3f} | {m['response_length']:.1f} | {m['eos_fraction']:.2f} |"
        )
    if "paired" in results:
        p = results["paired"]
        lines += [
            "",
            f"Paired on the same {p['n']:.0f} prompts: the trained response scores higher on {100 * p['win_rate']:.0f}% of "
            f"them; mean difference {p['mean_difference']:+.4f} (95% interval {p['ci95_low']:+.4f} to "
            f"{p['ci95_high']:+.4f}); Bradley–Terry preference for the trained response, mean σ(Δ score), "
            f"{p['bradley_terry_preference']:.3f}.",
        ]
    judged = "judge_positive_share" in results["initial"]
    lines += [
        "",
        "| policy | distinct-1 | distinct-2 | repeated bigrams | reference perplexity |"
        + (" second judge: positive |" if judged else ""),
        "|---|---|---|---|---|" + ("---|" if judged else ""),
    ]
    for key in ("initial", "trained"):
        m = results[key]
        lines.append(
            f"| {key} | {m['distinct_1']:.3f} | {m['distinct_2']:.3f} | {m['repeated_2gram_rate']:.3f} | "
            f"{m['reference_perplexity']:.1f} |" + (f" {m['judge_positive_share']:.2f} |" if judged else "")
        )
    lines += ["", "| prompt | initial | trained |", "|---|---|---|"]
    lines += [f"| {cell(s['prompt'])} | {cell(s['initial'])} | {cell(s['trained'])} |" for s in results["samples"]]
    return "\n".join(lines) + "\n"
