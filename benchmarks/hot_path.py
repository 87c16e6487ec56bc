"""Benchmark: the hot-path changes of the update, each against what it replaced, in one process.

    python benchmarks/hot_path.py            # a ~17M-parameter Llama built in memory (about a minute)
    python benchmarks/hot_path.py --smollm   # the SmolLM2-135M-Instruct shape (vocabulary 49152, 576 wide)

1. Log-probs of the response tokens, log_softmax(z)[a] (the library) against z_a − logsumexp(z) (tried: it was
   meant to spare autograd a ``(B, T, vocab)`` tensor), on float32 logits: forward + backward time, and the bytes
   autograd keeps for the backward pass (counted exactly with ``torch.autograd.graph.saved_tensors_hooks``, so
   the figure does not depend on the machine's load).
2. The update's teacher-forced pass of a critic-free algorithm (RLOO, GRPO, P3O), ``evaluate_sequences`` with
   values (before) and without (the library): time of forward + backward, and saved bytes.
3. The same pass under LoRA with a long prompt: the LM head over every position (before: peft's forward hid
   ``logits_to_keep``) against over the response positions only.
4. The rollout's no-gradient pass of the actor with a shared value head: every layer's hidden states
   (``output_hidden_states=True``, before) against the last layer's, read from the LM head's input by a hook.
5. An update step (forward with values, loss, backward, AdamW) against its model FLOPs at this machine's measured
   float32 matrix-product rate (the issue's goal: at most 1.2× that ideal time), and beside it the same step
   written directly in torch and transformers: how much of the distance to the ideal is the library's.
6. The per-token callback loop (``update_locals`` + ``on_step`` per generated token, as SB3 per env step) at
   1k-token responses, against the whole rollout it belongs to.

Medians of ``--repeats`` after a warm-up. Writes ``benchmarks/results/hot_path.md``. A benchmark reports: it fails
on nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch as th
from throughput import median_time  # benchmarks/throughput.py
from versions import versions_line  # benchmarks/versions.py

from sb3_rlhf import TokenGenerationEnv, TransformerActorCriticPolicy
from sb3_rlhf.common import forward
from sb3_rlhf.common.models import causal_lm_from_config
from sb3_rlhf.common.rollout_engine import RolloutEngine
from sb3_rlhf.common.sequences import logprobs_of_tokens, position_ids_from_mask
from sb3_rlhf.common.tiny import TINY_WORDS, tiny_config, tiny_prompts, tiny_tokenizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hot_path.md")


def logsumexp_logprobs(logits: th.Tensor, tokens: th.Tensor) -> th.Tensor:
    """The alternative: the gather minus the log-sum-exp, with no log-softmax materialised."""
    logits = logits.float()
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - th.logsumexp(logits, dim=-1)


def saved_bytes(fn: Callable[[], th.Tensor]) -> int:
    """Bytes of the tensors autograd saves for the backward pass of ``fn()`` (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(tensor: th.Tensor) -> th.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with th.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def logprob_rows(batch: int, length: int, vocab: int, repeats: int) -> list[tuple[str, float, int]]:
    g = th.Generator().manual_seed(0)
    logits = th.randn(batch, length, vocab, generator=g).requires_grad_(True)
    tokens = th.randint(0, vocab, (batch, length), generator=g)
    rows = []
    for name, fn in (
        ("log_softmax + gather (the library)", logprobs_of_tokens),
        ("gather − logsumexp (tried)", logsumexp_logprobs),
    ):

        def step(fn=fn) -> None:
            fn(logits, tokens).sum().backward()
            logits.grad = None

        rows.append((name, median_time(step, repeats), saved_bytes(lambda fn=fn: fn(logits, tokens))))
    return rows


def build_policy(vocab: int, config: dict, max_tokens: int, lora: dict | None = None) -> TransformerActorCriticPolicy:
    """A Llama with a ``vocab``-wide LM head and a tokenizer of as many entries, as a policy: its actions span the
    whole LM head, as with any real tokenizer, so every log-softmax runs over the full vocabulary."""
    fillers = [f"w{i}" for i in range(vocab - 3 - len(TINY_WORDS))]  # 3 special tokens
    tokenizer = tiny_tokenizer([*TINY_WORDS, *fillers])
    with tempfile.TemporaryDirectory() as folder:
        model_config = tiny_config(vocab, "llama", max_positions=max_tokens, **config)
        causal_lm_from_config(model_config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        env = TokenGenerationEnv(tiny_prompts(8), tokenizer, max_prompt_tokens=8, max_new_tokens=8)
        return TransformerActorCriticPolicy(
            env.observation_space, env.action_space, lambda _: 1e-4, model_name_or_path=folder, lora=lora
        )


def pass_rows(
    policy: TransformerActorCriticPolicy,
    variants: list[tuple[str, dict, bool]],
    batch: int,
    prompt: int,
    length: int,
    repeats: int,
) -> list[tuple[str, float, int]]:
    """Forward + backward of ``evaluate_sequences`` in each variant: (name, its keyword arguments, whether the LM
    head may skip the prompt positions)."""
    g = th.Generator().manual_seed(0)
    input_ids = th.randint(2, policy.n_actions, (batch, prompt + length), generator=g)
    attention_mask = th.ones_like(input_ids)
    rows = []
    for name, kwargs, keep_logits in variants:

        def run(kwargs: dict = kwargs) -> th.Tensor:
            logprobs, values, _ = policy.evaluate_sequences(
                input_ids, attention_mask, length, entropy_grad=False, **kwargs
            )
            return logprobs.sum() + (0 if values is None else 0 * values.sum())

        def step(run: Callable[[], th.Tensor] = run) -> None:
            run().backward()
            policy.zero_grad()

        accepts = forward._accepts_logits_to_keep
        if not keep_logits:  # what peft models got before: the LM head over every position
            forward._accepts_logits_to_keep = lambda model: False  # type: ignore[assignment]
        try:
            rows.append((name, median_time(step, repeats), saved_bytes(run)))
        finally:
            forward._accepts_logits_to_keep = accepts  # type: ignore[assignment]
    return rows


def hidden_state_rows(
    policy: TransformerActorCriticPolicy, batch: int, prompt: int, length: int, repeats: int
) -> list[tuple[str, float, int]]:
    """The rollout's teacher-forced pass of the actor with a shared value head (no gradient): the bytes of the
    hidden states the call hands back (every layer's with ``output_hidden_states``, before; only the last
    positions of the last layer, taken from the LM head's input, now)."""
    g = th.Generator().manual_seed(0)
    input_ids = th.randint(2, policy.n_actions, (batch, prompt + length), generator=g)
    attention_mask = th.ones_like(input_ids)
    actor = policy.actor
    n = length + 1
    kept: dict[str, int] = {}

    def before() -> None:
        out = actor(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=n,
        )
        kept["before"] = sum(h.untyped_storage().nbytes() for h in out.hidden_states)

    def after() -> None:
        _, hidden = forward.forward_last_positions(actor, input_ids, attention_mask, n, output_hidden_states=True)
        assert hidden is not None
        kept["after"] = hidden.untyped_storage().nbytes()

    rows = []
    with th.no_grad():
        for name, key, fn in (
            ("output_hidden_states=True (before)", "before", before),
            ("LM head input hook", "after", after),
        ):
            rows.append((name, median_time(fn, repeats), kept[key] if key in kept else 0))
    return rows


def callback_loop_rows(n_episodes: int, length: int) -> list[tuple[str, float, int]]:
    """Per generated token, RLHFPPO calls ``update_locals`` and ``on_step`` of the run's callbacks (as SB3 does per
    env step). Here: a whole rollout of ``n_episodes`` responses of ``length`` tokens on a tiny model (no stop
    token), and the same number of callback steps alone with the same callbacks (a progress bar, the rollout
    history, a checkpoint callback that does not fire), so that the loop's share of a rollout is read off."""
    from sb3_rlhf import RLHFPPO
    from sb3_rlhf.common.callbacks import RolloutHistoryCallback
    from sb3_rlhf.common.checkpoints import TrainingCheckpointCallback
    from sb3_rlhf.rewards import RewardFunctionWrapper

    tokenizer = tiny_tokenizer(TINY_WORDS)
    with tempfile.TemporaryDirectory() as folder:
        causal_lm_from_config(tiny_config(len(tokenizer), "llama", max_positions=length + 16)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        # every response runs to its full length
        env = TokenGenerationEnv(tiny_prompts(64), tokenizer, 8, length, stop_at_eos=False)
        model = RLHFPPO(
            TransformerActorCriticPolicy,
            RewardFunctionWrapper(env, fn=lambda prompts, completions: [0.0] * len(completions)),
            n_episodes=n_episodes,
            batch_size=n_episodes,
            n_epochs=1,
            policy_kwargs=dict(model_name_or_path=folder),
            seed=0,
        )
        rollout_seconds: list[float] = []
        original = model.collect_rollouts

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            rollout_seconds.append(time.perf_counter() - start)
            return result

        model.collect_rollouts = timed  # type: ignore[method-assign]
        callbacks = [RolloutHistoryCallback(), TrainingCheckpointCallback(10**9, os.path.join(folder, "checkpoints"))]
        model.learn(n_episodes * length, callback=callbacks, progress_bar=True)
        # the loop alone, on the same callbacks
        total_timesteps = n_episodes * length
        _, callback = model._setup_learn(total_timesteps, callbacks, True, "loop", True)
        callback.on_training_start({"total_timesteps": total_timesteps}, globals())
        episodes = {
            "reward": [0.0] * n_episodes,
            "length": [length] * n_episodes,
            "infos": [{"prompt": "", "completion": ""} for _ in range(n_episodes)],
        }
        start = time.perf_counter()
        model._step_callbacks(callback, episodes)  # the rollout's own loop
        loop = time.perf_counter() - start
        callback.on_training_end()
    tokens = n_episodes * length
    return [
        (f"a rollout of {n_episodes} × {length} tokens (tiny Llama)", rollout_seconds[0], tokens),
        ("the per-token callback loop alone", loop, tokens),
    ]


def generation_lines(
    policy: TransformerActorCriticPolicy, batch: int, prompt: int, length: int, repeats: int
) -> list[str]:
    """The rollout's generation against bare ``generate()`` on the same model and prompts, and the critic-free
    rollout's old log-probs: recorded during generation (now) against a teacher-forced pass after it (before)."""
    g = th.Generator().manual_seed(0)
    input_ids = th.randint(2, policy.n_actions, (batch, prompt), generator=g)
    attention_mask = th.ones_like(input_ids)
    # a stop id past the tokenizer's: the policy never draws it, bare generate() almost never (1 in the vocabulary)
    vocab = policy.actor.config.vocab_size
    stop, pad = (vocab - 1,), 0

    engine = RolloutEngine()

    def bare() -> None:
        with th.no_grad():
            policy.actor.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                top_k=0,
                max_new_tokens=length,
                eos_token_id=list(stop),
                pad_token_id=pad,
            )

    def ours(**kwargs: bool) -> Callable[[], None]:
        def run() -> None:
            engine.generate(policy, input_ids, attention_mask, length, stop, pad, **kwargs)

        return run

    def before() -> None:
        response = engine.generate(policy, input_ids, attention_mask, length, stop, pad).responses
        full = th.cat([input_ids, response], dim=1)
        with th.no_grad():
            policy.evaluate_sequences(
                full, th.ones_like(full), response.shape[1], with_entropy=False, with_values=False
            )

    rows = [
        ("bare `generate()` (transformers, same sampling)", bare),
        ("`RolloutEngine.generate()` (the policy's logits processors)", ours()),
        ("critic-free rollout before: `RolloutEngine.generate()` + teacher-forced pass", before),
        ("critic-free rollout now: `RolloutEngine.generate(output_logprobs=True)`", ours(output_logprobs=True)),
    ]
    times = [(name, median_time(fn, repeats)) for name, fn in rows]
    lines = [
        f"**Generation against bare `generate()` (Llama 256×4, vocabulary {vocab}, B={batch}, prompt "
        f"{prompt}, {length} new tokens, KV cache)**",
        "",
        "| | seconds | against bare `generate()` |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {seconds:.3f} | {seconds / times[0][1]:.2f} |" for name, seconds in times]
    return [*lines, ""]


def table(
    title: str,
    rows: list[tuple[str, float, int]],
    columns: tuple[str, str] = ("forward + backward", "saved for backward"),
) -> list[str]:
    base_time, base_bytes = rows[0][1], rows[0][2]
    time_label, bytes_label = columns
    lines = [
        f"**{title}**",
        "",
        f"| | {time_label} | ratio | {bytes_label} | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, seconds, nbytes in rows:
        lines.append(
            f"| {name} | {seconds * 1e3:.1f} ms | {seconds / base_time:.2f} | {nbytes / 2**20:.1f} MiB | "
            f"{nbytes / base_bytes:.2f} |"
        )
    return [*lines, ""]


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
    """This machine's float32 matrix-product rate at the benchmark's thread count (n³ products, GFLOP/s)."""
    a, b = th.randn(n, n), th.randn(n, n)
    seconds = median_time(lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def raw_update_step(
    policy: TransformerActorCriticPolicy, input_ids: th.Tensor, attention_mask: th.Tensor, length: int
) -> Callable[[], None]:
    """The same update step written directly against transformers and torch, nothing of the library: the decoder's
    last hidden state, the LM head over the T + 1 kept positions (the last dropped, as the library does),
    log_softmax + gather, the entropy without gradient, a linear value head over T + 1 states, the same loss,
    backward and an AdamW step of the same settings over a copy of the same weights: what any implementation of
    the update has to do."""
    actor = copy.deepcopy(policy.actor)
    decoder, lm_head = actor.get_decoder(), actor.get_output_embeddings()
    value_head = th.nn.Linear(actor.config.hidden_size, 1)
    group = policy.optimizer.param_groups[0]
    settings = {key: group[key] for key in ("lr", "betas", "eps", "weight_decay")}
    optimizer = th.optim.AdamW([*actor.parameters(), *value_head.parameters()], **settings)
    tokens = input_ids[:, -length:]

    def step() -> None:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)  # no KV cache to train
        hidden = out.last_hidden_state[:, -(length + 1) :]
        logits = lm_head(hidden)[:, :-1].float()  # over the T + 1 kept positions, as the library (values need them)
        logprobs = th.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        with th.no_grad():  # logged, as the library's update logs it
            probs = th.softmax(logits, dim=-1)
            (th.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)).mean()
        values = value_head(hidden).squeeze(-1).float()
        (-logprobs.mean() + values.pow(2).mean()).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def update_flops_lines(
    policy: TransformerActorCriticPolicy, batch: int, prompt: int, length: int, repeats: int
) -> list[str]:
    """One update step (teacher-forced forward with values, a loss, backward, AdamW) against its model FLOPs:
    forward = 2·(non-embedding parameters)·B·(P+T) + the LM head over the kept T+1 positions + attention's
    4·B·(P+T)²·H per layer, backward = 2× forward; the ideal time is those FLOPs at the measured matmul rate.
    Beside it, the same step written directly in torch and transformers (:func:`raw_update_step`): how far the
    library is from that, and how far the raw step itself is from the ideal on this machine."""
    g = th.Generator().manual_seed(0)
    input_ids = th.randint(2, policy.n_actions, (batch, prompt + length), generator=g)
    attention_mask = th.ones_like(input_ids)

    def step() -> None:
        logprobs, values, entropy = policy.evaluate_sequences(input_ids, attention_mask, length, entropy_grad=False)
        assert values is not None
        (-logprobs.mean() + values.pow(2).mean()).backward()
        policy.optimizer.step()
        policy.optimizer.zero_grad()

    raw = raw_update_step(policy, input_ids, attention_mask, length)
    # interleaved with the matmul rate, so that the machine's drift falls on all three alike
    ours_times, raw_times, rates = [], [], []
    for _ in range(3):
        ours_times.append(median_time(step, repeats))
        raw_times.append(median_time(raw, repeats))
        rates.append(matmul_gflops())
    seconds, raw_seconds = float(np.median(ours_times)), float(np.median(raw_times))
    config = policy.actor.config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    # parameters counted once each (tied input and output embeddings are one tensor)
    embedding_ids = {
        id(p)
        for m in (policy.actor.get_input_embeddings(), policy.actor.get_output_embeddings())
        for p in m.parameters()
    }
    body = sum(p.numel() for p in policy.actor.parameters() if id(p) not in embedding_ids)
    tokens = batch * (prompt + length)
    forward_flops = (
        2 * body * tokens
        + 2 * vocab * hidden * batch * (length + 1)
        + 4 * batch * (prompt + length) ** 2 * hidden * layers
    )
    flops = 3 * forward_flops
    rate = float(np.median(rates))
    ideal = flops / (rate * 1e9)
    return [
        f"**An update step against its FLOPs (Llama {hidden}×{layers}, vocabulary {vocab}, B={batch}, prompt {prompt} + {length} tokens)**",
        "",
        f"Model FLOPs (forward + backward) {flops / 1e9:.1f} GFLOP; this machine's float32 matmul rate (1024² "
        f"products) {rate:.0f} GFLOP/s; the ideal time at that rate {ideal * 1e3:.0f} ms. The raw step is the same "
        "work written directly in torch and transformers (`raw_update_step`: decoder, LM head over the kept "
        "positions, log_softmax + gather, entropy without gradient, a linear value head, backward, AdamW); "
        "medians of 3 rounds, each timing both steps and the matmul rate.",
        "",
        "| step | measured | against the ideal | against the raw step |",
        "|---|---|---|---|",
        f"| the library's update step | {seconds * 1e3:.0f} ms | {seconds / ideal:.2f} | {seconds / raw_seconds:.2f} |",
        f"| the raw torch/transformers step | {raw_seconds * 1e3:.0f} ms | {raw_seconds / ideal:.2f} | 1.00 |",
        "",
    ]


def callback_table(rows: list[tuple[str, float, int]], length: int) -> list[str]:
    (rollout_name, rollout, tokens), (loop_name, loop, _) = rows
    return [
        f"**The per-token callback loop at {length}-token responses**",
        "",
        "| | seconds | µs per generated token | share of the rollout |",
        "|---|---|---|---|",
        f"| {rollout_name} | {rollout:.2f} | {rollout / tokens * 1e6:.1f} | 1.00 |",
        f"| {loop_name} | {loop:.3f} | {loop / tokens * 1e6:.2f} | {loop / rollout:.3f} |",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--long-prompt-tokens", type=int, default=256, help="the LoRA pass's prompt (hh_harmless-like)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--callback-episodes", type=int, default=8)
    parser.add_argument("--callback-tokens", type=int, default=1024, help="response length for the callback loop")
    parser.add_argument("--smollm", action="store_true", help="the SmolLM2-135M shape (vocabulary 49152)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    th.set_num_threads(args.threads)
    th.manual_seed(0)
    vocab = 49152 if args.smollm else 32000
    config = dict(hidden_size=256, num_layers=4, num_heads=4)
    b, t = args.batch, args.new_tokens
    lines = [
        "# Hot path of the update: each change against what it replaced",
        "",
        f"`python benchmarks/hot_path.py{' --smollm' if args.smollm else ''}`; {args.threads} threads, median of "
        f"{args.repeats} after a warm-up; saved bytes counted exactly by autograd's saved-tensor hooks. Times on a "
        "shared 2-core machine vary by about ±20% between runs (seen here): a time ratio inside that band is no "
        "measured difference.",
        "",
        *table(
            f"Log-probs of B×T = {b}×{t} response tokens over a {vocab}-token vocabulary",
            logprob_rows(b, t, vocab, args.repeats),
        ),
        *table(
            f"A critic-free update's teacher-forced pass (Llama 256×4, vocabulary {vocab}, B={b}, prompt "
            f"{args.prompt_tokens} + {t} tokens, shared value head)",
            pass_rows(
                build_policy(vocab, config, args.prompt_tokens + t),
                [("with values (before)", {}, True), ("without values", {"with_values": False}, True)],
                b,
                args.prompt_tokens,
                t,
                args.repeats,
            ),
        ),
        *table(
            f"A LoRA (r=8) update's teacher-forced pass with a long prompt (Llama 256×4, vocabulary {vocab}, B={b}, "
            f"prompt {args.long_prompt_tokens} + {t} tokens)",
            pass_rows(
                build_policy(vocab, config, args.long_prompt_tokens + t, lora={"r": 8}),
                [("LM head over every position (before)", {}, False), ("logits_to_keep passed through peft", {}, True)],
                b,
                args.long_prompt_tokens,
                t,
                args.repeats,
            ),
        ),
        *table(
            f"The rollout's teacher-forced pass with a shared value head, no gradient (Llama 256×4, vocabulary {vocab}, "
            f"B={b}, prompt {args.prompt_tokens} + {t} tokens)",
            hidden_state_rows(
                build_policy(vocab, config, args.prompt_tokens + t), b, args.prompt_tokens, t, args.repeats
            ),
            ("forward", "hidden states handed back"),
        ),
        *generation_lines(build_policy(vocab, config, args.prompt_tokens + t), b, args.prompt_tokens, t, args.repeats),
        *update_flops_lines(
            build_policy(vocab, config, args.prompt_tokens + t), b, args.prompt_tokens, t, args.repeats
        ),
        *callback_table(callback_loop_rows(args.callback_episodes, args.callback_tokens), args.callback_tokens),
        versions_line(),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_write:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
