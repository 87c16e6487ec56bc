"""``sb3-rlhf demo``: PPO on a tiny random model with a rule reward."""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser(
        "demo", help="PPO on a tiny random model with a rule reward (runs in about a minute on CPU)"
    )
    parser.add_argument("--out", default="runs/demo", help="folder for TensorBoard logs, the SB3 zip and the export")
    parser.add_argument("--timesteps", type=int, default=30_000, help="generated tokens to train on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.set_defaults(func=run)
    return parser


def tiny_demo(out: str, timesteps: int, seed: int, device: str, progress_bar: bool) -> dict[str, float]:
    """Train a tiny random Llama with PPO to say "good" (rule reward) under a KL penalty; return a summary."""
    from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
    from sb3_rlhf.common.callbacks import RolloutHistoryCallback
    from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model, tiny_prompts
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
    from sb3_rlhf.rewards.rules import share_of_good

    base_model = os.path.join(out, "base_model")
    tokenizer = save_tiny_model(base_model, TINY_WORDS, "llama", seed=seed, hidden_size=64)

    prompts = tiny_prompts(200, seed, min_words=2)

    env = KLPenaltyWrapper(
        RewardFunctionWrapper(
            TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=12), fn=share_of_good
        ),
        coef=0.02,
    )
    model = RLHFPPO(
        TransformerActorCriticPolicy,
        env,
        learning_rate=1e-3,
        n_episodes=64,
        batch_size=16,
        n_epochs=4,
        policy_kwargs=dict(model_name_or_path=base_model),
        tensorboard_log=os.path.join(out, "tensorboard"),
        seed=seed,
        device=device,
    )
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=timesteps, callback=history, progress_bar=progress_bar)
    model.save(os.path.join(out, "ppo_tiny.zip"))
    model.policy.save_pretrained(os.path.join(out, "policy"), tokenizer=tokenizer)
    first, last = history.history[0], history.history[-1]
    return {
        "rollouts": len(history.history),
        "first_scores": first["scores"],
        "last_scores": last["scores"],
        "last_kl": last["kl"],
        "last_response_length": last["response_length"],
    }


def run(args: argparse.Namespace) -> dict[str, float]:
    """Run the demo and print where its outputs went."""
    summary = tiny_demo(args.out, args.timesteps, args.seed, args.device, progress_bar=not args.no_progress_bar)
    print(f"rollouts: {summary['rollouts']}")
    print(
        f"mean score (share of 'good'): first rollout {summary['first_scores']:.3f} -> last {summary['last_scores']:.3f}"
    )
    print(f"KL to the reference (nats per response): {summary['last_kl']:.3f}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(args.out, 'tensorboard')}")
    print(f"SB3 model: {os.path.join(args.out, 'ppo_tiny.zip')}; exported policy: {os.path.join(args.out, 'policy')}")
    return summary
