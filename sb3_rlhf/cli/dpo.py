"""``sb3-rlhf dpo``: Direct Preference Optimization of a causal LM on preference pairs."""

from __future__ import annotations

import argparse
import os
from typing import Any

from sb3_rlhf.cli.common import add_training_arguments, fit_and_export, records, training_settings


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``dpo`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser("dpo", help="Direct Preference Optimization of a causal LM on preference pairs")
    add_training_arguments(parser, learning_rate=5e-6, batch_size=8, max_length=512)
    parser.add_argument("--beta", type=float, default=0.1, help="strength of the implicit KL constraint (> 0)")
    parser.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo"])
    parser.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank (0: full fine-tuning)")
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--chosen-key", default="chosen")
    parser.add_argument("--rejected-key", default="rejected")
    parser.add_argument("--no-chat-template", action="store_true", help="do not apply the tokenizer's chat template")
    parser.set_defaults(func=train_dpo)
    return parser


def train_dpo(args: argparse.Namespace) -> dict[str, float]:
    """``sb3-rlhf dpo``: Direct Preference Optimization on preference pairs (JSONL, HH transcripts too)."""
    from sb3_rlhf.common.data import load_preference_pairs, train_test_split
    from sb3_rlhf.common.models import resolve_model_path
    from sb3_rlhf.dpo import DPOTrainer

    pairs, report = load_preference_pairs(records(args), args.chosen_key, args.rejected_key, args.prompt_key)
    train, test = train_test_split(pairs, args.test_size, args.seed, "--test-size")
    trainer = DPOTrainer(
        resolve_model_path(args.model, args.revision),
        None,
        train,
        test,
        beta=args.beta,
        loss_type=args.loss_type,
        lora={"r": args.lora_r} if args.lora_r else None,
        chat_template=False if args.no_chat_template else None,
        **training_settings(args),
    )
    before, after = fit_and_export(trainer, args)
    print(report)
    print(f"pairs: {len(train)} train, {len(test)} held out (seed {args.seed})")
    if after:
        print(
            f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}; implicit-reward accuracy "
            f"{after['rewards/accuracies']:.3f}, margin {after['rewards/margins']:.3f}"
        )
    print(f"model saved to {os.path.join(args.out, 'model')} (use it as policy_kwargs['model_name_or_path'])")
    return after
