"""Run a task file end to end: reward-model stage (if any), the algorithm (PPO, RLOO, GRPO, P3O or DPO),
checkpoints, export, final report."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from stable_baselines3.common.utils import get_device, set_random_seed
from transformers import PreTrainedTokenizerBase

from sb3_rlhf.algorithms import ONLINE_ALGORITHMS
from sb3_rlhf.common.checkpoints import TrainingCheckpointCallback, latest_checkpoint
from sb3_rlhf.common.data import (
    LoadReport,
    PreferencePair,
    find_data_file,
    load_hub_dataset,
    load_labelled_texts,
    load_preference_pairs,
    load_prompt_texts,
    pairs_from_labels,
    prompt_messages,
    train_test_split,
)
from sb3_rlhf.common.distributed import init_distributed, is_main_process
from sb3_rlhf.common.models import load_tokenizer, pinned_revision, resolve_model_path
from sb3_rlhf.common.tiny import save_tiny_model
from sb3_rlhf.dpo import DPOTrainer
from sb3_rlhf.dpo.sampled_pairs import pairs_from_policy_samples
from sb3_rlhf.envs.token_generation import TokenGenerationEnv
from sb3_rlhf.common.evaluation import compare_policies, report_markdown
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.ppo.ppo import RLHFPPO
from sb3_rlhf.reward_modeling import RewardModelTrainer
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper, RewardModelWrapper, reward_wrappers
from sb3_rlhf.tasks.config import (
    DPO_TASK_SETTINGS,
    PromptsSection,
    RewardModelTrainingSection,
    TaskConfig,
    kl_estimator,
)


def policy_model_path(task: TaskConfig, out: str) -> str:
    """The policy's model as the policy names it (and the SB3 zip records it): the task's folder, packaged name or
    hub id; or a tiny random model built into ``out``."""
    if task.policy.model != "tiny":
        return task.policy.model
    path = os.path.join(out, "base_model")
    if not os.path.exists(os.path.join(path, "config.json")):
        save_tiny_model(path, task.policy.tiny_words, "llama", seed=task.seed, hidden_size=task.policy.tiny_hidden_size)
    return path


def _hub_dataset(section: PromptsSection | RewardModelTrainingSection, where: str, columns: dict[str, str]) -> Any:
    """The ``datasets`` split a ``source = "hub"`` section names, checked to have the ``columns`` its keys name.

    :raises ValueError: one line naming the missing column, its key and the data set's columns.
    """
    dataset = load_hub_dataset(
        section.dataset, section.config, section.split, section.revision, section.data_dir, section.data_files
    )
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"data set {section.dataset!r} has no column {column!r} ({where}.{key}); its columns are "
                f"{dataset.column_names}"
            )
    return dataset


def load_prompt_forms(
    section: PromptsSection, tokenizer: PreTrainedTokenizerBase | None
) -> tuple[list[str], list[str]]:
    """The task's prompts in file order (the split is seeded later), in two parallel forms: what the policy
    reads (through its chat template when ``prompts.chat_template``: an HH conversation as its turns, any other
    text as one user turn, ending in the assistant's header) and the plain text that reward models score
    (the same texts without a chat template).

    :param tokenizer: the policy's tokenizer (used only with ``chat_template``).
    :raises ValueError: a missing column (naming the columns present), or a chat template asked of a tokenizer without one.
    """
    if section.source == "inline":
        texts = list(section.texts)
    elif section.source == "hh":
        pairs, _ = load_preference_pairs(find_data_file(section.path))
        texts = list(dict.fromkeys(p.prompt for p in pairs))
    else:
        if section.source == "hub":
            source = _hub_dataset(section, "prompts", {"column": section.column})
        else:
            source = find_data_file(section.path)
        texts, _ = load_prompt_texts(source, section.column)
    if section.first_words:
        texts = [" ".join(t.split()[: section.first_words]) for t in texts]
    if section.max_prompts:
        texts = texts[: section.max_prompts]
    if not section.chat_template:
        return texts, texts
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompts.chat_template = true but the policy tokenizer has no chat template: set it to false")
    templated = [
        tokenizer.apply_chat_template(prompt_messages(t), add_generation_prompt=True, tokenize=False) for t in texts
    ]
    return templated, texts


def load_prompts(section: PromptsSection, tokenizer: PreTrainedTokenizerBase | None) -> list[str]:
    """The task's prompt texts as the policy reads them, in file order (see :func:`load_prompt_forms`)."""
    return load_prompt_forms(section, tokenizer)[0]


def reward_training_pairs(stage: RewardModelTrainingSection, seed: int) -> tuple[list[PreferencePair], LoadReport]:
    """The comparisons of a ``[reward.train]`` stage: a file's pairs (plain, HH or conversational), labelled
    texts paired positive-over-negative (seeded), or the same from a ``datasets`` data set.

    :raises ValueError: a missing column, naming it and the columns present.
    """
    labels = stage.source == "labels" or (stage.source == "hub" and stage.format == "labels")
    positive_label = str(stage.positive_label)
    if stage.source == "hub":
        if labels:
            columns = {"text_column": stage.text_column, "label_column": stage.label_column}
        else:
            columns = {"chosen_key": stage.chosen_key, "rejected_key": stage.rejected_key}
        source = _hub_dataset(stage, "reward.train", columns)
        names = getattr(source.features[stage.label_column], "names", None) if labels else None
        if names and positive_label in names:  # a ClassLabel column stores class indices
            positive_label = str(names.index(positive_label))
    else:
        source = find_data_file(stage.data)
    if labels:
        positives, negatives, report = load_labelled_texts(
            source, stage.text_column, stage.label_column, positive_label
        )
        pairs = pairs_from_labels(positives, negatives, seed=seed)
    else:
        pairs, report = load_preference_pairs(source, stage.chosen_key, stage.rejected_key, stage.prompt_key)
    return pairs, report


def train_reward_model_stage(
    stage: RewardModelTrainingSection, out: str, seed: int, device: str, progress_bar: bool
) -> tuple[str, dict[str, Any]]:
    """Train a reward model (the task's first stage, or ``sb3-rlhf reward-model``) into ``out/reward_model``.

    :return: the folder, and ``{"before", "after"}`` held-out metrics with the pair counts and the data report.
    """
    pairs, report = reward_training_pairs(stage, seed)
    train, test = train_test_split(pairs, stage.test_size, seed=seed)
    if stage.max_pairs:
        train = train[: stage.max_pairs]
    trainer = RewardModelTrainer(
        resolve_model_path(stage.backbone, stage.backbone_revision, "reward-model backbone"),
        None,
        train,
        test,
        learning_rate=stage.learning_rate,
        head_learning_rate=stage.head_learning_rate,
        batch_size=stage.batch_size,
        n_epochs=stage.epochs,
        max_length=stage.max_length,
        pooling=stage.pooling,
        center_coef=stage.center_coef,
        tensorboard_log=os.path.join(out, "tensorboard"),
        seed=seed,
        device=device,
    )
    before = trainer.evaluate()
    if stage.linear_probe_init:
        trainer.fit_linear_probe()
    trainer.learn(progress_bar=progress_bar)
    folder = os.path.join(out, "reward_model")
    trainer.save(folder)
    info = {
        "before": before,
        "after": trainer.evaluate(),
        "n_train": len(train),
        "n_test": len(test),
        "data": str(report),
    }
    return folder, info


def import_function(spec: str) -> Any:
    """``"package.module:function"`` → the function (only an explicitly named callable is ever imported)."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"reward.function {spec!r}: cannot import {module_name!r} ({error}); the module must be importable "
            "(installed, or its folder on PYTHONPATH)"
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"reward.function {spec!r}: {module_name} has no callable {attribute!r}")
    return function


def make_env(
    task: TaskConfig,
    prompts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    reward_model: str | None,
    reward_prompts: dict[str, str] | None = None,
) -> Any:
    """The task's env under its reward wrappers.

    :param reward_prompts: the plain text of each chat-templated prompt (see :func:`load_prompt_forms`), which
        reward models read instead of the template.
    """
    env = TokenGenerationEnv(
        prompts,
        tokenizer,
        task.generation.max_prompt_tokens,
        task.generation.max_new_tokens,
        # a chat template writes the special tokens itself (BOS included, or not), as SFT/DPO tokenize it
        add_special_tokens=not task.prompts.chat_template,
        reward_prompts=[reward_prompts[p] for p in prompts] if reward_prompts else None,
    )
    if task.reward.function is not None:
        env = RewardFunctionWrapper(env, import_function(task.reward.function))
    else:
        # the reward model runs beside the policy (GPU when there is one)
        env = RewardModelWrapper(
            env,
            reward_model,
            max_length=task.reward.max_length,
            device=get_device(task.device),
            label=task.reward.label,
            score=task.reward.score,
        )
    if task.kl.coef > 0:
        env = KLPenaltyWrapper(
            env, task.kl.coef, target=task.kl.target, horizon=task.kl.horizon, estimator=kl_estimator(task)
        )
    return env


@dataclass
class PreparedTask:
    """What every stage of a task shares: the policy folder and tokenizer, the prompt split, the reward model."""

    task: TaskConfig
    out: str
    policy_path: str
    tokenizer: PreTrainedTokenizerBase
    train_prompts: list[str]
    eval_prompts: list[str]
    reward_model: str | None
    #: the commit a hub-id policy resolved to (see :func:`~sb3_rlhf.common.models.pinned_revision`): every later
    #: load (policy, reference, DPO) gets the same weights without looking the branch up again
    policy_revision: str | None = None
    #: policy prompt -> its plain text, when the prompts are chat-templated (what reward models read)
    reward_prompts: dict[str, str] | None = None

    @property
    def policy_kwargs(self) -> dict[str, Any]:
        policy = self.task.policy
        return dict(
            model_name_or_path=self.policy_path,
            revision=self.policy_revision,
            temperature=policy.temperature,
            top_k=policy.top_k,
            top_p=policy.top_p,
            dtype=policy.dtype,
            value_head=policy.value_head,
            lora=policy.lora,
        )

    def env(self, prompts: list[str]) -> Any:
        return make_env(self.task, prompts, self.tokenizer, self.reward_model, self.reward_prompts)


def prepare(
    task: TaskConfig, out: str, train_reward_model: bool, progress_bar: bool = False
) -> tuple[PreparedTask, dict | None]:
    """Resolve the policy, split the prompts (seeded) and get the reward model: trained now into
    ``out/reward_model`` when ``train_reward_model``, else the one a previous run left there."""
    os.makedirs(out, exist_ok=True)
    set_random_seed(task.seed)
    policy_path = policy_model_path(task, out)
    # resolved now, so that a missing model fails before any work
    policy_folder = resolve_model_path(policy_path, task.policy.revision, "policy model")
    policy_revision = pinned_revision(policy_path, task.policy.revision, policy_folder)
    tokenizer = load_tokenizer(policy_folder)
    prompts, plain_prompts = load_prompt_forms(task.prompts, tokenizer)
    train_prompts, eval_prompts = train_test_split(prompts, task.prompts.eval_size, seed=task.seed)
    reward_model, metrics = task.reward.model, None
    if task.reward.train is not None:
        if train_reward_model:
            reward_model, info = train_reward_model_stage(task.reward.train, out, task.seed, task.device, progress_bar)
            metrics = info["after"]
        else:
            reward_model = os.path.join(out, "reward_model")
    if reward_model is not None:
        # a folder, packaged name or hub id (at [reward] revision) -> a local folder, once for every env built
        revision = task.reward.revision if task.reward.model is not None else None
        reward_model = resolve_model_path(reward_model, revision, "reward model")
    prepared = PreparedTask(
        task,
        out,
        policy_path,
        tokenizer,
        train_prompts,
        eval_prompts[: task.evaluation.n_prompts],
        reward_model,
        policy_revision,
    )
    if task.prompts.chat_template:
        prepared.reward_prompts = dict(zip(prompts, plain_prompts))
    return prepared, metrics


def initial_policy(prepared: PreparedTask, env: Any, device: Any = "cpu") -> TransformerActorCriticPolicy:
    """A fresh copy of the task's initial policy (the KL reference of every algorithm)."""
    return TransformerActorCriticPolicy(
        env.observation_space, env.action_space, lambda _: 0.0, **prepared.policy_kwargs
    ).to(device)


def exported_policy(prepared: PreparedTask, folder: str, env: Any, device: Any) -> TransformerActorCriticPolicy:
    """A policy whose actor is an exported model folder (e.g. DPO's), with the task's other policy settings."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder} is not a model folder: run `sb3-rlhf train` with --out for this run first")
    # LoRA was merged on export; the folder is local, so no revision
    settings = {**prepared.policy_kwargs, "model_name_or_path": folder, "revision": None, "lora": None}
    return TransformerActorCriticPolicy(env.observation_space, env.action_space, lambda _: 0.0, **settings).to(device)


def evaluate_against_initial(
    prepared: PreparedTask, trained: TransformerActorCriticPolicy, timesteps: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Compare ``trained`` with a fresh initial policy on the held-out prompts; write ``report.md``/``.json``
    (with ``extra`` entries, e.g. the reward model's held-out metrics)."""
    task = prepared.task
    eval_env = prepared.env(prepared.eval_prompts)
    initial = initial_policy(prepared, eval_env, trained.device)
    results = compare_policies(
        trained,
        initial,
        eval_env.unwrapped,
        reward_wrappers(eval_env),
        task.seed,
        task.evaluation.n_samples_shown,
    )
    results["algorithm"] = task.algorithm_name
    results["timesteps"] = timesteps
    results.update(extra or {})
    with open(os.path.join(prepared.out, "report.md"), "w") as f:
        f.write(report_markdown(task.name, results, len(prepared.eval_prompts)))
    with open(os.path.join(prepared.out, "report.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    return results


def model_file(task: TaskConfig, out: str) -> str:
    """Where an online run saves its SB3 zip: ``<out>/<algorithm>_model.zip``."""
    return os.path.join(out, f"{task.algorithm_name}_model.zip")


def make_online_model(prepared: PreparedTask, env: Any, **overrides: Any) -> RLHFPPO:
    """The task's online algorithm (PPO, RLOO, GRPO or P3O) on ``env``, with the task's settings and ``overrides``."""
    task = prepared.task
    settings = {
        "policy_kwargs": prepared.policy_kwargs,
        "tensorboard_log": os.path.join(prepared.out, "tensorboard"),
        "seed": task.seed,
        "device": task.device,
        **task.algorithm_settings(),
        **overrides,
    }
    return ONLINE_ALGORITHMS[task.algorithm_name](TransformerActorCriticPolicy, env, **settings)


def make_dpo_trainer(prepared: PreparedTask, **overrides: Any) -> tuple[DPOTrainer, dict]:
    """DPO on pairs of the initial policy's samples on the training prompts, labelled by the task's reward.

    :return: the trainer (not trained yet), and the pair counts (``samples``, ``pairs``, ``ties``, ``empty``).
    """
    task = prepared.task
    settings = {**task.algorithm_settings(), **overrides}
    pair_settings = {k: settings.pop(k) for k in DPO_TASK_SETTINGS if k in settings}
    env = prepared.env(prepared.train_prompts)
    policy = initial_policy(prepared, env, get_device(task.device))
    pairs, counts = pairs_from_policy_samples(
        policy, env.unwrapped, reward_wrappers(env), seed=task.seed, **pair_settings
    )
    del policy
    if not pairs:
        raise ValueError("every sampled pair was a tie under the task's reward: DPO has nothing to learn from")
    settings.setdefault("chat_template", False)  # the prompts are the env's texts, templated already if asked
    settings.setdefault("add_eos", False)  # responses cut at max_new_tokens have no EOS
    settings.setdefault("max_length", task.generation.max_prompt_tokens + task.generation.max_new_tokens + 8)
    settings.setdefault("tensorboard_log", os.path.join(prepared.out, "tensorboard"))
    settings.setdefault("seed", task.seed)
    settings.setdefault("device", task.device)
    model = resolve_model_path(prepared.policy_path, prepared.policy_revision)
    trainer = DPOTrainer(model, prepared.tokenizer, pairs, lora=task.policy.lora, **settings)
    return trainer, counts


def run_task(task: TaskConfig, out: str, progress_bar: bool = True, resume: bool = False) -> dict[str, Any]:
    """Run every stage of ``task`` into ``out``; return the final comparison (also written to ``out/report.md``).

    :param resume: continue an online run from the newest checkpoint in ``out/checkpoints`` (the reward model
        a previous run trained into ``out/reward_model`` is reused).
    """
    checkpoints = os.path.join(out, "checkpoints")
    if resume:
        if task.algorithm_name not in ONLINE_ALGORITHMS:
            raise ValueError(f"--resume continues an online run (ppo, rloo, grpo, p3o), not {task.algorithm_name}")
        latest_checkpoint(checkpoints)  # fail before any work when there is nothing to resume
    distributed = init_distributed()
    if distributed and task.algorithm_name not in ONLINE_ALGORITHMS:
        raise ValueError(
            f"several processes train the online algorithms (ppo, rloo, grpo, p3o), not {task.algorithm_name}"
        )
    progress_bar = progress_bar and is_main_process()
    reward_model_ready = resume and os.path.isdir(os.path.join(out, "reward_model"))
    if not is_main_process():
        dist.barrier()  # rank 0 builds the tiny model and trains the reward model into `out` first
    prepared, reward_model_metrics = prepare(
        task, out, train_reward_model=is_main_process() and not reward_model_ready, progress_bar=progress_bar
    )
    if distributed and is_main_process():
        dist.barrier()
    extra: dict[str, Any] = {"reward_model": reward_model_metrics}
    if task.algorithm_name == "dpo":
        trainer, counts = make_dpo_trainer(prepared)
        trainer.learn(progress_bar=progress_bar)
        trainer.save(os.path.join(out, "policy"))
        env = prepared.env(prepared.eval_prompts)
        trained = exported_policy(prepared, os.path.join(out, "policy"), env, trainer.device)
        extra["dpo"] = {**counts, "gradient_steps": trainer.num_steps}
        return evaluate_against_initial(prepared, trained, 0, extra)
    env = prepared.env(prepared.train_prompts)
    total = task.algorithm.total_timesteps
    if resume:
        model = ONLINE_ALGORITHMS[task.algorithm_name].load_checkpoint(checkpoints, env=env, device=task.device)
        print(f"resuming from timestep {model.num_timesteps} of {total}")
    else:
        model = make_online_model(prepared, env)
    callback = TrainingCheckpointCallback(
        task.checkpoint.every or max(total // 4, 1), checkpoints, task.checkpoint.keep
    )
    remaining = total - model.num_timesteps if resume else total
    if remaining > 0:
        model.learn(
            remaining,
            callback=callback,
            progress_bar=progress_bar,
            tb_log_name=task.name,
            reset_num_timesteps=not resume,
        )
    if not is_main_process():
        return {}  # rank 0 saves and reports for the run
    model.save(model_file(task, out))
    model.policy.save_pretrained(os.path.join(out, "policy"), tokenizer=prepared.tokenizer)
    return evaluate_against_initial(prepared, model.policy, model.num_timesteps, extra)


def evaluate_task(task: TaskConfig, out: str) -> dict[str, Any]:
    """``sb3-rlhf evaluate``: re-run the final comparison of a finished run folder (its SB3 zip, or for DPO its
    exported policy)."""
    prepared, _ = prepare(task, out, train_reward_model=False)
    env = prepared.env(prepared.eval_prompts)
    if task.algorithm_name == "dpo":
        trained = exported_policy(prepared, os.path.join(out, "policy"), env, get_device(task.device))
        return evaluate_against_initial(prepared, trained, 0)
    path = model_file(task, out)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{out} has no {os.path.basename(path)}: run `sb3-rlhf train` with --out {out} first")
    model = ONLINE_ALGORITHMS[task.algorithm_name].load(path, env=env, device=task.device)
    return evaluate_against_initial(prepared, model.policy, model.num_timesteps)
