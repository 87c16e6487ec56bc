"""What sharding costs and saves: RLHFPPO under ``strategy="ddp"`` and ``"fsdp"`` in the same processes.

    python benchmarks/sharded_rollout.py --processes 2 --out benchmarks/results/sharded_rollout.md

It starts itself under ``torchrun`` (``--processes`` processes; gloo on CPU, NCCL on GPUs) and builds, in every
process, one model under each strategy: SmolLM2-135M's architecture (Llama, 30 layers, 576 wide, 9 heads with 3
KV heads, tied embeddings) with random weights and a word vocabulary of ``--vocab`` tokens, float32, AdamW, a
separate KL reference (sharded under fsdp). The two models then train in turn, ``--repeats`` iterations each after
a warm-up, and for each it reports per rank:

- the rollout's time (``generate()`` with the weights gathered once, the teacher-forced passes, the reference's
  scoring) and the update's;
- the bytes of parameters + gradients + AdamW state the rank holds after an update (its shards under fsdp), and
  the bytes the rollout's gathering adds (the whole weights, beside the shards), both counted from the tensors
  (on a CPU there is no allocator peak to read);
- on CUDA, the peak memory allocated during each phase (``torch.cuda.max_memory_allocated``).

Timings are medians; the ratios fsdp/ddp are within one run, on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch as th

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def gathered_bytes(model) -> int:
    """What the rollout's gathering adds on this rank under fsdp: the whole weights, in buffers of their own beside
    the shards FSDP keeps."""
    return sum(p.numel() * p.element_size() for p in model.policy.parameters()) if model.parallel.sharded else 0


def build(strategy: str, model_path: str, args: argparse.Namespace):
    from sb3_rlhf import RLHFPPO, TokenGenerationEnv
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
    from sb3_rlhf.rewards.rules import share_of_good

    prompts = [" ".join(f"w{(i * 7 + j) % args.vocab}" for j in range(1 + i % 5)) for i in range(64)]
    env = TokenGenerationEnv(prompts, model_path, max_prompt_tokens=16, max_new_tokens=args.new_tokens)
    env = KLPenaltyWrapper(RewardFunctionWrapper(env, fn=share_of_good), coef=0.05)
    model = RLHFPPO(
        "TransformerActorCriticPolicy",
        env,
        n_episodes=args.episodes,
        batch_size=args.episodes,
        n_epochs=1,
        seed=0,
        strategy=strategy,
        policy_kwargs=dict(model_name_or_path=model_path),
    )
    timings: dict[str, list[float]] = {"rollout": [], "update": [], "rollout_peak": [], "update_peak": []}
    for phase in ("collect_rollouts", "train"):
        method = getattr(model, phase)
        name = "rollout" if phase == "collect_rollouts" else "update"

        def timed(*a, _method=method, _name=name, **k):
            if th.cuda.is_available():
                th.cuda.synchronize()
                th.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = _method(*a, **k)
            if th.cuda.is_available():
                th.cuda.synchronize()
                timings[f"{_name}_peak"].append(th.cuda.max_memory_allocated() / 2**30)
            timings[_name].append(time.perf_counter() - start)
            return result

        setattr(model, phase, timed)
    return model, timings


def worker(args: argparse.Namespace) -> None:
    from sb3_rlhf.common.distributed import init_distributed, is_main_process, world_size
    from sb3_rlhf.common.memory import training_state_bytes

    init_distributed()
    th.set_num_threads(max(1, (os.cpu_count() or 1) // world_size()))
    models = {s: build(s, args.model, args) for s in ("ddp", "fsdp")}
    for model, timings in models.values():
        model.learn(1)  # warm-up
        for values in timings.values():
            values.clear()
    for i in range(args.repeats):
        for model, _ in models.values():
            model.learn(1, reset_num_timesteps=False)
    rows = {}
    for strategy, (model, timings) in models.items():
        measured = [
            statistics.median(timings["rollout"]),
            statistics.median(timings["update"]),
            training_state_bytes(model.policy, model.policy.optimizer) / 2**20,
            gathered_bytes(model) / 2**20,
        ]
        if th.cuda.is_available():
            measured += [max(timings["rollout_peak"]), max(timings["update_peak"])]
        rows[strategy] = th.tensor(measured, dtype=th.float64)
    import torch.distributed as dist

    per_rank = {}
    for strategy, row in rows.items():
        gathered = [th.zeros_like(row) for _ in range(world_size())]
        dist.all_gather_object(gathered, row)
        per_rank[strategy] = gathered
    if is_main_process():
        report(per_rank, args)
    dist.barrier()  # every rank done before the group goes (a rank leaving early aborts gloo's threads)
    dist.destroy_process_group()


def report(per_rank: dict[str, list[th.Tensor]], args: argparse.Namespace) -> None:
    device = th.cuda.get_device_name() if th.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    lines = [
        f"# Sharded rollout: ddp against fsdp, {len(per_rank['ddp'])} processes on {device}",
        "",
        f"`python benchmarks/sharded_rollout.py --processes {len(per_rank['ddp'])} --episodes {args.episodes} "
        f"--new-tokens {args.new_tokens} --repeats {args.repeats} --vocab {args.vocab}` (torch {th.__version__}): a "
        "model of SmolLM2-135M's shape, float32, AdamW; medians of the iterations after a warm-up, per rank.",
        "",
    ]
    cuda = th.cuda.is_available()
    header = "| strategy | rank | rollout s | update s | params+grads+AdamW MiB | gathered for the rollout MiB |"
    lines += [header + (" rollout peak GiB | update peak GiB |" if cuda else ""), "|" + "---|" * (8 if cuda else 6)]
    for strategy, ranks in per_rank.items():
        for r, row in enumerate(ranks):
            values = row.tolist()
            cells = [f"{values[0]:.2f}", f"{values[1]:.2f}", f"{values[2]:.0f}", f"{values[3]:.0f}"]
            cells += [f"{v:.2f}" for v in values[4:]]
            lines.append(f"| {strategy} | {r} | " + " | ".join(cells) + " |")
    ddp, fsdp = (th.stack(per_rank[s]).mean(0).tolist() for s in ("ddp", "fsdp"))
    lines += [
        "",
        f"fsdp / ddp, mean over ranks: rollout time {fsdp[0] / ddp[0]:.2f}×, update time {fsdp[1] / ddp[1]:.2f}×, "
        f"training state held {fsdp[2] / ddp[2]:.2f}×.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


def build_model_folder(folder: str, vocab: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.gpu_throughput import smollm2_135m_config
    from sb3_rlhf.common.tiny import tiny_tokenizer

    words = ["good", "bad", *[f"w{i}" for i in range(vocab)]]
    tokenizer = tiny_tokenizer(words)
    th.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**smollm2_135m_config(len(tokenizer)))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--episodes", type=int, default=8, help="responses per rollout and rank")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096, help="words in the tokenizer")
    parser.add_argument("--out", default=None, help="append the report to this markdown file")
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)  # set for the ranks
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        build_model_folder(folder, args.vocab)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}"]
        script = [os.path.abspath(__file__), *sys.argv[1:], "--model", folder]
        return subprocess.run([*command, *script], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
