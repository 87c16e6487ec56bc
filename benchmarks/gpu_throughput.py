"""Benchmark on a CUDA GPU: RLHFPPO on a model of SmolLM2-135M's shape in bf16, against the GPU's bf16 peak.

    python benchmarks/gpu_throughput.py --out benchmarks/results/gpu.md

The model has SmolLM2-135M's architecture and size (Llama, 30 layers, 576 wide, 9 heads with 3 KV heads, a
49152-token vocabulary, tied embeddings: 134.5M parameters) with random weights, built in memory: the real
weights do not fit the device machine's transfer limit, and speed does not depend on them. The env has no stop
token, so every response runs to its full length, as TRL's do. It measures, medians of ``--repeats`` iterations
after a warm-up:

- the rollout (``generate()`` with the KV cache, then the teacher-forced pass): generated tokens/s, and
  ``generate()`` alone on the same prompts with transformers' own call for comparison;
- the update (forward + backward + AdamW over every minibatch and epoch): time, and its model FLOP utilisation,
  MFU = 6 · N · tokens processed / time / peak, with N the backbone's parameters (attention's own FLOPs left out,
  as in the usual MFU), against the bf16 peak of the GPU's datasheet when known and against a measured
  8192³ bf16 matrix product's rate;
- peak GPU memory (``torch.cuda.max_memory_allocated``).

Exits with status 3 and one line when no CUDA device is visible.
"""

from __future__ import annotations

import argparse
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=64, help="responses per rollout")
    parser.add_argument("--minibatch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="append the report to this markdown file")
    args = parser.parse_args()
    if not th.cuda.is_available():
        print("gpu_throughput: no CUDA device visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3

    from transformers import LlamaConfig, LlamaForCausalLM

    from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
    from sb3_rlhf.common.tiny import TINY_WORDS, tiny_prompts, tiny_tokenizer
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper

    th.manual_seed(0)
    tokenizer = tiny_tokenizer(TINY_WORDS)  # ids 0..~60 of the 49152-wide model; the action space is the tokenizer's
    config = LlamaConfig(**{k: v for k, v in smollm2_135m_config().items() if k != "model_type"})
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).to(th.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        prompts = tiny_prompts(256, seed=0, min_words=4, max_words=12)
        # every response runs to max_new_tokens, as TRL's do
        env = TokenGenerationEnv(prompts, tokenizer, 32, args.new_tokens, stop_at_eos=False)
        env = KLPenaltyWrapper(
            RewardFunctionWrapper(env, fn=lambda prompts, completions: [len(c) / 100.0 for c in completions]),
            coef=0.05,
        )
        model = RLHFPPO(
            TransformerActorCriticPolicy,
            env,
            learning_rate=1e-5,
            n_episodes=args.episodes,
            batch_size=args.minibatch,
            n_epochs=args.epochs,
            policy_kwargs=dict(model_name_or_path=folder, dtype="bfloat16"),
            device="cuda",
            seed=0,
        )
    n_params = sum(p.numel() for p in model.policy.actor.parameters())
    rollout_times, update_times, tokens, processed = [], [], [], []
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
    th.cuda.reset_peak_memory_stats()
    for i in range(args.repeats + 1):
        th.cuda.synchronize()
        start = time.perf_counter()
        model.learn(args.episodes * args.new_tokens, reset_num_timesteps=i == 0)
        th.cuda.synchronize()
        if i == 0:
            rollout_times.clear(), update_times.clear(), processed.clear()  # warm-up
            continue
        rollout_times.append(time.perf_counter() - start - update_times[-1])
        tokens.append(float(model.rollout_buffer.response_mask.sum()))
    peak_memory = th.cuda.max_memory_allocated() / 2**30

    # generate() alone, transformers' call on the same prompts and length
    actor = model.policy.actor
    prompt_ids, prompt_mask = (
        th.as_tensor(a, device="cuda") for a in env.unwrapped.prompt_batch(list(range(args.episodes)))
    )
    generate_times = []
    for i in range(args.repeats + 1):
        th.cuda.synchronize()
        start = time.perf_counter()
        actor.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=True,
            pad_token_id=tokenizer.pad_token_id,
        )
        th.cuda.synchronize()
        if i:
            generate_times.append(time.perf_counter() - start)

    measured = matmul_tflops()
    name = th.cuda.get_device_name()
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    update = statistics.median(update_times)
    flops = 6 * n_params * statistics.median(processed)
    achieved = flops / update / 1e12
    rollout = statistics.median(rollout_times)
    lines = [
        f"## RLHFPPO on {name}, bf16, a model of SmolLM2-135M's shape ({n_params / 1e6:.1f}M parameters, random weights)",
        "",
        f"`python benchmarks/gpu_throughput.py` (run by `benchmarks/gpu_check.sh`): {args.episodes} responses of "
        f"{args.new_tokens} tokens per rollout (no early EOS), minibatches of {args.minibatch}, {args.epochs} epochs, "
        f"shared value head, KL to the reference; medians of {args.repeats} iterations after a warm-up.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| rollout (generate + teacher-forced passes + rewards) | {rollout:.2f} s, {statistics.median(tokens) / rollout:,.0f} generated tokens/s |",
        f"| bare `generate()` on the same prompts | {statistics.median(generate_times):.2f} s ({rollout / statistics.median(generate_times):.2f}× of it for the whole rollout) |",
        f"| update (forward + backward + AdamW, every minibatch and epoch) | {update:.2f} s |",
        f"| update model FLOPs (6·N·tokens) | {flops / 1e12:.1f} TFLOP, {achieved:.1f} TFLOP/s |",
        f"| MFU against the measured 8192³ bf16 matmul ({measured:.0f} TFLOP/s) | {achieved / measured:.1%} |",
        f"| MFU against the datasheet bf16 peak | {f'{achieved / datasheet:.1%} of {datasheet:.0f} TFLOP/s' if datasheet else 'unknown for this GPU'} |",
        f"| peak GPU memory (max_memory_allocated) | {peak_memory:.2f} GiB |",
        f"| torch / CUDA | {th.__version__} / {th.version.cuda} |",
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
