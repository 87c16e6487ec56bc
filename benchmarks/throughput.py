"""Benchmark: the speed of one RLHFPPO iteration against the bare work it must do, against naive token
stepping with stock SB3 PPO, and how it scales with the response length T and the batch B.

    python benchmarks/throughput.py                 # the ~17M-parameter Llama built in memory (a few minutes)
    python benchmarks/throughput.py --smollm        # also SmolLM2-135M-Instruct, when its package is installed

1. Floor: one iteration written directly with torch and transformers on the same model and data — one
   ``generate()`` with the KV cache, one teacher-forced pass of the policy (log-probs and the value head), one of
   the reference, then E epochs of forward + backward + AdamW step over minibatches — against one RLHFPPO
   iteration (``learn()`` for one rollout and one update), with the breakdown of where RLHFPPO spends it.
2. Naive: stock ``stable_baselines3.PPO`` on the same TokenGenerationEnv and policy, one full forward per token
   (what a straightforward port of an SB3 agent does), in time per generated token (rollout + update).
3. Scaling: time per iteration and of generation alone as T doubles (16 → 128) and as B doubles, with the
   fitted exponents (time ∝ T^a): a KV-cached generation is about linear in T.

All in one process, same threads, medians of ``--repeats`` after a warm-up. Writes
``benchmarks/results/throughput.md``. A benchmark reports: it fails on nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from stable_baselines3 import PPO
from transformers import AutoTokenizer, GenerationConfig
from versions import versions_line  # benchmarks/versions.py

from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.models import causal_lm_from_config, load_causal_lm, packaged_model_path
from sb3_rlhf.common.sequences import masked_mean, masked_whiten, position_ids_from_mask, response_mask_until_stop
from sb3_rlhf.common.tiny import tiny_config, tiny_tokenizer
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "throughput.md")


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A reward that costs nothing to compute: the measured work is the RL machinery, not the scorer."""
    return [len(c.split()) / 10.0 for c in completions]


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Setup:
    """A model folder, its tokenizer and prompts of ``prompt_tokens`` tokens."""

    def __init__(self, model_path: str, tokenizer: Any, n_prompts: int, prompt_tokens: int, seed: int = 0) -> None:
        self.model_path = model_path
        self.tokenizer = tokenizer
        rng = np.random.default_rng(seed)
        vocab = [t for t in tokenizer.get_vocab() if t not in tokenizer.all_special_tokens]
        self.prompts = []
        for _ in range(n_prompts):
            ids = tokenizer(" ".join(rng.choice(vocab, size=prompt_tokens * 2)), add_special_tokens=False)["input_ids"]
            self.prompts.append(tokenizer.decode(ids[:prompt_tokens]))
        self.prompt_tokens = prompt_tokens

    def env(self, max_new_tokens: int) -> Any:
        env = TokenGenerationEnv(self.prompts, self.tokenizer, self.prompt_tokens + 8, max_new_tokens)
        return KLPenaltyWrapper(RewardFunctionWrapper(env, fn=length_reward), coef=0.05)

    def ours(self, batch: int, new_tokens: int, epochs: int, minibatch: int, seed: int = 0) -> RLHFPPO:
        return RLHFPPO(
            TransformerActorCriticPolicy,
            self.env(new_tokens),
            learning_rate=1e-5,
            n_episodes=batch,
            batch_size=minibatch,
            n_epochs=epochs,
            n_logged_samples=0,
            policy_kwargs=dict(model_name_or_path=self.model_path),
            seed=seed,
            device="cpu",
        )


def ours_iteration(model: RLHFPPO) -> Callable[[], None]:
    def run() -> None:
        model.learn(total_timesteps=1)  # exactly one rollout of n_episodes, then one update

    return run


def ours_breakdown(model: RLHFPPO, repeats: int) -> dict[str, float]:
    """Time of each stage RLHFPPO runs, called one by one through the public API."""
    env = model.generation_env
    policy = model.policy
    wrappers = model.reward_wrappers
    indices = env.sample_prompt_indices(model.n_episodes)
    prompt_ids, prompt_mask = (th.as_tensor(a) for a in env.prompt_batch(indices))
    stages: dict[str, float] = {}
    policy.set_training_mode(False)
    stages["generate()"] = median_time(
        lambda: model.rollout_engine.generate(
            policy, prompt_ids, prompt_mask, env.max_new_tokens, env.stop_token_ids, env.pad_token_id
        ),
        repeats,
    )
    batch, values = model.rollout_engine.sample_episodes(policy, env, indices)
    stages["teacher-forced policy pass (log-probs, values)"] = median_time(
        lambda: th.no_grad()(policy.evaluate_sequences)(
            batch.input_ids, batch.attention_mask, batch.response_length, with_entropy=False
        ),
        repeats,
    )
    kl, score = wrappers[0], wrappers[1]
    stages["reference pass (KL wrapper)"] = median_time(lambda: kl.batch_rewards(batch), repeats)
    stages["reward function (decode + score)"] = median_time(
        lambda: score.batch_rewards(type(batch)(**{**batch.__dict__, "_infos": None})), repeats
    )

    def buffer() -> None:
        buf = model.rollout_buffer
        buf.reset()
        rewards = th.zeros_like(batch.logprobs)
        buf.add(
            *(batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask),
            batch.logprobs,
            values,
            rewards,
            batch.terminated,
        )
        buf.compute_returns_and_advantage()

    stages["buffer + GAE"] = median_time(buffer, repeats)
    stages["update (E epochs)"] = median_time(model.train, repeats)
    return stages


class Floor:
    """The same iteration written directly with torch and transformers: no env, no SB3, no wrappers."""

    def __init__(self, model: RLHFPPO, batch: int, new_tokens: int, epochs: int, minibatch: int) -> None:
        self.actor = copy.deepcopy(model.policy.actor)
        self.head = copy.deepcopy(model.policy.value_head)
        self.ref = copy.deepcopy(model.policy.actor).eval().requires_grad_(False)
        self.optimizer = th.optim.AdamW([*self.actor.parameters(), *self.head.parameters()], lr=1e-5)
        env = model.generation_env
        self.stop = list(env.stop_token_ids)
        self.pad = env.pad_token_id
        self.prompt_ids, self.prompt_mask = (
            th.as_tensor(a) for a in env.prompt_batch(env.sample_prompt_indices(batch))
        )
        self.config = GenerationConfig(
            do_sample=True,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            eos_token_id=self.stop,
            pad_token_id=self.pad,
            use_cache=True,
        )
        self.epochs, self.minibatch, self.new_tokens = epochs, minibatch, new_tokens

    def _forward(self, model: Any, ids: th.Tensor, mask: th.Tensor, n: int, hidden: bool) -> Any:
        return model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            logits_to_keep=n + 1,
            output_hidden_states=hidden,
            use_cache=False,
        )

    def __call__(self) -> None:
        with th.no_grad():
            self.actor.eval()
            sequences = self.actor.generate(
                input_ids=self.prompt_ids, attention_mask=self.prompt_mask, generation_config=self.config
            )
            response = sequences[:, self.prompt_ids.shape[1] :]
            n = response.shape[1]
            response_mask, _ = response_mask_until_stop(response, self.stop)
            mask = th.cat([self.prompt_mask, response_mask.long()], dim=1)
            out = self._forward(self.actor, sequences, mask, n, hidden=True)
            old_logprobs = F.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
            old_values = self.head(out.hidden_states[-1][:, -n - 1 : -1]).squeeze(-1)
            ref = self._forward(self.ref, sequences, mask, n, hidden=False)
            ref_logprobs = F.log_softmax(ref.logits[:, :-1].float(), -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)
            rewards = -0.05 * (old_logprobs - ref_logprobs) * response_mask
            returns = rewards.flip(-1).cumsum(-1).flip(-1)  # γ = 1, λ = 1: the cheapest correct advantage
            advantages = masked_whiten(returns - old_values, response_mask)
        self.actor.train()
        for _ in range(self.epochs):
            for start in range(0, sequences.shape[0], self.minibatch):
                rows = slice(start, start + self.minibatch)
                out = self._forward(self.actor, sequences[rows], mask[rows], n, hidden=True)
                logits = out.logits[:, :-1].float()
                logprobs = F.log_softmax(logits, -1).gather(-1, response[rows].unsqueeze(-1)).squeeze(-1)
                values = self.head(out.hidden_states[-1][:, -n - 1 : -1]).squeeze(-1)
                ratio = th.exp(logprobs - old_logprobs[rows])
                adv = advantages[rows]
                pg = th.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
                loss = masked_mean(pg, response_mask[rows]) + 0.5 * masked_mean(
                    (values - returns[rows]) ** 2, response_mask[rows]
                )
                self.optimizer.zero_grad()
                loss.backward()
                th.nn.utils.clip_grad_norm_(self.actor.parameters(), 1.0)
                self.optimizer.step()


def naive_sb3_seconds_per_token(setup: Setup, new_tokens: int, n_steps: int, epochs: int) -> float:
    """Stock SB3 PPO stepping the env one token at a time, one full forward per step."""
    model = PPO(
        TransformerActorCriticPolicy,
        setup.env(new_tokens),
        n_steps=n_steps,
        batch_size=n_steps // 4,
        n_epochs=epochs,
        learning_rate=1e-5,
        policy_kwargs=dict(model_name_or_path=setup.model_path),
        seed=0,
        device="cpu",
    )
    model.env.envs[0].env.bind(model.policy)  # the KL wrapper's policy (RLHFPPO binds it itself)
    model.learn(total_timesteps=n_steps)  # warm-up
    start = time.perf_counter()
    model.learn(total_timesteps=n_steps)
    return (time.perf_counter() - start) / n_steps


def fit_exponent(xs: list[int], ys: list[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def small_llama(folder: str) -> str:
    """A ~17M-parameter Llama (6 layers, hidden 384) over a 4,003-token word-level vocabulary, saved to ``folder``."""
    tokenizer = tiny_tokenizer([f"w{i}" for i in range(4000)])
    config = tiny_config(len(tokenizer), "llama", hidden_size=384, num_layers=6, num_heads=6, max_positions=512)
    config.intermediate_size = 1536
    with th.random.fork_rng():
        th.manual_seed(0)
        causal_lm_from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def n_parameters(path: str) -> int:
    return sum(p.numel() for p in load_causal_lm(path).parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="B: prompts per iteration")
    parser.add_argument("--new-tokens", type=int, default=32, help="T: new tokens per response")
    parser.add_argument("--epochs", type=int, default=2, help="E: PPO epochs")
    parser.add_argument("--minibatch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-steps", type=int, default=128, help="tokens per naive SB3 PPO rollout")
    parser.add_argument("--scaling-tokens", type=int, nargs="+", default=[16, 32, 64, 128], help="T values (B=16)")
    parser.add_argument("--scaling-batch", type=int, nargs="+", default=[4, 8, 16, 32], help="B values (T=32)")
    parser.add_argument("--smollm", action="store_true", help="also SmolLM2-135M-Instruct (floor and ours only)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    started = time.time()
    B, T, E, M = args.batch, args.new_tokens, args.epochs, args.minibatch
    lines = [
        "# Throughput: RLHFPPO against the floor, naive SB3 stepping, and scaling",
        "",
        f"Command: `python benchmarks/throughput.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores, {args.threads} "
        f"torch threads. Medians of {args.repeats} repeats after a warm-up, every measurement in this one process.",
        f"Versions: {versions_line()}.",
        "",
    ]

    with tempfile.TemporaryDirectory() as folder:
        models = [("Llama 6×384 (built in memory)", small_llama(os.path.join(folder, "llama")))]
        if args.smollm:
            try:
                models.append(("SmolLM2-135M-Instruct", packaged_model_path("SmolLM2-135M-Instruct")))
            except ImportError as missing:
                print(f"SmolLM2 skipped: {missing}")
        lines += [
            f"## 1. One iteration against the floor (B={B} prompts, T={T} new tokens, E={E} epochs, "
            f"minibatches of {M}, prompts of {args.prompt_tokens} tokens)",
            "",
            "| model | parameters | floor (s) | RLHFPPO (s) | floor / RLHFPPO | tokens per second (RLHFPPO) |",
            "|---|---|---|---|---|---|",
        ]
        breakdowns = []
        for name, path in models:
            setup = Setup(path, AutoTokenizer.from_pretrained(path), 64, args.prompt_tokens)
            model = setup.ours(B, T, E, M)
            ours = median_time(ours_iteration(model), args.repeats)
            floor = median_time(Floor(model, B, T, E, M), args.repeats)
            tokens = B * T
            lines.append(
                f"| {name} | {n_parameters(path) / 1e6:.1f}M | {floor:.3f} | {ours:.3f} | {floor / ours:.2f} | "
                f"{tokens / ours:.0f} |"
            )
            breakdowns.append((name, ours, ours_breakdown(model, args.repeats)))
            print(lines[-1], flush=True)
        for name, total, stages in breakdowns:
            lines += [
                "",
                f"Where one RLHFPPO iteration goes ({name}; each stage timed alone):",
                "",
                "| stage | seconds | share of the iteration |",
                "|---|---|---|",
            ]
            for stage, seconds in stages.items():
                lines.append(f"| {stage} | {seconds:.4f} | {seconds / total:.1%} |")
            rest = total - sum(stages.values())
            lines.append(f"| the rest (callbacks per token, logging, bookkeeping) | {rest:.4f} | {rest / total:.1%} |")

        name, path = models[0]
        setup = Setup(path, AutoTokenizer.from_pretrained(path), 64, args.prompt_tokens)
        naive = naive_sb3_seconds_per_token(setup, T, args.naive_steps, E)
        model = setup.ours(B, T, E, M)
        ours_per_token = median_time(ours_iteration(model), args.repeats) / (B * T)
        lines += [
            "",
            f"## 2. Against naive token stepping ({name})",
            "",
            "Stock `stable_baselines3.PPO` on the same env, policy and rewards: one `env.step()` per token and one "
            f"full forward of the whole window per step (rollouts of {args.naive_steps} tokens, E={E}).",
            "",
            "| | seconds per generated token (rollout + update) | speed-up |",
            "|---|---|---|",
            f"| stock SB3 PPO, one forward per token | {naive:.5f} | 1× |",
            f"| RLHFPPO (B={B}, T={T}) | {ours_per_token:.5f} | {naive / ours_per_token:.1f}× |",
        ]
        print("\n".join(lines[-3:]), flush=True)

        lines += [
            "",
            f"## 3. Scaling ({name}, E={E})",
            "",
            "| B | T | iteration (s) | generate() alone (s) |",
            "|---|---|---|---|",
        ]
        series: dict[str, tuple[list[int], list[float], list[float]]] = {"T": ([], [], []), "B": ([], [], [])}
        for axis, shapes in (
            ("T", [(16, t) for t in args.scaling_tokens]),
            ("B", [(b, 32) for b in args.scaling_batch]),
        ):
            for b, t in shapes:
                model = setup.ours(b, t, E, min(M, b))
                iteration = median_time(ours_iteration(model), args.repeats)
                env = model.generation_env
                ids, mask = (th.as_tensor(a) for a in env.prompt_batch(env.sample_prompt_indices(b)))
                generation = median_time(
                    lambda: model.rollout_engine.generate(
                        model.policy, ids, mask, t, env.stop_token_ids, env.pad_token_id
                    ),
                    args.repeats,
                )
                xs, its, gens = series[axis]
                xs.append(t if axis == "T" else b)
                its.append(iteration)
                gens.append(generation)
                lines.append(f"| {b} | {t} | {iteration:.3f} | {generation:.3f} |")
                print(lines[-1], flush=True)
        lines += [""]
        for axis, (xs, its, gens) in series.items():
            lines.append(
                f"Fitted exponent in {axis} (time ∝ {axis}^a): iteration a = {fit_exponent(xs, its):.2f}, "
                f"generate() a = {fit_exponent(xs, gens):.2f}."
            )
    lines += ["", f"Total benchmark time {time.time() - started:.0f} s.", ""]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        with open(RESULTS, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
