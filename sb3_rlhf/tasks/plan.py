"""``sb3-rlhf train TASK --dry-run``: resolve everything a task names and say what the run would do, without training."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoConfig, PreTrainedTokenizerBase

from sb3_rlhf.algorithms import ONLINE_ALGORITHMS, algorithm_class, argument_defaults
from sb3_rlhf.common.models import count_parameters, load_tokenizer, resolve_model_path
from sb3_rlhf.common.tiny import tiny_causal_lm, tiny_tokenizer
from sb3_rlhf.common.tokenizers import check_tokenizer
from sb3_rlhf.dpo import DPOTrainer
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.rewards.reward_model import classifier_label_index
from sb3_rlhf.tasks.config import DPO_TASK_SETTINGS, TaskConfig, kl_estimator
from sb3_rlhf.tasks.data import (
    load_prompt_forms,
    policy_conversations,
    reward_training_pairs,
    split_prompts,
    split_reward_pairs,
)
from sb3_rlhf.tasks.stages import import_function


@dataclass
class TaskPlan:
    """What a task resolves to: its models (with parameter counts), data sizes and training budget."""

    task: TaskConfig
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {"name", "path", "parameters", ...}
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # what -> {"source", counts}
    budget: dict[str, Any] = field(default_factory=dict)
    stages: list[str] = field(default_factory=list)


def _model_entry(name: str, revision: str | None, what: str) -> dict[str, Any]:
    path = resolve_model_path(name, revision, what)
    return {"name": name, "revision": revision, "path": path, "parameters": count_parameters(path)}


def plan_task(task: TaskConfig) -> TaskPlan:
    """Resolve every model and data file of ``task`` (local, packaged or hub) and compute its budget.

    Nothing is trained and the run folder is not touched: a tiny policy is built in memory to be counted. A hub
    id or data set not cached yet is downloaded into the Hugging Face cache, and a packaged GGUF model is
    converted once into its cache, as the run itself would.

    :raises FileNotFoundError: a model or data file is missing (the message names it and the fix).
    """
    plan = TaskPlan(task)
    policy = task.policy
    if policy.model == "tiny":
        tokenizer: PreTrainedTokenizerBase = tiny_tokenizer(policy.tiny_words)
        model = tiny_causal_lm(len(tokenizer), "llama", seed=task.seed, hidden_size=policy.tiny_hidden_size)
        parameters = sum(p.numel() for p in model.parameters())
        plan.models["policy"] = {"name": "tiny", "revision": None, "path": None, "parameters": parameters}
    else:
        plan.models["policy"] = _model_entry(policy.model, policy.revision, "policy model")
        tokenizer = check_tokenizer(load_tokenizer(plan.models["policy"]["path"]))
    if policy.lora is not None:
        plan.models["policy"]["lora"] = dict(policy.lora)

    prompts, plain_prompts = load_prompt_forms(
        task.prompts, tokenizer, policy_conversations(task.reward.train, task.seed)
    )
    train_prompts, eval_prompts = split_prompts(task.prompts, prompts, plain_prompts, task.seed)
    plan.data["prompts"] = {
        "source": task.prompts.path or task.prompts.source,
        "total": len(prompts),
        "train": len(train_prompts),
        "held_out": min(len(eval_prompts), task.evaluation.n_prompts),
    }

    reward = task.reward
    if reward.train is not None:
        stage = reward.train
        plan.models["reward_backbone"] = _model_entry(stage.backbone, stage.backbone_revision, "reward-model backbone")
        pairs, report = reward_training_pairs(stage, task.seed, task.judge.share if task.judge else 0.0)
        train, test = split_reward_pairs(stage, pairs, task.seed)
        train = train[: stage.max_pairs] if stage.max_pairs else train
        steps = stage.n_epochs * math.ceil(len(train) / stage.batch_size)
        plan.data["reward_pairs"] = {"source": str(report), "train": len(train), "held_out": len(test)}
        by_conversation = ", one per conversation" if stage.split_by == "conversation" else ""
        plan.stages.append(
            f"reward model: Bradley–Terry on {len(train)} pairs ({len(test)} held out{by_conversation}), "
            f"{'linear probe, then ' if stage.linear_probe_init else ''}{stage.n_epochs} epoch(s) = {steps} gradient steps"
        )
    elif reward.function is not None:
        import_function(reward.function)  # importable, and a callable: fail now, not after the first rollout
    elif reward.model is not None:
        plan.models["reward_model"] = _model_entry(reward.model, reward.revision, "reward model")
        folder = plan.models["reward_model"]["path"]
        # a classifier needs a label it has: check it now, from the config alone
        scalar = os.path.exists(os.path.join(folder, "reward_model.json"))  # a RewardModel: one score
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        classifier_label_index(config, 1 if scalar else config.num_labels, reward.label)

    settings = {**argument_defaults(algorithm_class(task.algorithm_name)), **task.algorithm_settings()}
    if task.algorithm_name in ONLINE_ALGORITHMS:
        # the algorithm's own checks of its settings, as the run makes them (SB3's _init_setup_model=False: no model)
        ONLINE_ALGORITHMS[task.algorithm_name](
            TransformerActorCriticPolicy,
            None,
            **task.algorithm_settings(),
            policy_kwargs={"value_head": task.policy.value_head},
            device="cpu",  # the task's device is checked by name: a plan may be made away from the GPU
            _init_setup_model=False,
        )
        total = task.algorithm.total_timesteps
        n_episodes, batch_size, n_epochs = settings["n_episodes"], settings["batch_size"], settings["n_epochs"]
        # one timestep is one generated token: a rollout holds n_episodes responses of 1..max_new_tokens tokens
        longest = n_episodes * task.generation.max_new_tokens
        rollouts = (math.ceil(total / longest), math.ceil(total / n_episodes))
        steps_per_rollout = n_epochs * math.ceil(n_episodes / batch_size)
        plan.budget = {
            "total_timesteps": total,
            "rollouts": rollouts,
            "episodes_per_rollout": n_episodes,
            "gradient_steps_per_rollout": steps_per_rollout,
            "gradient_steps": (rollouts[0] * steps_per_rollout, rollouts[1] * steps_per_rollout),
        }
        plan.stages.append(
            f"{task.algorithm_name}: {total} generated tokens in {rollouts[0]}–{rollouts[1]} rollouts of "
            f"{n_episodes} responses; {steps_per_rollout} gradient steps each ({n_epochs} epochs × "
            f"{math.ceil(n_episodes / batch_size)} minibatches{', fewer if target_kl stops early' if settings.get('target_kl') else ''})"
        )
    else:
        # DPO's own checks of its settings, as the run makes them (the model is not loaded for a plan)
        names = ("learning_rate", "batch_size", "n_epochs", "weight_decay", "max_grad_norm", "log_interval")
        DPOTrainer.check_settings(**{k: settings[k] for k in names})
        DPOTrainer.check_loss_settings(settings["beta"], settings["loss_type"], settings["label_smoothing"])
        pair_settings = {k: settings.get(k) for k in DPO_TASK_SETTINGS}
        n_prompts = min(pair_settings["n_prompts"] or len(train_prompts), len(train_prompts))
        n_pairs = n_prompts * (pair_settings["pairs_per_prompt"] or 1)
        steps = settings["n_epochs"] * math.ceil(n_pairs / settings["batch_size"])
        plan.budget = {"sampled_pairs": n_pairs, "gradient_steps": (steps, steps)}
        plan.stages.append(
            f"dpo: sample {n_pairs} pairs from the initial policy on {n_prompts} training prompts, label them with the "
            f"reward, then up to {steps} gradient steps (ties are dropped)"
        )
    plan.stages.append(f"report: trained against initial policy on {plan.data['prompts']['held_out']} held-out prompts")
    return plan


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def format_plan(plan: TaskPlan) -> str:
    """The plan as the lines ``--dry-run`` prints."""
    task = plan.task
    lines = [f"task {task.name} ({task.source}): {task.algorithm_name}, seed {task.seed}, device {task.device}"]
    for role, model in plan.models.items():
        where = "" if model["path"] is None or model["path"] == model["name"] else f" -> {model['path']}"
        revision = f"@{model['revision']}" if model.get("revision") else ""
        lora = f", LoRA {model['lora']}" if model.get("lora") else ""
        lines.append(f"{role}: {model['name']}{revision}{where} ({_millions(model['parameters'])} parameters{lora})")
    if task.reward.function is not None:
        lines.append(f"reward: function {task.reward.function}")
    if task.kl.coef > 0:
        adaptive = ""
        if task.kl.target is not None:
            adaptive = f", adapted to a KL target of {task.kl.target} (horizon {task.kl.horizon} episodes"
            adaptive += f", proportional gain {task.kl.proportional_gain})" if task.kl.proportional_gain else ")"
        lines.append(
            f"kl: β = {task.kl.coef}{adaptive}, estimator {kl_estimator(task)}, reference = the initial policy"
        )
    for what, data in plan.data.items():
        counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in data.items() if k != "source")
        lines.append(f"{what}: {data['source']}: {counts}")
    generation = task.generation
    lines.append(
        f"episodes: prompts up to {generation.max_prompt_tokens} tokens, responses up to {generation.max_new_tokens}"
    )
    lines += [f"stage {i}. {stage}" for i, stage in enumerate(plan.stages, start=1)]
    return "\n".join(lines)


def describe_output(out: str) -> str:
    """Where the run would write."""
    return f"run folder: {os.path.abspath(out)} (not written by --dry-run)"
