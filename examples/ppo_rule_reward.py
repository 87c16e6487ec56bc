"""PPO on a causal LM with a plain Python reward and a KL penalty: the SB3 way.

    python examples/ppo_rule_reward.py                      # a tiny random model, built and saved first
    python examples/ppo_rule_reward.py --model path/to/lm   # your own causal LM folder (with its tokenizer)

Watch it with ``tensorboard --logdir runs/rule_reward``.
"""

import argparse
import os

from transformers import AutoTokenizer

from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a local causal LM folder; default: a tiny random model")
parser.add_argument("--out", default="runs/rule_reward")
parser.add_argument("--timesteps", type=int, default=20_000)
args = parser.parse_args()

if args.model is None:
    args.model = os.path.join(args.out, "tiny_model")
    save_tiny_model(args.model, TINY_WORDS, hidden_size=64)
tokenizer = AutoTokenizer.from_pretrained(args.model)

prompts = ["the cat sat on", "a dog was", "then it", "the mat was", "a happy cat", "the sad dog and"]


def positivity(prompts: list[str], completions: list[str]) -> list[float]:
    """Share of completion words that are "good" or "happy"."""
    return [sum(w in ("good", "happy") for w in c.split()) / max(1, len(c.split())) for c in completions]


env = TokenGenerationEnv(prompts=prompts, tokenizer=tokenizer, max_prompt_tokens=16, max_new_tokens=12)
env = RewardFunctionWrapper(env, fn=positivity)
env = KLPenaltyWrapper(env, coef=0.05)  # per-token KL to the initial policy
model = RLHFPPO(
    TransformerActorCriticPolicy,
    env,
    learning_rate=1e-3,
    n_episodes=32,
    batch_size=8,
    policy_kwargs=dict(model_name_or_path=args.model),
    tensorboard_log=args.out,
    seed=0,
    verbose=1,
)
model.learn(total_timesteps=args.timesteps, progress_bar=True)
model.save(os.path.join(args.out, "ppo_lm.zip"))
model = RLHFPPO.load(os.path.join(args.out, "ppo_lm.zip"), env=env)
model.policy.save_pretrained(os.path.join(args.out, "exported"), tokenizer=tokenizer)  # plain transformers loads it
