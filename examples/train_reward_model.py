"""Train a reward model on human comparisons with the Bradley–Terry loss, then use it as a PPO reward.

    python examples/train_reward_model.py                                   # shipped HH-RLHF pairs + MiniLM
    python examples/train_reward_model.py --data pairs.jsonl --model path   # your own pairs and backbone (or hub id)

The HH-RLHF harmless pairs ship with the package; without the MiniLM package (make install installs it), a tiny
random backbone learns toy pairs instead.
"""

import argparse
import os

from sb3_rlhf.common.data import PreferencePair, find_data_file, load_preference_pairs, train_test_split
from sb3_rlhf.common.models import packaged_model_path
from sb3_rlhf.reward_modeling import RewardModelTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--data", default="hh_harmless_base_test.jsonl.gz")
parser.add_argument("--model", help="backbone folder or hub id (default: the packaged all-MiniLM-L6-v2)")
parser.add_argument("--out", default="runs/reward_model")
parser.add_argument("--pairs", type=int, default=400, help="training pairs to use (CPU-friendly)")
parser.add_argument("--test-pairs", type=int, default=200, help="held-out pairs to score")
args = parser.parse_args()

try:
    pairs, report = load_preference_pairs(find_data_file(args.data))
    model = args.model or packaged_model_path("all-MiniLM-L6-v2")
    print(report)
except (FileNotFoundError, ImportError) as missing:
    print(f"{missing}\nfalling back to toy pairs and a tiny backbone")
    from transformers import BertConfig, BertModel

    from sb3_rlhf.common.tiny import TINY_WORDS, tiny_tokenizer

    tokenizer = tiny_tokenizer(TINY_WORDS)
    model = os.path.join(args.out, "tiny_backbone")
    BertModel(
        BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(model)
    tokenizer.save_pretrained(model)
    pairs = [PreferencePair("the cat ", f"sat {w} good", f"sat {w} bad") for w in TINY_WORDS[:6] for _ in range(8)]

train, test = train_test_split(pairs, 0.2, seed=0)
trainer = RewardModelTrainer(
    model, None, train[: args.pairs], test[: args.test_pairs], max_length=128, tensorboard_log=args.out, verbose=1
)
print("held-out before:", trainer.evaluate())
trainer.fit_linear_probe()
print("held-out after the linear probe:", trainer.evaluate())
trainer.learn(progress_bar=True)
print("held-out after fine-tuning:", trainer.evaluate())
trainer.save(os.path.join(args.out, "model"))
print(f"saved to {os.path.join(args.out, 'model')}: RewardModelWrapper(env, that_path) scores PPO episodes with it")
