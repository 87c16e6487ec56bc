"""Task files: one TOML file holds everything a run needs; unknown keys are errors that name the key."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from sb3_rlhf.common.kl_controllers import AdaptiveKLController

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


@dataclass
class PolicySection:
    """``[policy]``: ``model`` is a local folder, a packaged model name (``SmolLM2-135M-Instruct``), a Hugging
    Face hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``, with an optional ``revision``) or ``"tiny"`` (a random tiny Llama over ``tiny_words``, built and saved into the run folder)."""

    model: str
    revision: str | None = None  # branch, tag or commit when ``model`` is a hub id
    temperature: float = 1.0
    top_k: int = 0  # 0: off; sampling and log-probs both use the truncated distribution
    top_p: float = 1.0  # 1.0: off
    dtype: str | None = None
    value_head: str = "shared"
    lora: dict[str, Any] | None = None
    tiny_words: list[str] = field(default_factory=list)
    tiny_hidden_size: int = 64


@dataclass(kw_only=True)
class HubDataKeys:
    """The keys that name a ``datasets`` data set when a section's ``source = "hub"``: ``dataset`` is a hub name,
    a folder or a builder such as ``"parquet"`` with ``data_files``; ``config``, ``data_dir``, ``split`` and
    ``revision`` as in ``datasets.load_dataset``."""

    dataset: str | None = None
    config: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    revision: str | None = None


@dataclass
class PromptsSection(HubDataKeys):
    """``[prompts]``: ``source`` is ``"inline"`` (``texts``), ``"csv"`` (``column`` of ``path``), ``"jsonl"``
    (``column`` of each record), ``"hh"`` (the conversations of HH-RLHF pairs) or ``"hub"`` (``column`` of a
    ``datasets`` data set: ``dataset`` is a hub name, a folder or a builder such as ``"parquet"`` with
    ``data_files``; ``config``, ``data_dir``, ``split``, ``revision`` as in ``datasets.load_dataset``). A
    column holds texts, HH transcripts or conversations (lists of ``{"role", "content"}``, TRL's format).
    ``first_words`` keeps the beginning of each text (a review to continue); ``chat_template`` feeds prompts
    through the policy tokenizer's chat template (an HH conversation as its turns, other texts as one user
    turn), while reward models still read the plain text."""

    source: str
    texts: list[str] = field(default_factory=list)
    path: str | None = None
    column: str = "prompt"
    first_words: int | None = None
    max_prompts: int | None = None
    eval_size: float = 0.1  # a share (< 1) or a count of held-out prompts
    chat_template: bool = False


@dataclass
class GenerationSection:
    """``[generation]``: episode limits (see :class:`~sb3_rlhf.TokenGenerationEnv`)."""

    max_prompt_tokens: int = 64
    max_new_tokens: int = 32


@dataclass
class RewardModelTrainingSection(HubDataKeys):
    """``[reward.train]``: a reward-model stage run before PPO. ``source`` is ``"pairs"`` (a JSONL file
    ``data`` of comparisons), ``"labels"`` (a CSV file ``data`` whose ``positive_label`` texts beat the others)
    or ``"hub"`` (a ``datasets`` data set, keys as in ``[prompts]``, read as ``format = "pairs"`` with the
    ``*_key`` columns, plain, HH or conversational, or ``format = "labels"`` with the label columns; a class
    label may be named by its class name, e.g. ``positive_label = "pos"``)."""

    data: str | None = None
    backbone: str = "all-MiniLM-L6-v2"  # a folder, packaged model name or hub id
    backbone_revision: str | None = None  # branch, tag or commit of a hub id
    source: str = "pairs"
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    text_column: str = "review"
    label_column: str = "sentiment"
    positive_label: str = "positive"
    max_pairs: int | None = None
    test_size: float = 0.1  # a share (< 1) or a count of held-out pairs
    epochs: int = 1  # 0 with linear_probe_init: the probe alone
    learning_rate: float = 2e-5
    head_learning_rate: float | None = None
    linear_probe_init: bool = True
    batch_size: int = 16
    max_length: int = 128
    pooling: str = "auto"
    center_coef: float = 0.0
    format: str = "pairs"  # with source = "hub": "pairs" or "labels"


@dataclass
class RewardSection:
    """``[reward]``: exactly one of ``function`` (``"module:function"``, called as ``fn(prompts, completions)``),
    ``model`` (a reward-model or classifier folder, packaged name or hub id, at ``revision``) or
    ``[reward.train]`` (train one first). A classifier with several labels needs ``label`` (the class to
    reward, by name or index); ``score`` is ``"logit"``, ``"probability"`` or ``"logit_margin"``
    (see :class:`~sb3_rlhf.rewards.RewardModelWrapper`)."""

    function: str | None = None
    model: str | None = None
    train: RewardModelTrainingSection | None = None
    max_length: int | None = None  # None: the length the reward model was trained with (saved with it), else 512
    label: str | int | None = None
    score: str = "logit"
    revision: str | None = None


@dataclass
class KLSection:
    """``[kl]``: the KL penalty to the reference (the initial policy); ``coef = 0`` disables it. ``target``
    turns on the adaptive controller (every online algorithm), ``horizon`` and ``proportional_gain`` set it
    (:class:`~sb3_rlhf.common.kl_controllers.AdaptiveKLController`). ``estimator`` names the per-token KL
    estimator, ``"k1"``, ``"k2"`` or ``"k3"``; left out, it is ``"k3"`` for GRPO (KL in the loss) and ``"k1"``
    otherwise."""

    coef: float = 0.05
    target: float | None = None
    horizon: int = 10_000
    proportional_gain: float = 0.0
    estimator: str | None = None


@dataclass
class AlgorithmSection:
    """``[algorithm]``: ``total_timesteps`` (generated tokens; online algorithms) and arguments of the
    algorithm classes (:class:`~sb3_rlhf.RLHFPPO`, :class:`~sb3_rlhf.RLOO`, :class:`~sb3_rlhf.GRPO`,
    :class:`~sb3_rlhf.P3O`, :class:`~sb3_rlhf.dpo.DPOTrainer`); a key applies to every algorithm that takes it.
    ``[algorithm.<name>]`` tables (``[algorithm.dpo]``, ``[algorithm.p3o]``, ...) hold settings for one algorithm
    only and win over the shared ones. DPO also takes ``pairs_per_prompt`` and ``n_prompts``: its pairs are the
    initial policy's samples on (the first ``n_prompts`` of) the training prompts, labelled by the task's reward."""

    total_timesteps: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    per_algorithm: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class CheckpointSection:
    """``[checkpoint]``: an online run writes ``<out>/checkpoints/checkpoint_<timesteps>`` every ``every``
    generated tokens (default: a quarter of ``total_timesteps``) and at the end, keeping the newest ``keep``;
    ``sb3-rlhf train --resume`` continues from the newest."""

    every: int | None = None
    keep: int = 2


@dataclass
class EvaluationSection:
    """``[evaluation]``: the final report on held-out prompts; ``every`` (rollouts) also evaluates during
    training, logged under ``eval/`` in TensorBoard (online algorithms)."""

    n_prompts: int = 64
    n_samples_shown: int = 4
    every: int | None = None


@dataclass
class JudgeSection:
    """``[judge]``: a second judge the policy never trains against, for the evaluation reports
    (:class:`~sb3_rlhf.common.judge.BagOfWordsJudge`, logistic regression on word unigrams and bigrams). It is
    trained on ``share`` of ``[reward.train]``'s labelled texts (seeded, each label alike), which the reward model
    then never sees; ``test_size`` of that share measures its accuracy. With ``window_words`` it is fitted on
    consecutive, non-overlapping windows of that many words cut from its training texts (each labelled as its
    text, as many of each label) instead of on whole texts: a judge of short responses must be calibrated on text
    as short as theirs (fitted on whole reviews, it calls most 12-word snippets positive); 0 fits on whole texts."""

    share: float = 0.5
    test_size: float = 0.2
    max_features: int = 20_000
    C: float = 1.0
    window_words: int = 0


@dataclass
class TaskConfig:
    """A whole task file."""

    name: str
    policy: PolicySection
    prompts: PromptsSection
    reward: RewardSection
    algorithm: AlgorithmSection
    algorithm_name: str = "ppo"  # [task] algorithm = "ppo" | "rloo" | "grpo" | "p3o" | "nlpo" | "dpo"
    seed: int = 0
    device: str = "auto"
    description: str = ""
    generation: GenerationSection = field(default_factory=GenerationSection)
    kl: KLSection = field(default_factory=KLSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    judge: JudgeSection | None = None
    source: str = ""

    def algorithm_settings(self) -> dict[str, Any]:
        """The settings for ``algorithm_name``: the shared keys it takes, then its own ``[algorithm.<name>]`` table."""
        accepted = _accepted_settings(self.algorithm_name)
        shared = {k: v for k, v in self.algorithm.settings.items() if k in accepted}
        return {**shared, **self.algorithm.per_algorithm.get(self.algorithm_name, {})}


_SECTIONS = {
    "policy": PolicySection,
    "prompts": PromptsSection,
    "generation": GenerationSection,
    "reward": RewardSection,
    "kl": KLSection,
    "algorithm": AlgorithmSection,
    "evaluation": EvaluationSection,
    "checkpoint": CheckpointSection,
    "judge": JudgeSection,
}


def _build(cls: type[C], data: dict[str, Any], where: str) -> C:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a table, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]}: the keys of [{where}] are {sorted(names)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
    ]
    if missing:
        raise ValueError(f"missing key {where}.{missing[0]}")
    return cls(**data)


def parse_task(data: dict[str, Any], source: str = "<dict>") -> TaskConfig:
    """Validate a task dictionary (a parsed TOML file) into a :class:`TaskConfig`."""
    data = dict(data)
    top = dict(data.pop("task", {}))
    if "algorithm" in top:
        top["algorithm_name"] = top.pop("algorithm")
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _SECTIONS:
            raise ValueError(f"unknown section [{key}] in {source}: the sections are {['task', *_SECTIONS]}")
        value = dict(value)
        if key == "reward" and "train" in value:
            value["train"] = _build(RewardModelTrainingSection, value["train"], "reward.train")
        if key == "algorithm":
            from sb3_rlhf.algorithms import ALGORITHM_NAMES

            per_algorithm = {
                k: value.pop(k) for k in list(value) if k in ALGORITHM_NAMES and isinstance(value[k], dict)
            }
            value = {
                "total_timesteps": value.pop("total_timesteps", None),
                "settings": value,
                "per_algorithm": per_algorithm,
            }
        sections[key] = value if key == "algorithm" else _build(_SECTIONS[key], value, key)
    if "algorithm" in sections:
        sections["algorithm"] = AlgorithmSection(**sections["algorithm"])
    task = _build(TaskConfig, {**top, **sections, "source": source}, "task")
    _check(task)
    return task


#: Algorithm arguments that the task sets itself (from other sections).
_SET_BY_TASK = {
    "policy",
    "env",
    "policy_kwargs",
    "tensorboard_log",
    "seed",
    "device",
    "_init_setup_model",
    "model",
    "tokenizer",
    "train_pairs",
    "eval_pairs",
    "ref_model",
    "lora",
}
#: Task-level DPO settings (how its pairs are made), besides DPOTrainer's own arguments.
DPO_TASK_SETTINGS = {"pairs_per_prompt", "n_prompts"}


@cache
def _accepted_settings(name: str) -> frozenset[str]:
    from sb3_rlhf.algorithms import accepted_arguments, algorithm_class

    allowed = accepted_arguments(algorithm_class(name)) - _SET_BY_TASK
    return frozenset(allowed | DPO_TASK_SETTINGS if name == "dpo" else allowed)


def _check(task: TaskConfig) -> None:
    from sb3_rlhf.algorithms import ALGORITHM_NAMES, ONLINE_ALGORITHMS

    if task.algorithm_name not in ALGORITHM_NAMES:
        raise ValueError(f"unknown task.algorithm {task.algorithm_name!r}: choose one of {list(ALGORITHM_NAMES)}")
    any_algorithm = set().union(*(_accepted_settings(name) for name in ALGORITHM_NAMES))
    unknown = sorted(set(task.algorithm.settings) - any_algorithm)
    if unknown:
        raise ValueError(
            f"unknown key algorithm.{unknown[0]}: no algorithm takes it; [algorithm] takes total_timesteps, "
            f"[algorithm.<name>] tables for {list(ALGORITHM_NAMES)} and {sorted(any_algorithm)}"
        )
    for name, settings in task.algorithm.per_algorithm.items():
        unknown = sorted(set(settings) - _accepted_settings(name))
        if unknown:
            raise ValueError(
                f"unknown key algorithm.{name}.{unknown[0]}: {name} takes {sorted(_accepted_settings(name))}"
            )
    if task.algorithm_name in ONLINE_ALGORITHMS and task.algorithm.total_timesteps is None:
        raise ValueError(f"missing key algorithm.total_timesteps ({task.algorithm_name} is an online algorithm)")
    total = task.algorithm.total_timesteps
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ValueError(
            f"algorithm.total_timesteps must be a positive whole number of generated tokens (2000, not 2e3 or -5), "
            f"got {total!r}"
        )
    from sb3_rlhf.common.models import check_device

    check_device(task.device, present=False)  # a plan (--dry-run) may be made on a machine without the GPU
    if task.kl.estimator is not None and task.kl.estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"kl.estimator must be 'k1', 'k2' or 'k3', got {task.kl.estimator!r}")
    reward = task.reward
    given = [name for name in ("function", "model", "train") if getattr(reward, name) is not None]
    if len(given) != 1:
        raise ValueError(f"[reward] needs exactly one of function, model or [reward.train]; got {given or 'none'}")
    if reward.function is not None and ":" not in reward.function:
        raise ValueError(f"reward.function must be 'module:function', got {reward.function!r}")
    from sb3_rlhf.rewards.reward_model import SCORES

    if reward.score not in SCORES:
        raise ValueError(f"reward.score must be one of {list(SCORES)}, got {reward.score!r}")
    for key, value in (("label", reward.label), ("revision", reward.revision)):
        if value is not None and reward.model is None:
            raise ValueError(f"reward.{key} applies to reward.model (a classifier or hub id); this task has no model")
    if reward.function is not None and reward.score != "logit":
        raise ValueError("reward.score applies to a reward model; a reward.function returns its scores as they are")
    _check_prompts(task.prompts)
    if task.policy.model == "tiny" and task.policy.revision is not None:
        raise ValueError("policy.revision names a hub revision: the tiny model is built locally, remove it")
    if task.policy.model == "tiny" and not task.policy.tiny_words:
        raise ValueError("policy.model = 'tiny' needs policy.tiny_words (the tiny tokenizer's vocabulary)")
    every, keep = task.checkpoint.every, task.checkpoint.keep
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(f"checkpoint.every must be a positive number of timesteps, got {every!r}")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"checkpoint.keep must be a positive integer, got {keep!r}")
    if reward.train is not None:
        _check_reward_training(reward.train)
    _check_judge(task)
    _check_kl(task.kl)
    every = task.evaluation.every
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(f"evaluation.every must be a positive number of rollouts, got {every!r}")


def _check_kl(kl: KLSection) -> None:
    """The controller's settings, before any stage runs (a reward model may train for minutes first): the
    controller's own checks, run now."""
    if kl.target is not None:
        try:
            AdaptiveKLController(kl.coef, kl.target, kl.horizon, kl.proportional_gain)
        except ValueError as error:
            raise ValueError(f"[kl]: {error}") from None
    elif kl.proportional_gain:
        raise ValueError("kl.proportional_gain is a setting of the adaptive controller: give kl.target too, or drop it")


def _check_judge(task: TaskConfig) -> None:
    judge = task.judge
    if judge is None:
        return
    train = task.reward.train
    if train is None or not (train.source == "labels" or (train.source == "hub" and train.format == "labels")):
        raise ValueError(
            "[judge] is trained on a share of [reward.train]'s labelled texts: give [reward.train] a labelled source "
            "(source = 'labels', or source = 'hub' with format = 'labels'), or remove [judge]"
        )
    for key in ("share", "test_size"):
        if not 0 < getattr(judge, key) < 1:
            raise ValueError(f"judge.{key} must be a share between 0 and 1, got {getattr(judge, key)!r}")
    if judge.max_features < 1 or judge.C <= 0:
        raise ValueError(f"judge.max_features must be >= 1 and judge.C > 0, got {judge.max_features}, {judge.C}")
    if judge.window_words < 0:
        raise ValueError(f"judge.window_words must be >= 0 (0: whole texts), got {judge.window_words}")


#: The keys that name a ``datasets`` data set (``source = "hub"`` only), with their defaults.
_HUB_KEYS = {f.name: f.default for f in dataclasses.fields(HubDataKeys)}


def _check_hub_keys(section: PromptsSection | RewardModelTrainingSection, where: str) -> None:
    hub = section.source == "hub"
    if hub and not section.dataset:
        raise ValueError(
            f"{where}.source = 'hub' needs {where}.dataset: a hub name (e.g. 'stanfordnlp/imdb'), a folder, "
            f"or a builder such as 'parquet' with {where}.data_files"
        )
    given = [key for key, default in _HUB_KEYS.items() if getattr(section, key) != default]
    if given and not hub:
        raise ValueError(f"{where}.{given[0]} names a datasets data set: it needs {where}.source = 'hub'")


def _check_prompts(prompts: PromptsSection) -> None:
    sources = ("inline", "csv", "jsonl", "hh", "hub")
    if prompts.source not in sources:
        raise ValueError(f"prompts.source must be one of {', '.join(sources)}; got {prompts.source!r}")
    if prompts.source == "inline" and not prompts.texts:
        raise ValueError("prompts.source = 'inline' needs prompts.texts")
    if prompts.source in ("csv", "jsonl", "hh") and not prompts.path:
        raise ValueError(f"prompts.source = {prompts.source!r} needs prompts.path")
    if prompts.source == "hub" and prompts.path:
        raise ValueError("prompts.path is a file: with source = 'hub' name the data set in prompts.dataset")
    _check_hub_keys(prompts, "prompts")


def _check_reward_training(stage: RewardModelTrainingSection) -> None:
    if stage.source not in ("pairs", "labels", "hub"):
        raise ValueError(f"reward.train.source must be 'pairs', 'labels' or 'hub', got {stage.source!r}")
    if stage.source != "hub" and not stage.data:
        raise ValueError(f"reward.train.source = {stage.source!r} needs reward.train.data (a file name or path)")
    if stage.source == "hub" and stage.data:
        raise ValueError("reward.train.data is a file: with source = 'hub' name the data set in reward.train.dataset")
    if stage.format not in ("pairs", "labels"):
        raise ValueError(f"reward.train.format must be 'pairs' or 'labels', got {stage.format!r}")
    if stage.format != "pairs" and stage.source != "hub":
        raise ValueError("reward.train.format is for source = 'hub'; for a file, source = 'labels' says it")
    _check_hub_keys(stage, "reward.train")


def kl_estimator(task: TaskConfig) -> str:
    """The task's KL estimator: as named in ``[kl]``, else ``"k3"`` for GRPO (KL in its loss) and ``"k1"``."""
    if task.kl.estimator is not None:
        return task.kl.estimator
    return "k3" if task.algorithm_name == "grpo" else "k1"


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for key in path:
        data = data.setdefault(key, {})
    data[last] = value


def load_task(path: str, overrides: list[str] | None = None) -> TaskConfig:
    """Read a task file, apply ``--set key=value`` overrides (values in TOML syntax, strings unquoted ok)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"task file {path!r} does not exist: the ready tasks are in envs/*.toml")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from error
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set takes key=value, got {item!r}")
        key, text = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        _set(data, key.strip(), value)
    return parse_task(data, source=path)
