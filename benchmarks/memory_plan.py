"""The memory plan on paper: per-device memory of an RLHF PPO run under ``ddp`` and ``fsdp``, by model size.

    python benchmarks/memory_plan.py --out benchmarks/results/memory_plan.md

Pure arithmetic from the formulas in ``docs/scaling.md`` (nothing is run); the measured check of the same formulas
is ``benchmarks/sharded_rollout.py``. Sizes are the published configs: SmolLM2-135M and -1.7B, Llama-3.1-8B and
-70B. Per device, in GiB, for the model states only (no activations, no KV cache: those scale with the batch and
are bounded by ``micro_batch_tokens`` and ``generation_batch_size``).
"""

from __future__ import annotations

import argparse

#: parameters (billions) of the sizes the plan covers
SIZES = {"SmolLM2-135M": 0.1345, "SmolLM2-1.7B": 1.711, "Llama-3.1-8B": 8.03, "Llama-3.1-70B": 70.55}
DEVICES = (1, 8, 64)
#: the memory a device has, and what is left of it for the model states (the rest: activations, KV cache, CUDA)
DEVICE_GIB, BUDGET_GIB = 80, 70
GIB = 2**30


def per_device(n: float, devices: int, strategy: str, lora: bool, trained_bytes: int, lora_fraction: float) -> dict:
    """Per-device bytes of each model and the rollout's gathered weights (see docs/scaling.md for the formulas).

    :param n: parameters of the policy (the critic, reference and reward model are taken to be the same size).
    :param trained_bytes: bytes per trained parameter: weights + gradient + AdamW's two moments (8 in bf16, 16 in
        float32 or under ``mixed_precision="bf16"``, whose master weights are float32).
    :param lora_fraction: the adapter's parameters as a share of the model's.
    """
    frozen_bytes = 2  # bf16 weights, no gradient, no optimizer
    shards = devices if strategy == "fsdp" else 1
    if lora:  # the base frozen, the adapter trained; the reference is the base (no copy); a shared value head
        actor = frozen_bytes * n + trained_bytes * lora_fraction * n
        critic, reference = 0.0, 0.0
        gathered = frozen_bytes * n * (1 + lora_fraction)
    else:  # a separate critic of the policy's size; the reference is the initial policy
        actor = critic = trained_bytes * n
        reference = frozen_bytes * n
        weight_bytes = trained_bytes // 4  # the weights' own share of the trained bytes (2 bf16, 4 float32)
        gathered = 2 * weight_bytes * n  # actor and critic, whole, for generate() and the values
    reward = frozen_bytes * n
    states = (actor + critic + reference + reward) / shards
    # fsdp: the rollout holds the whole actor (and critic) in buffers of their own, besides the shards (which FSDP
    # keeps); ddp holds them whole anyway
    rollout = gathered if strategy == "fsdp" else 0.0
    return {"actor": actor / shards, "critic": critic / shards, "reference": reference / shards,
            "reward": reward / shards, "states": states, "peak": states + rollout}  # fmt: skip


def table(trained_bytes: int, lora_fraction: float) -> list[str]:
    lines = [
        "| model | params | LoRA | ddp (any number of devices) | fsdp, 8 devices | fsdp, 64 devices |",
        "|---|---|---|---|---|---|",
    ]
    for name, billions in SIZES.items():
        n = billions * 1e9
        for lora in (False, True):
            cells = []
            for strategy, devices in (("ddp", 1), ("fsdp", 8), ("fsdp", 64)):
                m = per_device(n, devices, strategy, lora, trained_bytes, lora_fraction)
                fits = "fits" if m["peak"] / GIB <= BUDGET_GIB else "**no**"
                cells.append(f"{m['states'] / GIB:.1f} → {m['peak'] / GIB:.1f} ({fits})")
            lines.append(f"| {name} | {billions:g}B | {'yes' if lora else 'no'} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora-fraction", type=float, default=0.005, help="adapter parameters / model parameters")
    parser.add_argument("--out", default=None, help="write the tables to this markdown file")
    args = parser.parse_args()
    lines = [
        "# Memory plan: GiB per device for the model states (steady → during the rollout)",
        "",
        f"`python benchmarks/memory_plan.py --lora-fraction {args.lora_fraction}`. PPO; without LoRA a separate "
        "critic, the KL reference and the reward model each the policy's size; with LoRA a shared value head, the "
        "reference is the base with the adapter off, and a reward model of the policy's size. Frozen models in "
        "bf16 and sharded under fsdp (`shard_frozen_models=True`). "
        f"'fits': at most {BUDGET_GIB} GiB of an {DEVICE_GIB} GB device, leaving the rest for activations, the KV "
        "cache and CUDA's own.",
        "",
    ]
    for trained_bytes, title in ((8, "bf16 weights (`dtype='bfloat16'`): 8 bytes per trained parameter"),
                                 (16, "float32 master weights (`mixed_precision='bf16'` or float32): 16 bytes")):  # fmt: skip
        lines += [f"## {title}", "", *table(trained_bytes, args.lora_fraction), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
