"""``sb3-rlhf sft``: supervised fine-tuning of a causal LM on demonstrations."""

from __future__ import annotations

import argparse
import os
from typing import Any

from sb3_rlhf.cli.common import add_training_arguments, fit_and_export, records, training_settings


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sft`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser("sft", help="supervised fine-tuning of a causal LM on demonstrations")
    add_training_arguments(parser, learning_rate=5e-5, batch_size=8, max_length=512)
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--response-key", default="response")
    parser.add_argument("--no-chat-template", action="store_true", help="do not apply the tokenizer's chat template")
    parser.set_defaults(func=train_sft)
    return parser


def train_sft(args: argparse.Namespace) -> dict[str, float]:
    """``sb3-rlhf sft``: supervised fine-tuning on (prompt, response) demonstrations."""
    from sb3_rlhf.common.data import load_demonstrations, train_test_split
    from sb3_rlhf.common.models import resolve_model_path
    from sb3_rlhf.sft import SFTTrainer

    demos, report = load_demonstrations(records(args), args.prompt_key, args.response_key)
    train, test = train_test_split(demos, args.test_size, args.seed, "--test-size")
    trainer = SFTTrainer(
        resolve_model_path(args.model, args.revision),
        None,
        train,
        test,
        chat_template=False if args.no_chat_template else None,
        checkpoint_dir=os.path.join(args.out, "checkpoints"),
        **training_settings(args),
    )
    before, after = fit_and_export(trainer, args)
    print(report)
    print(f"demonstrations: {len(train)} train, {len(test)} held out (seed {args.seed})")
    print(f"held-out perplexity: {before['perplexity']:.2f} -> {after['perplexity']:.2f}")
    print(f"model saved to {os.path.join(args.out, 'model')} (use it as policy_kwargs['model_name_or_path'])")
    return after
