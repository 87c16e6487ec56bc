"""The stages of a task and the factories the runner builds them with: the reward-model stage, the second
judge, the policy (initial, reference, exported), the env under its reward wrappers, and the online algorithm or
DPO trainer."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.utils import get_device
from transformers import PreTrainedTokenizerBase

from sb3_rlhf.algorithms import ONLINE_ALGORITHMS
from sb3_rlhf.common.data import train_test_split
from sb3_rlhf.common.io import atomic_directory, atomic_file
from sb3_rlhf.common.judge import BagOfWordsJudge
from sb3_rlhf.common.models import resolve_model_path
from sb3_rlhf.common.on_policy_algorithm import RLHFOnPolicyAlgorithm
from sb3_rlhf.common.progress import announce
from sb3_rlhf.common.tiny import save_tiny_model
from sb3_rlhf.dpo import DPOTrainer
from sb3_rlhf.dpo.sampled_pairs import pairs_from_policy_samples
from sb3_rlhf.envs.token_generation import TokenGenerationEnv
from sb3_rlhf.policies import TransformerActorCriticPolicy
from sb3_rlhf.reward_modeling import RewardModelTrainer
from sb3_rlhf.rewards import KLPenaltyWrapper, RewardFunctionWrapper, RewardModelWrapper, reward_wrappers
from sb3_rlhf.tasks.config import (
    DPO_TASK_SETTINGS,
    JudgeSection,
    RewardModelTrainingSection,
    TaskConfig,
    kl_estimator,
)
from sb3_rlhf.tasks.data import labelled_halves, reward_training_pairs, split_reward_pairs

#: in a trained reward model's folder: the share of labelled texts it left out for a judge, the share of
#: conversations it left to the policy, and the seed
DATA_SPLIT_FILE = "data_split.json"


#: The settings a tiny base model was built with, saved beside it.
TINY_SETTINGS_FILE = "tiny_settings.json"


def policy_model_path(task: TaskConfig, out: str) -> str:
    """The policy's model as the policy names it (and the SB3 zip records it): the task's folder, packaged name or
    hub id; or a tiny random model built into ``out`` (again when its settings change)."""
    if task.policy.model != "tiny":
        return task.policy.model
    path = os.path.join(out, "base_model")
    settings = {"words": task.policy.tiny_words, "hidden_size": task.policy.tiny_hidden_size, "seed": task.seed}
    record = os.path.join(path, TINY_SETTINGS_FILE)
    if os.path.exists(record):
        with open(record) as f:
            if json.load(f) == settings and os.path.exists(os.path.join(path, "config.json")):
                return path
    # built anew when its settings changed (or by a version that did not record them)
    with atomic_directory(path) as tmp:
        save_tiny_model(tmp, task.policy.tiny_words, "llama", seed=task.seed, hidden_size=task.policy.tiny_hidden_size)
        with open(os.path.join(tmp, TINY_SETTINGS_FILE), "w") as f:
            json.dump(settings, f)
    return path


def train_reward_model_stage(
    stage: RewardModelTrainingSection,
    out: str,
    seed: int,
    device: str,
    progress_bar: bool,
    judge_share: float = 0.0,
    test_size_name: str = "reward.train.test_size",
) -> tuple[str, dict[str, Any]]:
    """Train a reward model (the task's first stage, or ``sb3-rlhf reward-model``) into ``out/reward_model``.

    :param judge_share: the share of labelled texts set aside for the second judge (``[judge] share``).
    :param test_size_name: the held-out share's name in errors (``--test-size`` for ``sb3-rlhf reward-model``).
    :return: the folder, and ``{"before", "after"}`` held-out metrics with the pair counts and the data report.
    """
    pairs, report = reward_training_pairs(stage, seed, judge_share)
    train, test = split_reward_pairs(stage, pairs, seed, test_size_name)
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
        n_epochs=stage.n_epochs,
        max_length=stage.max_length,
        pooling=stage.pooling,
        center_coef=stage.center_coef,
        tensorboard_log=os.path.join(out, "tensorboard"),
        seed=seed,
        device=device,
    )
    announce(
        f"reward model: training {stage.backbone} on {len(train)} preference pairs for {stage.n_epochs} "
        f"epoch{'' if stage.n_epochs == 1 else 's'} "
        f"({len(test)} held out)"
    )
    before = trainer.evaluate()
    if stage.linear_probe_init:
        trainer.fit_linear_probe()
    trainer.learn(progress_bar=progress_bar)
    folder = os.path.join(out, "reward_model")
    trainer.save(folder)
    with atomic_file(os.path.join(folder, DATA_SPLIT_FILE)) as tmp, open(tmp, "w") as f:
        # what a judge may train on, and which conversations the policy may be prompted with (disjoint from it)
        json.dump({"judge_share": judge_share, "seed": seed, "policy_share": stage.policy_share}, f)
    info = {
        "before": before,
        "after": trainer.evaluate(),
        "n_train": len(train),
        "n_test": len(test),
        "data": str(report),
    }
    return folder, info


def check_reward_model_split(task: TaskConfig, folder: str) -> None:
    """A reward model a previous run trained, reused: it must have left the same conversations to the policy
    (``[reward.train] policy_share`` at the task's seed), or the policy's prompts could be among its pairs.

    :raises ValueError: another split, or none recorded where the task asks for one.
    """
    assert task.reward.train is not None
    wanted = task.reward.train.policy_share
    split_file = os.path.join(folder, DATA_SPLIT_FILE)
    split: dict[str, Any] = {}
    if os.path.exists(split_file):
        with open(split_file) as f:
            split = json.load(f)
    recorded = split.get("policy_share")
    if recorded != wanted or (wanted is not None and split.get("seed") != task.seed):
        raise ValueError(
            f"the reward model in {folder} was trained with reward.train.policy_share = {recorded} at seed "
            f"{split.get('seed')}, this task asks for {wanted} at seed {task.seed}: the policy's prompts could be "
            "among its pairs; train it again (--overwrite, or a new --out)"
        )


def _fragments(texts: list[str], n_words: int, seed: int) -> list[str]:
    """A window of ``n_words`` words of each text at a seeded start: text as long as a policy's responses."""
    rng = np.random.default_rng(seed)
    windows = []
    for text in texts:
        tokens = text.split()
        start = int(rng.integers(max(1, len(tokens) - n_words + 1)))
        windows.append(" ".join(tokens[start : start + n_words]))
    return windows


def _windows(texts: list[str], n_words: int) -> list[str]:
    """Each text cut into consecutive, non-overlapping windows of ``n_words`` words; a last window shorter than
    half that joins the one before it (a lone word would carry the text's label on its own); empty texts give
    none."""
    windows = []
    for text in texts:
        tokens = text.split()
        cuts = [tokens[start : start + n_words] for start in range(0, len(tokens), n_words)]
        if len(cuts) > 1 and 2 * len(cuts[-1]) < n_words:
            tail = cuts.pop()
            cuts[-1] += tail
        windows += [" ".join(cut) for cut in cuts]
    return windows


def _balanced(positives: list[str], negatives: list[str], seed: int) -> tuple[list[str], list[str]]:
    """As many texts of each label, the larger side subsampled (seeded, order kept): a logistic regression's
    intercept follows the labels' proportions, and the judge's positive share follows its intercept."""
    n = min(len(positives), len(negatives))
    rng = np.random.default_rng(seed)
    return tuple(  # type: ignore[return-value]
        [texts[i] for i in sorted(rng.choice(len(texts), n, replace=False))] if len(texts) > n else texts
        for texts in (positives, negatives)
    )


def _judge_settings(judge: JudgeSection, seed: int) -> dict[str, Any]:
    return {
        "share": judge.share,
        "seed": seed,
        "test_size": judge.test_size,
        "max_features": judge.max_features,
        "C": judge.C,
        "window_words": judge.window_words,
    }


def judge_for_task(task: TaskConfig, out: str, train: bool) -> tuple[BagOfWordsJudge, dict[str, Any]]:
    """The task's second judge: fitted now (``train``, or when ``out/judge`` holds none or one fitted with other
    settings), else the saved one. Either way the reward model in ``out/reward_model`` must have left out this
    judge's share with this seed (its ``data_split.json``), or their texts would overlap.

    :return: the judge and its metadata (settings and held-out metrics).
    """
    assert task.judge is not None and task.reward.train is not None  # parse_task requires labelled data for it
    rm_folder = os.path.join(out, "reward_model")
    split_file = os.path.join(rm_folder, DATA_SPLIT_FILE)
    split = None
    if os.path.exists(split_file):
        with open(split_file) as f:
            split = json.load(f)
    if split is None or {k: split.get(k) for k in ("judge_share", "seed")} != {
        "judge_share": task.judge.share,
        "seed": task.seed,
    }:
        raise ValueError(
            f"the reward model in {rm_folder} was trained on {split or 'texts not recorded'}, not with judge share "
            f"{task.judge.share} set aside at seed {task.seed}: the judge's texts would overlap its own; train both "
            "again (without --resume, or into a new --out)"
        )
    folder = os.path.join(out, "judge")
    settings = _judge_settings(task.judge, task.seed)
    if not train and os.path.isdir(folder):
        judge = BagOfWordsJudge.load(folder)
        if {key: judge.metadata.get(key) for key in settings} == settings:
            return judge, judge.metadata
    return train_judge_stage(task.judge, task.reward.train, out, task.seed)


def train_judge_stage(
    judge: JudgeSection, stage: RewardModelTrainingSection, out: str, seed: int, fragment_words: int = 12
) -> tuple[BagOfWordsJudge, dict[str, Any]]:
    """Fit the second judge on the labelled texts set aside from the reward model (:func:`labelled_halves`, the
    same seed as the reward-model stage) and save it into ``out/judge`` with its settings and metrics.

    :param fragment_words: also measure its accuracy on windows of this many words of the held-out texts, about
        the length of the responses it judges.
    :return: the judge, and its settings with its held-out ``accuracy``, ``fragment_accuracy`` and text counts
        (``n_train`` texts; ``n_train_windows``, the windows it was fitted on, when it is fitted on windows).
    """
    _, (positives, negatives), _ = labelled_halves(stage, judge.share, seed)
    train_pos, test_pos = train_test_split(positives, judge.test_size, seed, "judge.test_size")
    train_neg, test_neg = train_test_split(negatives, judge.test_size, seed, "judge.test_size")
    fit_pos, fit_neg = train_pos, train_neg
    if judge.window_words:  # reviews of one label run longer than the other's: as many windows of each
        fit_pos, fit_neg = _balanced(
            _windows(train_pos, judge.window_words), _windows(train_neg, judge.window_words), seed
        )
    model = BagOfWordsJudge.fit(fit_pos, fit_neg, judge.max_features, C=judge.C)
    info = {
        **_judge_settings(judge, seed),
        "accuracy": model.accuracy(test_pos, test_neg),
        "fragment_accuracy": model.accuracy(
            _fragments(test_pos, fragment_words, seed), _fragments(test_neg, fragment_words, seed + 1)
        ),
        "fragment_words": fragment_words,
        "n_train": len(train_pos) + len(train_neg),
        "n_test": len(test_pos) + len(test_neg),
        "n_features": len(model.vocabulary),
        **({"n_train_windows": len(fit_pos) + len(fit_neg)} if judge.window_words else {}),
    }
    model.metadata = info
    model.save(os.path.join(out, "judge"))
    return model, info


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

    :param reward_prompts: the plain text of each chat-templated prompt (see :func:`~sb3_rlhf.tasks.data.load_prompt_forms`), which
        reward models read instead of the template.
    """
    env: gym.Env = TokenGenerationEnv(
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
        assert reward_model is not None  # the task has a reward model when it has no reward function
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
            env,
            task.kl.coef,
            target=task.kl.target,
            horizon=task.kl.horizon,
            proportional_gain=task.kl.proportional_gain,
            estimator=kl_estimator(task),
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
    #: the second judge of the evaluations (``[judge]``) and its settings and held-out metrics
    judge: BagOfWordsJudge | None = None
    judge_metrics: dict[str, Any] | None = None

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


def make_online_model(prepared: PreparedTask, env: Any, **overrides: Any) -> RLHFOnPolicyAlgorithm:
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
    announce("DPO: sampling the initial policy's response pairs, labelled by the task's reward")
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
    announce(f"DPO: {len(pairs)} pairs ({counts['ties']:.0f} ties left out), {trainer.n_epochs} epochs")
    return trainer, counts
