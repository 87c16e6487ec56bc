"""Benchmark: peak memory of one PPO iteration (rollout and update) against batch and response length, with and
without a token budget (``max_batch_tokens``, with ``generation_batch_size`` for the rollout) and activation
checkpointing.

    python benchmarks/memory_grid.py                 # B ∈ {4, 8, 16} × T ∈ {32, 64, 128}, four variants (~8 min)
    python benchmarks/memory_grid.py --batches 4 8 --lengths 32 --no-write

Each cell is its own process (a random Llama 256×4 with a 32000-token vocabulary, RLHFPPO with a shared value
head, the KL penalty against the reference, a Python reward, 2 epochs of one minibatch, one iteration after a
warm-up iteration of the same size). Peak memory is the growth of the resident set during the measured
iteration above the resident set when it started (``VmHWM`` reset through ``/proc/self/clear_refs``): the
activations, logits, KV cache and their copies; the weights, gradients and AdamW's moments exist before it
(the warm-up allocated them). Writes ``benchmarks/results/memory_grid.md``. A benchmark reports: it fails on
nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "memory_grid.md")
PROMPT_TOKENS = 32
#: (label, max_batch_tokens and generation_batch_size set, activation checkpointing)
VARIANTS = [
    ("no budget", False, False),
    ("activation checkpointing", False, True),
    ("token budget", True, False),
    ("token budget + checkpointing", True, True),
]


def cell(spec: dict[str, Any]) -> dict[str, float]:
    """One iteration at ``spec``'s size in this process: its peak resident-set growth (MiB)."""
    import torch as th
    from peers_common import PeakMemory
    from transformers import LlamaConfig, LlamaForCausalLM

    from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
    from sb3_rlhf.common.tiny import TINY_WORDS, tiny_prompts, tiny_tokenizer
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper

    th.set_num_threads(spec["threads"])
    B, T, budget = spec["batch"], spec["length"], spec["budget"]
    tokenizer = tiny_tokenizer(TINY_WORDS)
    with tempfile.TemporaryDirectory() as folder:
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=PROMPT_TOKENS + T + 8,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        th.manual_seed(0)
        model = LlamaForCausalLM(config)
        # the random model almost never stops: every response runs to T tokens
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        words = PROMPT_TOKENS - 2  # with BOS, within max_prompt_tokens
        prompts = tiny_prompts(16, min_words=words, max_words=words)
        # responses of exactly T tokens: the grid's T is the response length
        env = TokenGenerationEnv(prompts, tokenizer, PROMPT_TOKENS, T, stop_at_eos=False)
        env = KLPenaltyWrapper(RewardFunctionWrapper(env, fn=lambda p, c: [float(len(x)) for x in c]), coef=0.05)
        ppo = RLHFPPO(
            TransformerActorCriticPolicy,
            env,
            n_episodes=B,
            batch_size=B,
            n_epochs=2,
            max_batch_tokens=budget or None,
            generation_batch_size=max(1, budget // (PROMPT_TOKENS + T)) if budget else None,
            n_logged_samples=0,
            seed=0,
            policy_kwargs={"model_name_or_path": folder, "gradient_checkpointing": spec["checkpointing"]},
        )
        ppo.learn(1)  # warm-up: weights, gradients and AdamW's moments exist from here on
        memory = PeakMemory("cpu")
        memory.start()
        ppo.learn(1, reset_num_timesteps=False)
        peak = memory.peak_mib()
    tokens = int(ppo.rollout_buffer.response_mask.sum())
    return {"growth_mib": peak["train_growth_mib"], "tokens": tokens}


def run_cell(spec: dict[str, Any]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "OMP_NUM_THREADS": str(spec["threads"]),
            "TOKENIZERS_PARALLELISM": "false",
            # a fixed mmap threshold: freed large tensors go back to the OS, so the resident set follows what is
            # alive (glibc otherwise raises the threshold after a free and keeps later ones on its heap)
            "MALLOC_MMAP_THRESHOLD_": "131072",
        },
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    if sys.argv[1:2] == ["--cell"]:
        sys.path.insert(0, HERE)
        print(json.dumps(cell(json.loads(sys.argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--budget", type=int, default=4 * (PROMPT_TOKENS + 64), help="max_batch_tokens of the budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    grid: dict[tuple[str, int, int], float] = {}
    for label, budgeted, checkpointing in VARIANTS:
        for B in args.batches:
            for T in args.lengths:
                spec = dict(
                    batch=B,
                    length=T,
                    budget=args.budget if budgeted else 0,
                    checkpointing=checkpointing,
                    threads=args.threads,
                )
                result = run_cell(spec)
                grid[(label, B, T)] = result["growth_mib"]
                print(f"{label:30s} B={B:3d} T={T:4d}: +{result['growth_mib']:7.1f} MiB", flush=True)
    sys.path.insert(0, HERE)
    from versions import versions_line

    lines = [
        "# Peak memory of one PPO iteration against batch and response length",
        "",
        f"`python benchmarks/memory_grid.py`; {args.threads} threads. Growth of the resident set during one "
        "iteration (rollout + 2 epochs of update) above what existed when it started (weights, gradients, AdamW's "
        f"moments): random Llama 256×4, vocabulary 32000, prompts of {PROMPT_TOKENS} tokens, responses of exactly "
        "T tokens, RLHFPPO with a shared value head and the KL penalty. *Token budget*: `max_batch_tokens="
        f"{args.budget}` and `generation_batch_size` = ⌊{args.budget} / (prompt + T)⌋ (at least 1). MiB; each cell "
        "its own process.",
        "",
    ]
    for label, _, _ in VARIANTS:
        lines += [f"**{label}**", "", "| B \\ T | " + " | ".join(str(t) for t in args.lengths) + " |"]
        lines += ["|---|" + "---|" * len(args.lengths)]
        for B in args.batches:
            lines.append(f"| {B} | " + " | ".join(f"{grid[(label, B, T)]:.0f}" for T in args.lengths) + " |")
        lines.append("")
    largest = (args.batches[-1], args.lengths[-1])
    smallest = (args.batches[0], args.lengths[0])
    for label, _, _ in VARIANTS:
        lines.append(
            f"- {label}: {grid[(label, *largest)]:.0f} MiB at B={largest[0]}, T={largest[1]} against "
            f"{grid[(label, *smallest)]:.0f} MiB at B={smallest[0]}, T={smallest[1]} "
            f"({grid[(label, *largest)] / max(grid[(label, *smallest)], 1e-9):.1f}×)."
        )
    lines += ["", versions_line(), ""]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        with open(RESULTS, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
