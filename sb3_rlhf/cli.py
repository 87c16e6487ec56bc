"""The ``sb3-rlhf`` command."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def tiny_demo(out: str, timesteps: int, seed: int, device: str, progress_bar: bool) -> dict[str, float]:
    """Train a tiny random Llama with PPO to say "good" (rule reward) under a KL penalty; return a summary."""
    from sb3_rlhf import RLHFPPO, TokenGenerationEnv, TransformerActorCriticPolicy
    from sb3_rlhf.common.callbacks import RolloutHistoryCallback
    from sb3_rlhf.common.tiny import TINY_WORDS, save_tiny_model, tiny_prompts
    from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper
    from sb3_rlhf.rewards.rules import share_of_good

    base_model = os.path.join(out, "base_model")
    tokenizer = save_tiny_model(base_model, TINY_WORDS, "llama", seed=seed, hidden_size=64)

    prompts = tiny_prompts(200, seed, min_words=2)

    env = TokenGenerationEnv(prompts, tokenizer, max_prompt_tokens=8, max_new_tokens=12)
    env = RewardFunctionWrapper(env, fn=share_of_good)
    env = KLPenaltyWrapper(env, coef=0.02)
    model = RLHFPPO(
        TransformerActorCriticPolicy,
        env,
        learning_rate=1e-3,
        n_episodes=64,
        batch_size=16,
        n_epochs=4,
        policy_kwargs=dict(model_name_or_path=base_model),
        tensorboard_log=os.path.join(out, "tensorboard"),
        seed=seed,
        device=device,
    )
    history = RolloutHistoryCallback()
    model.learn(total_timesteps=timesteps, callback=history, progress_bar=progress_bar)
    model.save(os.path.join(out, "ppo_tiny.zip"))
    model.policy.save_pretrained(os.path.join(out, "policy"), tokenizer=tokenizer)
    first, last = history.history[0], history.history[-1]
    return {
        "rollouts": len(history.history),
        "first_scores": first["scores"],
        "last_scores": last["scores"],
        "last_kl": last["kl"],
        "last_response_length": last["response_length"],
    }


def _test_size(text: str) -> int | float:
    value = float(text)
    return value if value < 1 else int(value)


def train_reward_model(args: argparse.Namespace) -> dict[str, object]:
    """``sb3-rlhf reward-model``: Bradley–Terry training on pairs from JSONL or a labelled CSV."""
    from sb3_rlhf.tasks.config import RewardModelTrainingSection
    from sb3_rlhf.tasks.run import train_reward_model_stage

    stage = RewardModelTrainingSection(
        data=args.data,
        dataset=args.dataset,
        config=args.dataset_config,
        split=args.split,
        data_dir=args.data_dir,
        revision=args.dataset_revision,
        format=args.format,
        backbone=args.model,
        backbone_revision=args.revision,
        source="hub" if args.dataset else "labels" if args.data.lower().endswith((".csv", ".csv.gz")) else "pairs",
        prompt_key=args.prompt_key,
        chosen_key=args.chosen_key,
        rejected_key=args.rejected_key,
        text_column=args.text_column,
        label_column=args.label_column,
        positive_label=args.positive_label,
        test_size=args.test_size,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        head_learning_rate=args.head_learning_rate,
        linear_probe_init=args.linear_probe_init,
        batch_size=args.batch_size,
        max_length=args.max_length,
        pooling=args.pooling,
        center_coef=args.center_coef,
    )
    folder, info = train_reward_model_stage(stage, args.out, args.seed, args.device, not args.no_progress_bar)
    before, after = info["before"], info["after"]
    print(info["data"])
    print(f"pairs: {info['n_train']} train, {info['n_test']} held out (seed {args.seed})")
    print(
        f"held-out accuracy: {before['accuracy']:.3f} -> {after['accuracy']:.3f}; margin {after['margin']:.3f}, "
        f"scores mean {after['mean']:.3f} std {after['std']:.3f}"
    )
    print(f"reward model saved to {folder} (RewardModelWrapper(env, path) loads it)")
    return after


def _training_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer arguments that ``sft`` and ``dpo`` take from their shared flags (:func:`_common_training_args`)."""
    return dict(
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        n_epochs=args.epochs,
        max_length=args.max_length,
        tensorboard_log=os.path.join(args.out, "tensorboard"),
        seed=args.seed,
        device=args.device,
    )


def _fit_and_export(trainer: Any, args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """Held-out metrics before, ``learn()``, metrics after, then the export to ``<out>/model``."""
    before = trainer.evaluate()
    trainer.learn(progress_bar=not args.no_progress_bar)
    after = trainer.evaluate()
    trainer.save(os.path.join(args.out, "model"))
    return before, after


def train_sft(args: argparse.Namespace) -> dict[str, float]:
    """``sb3-rlhf sft``: supervised fine-tuning on (prompt, response) demonstrations."""
    from sb3_rlhf.common.data import load_demonstrations, train_test_split
    from sb3_rlhf.common.models import resolve_model_path
    from sb3_rlhf.sft import SFTTrainer

    demos, report = load_demonstrations(_records(args), args.prompt_key, args.response_key)
    train, test = train_test_split(demos, args.test_size, seed=args.seed)
    trainer = SFTTrainer(
        resolve_model_path(args.model, args.revision),
        None,
        train,
        test,
        chat_template=False if args.no_chat_template else None,
        checkpoint_dir=os.path.join(args.out, "checkpoints"),
        **_training_settings(args),
    )
    before, after = _fit_and_export(trainer, args)
    print(report)
    print(f"demonstrations: {len(train)} train, {len(test)} held out (seed {args.seed})")
    print(f"held-out perplexity: {before['perplexity']:.2f} -> {after['perplexity']:.2f}")
    print(f"model saved to {os.path.join(args.out, 'model')} (use it as policy_kwargs['model_name_or_path'])")
    return after


def _with_algorithm(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, with ``--algorithm`` as ``task.algorithm``."""
    return [*args.set, *([f"task.algorithm={args.algorithm}"] if args.algorithm else [])]


def train_dpo(args: argparse.Namespace) -> dict[str, float]:
    """``sb3-rlhf dpo``: Direct Preference Optimization on preference pairs (JSONL, HH transcripts too)."""
    from sb3_rlhf.common.data import load_preference_pairs, train_test_split
    from sb3_rlhf.common.models import resolve_model_path
    from sb3_rlhf.dpo import DPOTrainer

    pairs, report = load_preference_pairs(_records(args), args.chosen_key, args.rejected_key, args.prompt_key)
    train, test = train_test_split(pairs, args.test_size, seed=args.seed)
    trainer = DPOTrainer(
        resolve_model_path(args.model, args.revision),
        None,
        train,
        test,
        beta=args.beta,
        loss_type=args.loss_type,
        lora={"r": args.lora_r} if args.lora_r else None,
        chat_template=False if args.no_chat_template else None,
        **_training_settings(args),
    )
    before, after = _fit_and_export(trainer, args)
    print(report)
    print(f"pairs: {len(train)} train, {len(test)} held out (seed {args.seed})")
    if after:
        print(
            f"held-out loss {before['loss']:.4f} -> {after['loss']:.4f}; implicit-reward accuracy "
            f"{after['rewards/accuracies']:.3f}, margin {after['rewards/margins']:.3f}"
        )
    print(f"model saved to {os.path.join(args.out, 'model')} (use it as policy_kwargs['model_name_or_path'])")
    return after


def launch_processes(nproc: int, argv: Sequence[str]) -> int:
    """``sb3-rlhf train --nproc N``: the same command in N processes under torchrun (one node; for several nodes
    run torchrun or ``accelerate launch`` yourself, see the README)."""
    rest, skip = [], False
    for arg in argv:  # the ranks run the command without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([*command, "-m", "sb3_rlhf.cli", *rest]).returncode


def run_train(args: argparse.Namespace) -> dict[str, object]:
    """``sb3-rlhf train``: every stage of a task file, then the comparison with the initial policy."""
    from sb3_rlhf.common.distributed import is_main_process
    from sb3_rlhf.common.evaluation import report_markdown
    from sb3_rlhf.tasks import load_task, run_task

    task = load_task(args.task, _with_algorithm(args))
    out = args.out or os.path.join("runs", task.name)
    if args.dry_run:
        from sb3_rlhf.tasks.plan import describe_output, format_plan, plan_task

        print(format_plan(plan_task(task)))
        print(describe_output(out))
        return {}
    results = run_task(task, out, progress_bar=not args.no_progress_bar, resume=args.resume)
    if not is_main_process():
        return results
    if results.get("reward_model"):
        print(f"reward model: held-out accuracy {results['reward_model']['accuracy']:.3f}")
    print(report_markdown(task.name, results, task.evaluation.n_prompts))
    print(f"run folder: {out} (tensorboard/, checkpoints/, {task.algorithm_name}_model.zip, policy/, report.md)")
    return results


def run_evaluate(args: argparse.Namespace) -> dict[str, object]:
    """``sb3-rlhf evaluate``: the comparison of a finished run's policy with the initial one."""
    from sb3_rlhf.common.evaluation import report_markdown
    from sb3_rlhf.tasks import evaluate_task, load_task

    task = load_task(args.task, _with_algorithm(args))
    results = evaluate_task(task, args.out or os.path.join("runs", task.name))
    print(report_markdown(task.name, results, task.evaluation.n_prompts))
    return results


def run_generate(args: argparse.Namespace) -> list[str]:
    """``sb3-rlhf generate``: responses of an exported policy, sampled as the policy samples (temperature and
    top-k/top-p in the policy's own processor; a checkpoint's generation_config does not apply)."""
    import torch as th
    from gymnasium import spaces

    from sb3_rlhf.common.models import load_tokenizer, resolve_model_path
    from sb3_rlhf.policies import TransformerActorCriticPolicy

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
    answers = []
    for prompt in args.prompt:
        if args.chat_template:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not args.chat_template)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        response = policy.generate(
            inputs["input_ids"],
            inputs["attention_mask"],
            args.max_new_tokens,
            (tokenizer.eos_token_id,),
            pad,
            deterministic=args.greedy,
        )
        answers.append(tokenizer.decode(response[0], skip_special_tokens=True))
        print(f"{prompt!r} -> {answers[-1]!r}")
    return answers


def _records(args: argparse.Namespace) -> Any:
    """The ``--data`` file, or the ``--dataset`` split loaded with ``datasets`` (an iterable of records)."""
    if args.data:
        return args.data
    from sb3_rlhf.common.data import load_hub_dataset

    return load_hub_dataset(args.dataset, args.dataset_config, args.split, args.dataset_revision, args.data_dir)


def _common_training_args(
    parser: argparse.ArgumentParser, learning_rate: float, batch_size: int, max_length: int
) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a .jsonl/.jsonl.gz file (or .csv for labelled texts)")
    source.add_argument(
        "--dataset", help="a `datasets` data set instead: a hub name (e.g. Anthropic/hh-rlhf), a folder or a builder"
    )
    parser.add_argument("--dataset-config", help="--dataset: its configuration (subset)")
    parser.add_argument("--split", default="train", help="--dataset: the split, e.g. train or 'test[:1000]'")
    parser.add_argument("--data-dir", help="--dataset: a folder inside it (Anthropic/hh-rlhf: harmless-base)")
    parser.add_argument("--dataset-revision", help="--dataset: a branch, tag or commit")
    parser.add_argument(
        "--model", required=True, help="a local model folder, a packaged model name or a Hugging Face hub id"
    )
    parser.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--test-size", type=_test_size, default=0.1, help="held-out share (<1) or count")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=learning_rate)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--max-length", type=int, default=max_length)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress-bar", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sb3-rlhf", description="RLHF for language models with Stable-Baselines3")
    parser.add_argument("--traceback", action="store_true", help="on an error, show the whole Python traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="PPO on a tiny random model with a rule reward (runs in about a minute on CPU)")
    demo.add_argument("--out", default="runs/demo", help="folder for TensorBoard logs, the SB3 zip and the export")
    demo.add_argument("--timesteps", type=int, default=30_000, help="generated tokens to train on")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.add_argument("--no-progress-bar", action="store_true")

    rm = sub.add_parser("reward-model", help="train a reward model on human comparisons (Bradley–Terry)")
    _common_training_args(rm, learning_rate=2e-5, batch_size=16, max_length=256)
    rm.add_argument("--head-learning-rate", type=float, default=1e-3)
    rm.add_argument("--pooling", default="auto", choices=["auto", "mean", "last", "first"])
    rm.add_argument("--center-coef", type=float, default=0.0)
    rm.add_argument(
        "--linear-probe-init", action="store_true", help="fit the head as a linear probe before fine-tuning"
    )
    rm.add_argument("--prompt-key", default="prompt")
    rm.add_argument("--chosen-key", default="chosen")
    rm.add_argument("--rejected-key", default="rejected")
    rm.add_argument("--text-column", default="review", help="CSV: the text column")
    rm.add_argument("--label-column", default="sentiment", help="CSV: the label column")
    rm.add_argument("--positive-label", default="positive", help="CSV: the preferred label")
    rm.add_argument(
        "--format", default="pairs", choices=["pairs", "labels"], help="--dataset: comparisons, or labelled texts"
    )

    sft = sub.add_parser("sft", help="supervised fine-tuning of a causal LM on demonstrations")
    _common_training_args(sft, learning_rate=5e-5, batch_size=8, max_length=512)
    sft.add_argument("--prompt-key", default="prompt")
    sft.add_argument("--response-key", default="response")
    sft.add_argument("--no-chat-template", action="store_true", help="do not apply the tokenizer's chat template")

    dpo = sub.add_parser("dpo", help="Direct Preference Optimization of a causal LM on preference pairs")
    _common_training_args(dpo, learning_rate=5e-6, batch_size=8, max_length=512)
    dpo.add_argument("--beta", type=float, default=0.1, help="strength of the implicit KL constraint (> 0)")
    dpo.add_argument("--loss-type", default="sigmoid", choices=["sigmoid", "ipo"])
    dpo.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank (0: full fine-tuning)")
    dpo.add_argument("--prompt-key", default="prompt")
    dpo.add_argument("--chosen-key", default="chosen")
    dpo.add_argument("--rejected-key", default="rejected")
    dpo.add_argument("--no-chat-template", action="store_true", help="do not apply the tokenizer's chat template")

    algorithms = ["ppo", "rloo", "grpo", "p3o", "dpo"]
    train = sub.add_parser("train", help="run a task file (envs/*.toml): reward-model stage, RL or DPO, report")
    train.add_argument("task", help="a task file, e.g. envs/tiny_synthetic.toml")
    train.add_argument("--algorithm", choices=algorithms, help="override the task's algorithm (task.algorithm)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a task key, e.g. algorithm.total_timesteps=2000",
    )
    train.add_argument("--out", help="run folder (default runs/<task name>)")
    train.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its newest checkpoint (online algorithms)"
    )
    train.add_argument(
        "--nproc", type=int, default=1, help="train in this many processes on this machine (torchrun; one per GPU)"
    )
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve every model and data file, print the plan (models, data sizes, budget) and exit without training",
    )
    train.add_argument("--no-progress-bar", action="store_true")

    evaluate = sub.add_parser("evaluate", help="re-run the trained-versus-initial report of a finished run")
    evaluate.add_argument("task", help="the task file the run used")
    evaluate.add_argument("--algorithm", choices=algorithms, help="the algorithm the run used, if overridden")
    evaluate.add_argument("--out", help="the run folder (default runs/<task name>)")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    generate = sub.add_parser("generate", help="sample from a trained (exported) policy")
    generate.add_argument(
        "--model", required=True, help="an exported policy folder, or any causal LM: folder, packaged name or hub id"
    )
    generate.add_argument("--revision", help="branch, tag or commit of a hub id (default: main)")
    generate.add_argument("--prompt", required=True, action="append", help="a prompt (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k most probable tokens (0: all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0: all)")
    generate.add_argument("--greedy", action="store_true")
    generate.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn")
    generate.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and not args.dry_run and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return launch_processes(args.nproc, list(sys.argv[1:] if argv is None else argv))
    try:
        _run(args)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        # bad input, a missing file, a run that cannot go on: the message names the fix; a traceback adds nothing
        print(f"sb3-rlhf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


#: errors that come from what the user gave (or a run that stopped for a reason it names), printed without a traceback
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FloatingPointError, ImportError, pickle.UnpicklingError)


def _run(args: argparse.Namespace) -> None:
    if args.command == "train":
        try:
            run_train(args)
        finally:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
    elif args.command == "evaluate":
        run_evaluate(args)
    elif args.command == "generate":
        run_generate(args)
    elif args.command == "reward-model":
        train_reward_model(args)
    elif args.command == "sft":
        train_sft(args)
    elif args.command == "dpo":
        train_dpo(args)
    elif args.command == "demo":
        summary = tiny_demo(args.out, args.timesteps, args.seed, args.device, progress_bar=not args.no_progress_bar)
        print(f"rollouts: {summary['rollouts']}")
        print(
            f"mean score (share of 'good'): first rollout {summary['first_scores']:.3f} -> last {summary['last_scores']:.3f}"
        )
        print(f"KL to the reference (nats per response): {summary['last_kl']:.3f}")
        print(f"TensorBoard: tensorboard --logdir {os.path.join(args.out, 'tensorboard')}")
        print(
            f"SB3 model: {os.path.join(args.out, 'ppo_tiny.zip')}; exported policy: {os.path.join(args.out, 'policy')}"
        )


if __name__ == "__main__":
    sys.exit(main())
