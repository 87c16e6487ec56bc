"""Read a run's TensorBoard logs without a browser: the main curves and the latest sample generations.

    python examples/inspect_run.py runs/demo/tensorboard
    tensorboard --logdir runs/demo/tensorboard     # the same curves in the browser

It reads the event files with TensorBoard's own EventAccumulator (no server).
"""

import argparse
import glob
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CURVES = [
    "rollout/ep_rew_mean",
    "rlhf/scores",
    "rlhf/kl",
    "rlhf/kl_coef",
    "rlhf/entropy",
    "rlhf/response_length",
    "train/value_loss",
    "train/clip_fraction",
    "train/approx_kl",
]

parser = argparse.ArgumentParser()
parser.add_argument("logdir", help="a tensorboard_log folder (or one run inside it)")
args = parser.parse_args()

events = sorted(glob.glob(os.path.join(args.logdir, "**", "events.*"), recursive=True))
if not events:
    raise SystemExit(f"no TensorBoard event files under {args.logdir}")
for path in events:
    accumulator = EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    print(f"== {os.path.relpath(path, args.logdir)}")
    scalars = set(accumulator.Tags()["scalars"])
    for tag in CURVES:
        if tag in scalars:
            values = [event.value for event in accumulator.Scalars(tag)]
            print(f"{tag:26s} first {values[0]:9.4f}   last {values[-1]:9.4f}   ({len(values)} points)")
    if "rlhf/samples/text_summary" in accumulator.Tags()["tensors"]:
        latest = accumulator.Tensors("rlhf/samples/text_summary")[-1]
        print(f"samples at step {latest.step}:")
        print(latest.tensor_proto.string_val[0].decode())
