"""What both sides of ``benchmarks/peers.py`` share: the reward function, the memory probe and the evaluation of a
policy after training. It imports only torch and transformers (no sb3_rlhf, no TRL), so that the project's worker
and the TRL worker (``peers_trl_worker.py``, run by another virtual environment) measure in exactly the same way.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch as th
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase


def word_score_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """The mean over a completion's words of a fixed score in [−1, 1] drawn from the word's CRC-32: about 0 for a
    random policy, learnable token by token, and independent of the tokenizer. Both calling conventions work:
    ``fn(prompts, completions)`` (sb3_rlhf's ``RewardFunctionWrapper``) and TRL's keyword call with extra columns."""
    scores = []
    for text in completions:
        words = text.split()
        scores.append(sum((zlib.crc32(w.encode()) % 2001 - 1000) / 1000 for w in words) / max(len(words), 1))
    return scores


class RecordedReward:
    """A reward function that remembers the mean score of every batch it scored (the first and last training
    batches) and, when the caller passes ``completion_ids`` (TRL does), how many tokens it saw."""

    def __init__(self, fn: Callable[..., list[float]]) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "reward")  # TRL names its metrics after the function
        self.batch_means: list[float] = []
        self.tokens = 0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
        scores = self.fn(prompts, completions, **kwargs)
        self.batch_means.append(sum(scores) / len(scores))
        self.tokens += sum(len(ids) for ids in kwargs.get("completion_ids") or ())
        return scores


class PeakMemory:
    """Peak memory of a stretch of work.

    CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``), reset with
    ``/proc/self/clear_refs`` when :meth:`start` is called, minus the resident set at :meth:`baseline` (after the
    imports, before any model is loaded): the models' resident weights plus everything training adds at its peak.
    CUDA: ``torch.cuda.max_memory_allocated`` since :meth:`start` (the allocator's peak, weights included).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.base_kib = 0
        self.start_kib = 0

    @staticmethod
    def _status_kib(key: str) -> int:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
        assert match is not None, key
        return int(match.group(1))

    def baseline(self) -> None:
        self.base_kib = self._status_kib("VmRSS")

    def start(self) -> None:
        if self.device.startswith("cuda"):
            th.cuda.synchronize()
            th.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
        self.start_kib = self._status_kib("VmRSS")

    def peak_mib(self) -> dict[str, float]:
        """``peak_memory_mib`` (above the baseline, or the CUDA allocator's peak) and ``train_growth_mib`` (above the
        resident set when training started; CUDA: the peak above what was allocated then)."""
        if self.device.startswith("cuda"):
            th.cuda.synchronize()
            peak = th.cuda.max_memory_allocated() / 2**20
            return {"peak_memory_mib": peak, "train_growth_mib": peak - th.cuda.memory_allocated() / 2**20}
        peak_kib = self._status_kib("VmHWM")
        return {
            "peak_memory_mib": (peak_kib - self.base_kib) / 1024,
            "train_growth_mib": (peak_kib - self.start_kib) / 1024,
        }


class Timer:
    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> Timer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start

    def _sync(self) -> None:
        if self.device.startswith("cuda"):
            th.cuda.synchronize()


def _positions(mask: th.Tensor) -> th.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _next_token_logprobs(
    model: PreTrainedModel, ids: th.Tensor, mask: th.Tensor, n: int, temperature: float
) -> th.Tensor:
    """``(batch, n, vocab)`` log-probabilities of the next token at each of the last ``n`` positions."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False).logits
    return th.log_softmax(logits[:, -n - 1 : -1].float() / temperature, -1)


@th.no_grad()
def evaluate(
    actor: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: dict[str, Any],
    reward_fn: Callable[..., list[float]] | None = None,
    reward_model: PreTrainedModel | None = None,
    reference: PreTrainedModel | None = None,
) -> dict[str, float]:
    """Sample ``spec["eval_samples"]`` responses to each of ``spec["eval_prompts"]`` from ``actor`` (seeded, at the
    training temperature, stopping at EOS or ``response_length``) and score them the same way on both sides.

    :return: ``reward`` (mean score of the reward function or the reward model's logit at the last response
        token), ``length`` (mean response tokens) and, with a ``reference``, ``kl``: KL(π ‖ π_ref) per response
        (nats), as the mean over the sampled responses of Σ_t KL(π(·|y_<t) ‖ π_ref(·|y_<t)), each term exact over
        the vocabulary (unbiased, by the chain rule, and far less noisy than Σ_t log π(y_t) − log π_ref(y_t)).
    """
    device = next(actor.parameters()).device
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = [tokenizer(p)["input_ids"] for p in spec["eval_prompts"] for _ in range(spec["eval_samples"])]
    width = max(len(r) for r in rows)
    prompt_ids = th.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    prompt_mask = (
        th.arange(width, device=device) >= th.tensor([width - len(r) for r in rows], device=device)[:, None]
    ).long()
    config = GenerationConfig(
        do_sample=True,
        temperature=spec["temperature"],
        top_k=0,
        top_p=1.0,
        max_new_tokens=spec["response_length"],
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    was_training = actor.training
    actor.eval()
    saved_config = actor.generation_config  # the checkpoint's own options must not change the samples
    actor.generation_config = config
    try:
        with th.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            th.manual_seed(spec["eval_seed"])
            sequences = actor.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    finally:
        actor.generation_config = saved_config
    response = sequences[:, width:]
    n = response.shape[1]
    is_eos = response == eos
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    response_mask = (~after_eos).long()
    ids = th.cat([prompt_ids, response.masked_fill(after_eos, pad)], 1)
    mask = th.cat([prompt_mask, response_mask], 1)
    result = {"length": response_mask.sum(-1).float().mean().item()}
    if reward_fn is not None:
        prompts = [spec["eval_prompts"][i // spec["eval_samples"]] for i in range(len(rows))]
        completions = tokenizer.batch_decode(response.masked_fill(after_eos, pad), skip_special_tokens=True)
        scores = th.tensor(reward_fn(prompts, completions), dtype=th.float32)
    else:
        assert reward_model is not None
        # a sequence classifier pools its last non-pad token: the response's last token (EOS included)
        scores = reward_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, 0].float()
    result["reward"] = scores.mean().item()
    if reference is not None:
        logprobs = _next_token_logprobs(actor, ids, mask, n, spec["temperature"])
        ref_logprobs = _next_token_logprobs(reference, ids, mask, n, spec["temperature"])
        per_position = (logprobs.exp() * (logprobs - ref_logprobs)).sum(-1)
        result["kl"] = (per_position * response_mask).sum(-1).mean().item()
    actor.train(was_training)
    return result


def parameter_checksum(model: th.nn.Module) -> float:
    """A float that differs between models with different weights: both sides report it for the initial policy."""
    return float(sum(p.detach().double().sum().item() * (i + 1) for i, p in enumerate(model.parameters())))


def run_result(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    spec: dict[str, Any],
    score: dict[str, Any],
    initial: dict[str, float],
    train_scores: list[float],
    **counts: Any,
) -> dict[str, Any]:
    """What a worker reports, the same on both sides: ``counts`` (episodes, tokens, rollouts, seconds, the peak
    memory, the initial checksum), the initial evaluation, and the trained policy evaluated against the initial
    model (loaded again from ``spec["model_dir"]``) as the KL reference.

    :param score: ``reward_model=`` or ``reward_fn=`` for :func:`evaluate`.
    :param train_scores: the mean training reward of each rollout.
    """
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(spec["model_dir"]).to(spec["device"])
    final = evaluate(policy, tokenizer, spec, reference=reference, **score)
    return {
        **counts,
        "initial_reward": initial["reward"],
        "final_reward": final["reward"],
        "final_kl": final["kl"],
        "final_length": final["length"],
        "train_reward_first": train_scores[0] if train_scores else float("nan"),
        "train_reward_last": train_scores[-1] if train_scores else float("nan"),
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
