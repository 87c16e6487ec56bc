"""Benchmark on a CUDA GPU: RLHFPPO on a model of SmolLM2-135M's shape in bf16, against the GPU's bf16 peak.

    python benchmarks/gpu_throughput.py --out benchmarks/results/gpu.md

The model has SmolLM2-135M's architecture and size (Llama, 30 layers, 576 wide, 9 heads with 3 KV heads, a
49152-token vocabulary, tied embeddings: 134.5M parameters) with random weights, built in memory: the real
weights do not fit the device machine's transfer limit, and speed does not depend on them. The env has no stop
token, so every response runs to its full length, as TRL's do. It measures, medians of ``--repeats`` iterations
after a warm-up:

- for each ``generation_cache`` setting (static: transformers compiles the decoding step; dynamic), the rollout
  (``generate()``, then the teacher-forced pass): generated tokens/s, and transformers' own ``generate()`` with the
  same cache on the same prompts for comparison; the warm-up iteration (compilation) apart;
- the update (forward + backward + AdamW over every minibatch and epoch): time, and its model FLOP utilisation,
  MFU = 6 · N · tokens processed / time / peak, with N the backbone's parameters (attention's own FLOPs left out,
  as in the usual MFU), against the bf16 peak of the GPU's datasheet when known and against a measured
  8192³ bf16 matrix product's rate;
- peak GPU memory (``torch.cuda.max_memory_allocated``).

Exits with status 3 and one line when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time

import torch as th

#: dense bf16 peak (TFLOP/s, no sparsity) from the datasheets, by a name fragment of torch.cuda.get_device_name()
DATASHEET_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.05, "A10G": 70.0, "L4": 121.0}


def smollm2_135m_config(vocab_size: int = 49152) -> dict:
    """SmolLM2-135M's config.json, as published (HuggingFaceTB/SmolLM2-135M)."""
    return dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def matmul_tflops() -> float:
    a = th.randn(8192, 8192, device="cuda", dtype=th.bfloat16)
    b = th.randn(8192, 8192, device="cuda", dtype=th.bfloat16)
    for _ in range(3):
        a @ b
    th.cuda.synchronize()
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ b
    th.cuda.synchronize()
    return 2 * 8192**3 * n / (time.perf_counter() - start) / 1e12


def bare_generate_seconds(actor, prompt_ids, prompt_mask, new_tokens: int, pad: int, cache: str, repeats: int):
    """transformers' own ``generate()`` on the same prompts, sampling ``new_tokens`` tokens with ``cache``: the
    first call's time (compilation, for the static cache) and the median of ``repeats`` calls after it."""
    from transformers import GenerationConfig

    times = []
    prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
    for _ in range(repeats + 1):
        th.cuda.synchronize()
        start = time.perf_counter()
        if cache == "continuous":
            # no min_new_tokens there; EOS is one token in 49152 of a random model
            config = GenerationConfig(
                max_new_tokens=new_tokens, do_sample=True, top_k=0, top_p=1.0, pad_token_id=pad, eos_token_id=None
            )
            actor.generate_batch(prompts, generation_config=config, max_new_tokens=new_tokens)
        else:
            actor.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                pad_token_id=pad,
                cache_implementation="static" if cache == "static" else None,
            )
        th.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def measure(folder: str, tokenizer, cache: str, args: argparse.Namespace) -> dict:
    """RLHFPPO with ``generation_cache=cache``: warm-up, rollout and update times, tokens, peak memory, and bare
    ``generate()`` with the same cache on the same prompts."""
    from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
    from sb3_rlhf.common.tiny import tiny_prompts
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper

    prompts = tiny_prompts(256, seed=0, min_words=4, max_words=12)
    # every response runs to max_new_tokens, as TRL's do
    env = TokenGenerationEnv(prompts, tokenizer, 32, args.new_tokens, stop_at_eos=False)
    env = KLPenaltyWrapper(
        RewardFunctionWrapper(env, fn=lambda prompts, completions: [len(c) / 100.0 for c in completions]), coef=0.05
    )
    model = RLHFPPO(
        TransformerActorCriticPolicy,
        env,
        learning_rate=1e-5,
        n_episodes=args.episodes,
        batch_size=args.minibatch,
        n_epochs=args.epochs,
        generation_cache=cache,
        micro_batch_tokens=args.micro_batch_tokens,
        policy_kwargs=dict(model_name_or_path=folder, dtype="bfloat16"),
        device="cuda",
        seed=0,
    )
    rollout_times, update_times, tokens, processed, totals = [], [], [], [], []
    original_train = model.train

    def timed_train() -> None:
        th.cuda.synchronize()
        start = time.perf_counter()
        original_train()
        th.cuda.synchronize()
        update_times.append(time.perf_counter() - start)
        buffer = model.rollout_buffer
        # tokens the update's forwards see: every (prompt + response) position of every minibatch, each epoch
        processed.append(
            args.epochs * float((buffer.prompt_mask.shape[1] + buffer.response_mask.shape[1]) * args.episodes)
        )

    model.train = timed_train  # type: ignore[method-assign]
    th.cuda.empty_cache()
    th.cuda.reset_peak_memory_stats()
    for i in range(args.repeats + 1):
        th.cuda.synchronize()
        start = time.perf_counter()
        model.learn(args.episodes * args.new_tokens, reset_num_timesteps=i == 0)
        th.cuda.synchronize()
        totals.append(time.perf_counter() - start)
        rollout_times.append(totals[-1] - update_times[-1])
        tokens.append(float(model.rollout_buffer.response_mask.sum()))
    peak_memory = th.cuda.max_memory_allocated() / 2**30
    prompt_ids, prompt_mask = (
        th.as_tensor(a, device="cuda") for a in env.unwrapped.prompt_batch(list(range(args.episodes)))
    )
    bare_first, bare = bare_generate_seconds(
        model.policy.actor, prompt_ids, prompt_mask, args.new_tokens, tokenizer.pad_token_id, cache, args.repeats
    )
    result = dict(
        cache=cache,
        used=model.rollout_engine.cache_for(th.device("cuda")),
        warmup=totals[0],
        rollout=statistics.median(rollout_times[1:]),
        tokens=statistics.median(tokens[1:]),
        update=statistics.median(update_times[1:]),
        processed=statistics.median(processed[1:]),
        peak_memory=peak_memory,
        bare_first=bare_first,
        bare=bare,
        n_params=sum(p.numel() for p in model.policy.actor.parameters()),
        micro_batch_tokens=model._micro_batch_token_budget(),
    )
    model.train = original_train  # type: ignore[method-assign]  # no cycle through the closure: freed on return
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=64, help="responses per rollout")
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--caches", nargs="+", default=["static", "dynamic", "continuous"], help="generation_cache settings"
    )
    parser.add_argument("--micro-batch-tokens", default="auto", help="the update's setting ('auto', a number, None)")
    parser.add_argument("--out", default=None, help="append the report to this markdown file")
    args = parser.parse_args()
    if args.micro_batch_tokens not in ("auto", "None"):
        args.micro_batch_tokens = int(args.micro_batch_tokens)
    elif args.micro_batch_tokens == "None":
        args.micro_batch_tokens = None
    if not th.cuda.is_available():
        print("gpu_throughput: no CUDA device visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3

    from transformers import LlamaConfig, LlamaForCausalLM

    from sb3_rlhf.common.tiny import TINY_WORDS, tiny_tokenizer

    th.manual_seed(0)
    tokenizer = tiny_tokenizer(TINY_WORDS)  # ids 0..~60 of the 49152-wide model; the action space is the tokenizer's
    config = LlamaConfig(**{k: v for k, v in smollm2_135m_config().items() if k != "model_type"})
    results = []
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).to(th.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for cache in args.caches:
            results.append(measure(folder, tokenizer, cache, args))
            gc.collect()
            th.cuda.empty_cache()

    measured = matmul_tflops()
    name = th.cuda.get_device_name()
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    n_params = results[0]["n_params"]
    lines = [
        f"## RLHFPPO on {name}, bf16, a model of SmolLM2-135M's shape ({n_params / 1e6:.1f}M parameters, random weights)",
        "",
        f"`python benchmarks/gpu_throughput.py` (run by `benchmarks/gpu_check.sh`): {args.episodes} responses of "
        f"{args.new_tokens} tokens per rollout (no early EOS), minibatches of {args.minibatch}, {args.epochs} epochs, "
        f"shared value head, KL to the reference; medians of {args.repeats} iterations after a warm-up iteration "
        "(its time, compilation included, reported apart). Bare `generate()`: transformers' own call on the same "
        "prompts with the same cache, sampling as many tokens.",
        "",
        "| generation_cache | warm-up iteration | rollout | generated tokens/s | bare `generate()` (first call) | speed vs bare (bare s / rollout s) | update | update TFLOP/s | MFU (measured matmul) | MFU (datasheet) | micro-batch tokens | peak GPU memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        achieved = 6 * r["n_params"] * r["processed"] / r["update"] / 1e12
        datasheet_mfu = f"{achieved / datasheet:.1%}" if datasheet else "unknown GPU"
        lines.append(
            f"| {r['cache']} ({r['used']}) | {r['warmup']:.1f} s | {r['rollout']:.2f} s | {r['tokens'] / r['rollout']:,.0f} "
            f"| {r['bare']:.2f} s ({r['bare_first']:.1f} s) | {r['bare'] / r['rollout']:.2f}× | {r['update']:.2f} s "
            f"| {achieved:.1f} | {achieved / measured:.1%} | {datasheet_mfu} | {r['micro_batch_tokens']} "
            f"| {r['peak_memory']:.2f} GiB |"
        )
    lines += [
        "",
        f"Measured 8192³ bf16 matmul: {measured:.0f} TFLOP/s; datasheet bf16 peak: "
        f"{f'{datasheet:.0f} TFLOP/s' if datasheet else 'unknown for this GPU'}. MFU = 6 · N · tokens the update's "
        f"forwards see / time (N the backbone's parameters, attention's own FLOPs left out). torch {th.__version__}, "
        f"CUDA {th.version.cuda}.",
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
