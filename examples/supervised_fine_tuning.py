"""Supervised fine-tuning on (prompt, response) demonstrations: the first stage of RLHF.

python examples/supervised_fine_tuning.py                               # a tiny model on toy demonstrations
python examples/supervised_fine_tuning.py --data demos.jsonl --model path/to/causal-lm
"""

import argparse
import os

from sb3_rlhf.common.data import Demonstration, load_demonstrations, train_test_split
from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model
from sb3_rlhf.sft import SFTTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--data", help='a JSONL file of {"prompt": ..., "response": ...} (or HH transcripts)')
parser.add_argument("--model", help="a causal LM folder with its tokenizer")
parser.add_argument("--out", default="runs/sft")
parser.add_argument("--epochs", type=int, default=3)
args = parser.parse_args()

if args.data:
    demos, report = load_demonstrations(args.data)
    print(report)
else:
    demos = [Demonstration(f"{a} {b}", f"{a} good") for a in TINY_WORDS for b in TINY_WORDS]
if args.model is None:
    args.model = os.path.join(args.out, "tiny_model")
    save_tiny_model(args.model, TINY_WORDS, hidden_size=64)

train, test = train_test_split(demos, 0.1, seed=0)
trainer = SFTTrainer(
    args.model,
    None,
    train,
    test,
    learning_rate=1e-3,
    batch_size=16,
    n_epochs=args.epochs,
    checkpoint_dir=os.path.join(args.out, "checkpoints"),
    tensorboard_log=args.out,
    verbose=1,
)
print("held-out perplexity before:", trainer.evaluate()["perplexity"])
trainer.learn(progress_bar=True)
print("held-out perplexity after:", trainer.evaluate()["perplexity"])
trainer.save(os.path.join(args.out, "model"))  # policy_kwargs=dict(model_name_or_path=...) for PPO
