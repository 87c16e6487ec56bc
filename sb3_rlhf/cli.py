"""The ``sb3-rlhf`` command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np

TINY_WORDS = "the a cat dog sat ran on under mat log good bad happy sad big small and then it was".split()


def tiny_demo(out: str, timesteps: int, seed: int, device: str, progress_bar: bool) -> dict[str, float]:
    """Train a tiny random Llama with PPO to say "good" (rule reward) under a KL penalty; return a summary."""
    from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
    from sb3_rlhf.common.callbacks import RolloutHistoryCallback
    from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper

    tokenizer = tiny_tokenizer(TINY_WORDS)
    base_model = os.path.join(out, "base_model")
    tiny_causal_lm(len(tokenizer), "llama", seed=seed, hidden_size=64).save_pretrained(base_model)
    tokenizer.save_pretrained(base_model)

    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(TINY_WORDS, size=rng.integers(2, 6))) for _ in range(200)]

    def share_of_good(prompts: list[str], completions: list[str]) -> list[float]:
        return [c.split().count("good") / max(1, len(c.split())) for c in completions]

    env = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=12)
    env = RewardFunctionWrapper(env, fn=share_of_good)
    env = KLPenaltyWrapper(env, coef=0.02)
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sb3-rlhf", description="RLHF for language models with Stable-Baselines3")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="PPO on a tiny random model with a rule reward (runs in about a minute on CPU)")
    demo.add_argument("--out", default="runs/demo", help="folder for TensorBoard logs, the SB3 zip and the export")
    demo.add_argument("--timesteps", type=int, default=30_000, help="generated tokens to train on")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "demo":
        summary = tiny_demo(args.out, args.timesteps, args.seed, args.device, progress_bar=not args.no_progress_bar)
        print(f"rollouts: {summary['rollouts']}")
        print(f"mean score (share of 'good'): first rollout {summary['first_scores']:.3f} -> last {summary['last_scores']:.3f}")
        print(f"KL to the reference (nats per response): {summary['last_kl']:.3f}")
        print(f"TensorBoard: tensorboard --logdir {os.path.join(args.out, 'tensorboard')}")
        print(f"SB3 model: {os.path.join(args.out, 'ppo_tiny.zip')}; exported policy: {os.path.join(args.out, 'policy')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
