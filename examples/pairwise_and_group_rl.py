"""P3O, GRPO and RLOO on the same env as PPO: swap the algorithm class, keep the env and its rewards.

    python examples/pairwise_and_group_rl.py                                 # P3O, a tiny random model
    python examples/pairwise_and_group_rl.py --algorithm grpo --model path/to/lm

P3O samples two responses per prompt and learns from their reward difference (with the KL penalty summed
over each response); GRPO and RLOO sample a group per prompt and need no value function. GRPO puts the KL in
its loss: give its KLPenaltyWrapper the k3 estimator.
"""

import argparse
import os

from transformers import AutoTokenizer

from sb3_rlhf import GRPO, P3O, RLOO, TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper

parser = argparse.ArgumentParser()
parser.add_argument("--algorithm", choices=["p3o", "grpo", "rloo"], default="p3o")
parser.add_argument("--model", help="a local causal LM folder; default: a tiny random model")
parser.add_argument("--out", default="runs/pairwise_and_group")
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
# the adaptive controller keeps the KL near 4 nats per response, for every algorithm
env = KLPenaltyWrapper(env, coef=0.05, target=4.0, horizon=2_000, estimator="k3" if args.algorithm == "grpo" else "k1")

settings = dict(
    learning_rate=1e-3,
    n_episodes=32,
    batch_size=8,
    n_epochs=2,
    policy_kwargs=dict(model_name_or_path=args.model),
    tensorboard_log=args.out,
    seed=0,
    verbose=1,
)
if args.algorithm == "p3o":
    model = P3O(TransformerActorCriticPolicy, env, clipping="joint", **settings)  # or clipping="separate"
elif args.algorithm == "grpo":
    model = GRPO(TransformerActorCriticPolicy, env, samples_per_prompt=4, **settings)
else:
    model = RLOO(TransformerActorCriticPolicy, env, samples_per_prompt=4, **settings)
model.learn(total_timesteps=args.timesteps, progress_bar=True)
path = os.path.join(args.out, f"{args.algorithm}_lm.zip")
model.save(path)
model = type(model).load(path, env=env)
model.policy.save_pretrained(os.path.join(args.out, "exported"), tokenizer=tokenizer)
