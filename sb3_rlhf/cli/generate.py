"""``sb3-rlhf generate``: sample from a trained (exported) policy."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``generate`` sub-command to ``subparsers``."""
    parser = subparsers.add_parser("generate", help="sample from a trained (exported) policy")
    parser.add_argument(
        "--model", required=True, help="an exported policy folder, or any causal LM: folder, packaged name or hub id"
    )
    parser.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")
    parser.add_argument("--prompt", required=True, action="append", help="a prompt (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most probable tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0: all)")
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_generate)
    return parser


def run_generate(args: argparse.Namespace) -> list[str]:
    """``sb3-rlhf generate``: responses of an exported policy, sampled as the policy samples (temperature and
    top-k/top-p in the policy's own processor; a checkpoint's generation_config does not apply)."""
    import torch as th
    from gymnasium import spaces

    from sb3_rlhf.common.models import load_tokenizer, resolve_model_path
    from sb3_rlhf.common.rollout_engine import RolloutEngine
    from sb3_rlhf.policies import TransformerActorCriticPolicy

    blank = [i for i, prompt in enumerate(args.prompt) if not prompt.strip()]
    if blank:  # checked before any model is loaded
        raise ValueError(f"--prompt number {blank[0] + 1} is empty: give it some text to continue")
    path = resolve_model_path(args.model, args.revision)
    tokenizer = load_tokenizer(path)
    policy = TransformerActorCriticPolicy(
        spaces.Dict({}),
        spaces.Discrete(len(tokenizer)),
        lambda _: 0.0,
        model_name_or_path=path,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
    )
    th.manual_seed(args.seed)
    answers: list[str] = []
    engine = RolloutEngine("dynamic")  # one prompt at a time, each its own shape: nothing a compiled step would reuse
    for prompt in args.prompt:
        if args.chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not args.chat_template)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        response = engine.generate(
            policy,
            inputs["input_ids"],
            inputs["attention_mask"],
            args.max_new_tokens,
            (tokenizer.eos_token_id,),
            pad,
            deterministic=args.greedy,
        ).responses
        answers.append(str(tokenizer.decode(response[0], skip_special_tokens=True)))
        print(f"{prompt!r} -> {answers[-1]!r}")
    return answers
