"""The TRL side of ``benchmarks/peers.py``: one run of TRL 1.12's ``PPOTrainer`` or TRL 1.16's ``GRPOTrainer`` /
``RLOOTrainer`` on the models, prompts and settings of a spec written by the driver; prints nothing the driver
reads, writes a JSON result. Run by the python of a TRL virtual environment (``.venv-trl-1.12``,
``.venv-trl-1.16``), so it must not import sb3_rlhf:

    .venv-trl-1.16/bin/python benchmarks/peers_trl_worker.py SPEC.json RESULT.json

Every TRL option that changes the algorithm or its cost is set here explicitly to the value the project's side
uses (see the ``trl_*`` functions); the driver's ``peers.md`` lists them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import warnings
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch as th  # noqa: E402
from datasets import Dataset  # noqa: E402
from peers_common import (  # noqa: E402  (benchmarks/, beside this file)
    PeakMemory,
    RecordedReward,
    Timer,
    evaluate,
    parameter_checksum,
    run_result,
    word_score_reward,
    write_json,
)
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402


def common_args(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """TrainingArguments shared by the three trainers, matched to the project's side."""
    cpu = spec["device"] == "cpu"
    return dict(
        output_dir=output_dir,
        learning_rate=spec["learning_rate"],
        lr_scheduler_type="constant",  # TrainingArguments' default decays linearly to 0; ours is constant
        warmup_steps=0,
        weight_decay=0.0,  # the project's side passes optimizer_kwargs=dict(weight_decay=0.0) too
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        # TRL's configs default to bf16 mixed precision; both sides train in float32 unless --precision bf16
        bf16=spec.get("precision") == "bf16",
        fp16=False,
        gradient_checkpointing=False,  # TRL's default is on; ours is off
        use_cpu=cpu,
        seed=spec["seed"],
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def trainer_classes(algorithm: str) -> tuple[Any, Any]:
    """TRL's config and trainer classes for ``algorithm`` (imported before the memory baseline is taken)."""
    if algorithm == "ppo":
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        return PPOConfig, PPOTrainer
    if algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        return GRPOConfig, GRPOTrainer
    from trl import RLOOConfig, RLOOTrainer

    return RLOOConfig, RLOOTrainer


def build_ppo(spec: dict[str, Any], tokenizer: Any, output_dir: str) -> tuple[Any, Any, Any]:
    PPOConfig, PPOTrainer = trainer_classes("ppo")
    model_dir, n_episodes = spec["model_dir"], spec["n_episodes"]
    policy = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    # TRL's value model is a sequence classifier; its backbone starts from the policy's weights, like ours
    value_model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_model_dir"])
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in spec["prompts"]]})
    config = PPOConfig(
        **common_args(spec, output_dir),
        per_device_train_batch_size=n_episodes,
        gradient_accumulation_steps=1,
        num_mini_batches=spec["n_minibatches"],
        num_ppo_epochs=spec["n_epochs"],
        total_episodes=spec["iterations"] * n_episodes,
        local_rollout_forward_batch_size=n_episodes,
        response_length=spec["response_length"],
        temperature=spec["temperature"],
        kl_coef=spec["beta"],
        kl_estimator="k1",
        cliprange=spec["clip_range"],
        cliprange_value=spec["clip_range"],
        vf_coef=spec["vf_coef"],
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        num_sample_generations=0,
        stop_token=None,  # generation runs to response_length (the policy makes EOS improbable on both sides)
    )
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=reference,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        eval_dataset=dataset.select(range(min(len(dataset), n_episodes))),
    )
    return trainer, policy, reward_model


def build_group(spec: dict[str, Any], tokenizer: Any, output_dir: str, reward: RecordedReward) -> tuple[Any, Any]:
    n_episodes, minibatches = spec["n_episodes"], spec["n_minibatches"]
    policy = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    group = dict(
        **common_args(spec, output_dir),
        per_device_train_batch_size=n_episodes // minibatches,  # one optimizer step per minibatch ...
        gradient_accumulation_steps=1,
        steps_per_generation=minibatches,  # ... of one generation batch of n_episodes responses
        num_generations=spec["samples_per_prompt"],
        num_iterations=spec["n_epochs"],  # μ: passes over each generation batch
        max_steps=spec["iterations"] * minibatches * spec["n_epochs"],
        max_completion_length=spec["response_length"],
        temperature=spec["temperature"],
        top_p=1.0,
        top_k=0,
        beta=spec["beta"],
        epsilon=spec["clip_range"],
        max_grad_norm=spec["max_grad_norm"],
        disable_dropout=True,
        mask_truncated_completions=False,
        shuffle_dataset=True,
    )
    dataset = Dataset.from_dict({"prompt": list(spec["prompts"])})
    config_class, trainer_class = trainer_classes(spec["algorithm"])
    if spec["algorithm"] == "grpo":
        # the paper's loss: each response's tokens averaged, then the responses (ours: loss_aggregation="sequence");
        # plain k3 in the loss (TRL multiplies it by the importance ratio by default; ours does not)
        config = config_class(**group, loss_type="grpo", scale_rewards="group", use_bias_correction_kl=False)
    else:
        config = config_class(**group, normalize_advantages=False)
    trainer = trainer_class(
        model=policy, reward_funcs=[reward], args=config, train_dataset=dataset, processing_class=tokenizer
    )
    return trainer, policy


class _GeneratedTokens:
    """Counts the tokens ``generate()`` returns beyond the prompt (TRL's PPO generates every response to the end)."""

    def __init__(self, model: Any) -> None:
        self.tokens = 0
        self._generate = model.generate
        model.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._generate(*args, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        prompt = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.tokens += sequences.shape[0] * (sequences.shape[1] - prompt.shape[1])
        return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    trainer_classes(spec["algorithm"])
    memory = PeakMemory(spec["device"])
    memory.baseline()  # after the imports, as the project's worker
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.padding_side = "left"  # TRL's PPO collates left-padded queries
    reward = RecordedReward(word_score_reward)
    with tempfile.TemporaryDirectory() as output_dir:
        if spec["algorithm"] == "ppo":
            trainer, policy, reward_model = build_ppo(spec, tokenizer, output_dir)
            counter = _GeneratedTokens(policy)
            score = dict(reward_model=reward_model)
        else:
            trainer, policy = build_group(spec, tokenizer, output_dir, reward)
            reward_model, score = None, dict(reward_fn=word_score_reward)
        checksum = parameter_checksum(policy)
        initial = evaluate(policy, tokenizer, spec, **score)
        if spec["algorithm"] == "ppo":
            counter.tokens = 0  # the evaluation's samples are not training's
        memory.start()
        with Timer(spec["device"]) as timer:
            trainer.train()
        peak = memory.peak_mib()
        history = trainer.state.log_history
    if spec["algorithm"] == "ppo":
        episodes = int(trainer.state.episode)
        tokens = counter.tokens
        rollouts = len([h for h in history if "objective/scores" in h])
        train_scores = [h["objective/scores"] for h in history if "objective/scores" in h]
    else:
        rollouts = len(reward.batch_means)
        episodes = rollouts * spec["n_episodes"]
        tokens = reward.tokens
        train_scores = reward.batch_means
    return run_result(
        policy,
        tokenizer,
        spec,
        score,
        initial,
        train_scores,
        episodes=episodes,
        tokens=tokens,
        rollouts=rollouts,
        seconds=timer.seconds,
        **peak,
        initial_checksum=checksum,
        versions={
            "python": platform.python_version(),
            **{p: importlib.metadata.version(p) for p in ("torch", "transformers", "trl", "accelerate")},
        },
    )


def main() -> int:
    spec_path, result_path = sys.argv[1:3]
    with open(spec_path) as f:
        spec = json.load(f)
    th.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    write_json(result_path, run(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
