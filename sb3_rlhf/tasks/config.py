"""Task files: one TOML file holds everything a run needs. This module is the one place their keys are defined:
each section is a dataclass whose fields give a key's type, default and allowed values; a file is checked
against them when it is read (unknown keys, wrong types and values out of range are errors naming the key),
and renamed keys are still read, with a warning naming the new one."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import tomllib
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from sb3_rlhf.common.kl_controllers import AdaptiveKLController
from sb3_rlhf.common.models import DTYPES
from sb3_rlhf.policies import VALUE_HEADS
from sb3_rlhf.reward_modeling.model import POOLINGS
from sb3_rlhf.rewards.kl import KL_ESTIMATORS
from sb3_rlhf.rewards.reward_model import SCORES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")

#: The ready tasks shipped inside the package (``envs/`` in a clone links to them): ``sb3-rlhf train NAME``.
READY_TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ready")


@dataclass(frozen=True)
class Rule:
    """The values a key takes besides its type: bounds, a whole multiple, a list of choices, or a held-out size
    (a share in (0, 1) or a count >= 1). ``None`` (a key left out) always passes."""

    above: float | None = None
    at_least: float | None = None
    at_most: float | None = None
    below: float | None = None
    multiple_of: int | None = None
    choices: tuple[Any, ...] | None = None
    share_or_count: bool = False

    def check(self, value: Any, where: str) -> None:
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} must be one of {list(self.choices)}, got {value!r}")
        if self.share_or_count:
            share = isinstance(value, float) and 0 < value < 1
            if not (share or (isinstance(value, int) and value >= 1)):
                raise ValueError(f"{where} must be a share in (0, 1) or a whole number >= 1 of items, got {value!r}")
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number, got {value!r}")
        limits = [
            (self.above, lambda v, b: v > b, "> {}"),
            (self.at_least, lambda v, b: v >= b, ">= {}"),
            (self.at_most, lambda v, b: v <= b, "<= {}"),
            (self.below, lambda v, b: v < b, "< {}"),
        ]
        for bound, holds, text in limits:
            if bound is not None and not holds(value, bound):
                allowed = " and ".join(t.format(b) for b, _, t in limits if b is not None)
                raise ValueError(f"{where} must be {allowed}, got {value!r}")
        if self.multiple_of is not None and value % self.multiple_of:
            raise ValueError(f"{where} must be a multiple of {self.multiple_of}, got {value!r}")


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, **rule: Any) -> Any:
    """A section's key: its default (none: the key is required) and its :class:`Rule`."""
    metadata = {"rule": Rule(**rule)} if rule else {}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PolicySection:
    """``[policy]``: ``model`` is a local folder, a packaged model name (``SmolLM2-135M-Instruct``), a Hugging
    Face hub id (``"HuggingFaceTB/SmolLM2-135M-Instruct"``, with an optional ``revision``) or ``"tiny"`` (a random
    tiny Llama over ``tiny_words``, built and saved into the run folder)."""

    model: str
    revision: str | None = None  # branch, tag or commit when ``model`` is a hub id
    temperature: float = setting(1.0, above=0)
    top_k: int = setting(0, at_least=0)  # 0: off; sampling and log-probs both use the truncated distribution
    top_p: float = setting(1.0, above=0, at_most=1)  # 1.0: off
    dtype: str | None = setting(None, choices=DTYPES)
    value_head: str = setting("shared", choices=VALUE_HEADS)
    lora: dict[str, Any] | None = None  # peft.LoraConfig's arguments
    tiny_words: list[str] = field(default_factory=list)
    tiny_hidden_size: int = setting(64, at_least=8, multiple_of=4)  # two heads, rotary halves


@dataclass(kw_only=True)
class HubDataKeys:
    """The keys that name a ``datasets`` data set when a section's ``source = "hub"``: ``dataset`` is a hub name,
    a folder or a builder such as ``"parquet"`` with ``data_files``; ``config``, ``data_dir``, ``split`` (default
    ``"train"``) and ``revision`` as in ``datasets.load_dataset``."""

    dataset: str | None = None
    config: str | None = None
    data_dir: str | None = None
    data_files: str | list[str] | None = None
    split: str | None = None
    revision: str | None = None


@dataclass
class PromptsSection(HubDataKeys):
    """``[prompts]``: ``source`` says where they are: ``"inline"`` (``texts``), ``"file"`` (a CSV or JSONL file
    ``path``) or ``"hub"`` (a ``datasets`` data set, see :class:`HubDataKeys`). ``format`` says what they are:
    ``"texts"`` (``column`` holds texts, HH transcripts or conversations, lists of ``{"role", "content"}`` as in
    TRL) or ``"hh"`` (HH-RLHF pairs, whose conversations are the prompts). ``first_words`` keeps the beginning of
    each text (a review to continue); ``test_size`` prompts are held out for evaluation, or ``test_size``
    conversations with ``split_by = "conversation"`` (the default of ``format = "hh"``: HH-RLHF records one
    conversation cut at several turns; every cut of a held-out conversation stays out of training, and it is
    evaluated on one of them); ``chat_template`` feeds prompts through the policy tokenizer's chat template (an HH
    conversation as its turns, other texts as one user turn), while reward models still read the plain text."""

    source: str = setting(choices=("inline", "file", "hub"))
    format: str = setting("texts", choices=("texts", "hh"))
    texts: list[str] = field(default_factory=list)
    path: str | None = None
    column: str = "prompt"
    first_words: int | None = setting(None, at_least=1)
    max_prompts: int | None = setting(None, at_least=1)
    test_size: int | float = setting(0.1, share_or_count=True)  # a share (< 1) or a count of held-out prompts
    split_by: str | None = setting(None, choices=("prompt", "conversation"))  # None: "prompt", or "hh"'s default
    chat_template: bool = False

    def __post_init__(self) -> None:
        # resolved here, so that a run's record (run.json) says how its held-out prompts were drawn
        if self.split_by is None and self.format == "hh":
            self.split_by = "conversation"


@dataclass
class GenerationSection:
    """``[generation]``: episode limits (see :class:`~sb3_rlhf.TokenGenerationEnv`)."""

    max_prompt_tokens: int = setting(64, at_least=1)
    max_new_tokens: int = setting(32, at_least=1)


@dataclass
class RewardModelTrainingSection(HubDataKeys):
    """``[reward.train]``: a reward-model stage run before PPO. ``source`` says where the data is: ``"file"`` (a
    JSONL or CSV file ``path``) or ``"hub"`` (a ``datasets`` data set, see :class:`HubDataKeys`); ``format`` says
    what it holds: ``"pairs"`` (comparisons in the ``*_key`` columns: plain, HH or conversational) or ``"labels"``
    (texts in ``text_column`` whose ``label_column`` is ``positive_label`` beat the others; a class label may be
    named by its class name, e.g. ``positive_label = "pos"``). ``policy_share`` splits the pairs' conversations
    once (seeded): that share becomes the policy's prompts (``[prompts]`` reading the same file, ``format = "hh"``),
    training and held-out alike, and the reward model trains and is tested on the pairs of the other conversations
    only, so that no prompt the policy is trained or evaluated on was one the reward model learnt from.
    ``test_size`` pairs are held out to measure the reward model, or ``test_size`` conversations with ``split_by =
    "conversation"`` (the default with ``policy_share``: HH-RLHF records one conversation cut at several turns,
    and a held-out pair whose conversation trained the model would flatter its accuracy; every pair of a held-out
    conversation stays out of training, and it is tested on one of them)."""

    path: str | None = None
    backbone: str = "all-MiniLM-L6-v2"  # a folder, packaged model name or hub id
    backbone_revision: str | None = None  # branch, tag or commit of a hub id
    source: str = setting("file", choices=("file", "hub"))
    format: str = setting("pairs", choices=("pairs", "labels"))
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    text_column: str = "review"
    label_column: str = "sentiment"
    positive_label: str | int = "positive"
    max_pairs: int | None = setting(None, at_least=1)
    test_size: int | float = setting(0.1, share_or_count=True)  # a share (< 1) or a count of held-out pairs
    n_epochs: int = setting(1, at_least=0)  # 0 with linear_probe_init: the probe alone
    learning_rate: float = setting(2e-5, above=0)
    head_learning_rate: float | None = setting(None, above=0)
    linear_probe_init: bool = True
    batch_size: int = setting(16, at_least=1)
    max_length: int = setting(128, at_least=1)
    pooling: str = setting("auto", choices=("auto", *POOLINGS))
    center_coef: float = setting(0.0, at_least=0)
    policy_share: float | None = setting(None, above=0, below=1)
    # None: "conversation" with policy_share, else "pair" (format = "pairs"; labelled texts share no conversation)
    split_by: str | None = setting(None, choices=("pair", "conversation"))

    def __post_init__(self) -> None:
        # resolved here, so that a run's record (run.json) says how the reward model's held-out pairs were drawn
        if self.split_by is None and self.format == "pairs":
            self.split_by = "conversation" if self.policy_share is not None else "pair"


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
    # None: the length the reward model was trained with (saved with it), else 512
    max_length: int | None = setting(None, at_least=1)
    label: str | int | None = None
    score: str = setting("logit", choices=SCORES)
    revision: str | None = None


@dataclass
class KLSection:
    """``[kl]``: the KL penalty to the reference (the initial policy); ``coef = 0`` disables it. ``target``
    turns on the adaptive controller (every online algorithm), ``horizon`` and ``proportional_gain`` set it
    (:class:`~sb3_rlhf.common.kl_controllers.AdaptiveKLController`). ``estimator`` names the per-token KL
    estimator, ``"k1"``, ``"k2"`` or ``"k3"``; left out, it is ``"k3"`` for GRPO (KL in the loss) and ``"k1"``
    otherwise."""

    coef: float = setting(0.05, at_least=0)
    target: float | None = setting(None, above=0)
    horizon: int = setting(10_000, at_least=1)
    proportional_gain: float = setting(0.0, at_least=0)
    estimator: str | None = setting(None, choices=KL_ESTIMATORS)


@dataclass
class AlgorithmSection:
    """``[algorithm]``: ``total_timesteps`` (generated tokens; online algorithms) and arguments of the
    algorithm classes (:class:`~sb3_rlhf.RLHFPPO`, :class:`~sb3_rlhf.RLOO`, :class:`~sb3_rlhf.GRPO`,
    :class:`~sb3_rlhf.P3O`, :class:`~sb3_rlhf.NLPO`, :class:`~sb3_rlhf.dpo.DPOTrainer`), typed as their signatures
    say; a key applies to every algorithm that takes it (one that the task's algorithm does not take is named in a
    warning). ``[algorithm.<name>]`` tables (``[algorithm.dpo]``, ``[algorithm.p3o]``, ...) hold settings for one
    algorithm only and win over the shared ones. DPO also takes ``pairs_per_prompt`` and ``n_prompts``: its pairs
    are the initial policy's samples on (the first ``n_prompts`` of) the training prompts, labelled by the task's
    reward."""

    total_timesteps: int | None = setting(None, at_least=1)
    settings: dict[str, Any] = field(default_factory=dict)
    per_algorithm: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class CheckpointSection:
    """``[checkpoint]``: an online run writes ``<out>/checkpoints/checkpoint_<timesteps>`` every ``every``
    generated tokens (default: a quarter of ``total_timesteps``) and at the end, keeping the newest ``keep``;
    ``sb3-rlhf train --resume`` continues from the newest."""

    every: int | None = setting(None, at_least=1)
    keep: int = setting(2, at_least=1)


@dataclass
class EvaluationSection:
    """``[evaluation]``: the final report on held-out prompts; ``every`` (rollouts) also evaluates during
    training, logged under ``eval/`` in TensorBoard (online algorithms)."""

    n_prompts: int = setting(64, at_least=1)
    n_samples_shown: int = setting(4, at_least=0)
    every: int | None = setting(None, at_least=1)


@dataclass
class JudgeSection:
    """``[judge]``: a second judge the policy never trains against, for the evaluation reports
    (:class:`~sb3_rlhf.common.judge.BagOfWordsJudge`, logistic regression on word unigrams and bigrams). It is
    trained on ``share`` of ``[reward.train]``'s labelled texts (seeded, each label alike), which the reward model
    then never sees; ``test_size`` of that share measures its accuracy. With ``window_words`` it is fitted on
    consecutive, non-overlapping windows of that many words cut from its training texts (each labelled as its
    text, as many of each label) instead of on whole texts: a judge of short responses must be calibrated on text
    as short as theirs (fitted on whole reviews, it calls most 12-word snippets positive); 0 fits on whole texts."""

    share: float = setting(0.5, above=0, below=1)
    test_size: float = setting(0.2, above=0, below=1)
    max_features: int = setting(20_000, at_least=1)
    C: float = setting(1.0, above=0)
    window_words: int = setting(0, at_least=0)


@dataclass
class TaskConfig:
    """A whole task file."""

    name: str
    policy: PolicySection
    prompts: PromptsSection
    reward: RewardSection
    algorithm: AlgorithmSection
    algorithm_name: str = "ppo"  # [task] algorithm = "ppo" | "rloo" | "grpo" | "p3o" | "nlpo" | "dpo"
    seed: int = setting(0, at_least=0)
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


#: The sections of a task file (``[task]`` holds :class:`TaskConfig`'s own keys), by their name in the file.
SECTIONS: dict[str, type] = {
    "policy": PolicySection,
    "prompts": PromptsSection,
    "generation": GenerationSection,
    "reward": RewardSection,
    "reward.train": RewardModelTrainingSection,
    "kl": KLSection,
    "algorithm": AlgorithmSection,
    "evaluation": EvaluationSection,
    "checkpoint": CheckpointSection,
    "judge": JudgeSection,
}
#: The keys of ``[task]``, and their fields in :class:`TaskConfig`.
TASK_KEYS = {
    "name": "name",
    "algorithm": "algorithm_name",
    "seed": "seed",
    "device": "device",
    "description": "description",
}
#: Keys renamed so that one idea has one name everywhere: still read, with a warning naming the new key.
RENAMED_KEYS = {
    "prompts": {"eval_size": "test_size"},
    "reward.train": {"data": "path", "epochs": "n_epochs"},
}
#: The columns of a ``format = "pairs"`` data set.
PAIR_KEYS = ("prompt_key", "chosen_key", "rejected_key")
#: Old ``source`` values that said what the data is rather than where: ``(source, format)`` now.
RENAMED_SOURCES = {
    "prompts": {"csv": ("file", "texts"), "jsonl": ("file", "texts"), "hh": ("file", "hh")},
    "reward.train": {"pairs": ("file", "pairs"), "labels": ("file", "labels")},
}


def _deprecated(old: str, new: str, source: str) -> None:
    warnings.warn(f"{old} in {source} is now {new}: the old form will stop working", FutureWarning, stacklevel=4)


def _upgrade(data: dict[str, Any], where: str, source: str) -> dict[str, Any]:
    """``data`` with renamed keys and old ``source`` values in their new form, each with a warning."""
    data = dict(data)
    for old, new in RENAMED_KEYS.get(where, {}).items():
        if old in data:
            if new in data:
                raise ValueError(f"{where}.{old} and {where}.{new} are one setting: keep {where}.{new}")
            _deprecated(f"{where}.{old}", f"{where}.{new}", source)
            data[new] = data.pop(old)
    renamed = RENAMED_SOURCES.get(where, {})
    old_source = data.get("source")
    if isinstance(old_source, str) and old_source in renamed:
        new_source, new_format = renamed[old_source]
        if "format" in data:
            raise ValueError(
                f"{where}.source = {old_source!r} is an old form: write source = {new_source!r} with format"
            )
        _deprecated(f"{where}.source = {old_source!r}", f"source = {new_source!r} with format = {new_format!r}", source)
        data["source"], data["format"] = new_source, new_format
    return data


# ------------------------------------------------------------------------------------------------- types
def describe_type(annotation: Any) -> str:
    """A key's type in words, for errors."""
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a text", type(None): ""}
    if annotation in names:
        return names[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(arg) for arg in args if arg is not type(None)]
        return " or ".join(p for p in parts if p) + (" (or left out)" if type(None) in args else "")
    if origin is list:
        return f"a list of {describe_type(args[0]).removeprefix('a ')}s" if args else "a list"
    if origin is dict or annotation is dict:
        return "a table"
    if origin in (type, Callable) or annotation is Callable:
        return ""  # a class or a schedule: Python only, never a task file's value
    return getattr(annotation, "__name__", str(annotation))


class _Mismatch(Exception):
    pass


def _typed(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation`` (an int is a valid float), or :class:`_Mismatch`. A value read from TOML is
    never a callable or a class, so those members of a union (SB3 schedules, classes) match nothing; kinds of
    annotation this does not know pass."""
    if annotation is Any:
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _typed(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if annotation is type(None):
        if value is None:
            return None
        raise _Mismatch
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if annotation in (bool, str):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    if origin is list:
        if not isinstance(value, list):
            raise _Mismatch
        return [_typed(item, args[0]) for item in value] if args else value
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if origin is type or origin in (Callable, typing.Callable) or annotation is Callable:
        raise _Mismatch
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise _Mismatch
    return value


def check_value(value: Any, annotation: Any, where: str, rule: Rule | None = None) -> Any:
    """``value`` checked against a key's type (returned as that type) and its :class:`Rule`.

    :raises ValueError: one line naming the key, what it takes and the value given.
    """
    try:
        value = _typed(value, annotation)
    except _Mismatch:
        raise ValueError(f"{where} must be {describe_type(annotation)}, got {value!r}") from None
    if rule is not None:
        rule.check(value, where)
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[C], data: Any, where: str) -> C:
    """A section from its table: every key known, present when required, and of its type and range."""
    if not isinstance(data, dict):
        raise ValueError(f"[{where}] must be a table, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown key {where}.{unknown[0]}: the keys of [{where}] are {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing key {where}.{name}")
            continue
        if dataclasses.is_dataclass(data[name]):  # a section built already
            values[name] = data[name]
        else:
            values[name] = check_value(data[name], _hints(cls)[name], f"{where}.{name}", f.metadata.get("rule"))
    section = cls(**values)
    vars(section)["_given"] = frozenset(data)  # for checks of keys that only mean something with others
    return section


def given(section: Any) -> frozenset[str]:
    """The keys a section's table gave (its defaults left out)."""
    return vars(section).get("_given", frozenset())


def schema_type(dotted: str) -> Any:
    """The type of a task key (``"policy.temperature"``, ``"reward.train.path"``, ``"task.seed"``,
    ``"algorithm.learning_rate"`` as the first algorithm that takes it types it), or ``None`` for unknown keys."""
    from sb3_rlhf.algorithms import ALGORITHM_NAMES

    *path, key = dotted.split(".")
    where = ".".join(path)
    if path and path[0] == "algorithm" and key != "total_timesteps":
        readers = (
            path[1:] if len(path) == 2 and path[1] in ALGORITHM_NAMES else ALGORITHM_NAMES if len(path) == 1 else ()
        )
        return next((_setting_types(n)[key] for n in readers if key in _setting_types(n)), None)
    cls = TaskConfig if where == "task" else SECTIONS.get(where)
    if cls is None:
        return None
    key = TASK_KEYS.get(key, key) if cls is TaskConfig else key
    key = RENAMED_KEYS.get(where, {}).get(key, key)
    return _hints(cls).get(key)


# ------------------------------------------------------------------------------------------------- a task
def parse_task(data: dict[str, Any], source: str = "<dict>") -> TaskConfig:
    """Validate a task dictionary (a parsed TOML file) into a :class:`TaskConfig`.

    :raises ValueError: one line naming the key, what it takes and what was given.
    """
    data = dict(data)
    top = _upgrade(dict(data.pop("task", {})), "task", source)
    unknown = sorted(set(top) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"unknown key task.{unknown[0]}: the keys of [task] are {list(TASK_KEYS)}")
    top = {TASK_KEYS[key]: value for key, value in top.items()}
    sections: dict[str, Any] = {}
    for key, value in data.items():
        if key not in SECTIONS or key == "reward.train":
            raise ValueError(f"unknown section [{key}] in {source}: the sections are {['task', *SECTIONS]}")
        if not isinstance(value, dict):
            raise ValueError(f"[{key}] must be a table, got {value!r}")
        value = _upgrade(value, key, source)
        if key == "reward" and "train" in value:
            value["train"] = _build(
                RewardModelTrainingSection, _upgrade(value["train"], "reward.train", source), "reward.train"
            )
        if key == "algorithm":
            sections[key] = _algorithm_section(value)
        else:
            sections[key] = _build(SECTIONS[key], value, key)
    task = _build(TaskConfig, {**top, **sections, "source": source}, "task")
    _check(task)
    return task


def _algorithm_section(value: dict[str, Any]) -> AlgorithmSection:
    from sb3_rlhf.algorithms import ALGORITHM_NAMES

    per_algorithm = {k: value.pop(k) for k in list(value) if k in ALGORITHM_NAMES and isinstance(value[k], dict)}
    total = value.pop("total_timesteps", None)
    try:
        total = check_value(total, int | None, "algorithm.total_timesteps", Rule(at_least=1))
    except ValueError:
        raise ValueError(
            f"algorithm.total_timesteps must be a positive whole number of generated tokens (2000, not 2e3 or -5), "
            f"got {total!r}"
        ) from None
    return AlgorithmSection(total, value, per_algorithm)


#: Algorithm arguments that the task sets itself (from other sections).
SET_BY_TASK = {
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

    allowed = accepted_arguments(algorithm_class(name)) - SET_BY_TASK
    return frozenset(allowed | DPO_TASK_SETTINGS if name == "dpo" else allowed)


@cache
def _setting_types(name: str) -> dict[str, Any]:
    """The annotation of each argument algorithm ``name`` takes, following ``**kwargs`` up its classes (an
    annotation that only a type checker resolves is left unchecked)."""
    import sys

    from sb3_rlhf.algorithms import algorithm_class

    hints: dict[str, Any] = {"pairs_per_prompt": int | None, "n_prompts": int | None} if name == "dpo" else {}
    for klass in algorithm_class(name).__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        namespace = vars(sys.modules[klass.__module__])
        for key, parameter in parameters.items():
            annotation = parameter.annotation
            try:
                annotation = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            except (NameError, AttributeError, TypeError):
                annotation = Any
            hints.setdefault(key, Any if annotation is parameter.empty else annotation)
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            break
    return hints


#: Where a task sets what an algorithm argument of that name would set.
_SET_WHERE = {"seed": "[task] seed", "device": "[task] device", "lora": "[policy] lora", "policy": "[policy] model"}


def _check_algorithm(task: TaskConfig) -> None:
    from sb3_rlhf.algorithms import ALGORITHM_NAMES, ONLINE_ALGORITHMS

    name = task.algorithm_name
    if name not in ALGORITHM_NAMES:
        raise ValueError(f"unknown task.algorithm {name!r}: choose one of {list(ALGORITHM_NAMES)}")
    tables = {"": task.algorithm.settings, **{f"{k}.": v for k, v in task.algorithm.per_algorithm.items()}}
    for prefix, table in tables.items():
        takers = [prefix[:-1]] if prefix else list(ALGORITHM_NAMES)
        for key, value in table.items():
            if key in _SET_WHERE or key in ("policy_kwargs", "tensorboard_log"):
                raise ValueError(f"algorithm.{prefix}{key} is set by the task: use {_SET_WHERE.get(key, '[policy]')}")
            taker = next((other for other in takers if key in _accepted_settings(other)), None)
            if taker is None:
                accepted = sorted(set().union(*(_accepted_settings(other) for other in takers)))
                raise ValueError(
                    f"unknown key algorithm.{prefix}{key}: "
                    + (
                        f"{takers[0]} takes {accepted}"
                        if prefix
                        else f"no algorithm takes it; [algorithm] takes "
                        f"total_timesteps, [algorithm.<name>] tables for {list(ALGORITHM_NAMES)} and {accepted}"
                    )
                )
            # typed as the algorithm that reads it (the task's own when it takes the key)
            reader = name if key in _accepted_settings(name) else taker
            table[key] = check_value(value, _setting_types(reader).get(key, Any), f"algorithm.{prefix}{key}")
            if key in DPO_TASK_SETTINGS:
                Rule(at_least=1).check(table[key], f"algorithm.{prefix}{key}")
    unused = sorted(set(task.algorithm.settings) - _accepted_settings(name))
    if name not in ONLINE_ALGORITHMS:  # DPO samples its pairs once: no timestep budget, no checkpoints
        offline = ["algorithm.total_timesteps"] * (task.algorithm.total_timesteps is not None)
        offline += [f"kl.{key}" for key in ("target", "horizon", "proportional_gain") if key in given(task.kl)]
        offline += ["[checkpoint]"] * ("checkpoint" in given(task)) + ["evaluation.every"] * (
            task.evaluation.every is not None
        )
        if offline:
            warnings.warn(
                f"{', '.join(offline)}: {name} samples its pairs once and trains offline, without a timestep budget, "
                "a KL controller, checkpoints or evaluations during training: ignored in this run",
                UserWarning,
                stacklevel=3,
            )
    if unused:
        warnings.warn(
            f"[algorithm] {', '.join(unused)}: not a setting of {name}, ignored in this run (other algorithms take "
            f"it; move a key to an [algorithm.<name>] table to keep it to those)",
            UserWarning,
            stacklevel=3,
        )
    if name in ONLINE_ALGORITHMS and task.algorithm.total_timesteps is None:
        raise ValueError(f"missing key algorithm.total_timesteps ({name} is an online algorithm)")


def _refuse_unused(
    section: Any, keys: tuple[str, ...], where: str, applies: bool, reason: str, warn: bool = False
) -> None:
    """A key given where it has no effect is an error (``warn``: a warning), never a silent no-op."""
    for key in keys:
        if not applies and key in given(section):
            if not warn:
                raise ValueError(f"{where}.{key} {reason}: remove it")
            warnings.warn(f"{where}.{key} {reason}: ignored in this run", UserWarning, stacklevel=4)


def _check(task: TaskConfig) -> None:
    """What no single key says: keys that go together, and names resolved elsewhere."""
    if not task.name or os.sep in task.name or task.name in (".", ".."):
        raise ValueError(f"task.name names the run folder (runs/<name>): give a plain name, got {task.name!r}")
    _check_algorithm(task)
    from sb3_rlhf.common.models import check_device

    check_device(task.device, present=False)  # a plan (--dry-run) may be made on a machine without the GPU
    reward = task.reward
    kinds = [name for name in ("function", "model", "train") if getattr(reward, name) is not None]
    if len(kinds) != 1:
        raise ValueError(f"[reward] needs exactly one of function, model or [reward.train]; got {kinds or 'none'}")
    if reward.function is not None and ":" not in reward.function:
        raise ValueError(f"reward.function must be 'module:function', got {reward.function!r}")
    for key, value in (("label", reward.label), ("revision", reward.revision)):
        if value is not None and reward.model is None:
            raise ValueError(f"reward.{key} applies to reward.model (a classifier or hub id); this task has no model")
    if reward.function is not None and reward.score != "logit":
        raise ValueError("reward.score applies to a reward model; a reward.function returns its scores as they are")
    _refuse_unused(reward, ("max_length",), "reward", reward.function is None, "applies to a reward model")
    _check_prompts(task.prompts)
    policy = task.policy
    if policy.model == "tiny" and policy.revision is not None:
        raise ValueError("policy.revision names a hub revision: the tiny model is built locally, remove it")
    if policy.model == "tiny" and not policy.tiny_words:
        raise ValueError("policy.model = 'tiny' needs policy.tiny_words (the tiny tokenizer's vocabulary)")
    tiny_keys = ("tiny_words", "tiny_hidden_size")
    # a warning: `--set policy.model=...` on a tiny task is the usual way to try a real model
    _refuse_unused(policy, tiny_keys, "policy", policy.model == "tiny", "applies to model = 'tiny'", warn=True)
    if policy.lora is not None:
        _check_lora(policy.lora)
    if reward.train is not None:
        _check_reward_training(reward.train)
    _check_judge(task)
    _check_policy_share(task)
    _check_kl(task.kl, task.algorithm_name)


def _check_lora(lora: dict[str, Any]) -> None:
    """``[policy] lora``: arguments of ``peft.LoraConfig``, checked now rather than when the policy is built."""
    import peft

    accepted = set(inspect.signature(peft.LoraConfig).parameters) - {"self"}
    unknown = sorted(set(lora) - accepted)
    if unknown:
        raise ValueError(
            f"unknown key policy.lora.{unknown[0]}: lora takes peft.LoraConfig's arguments ({sorted(accepted)})"
        )
    Rule(at_least=1).check(check_value(lora.get("r", 8), int, "policy.lora.r"), "policy.lora.r")


def _check_kl(kl: KLSection, algorithm: str) -> None:
    """The controller's settings, before any stage runs (a reward model may train for minutes first): the
    controller's own checks, run now; and settings that would do nothing."""
    if kl.target is not None:
        if kl.coef == 0:
            raise ValueError(
                "kl.target adapts kl.coef, and coef = 0 turns the penalty off: give coef > 0, or drop target"
            )
        try:
            AdaptiveKLController(kl.coef, kl.target, kl.horizon, kl.proportional_gain)
        except ValueError as error:
            raise ValueError(f"[kl]: {error}") from None
    controller = ("horizon", "proportional_gain")
    _refuse_unused(kl, controller, "kl", kl.target is not None, "is a setting of the adaptive controller (kl.target)")
    if algorithm == "grpo" and kl.estimator == "k1":
        raise ValueError(
            "kl.estimator = 'k1' with grpo: GRPO puts the KL in its loss, where k1 has zero expected gradient; use "
            "'k3' (the paper's) or 'k2'"
        )


def _check_judge(task: TaskConfig) -> None:
    train = task.reward.train
    if task.judge is not None and (train is None or train.format != "labels"):
        raise ValueError(
            "[judge] is trained on a share of [reward.train]'s labelled texts: give [reward.train] format = 'labels', "
            "or remove [judge]"
        )


def _check_policy_share(task: TaskConfig) -> None:
    train, prompts = task.reward.train, task.prompts
    if train is None or train.policy_share is None:
        return
    same_file = (
        prompts.source == train.source == "file"
        and prompts.path is not None
        and train.path is not None
        and os.path.normpath(prompts.path) == os.path.normpath(train.path)
    )
    if train.format != "pairs" or prompts.format != "hh" or not same_file:
        raise ValueError(
            "reward.train.policy_share splits the conversations of one file of pairs between the reward model and "
            "the policy: give [reward.train] format = 'pairs' and [prompts] format = 'hh', both source = 'file' with "
            f"the same path (got {train.format!r} from {train.source} {train.path!r}, prompts {prompts.format!r} "
            f"from {prompts.source} {prompts.path!r}), or drop it"
        )
    # the prompts are read with the default keys: other keys would split other texts than the policy reads
    keys = {key: getattr(train, key) for key in PAIR_KEYS if getattr(train, key) != key.removesuffix("_key")}
    if keys:
        raise ValueError(f"reward.train.policy_share reads the file's default columns; drop {sorted(keys)}")
    if prompts.first_words:
        raise ValueError(
            "prompts.first_words with reward.train.policy_share: cut prompts could equal the reward model's; drop one"
        )


def _check_hub_keys(section: HubDataKeys, source: str, where: str) -> None:
    hub = source == "hub"
    if hub and not section.dataset:
        raise ValueError(
            f"{where}.source = 'hub' needs {where}.dataset: a hub name (e.g. 'stanfordnlp/imdb'), a folder, "
            f"or a builder such as 'parquet' with {where}.data_files"
        )
    given = [f.name for f in dataclasses.fields(HubDataKeys) if getattr(section, f.name) is not None]
    if given and not hub:
        raise ValueError(f"{where}.{given[0]} names a datasets data set: it needs {where}.source = 'hub'")


def _check_prompts(prompts: PromptsSection) -> None:
    if prompts.source == "inline" and not prompts.texts:
        raise ValueError("prompts.source = 'inline' needs prompts.texts")
    if prompts.source != "inline" and prompts.texts:
        raise ValueError(
            f"prompts.texts are inline prompts: with source = {prompts.source!r} remove them (--set prompts.texts=[])"
        )
    if prompts.source == "file" and not prompts.path:
        raise ValueError("prompts.source = 'file' needs prompts.path (a CSV or JSONL file)")
    if prompts.source != "file" and prompts.path:
        raise ValueError(f"prompts.path is a file: it needs prompts.source = 'file' (not {prompts.source!r})")
    if prompts.format == "hh" and prompts.source != "file":
        raise ValueError("prompts.format = 'hh' reads an HH-RLHF pairs file: it needs source = 'file' and path")
    has_columns = prompts.source != "inline" and prompts.format == "texts"
    _refuse_unused(prompts, ("column",), "prompts", has_columns, "names a column of a file or data set of texts")
    _check_hub_keys(prompts, prompts.source, "prompts")


def _check_reward_training(stage: RewardModelTrainingSection) -> None:
    if stage.source == "file" and not stage.path:
        raise ValueError("reward.train.source = 'file' needs reward.train.path (a file name or path)")
    if stage.source == "hub" and stage.path:
        raise ValueError("reward.train.path is a file: with source = 'hub' name the data set in reward.train.dataset")
    _check_hub_keys(stage, stage.source, "reward.train")
    pair_keys = (*PAIR_KEYS, "split_by")  # labelled texts paired at random share no conversation
    for fmt, keys in (("labels", ("text_column", "label_column", "positive_label")), ("pairs", pair_keys)):
        _refuse_unused(stage, keys, "reward.train", stage.format == fmt, f"applies to format = {fmt!r}")


def kl_estimator(task: TaskConfig) -> str:
    """The task's KL estimator: as named in ``[kl]``, else ``"k3"`` for GRPO (KL in its loss) and ``"k1"``."""
    if task.kl.estimator is not None:
        return task.kl.estimator
    return "k3" if task.algorithm_name == "grpo" else "k1"


# ------------------------------------------------------------------------------------------------- files
def ready_tasks() -> dict[str, str]:
    """The ready tasks shipped with the package: name -> file."""
    return {
        name.removesuffix(".toml"): os.path.join(READY_TASKS_DIR, name)
        for name in sorted(os.listdir(READY_TASKS_DIR))
        if name.endswith(".toml")
    }


def find_task_file(task: str) -> str:
    """A task file: a path, or the name of a ready task (``imdb_positive``, see :func:`ready_tasks`).

    :raises FileNotFoundError: neither, naming the ready tasks.
    """
    if os.path.isfile(task):
        return task
    ready = ready_tasks()
    if task in ready:
        here = f"{task}.toml"
        if os.path.isfile(here) and not os.path.samefile(here, ready[task]):
            raise ValueError(f"{task!r} is a ready task and ./{here} a file here: give the file as {here}")
        return ready[task]
    name = os.path.normpath(task).removesuffix(".toml")
    if name.startswith(f"envs{os.sep}") and name.removeprefix(f"envs{os.sep}") in ready:
        return ready[name.removeprefix(f"envs{os.sep}")]  # envs/<name>.toml of the README, outside a clone
    raise FileNotFoundError(
        f"task file {task!r} does not exist: give a path to a .toml file or a ready task's name "
        f"({', '.join(ready)}; `sb3-rlhf tasks` lists them)"
    )


#: ``--set key=none`` for a key that does not take None: the key left out, as if the file did not give it.
UNSET = object()


def parse_override(item: str) -> tuple[str, Any]:
    """``--set key=value``: the value read as the key's type in the schema. A text key takes the text as it is
    (quotes optional); any other key takes TOML syntax (``2000``, ``1e-5``, ``true``, ``["a", "b"]``); ``none`` is
    None where the key takes it, else leaves the key out (:data:`UNSET`: its default)."""
    if "=" not in item:
        raise ValueError(f"--set takes key=value, got {item!r}")
    key, text = (part.strip() for part in item.split("=", 1))
    *where, last = key.split(".")
    renamed = RENAMED_KEYS.get(".".join(where), {}).get(last)
    if renamed is not None:  # an old name: the key it is now, so that it replaces the file's value
        _deprecated(f"--set {key}", f"{'.'.join(where)}.{renamed}", "the command line")
        key = f"{'.'.join(where)}.{renamed}"
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    annotation = schema_type(key)
    if text.lower() in ("none", "null"):
        try:  # None itself where the key takes it (clip_range_vf=None: unclipped), else the key left out
            return key, _typed(None, annotation) if annotation is not None else UNSET
        except _Mismatch:
            return key, UNSET
    if isinstance(value, str) and value == text:
        try:
            value = float(text) if annotation is not None and _typed(1.5, annotation) == 1.5 else value
        except (_Mismatch, ValueError):
            pass  # not a number, or not a key that takes one
    if annotation is not None and not isinstance(value, str):
        try:
            _typed(value, annotation)
        except _Mismatch:
            try:
                _typed(text, annotation)  # 123 for a text key (a revision, a path) is the text "123"
                value = text
            except _Mismatch:
                pass  # the schema's check names the key and the type when the task is parsed
    return key, value


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for old, new in RENAMED_KEYS.get(".".join(path), {}).items():
        if new == last:  # the command line's value replaces the file's, under its old name too
            _set(data, ".".join([*path, old]), UNSET)
    for key in path:
        if (value is UNSET or value is None) and key not in data:
            return  # nothing to leave out, or a default: no section to make for it
        inner = data.setdefault(key, {})
        if not isinstance(inner, dict):
            raise ValueError(f"--set {dotted}: {key} is a key, not a section")
        data = inner
    if value is UNSET:
        data.pop(last, None)
    else:
        data[last] = value


def read_task_file(path: str) -> dict[str, Any]:
    """A task file's TOML as a dictionary (unchecked; see :func:`parse_task`)."""
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path} is not valid TOML: {error}") from error


def load_task(task: str, overrides: list[str] | None = None) -> TaskConfig:
    """Read a task file (a path or a ready task's name), apply ``--set key=value`` overrides (see
    :func:`parse_override`) and check it all (:func:`parse_task`)."""
    path = find_task_file(task)
    data = read_task_file(path)
    for item in overrides or []:
        _set(data, *parse_override(item))
    return parse_task(data, source=path)
