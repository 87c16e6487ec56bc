"""DPO: align a causal LM directly on preference pairs, no reward model and no sampling.

    python examples/direct_preference_optimization.py                       # toy pairs, a tiny random model
    python examples/direct_preference_optimization.py --model path/to/lm --data pairs.jsonl --lora

``pairs.jsonl`` rows hold ``prompt``, ``chosen`` and ``rejected`` (or HH-RLHF transcripts without a prompt).
The reference is the initial model: its log-probs are computed once before training (under LoRA, the same
backbone with the adapter disabled). Watch ``rewards/accuracies`` and ``rewards/margins`` in TensorBoard.
"""

import argparse
import os
import random

from sb3_rlhf.common.data import PreferencePair, load_preference_pairs, train_test_split
from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model
from sb3_rlhf.dpo import DPOTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", help="a local causal LM folder; default: a tiny random model")
parser.add_argument("--data", help="a JSONL file of preference pairs; default: toy pairs")
parser.add_argument("--out", default="runs/dpo")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--beta", type=float, default=0.1)
parser.add_argument("--loss-type", choices=["sigmoid", "ipo"], default="sigmoid")
parser.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of every weight")
args = parser.parse_args()

if args.model is None:
    args.model = os.path.join(args.out, "tiny_model")
    save_tiny_model(args.model, TINY_WORDS, hidden_size=64)
if args.data is None:
    rng = random.Random(0)
    nouns = ["cat", "dog", "mat"]
    pairs = [
        PreferencePair(f"the {rng.choice(nouns)} was", "good and happy", "bad and sad") for _ in range(200)
    ]  # the preferred answer is the kind one
else:
    pairs, report = load_preference_pairs(args.data)
    print(report)
train, test = train_test_split(pairs, 0.1, seed=0)

trainer = DPOTrainer(
    args.model,
    None,
    train,
    test,
    beta=args.beta,
    loss_type=args.loss_type,
    lora=dict(r=8) if args.lora else None,
    learning_rate=1e-3 if args.data is None else 5e-6,
    batch_size=8,
    n_epochs=args.epochs,
    tensorboard_log=args.out,
    seed=0,
)
print("before:", trainer.evaluate())
trainer.learn(progress_bar=True)
print("after: ", trainer.evaluate())
trainer.save(os.path.join(args.out, "model"))  # plain transformers loads it; so does RLHFPPO as a policy
