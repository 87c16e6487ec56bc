"""PPO against a learned reward model (any AutoModelForSequenceClassification with one label).

    python examples/ppo_reward_model.py --policy path/to/lm --reward-model path/to/reward_model

Without paths, tiny random models stand in for both (the run shows the plumbing, not a useful policy).
The reward model reads the decoded text with its own tokenizer (found beside it); with no tokenizer there
it reads the policy's token ids, which needs a shared vocabulary.
"""

import argparse
import os

from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from sb3_rlhf import RLHFPPO, TokenGenerationEnv
from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardModelWrapper

parser = argparse.ArgumentParser()
parser.add_argument("--policy")
parser.add_argument("--reward-model")
parser.add_argument("--out", default="runs/reward_model")
parser.add_argument("--timesteps", type=int, default=5_000)
args = parser.parse_args()

if args.policy is None or args.reward_model is None:
    args.policy = os.path.join(args.out, "tiny_policy")
    tokenizer = save_tiny_model(args.policy, TINY_WORDS)
    args.reward_model = os.path.join(args.out, "tiny_reward_model")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_labels=1
    )
    BertForSequenceClassification(config).save_pretrained(args.reward_model)
    tokenizer.save_pretrained(args.reward_model)
tokenizer = AutoTokenizer.from_pretrained(args.policy)

env = TokenGenerationEnv(["the cat", "a dog sat", "then it was"], tokenizer, max_prompt_tokens=32, max_new_tokens=16)
env = RewardModelWrapper(env, args.reward_model)  # a path: loaded, frozen, never saved in the SB3 zip
env = KLPenaltyWrapper(env, coef=0.1, target=6.0, horizon=10_000)  # adaptive β (Ziegler et al.)
model = RLHFPPO(
    "TransformerActorCriticPolicy",
    env,
    n_episodes=16,
    batch_size=8,
    policy_kwargs=dict(model_name_or_path=args.policy),
    tensorboard_log=args.out,
    seed=0,
)
model.learn(total_timesteps=args.timesteps, progress_bar=True)
model.save(os.path.join(args.out, "ppo_rm.zip"))
