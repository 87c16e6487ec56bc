"""``sb3-rlhf reward-model``: a Bradley–Terry reward model trained on human comparisons."""

from __future__ import annotations

import argparse
from typing import Any

from sb3_rlhf.cli.common import add_training_arguments


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reward-model`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser("reward-model", help="train a reward model on human comparisons (Bradley–Terry)")
    add_training_arguments(parser, learning_rate=2e-5, batch_size=16, max_length=256)
    parser.add_argument("--head-learning-rate", type=float, default=1e-3)
    parser.add_argument("--pooling", default="auto", choices=["auto", "mean", "last", "first"])
    parser.add_argument("--center-coef", type=float, default=0.0)
    parser.add_argument(
        "--linear-probe-init", action="store_true", help="fit the head as a linear probe before fine-tuning"
    )
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--chosen-key", default="chosen")
    parser.add_argument("--rejected-key", default="rejected")
    parser.add_argument("--text-column", default="review", help="CSV: the text column")
    parser.add_argument("--label-column", default="sentiment", help="CSV: the label column")
    parser.add_argument("--positive-label", default="positive", help="CSV: the preferred label")
    parser.add_argument(
        "--format",
        choices=["pairs", "labels"],
        help="comparisons, or labelled texts (default: labels for a .csv file, else pairs)",
    )
    parser.add_argument(
        "--split-by",
        choices=["pair", "conversation"],
        default="pair",
        help="hold out pairs one by one, or by conversation (HH transcripts: one conversation is cut at several "
        "turns, and --test-size then counts conversations, each tested on one pair)",
    )
    parser.set_defaults(func=train_reward_model)
    return parser


def train_reward_model(args: argparse.Namespace) -> dict[str, object]:
    """``sb3-rlhf reward-model``: Bradley–Terry training on pairs from JSONL or a labelled CSV."""
    from sb3_rlhf.tasks.config import RewardModelTrainingSection
    from sb3_rlhf.tasks.stages import train_reward_model_stage

    fmt = args.format or ("labels" if (args.data or "").lower().endswith((".csv", ".csv.gz")) else "pairs")
    if fmt == "labels" and args.split_by == "conversation":
        raise ValueError(
            "--split-by conversation groups comparisons by conversation; labelled texts have none: drop it"
        )
    stage = RewardModelTrainingSection(
        path=args.data,
        dataset=args.dataset,
        config=args.dataset_config,
        split=args.split,
        data_dir=args.data_dir,
        revision=args.dataset_revision,
        format=fmt,
        backbone=args.model,
        backbone_revision=args.revision,
        source="hub" if args.dataset else "file",
        prompt_key=args.prompt_key,
        chosen_key=args.chosen_key,
        rejected_key=args.rejected_key,
        text_column=args.text_column,
        label_column=args.label_column,
        positive_label=args.positive_label,
        test_size=args.test_size,
        n_epochs=args.epochs,
        learning_rate=args.learning_rate,
        head_learning_rate=args.head_learning_rate,
        linear_probe_init=args.linear_probe_init,
        batch_size=args.batch_size,
        max_length=args.max_length,
        pooling=args.pooling,
        center_coef=args.center_coef,
        split_by=args.split_by,
    )
    progress_bar = not args.no_progress_bar
    folder, info = train_reward_model_stage(
        stage, args.out, args.seed, args.device, progress_bar, test_size_name="--test-size"
    )
    before, after = info["before"], info["after"]
    print(info["data"])
    print(f"pairs: {info['n_train']} train, {info['n_test']} held out (seed {args.seed})")
    print(
        f"held-out accuracy: {before['accuracy']:.3f} -> {after['accuracy']:.3f}; margin {after['margin']:.3f}, "
        f"scores mean {after['mean']:.3f} std {after['std']:.3f}"
    )
    print(f"reward model saved to {folder} (RewardModelWrapper(env, path) loads it)")
    return after
