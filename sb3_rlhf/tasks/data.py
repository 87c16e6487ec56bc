"""A task's data: its prompts (``[prompts]``) and its reward model's comparisons (``[reward.train]``), read from
the sections of :mod:`sb3_rlhf.tasks.config` with the loaders of :mod:`sb3_rlhf.common.data`."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, cast

import numpy as np

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
from sb3_rlhf.tasks.config import HubDataKeys, PromptsSection, RewardModelTrainingSection

if TYPE_CHECKING:  # annotations only: transformers is not imported at run time
    from transformers import PreTrainedTokenizerBase


def _hub_dataset(section: HubDataKeys, where: str, columns: dict[str, str]) -> Any:
    """The ``datasets`` split a ``source = "hub"`` section names, checked to have the ``columns`` its keys name.

    :raises ValueError: one line naming the missing column, its key and the data set's columns.
    """
    assert section.dataset is not None  # the schema requires it with source = "hub"
    dataset = load_hub_dataset(
        section.dataset,
        section.config,
        section.split or "train",
        section.revision,
        section.data_dir,
        section.data_files,
    )
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"data set {section.dataset!r} has no column {column!r} ({where}.{key}); its columns are "
                f"{dataset.column_names}"
            )
    return dataset


def load_prompt_forms(
    section: PromptsSection, tokenizer: PreTrainedTokenizerBase | None, only: Collection[str] | None = None
) -> tuple[list[str], list[str]]:
    """The task's prompts in file order (the split is seeded later), in two parallel forms: what the policy
    reads (through its chat template when ``prompts.chat_template``: an HH conversation as its turns, any other
    text as one user turn, ending in the assistant's header) and the plain text that reward models score
    (the same texts without a chat template).

    :param tokenizer: the policy's tokenizer (used only with ``chat_template``).
    :param only: keep only these texts, as the file holds them (the policy's share of a conversation split,
        :func:`policy_conversations`).
    :raises ValueError: a missing column (naming the columns present), or a chat template asked of a tokenizer without one.
    """
    if section.source == "inline":
        texts = list(section.texts)
    elif section.format == "hh":  # the conversations of HH-RLHF pairs
        assert section.path is not None  # the schema requires it of a file source
        pairs, _ = load_preference_pairs(find_data_file(section.path))
        texts = list(dict.fromkeys(p.prompt for p in pairs))
    else:
        if section.source == "hub":
            source = _hub_dataset(section, "prompts", {"column": section.column})
        else:
            assert section.path is not None
            source = find_data_file(section.path)
        texts, _ = load_prompt_texts(source, section.column)
    if only is not None:
        kept = set(only)
        texts = [t for t in texts if t in kept]
    if section.first_words:
        texts = [" ".join(t.split()[: section.first_words]) for t in texts]
    if section.max_prompts:
        texts = texts[: section.max_prompts]
    if not section.chat_template:
        return texts, texts
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompts.chat_template = true but the policy tokenizer has no chat template: set it to false")
    # tokenize=False: one string per conversation (the stubs' return type also covers token ids)
    templated = [
        cast(str, tokenizer.apply_chat_template(prompt_messages(t), add_generation_prompt=True, tokenize=False))
        for t in texts
    ]
    return templated, texts


def load_prompts(
    section: PromptsSection, tokenizer: PreTrainedTokenizerBase | None, only: Collection[str] | None = None
) -> list[str]:
    """The task's prompt texts as the policy reads them, in file order (see :func:`load_prompt_forms`)."""
    return load_prompt_forms(section, tokenizer, only)[0]


def split_prompts(
    section: PromptsSection, prompts: list[str], plain_prompts: list[str], seed: int
) -> tuple[list[str], list[str]]:
    """The prompts to train on and those held out (seeded, ``prompts.test_size``). With ``split_by =
    "conversation"`` (the default of HH pairs, ``format = "hh"``) by conversation (:func:`conversation_key` of the
    plain texts): HH-RLHF records one conversation cut at several turns, so a held-out conversation is tested on
    one cut and none of its cuts is trained on."""
    groups = [conversation_key(p) for p in plain_prompts] if section.split_by == "conversation" else None
    return train_test_split(prompts, section.test_size, seed, "prompts.test_size", groups)


def split_reward_pairs(
    stage: RewardModelTrainingSection, pairs: list[PreferencePair], seed: int, name: str = "reward.train.test_size"
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """The reward model's pairs to train on and those held out to measure it (seeded, ``reward.train.test_size``).
    With ``split_by = "conversation"`` (the default with ``policy_share``) by conversation (:func:`conversation_key`
    of the pairs' prompts): a held-out conversation is tested on one pair and none of its pairs is trained on.

    :param name: the test size's name in errors (``--test-size`` for ``sb3-rlhf reward-model``).
    """
    groups = [conversation_key(p.prompt) for p in pairs] if stage.split_by == "conversation" else None
    return train_test_split(pairs, stage.test_size, seed, name, groups)


def _comparison_source(stage: RewardModelTrainingSection) -> tuple[Any, str]:
    """The file or ``datasets`` data set of a ``[reward.train]`` stage, and the positive label as stored."""
    positive_label = str(stage.positive_label)
    if stage.source == "hub":
        if stage.format == "labels":
            columns = {"text_column": stage.text_column, "label_column": stage.label_column}
        else:
            columns = {"chosen_key": stage.chosen_key, "rejected_key": stage.rejected_key}
        source = _hub_dataset(stage, "reward.train", columns)
        names = getattr(source.features[stage.label_column], "names", None) if stage.format == "labels" else None
        if names and positive_label in names:  # a ClassLabel column stores class indices
            positive_label = str(names.index(positive_label))
        return source, positive_label
    assert stage.path is not None  # the schema requires it of a file source
    return find_data_file(stage.path), positive_label


def labelled_halves(
    stage: RewardModelTrainingSection, judge_share: float, seed: int
) -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]], LoadReport]:
    """A labelled ``[reward.train]`` source's texts in two disjoint parts, each label split alike (seeded):
    ``(positives, negatives)`` for the reward model, ``(positives, negatives)`` set aside for a second judge
    (``judge_share`` of each label), and the load report."""
    if stage.format != "labels":
        raise ValueError("a judge's share is set aside from labelled texts; this [reward.train] source has pairs")
    source, positive_label = _comparison_source(stage)
    positives, negatives, report = load_labelled_texts(source, stage.text_column, stage.label_column, positive_label)
    rng = np.random.default_rng(seed)
    kept, aside = [], []
    for texts in (positives, negatives):
        texts = list(dict.fromkeys(texts))  # a text listed twice must not land on both sides
        order = rng.permutation(len(texts))
        n_aside = int(round(judge_share * len(texts)))
        if not 0 < n_aside < len(texts):
            raise ValueError(f"judge share {judge_share} of {len(texts)} texts leaves one side empty")
        aside.append([texts[i] for i in order[:n_aside]])
        kept.append([texts[i] for i in order[n_aside:]])
    return (kept[0], kept[1]), (aside[0], aside[1]), report


def conversation_key(prompt: str) -> str:
    """What the prompts of one conversation share however many turns they hold: its first turn (HH-RLHF records
    the same conversation cut at several turns, and a later cut holds the earlier one's answer)."""
    first = prompt.strip().split("\n\nAssistant:")[0]
    return " ".join(first.split())


def policy_conversations(stage: RewardModelTrainingSection | None, seed: int) -> set[str] | None:
    """The prompts a ``[reward.train] policy_share`` sets aside for the policy: every prompt of that share of the
    conversations (grouped by :func:`conversation_key`, so that no cut of a conversation lands on the reward
    model's side), drawn once (seeded); the reward model never sees a pair of theirs. ``None`` where the task
    splits nothing (no stage, or no ``policy_share``).

    :raises ValueError: a share that leaves either side without a conversation.
    """
    if stage is None or stage.policy_share is None:
        return None
    source, _ = _comparison_source(stage)
    pairs, _ = load_preference_pairs(source, stage.chosen_key, stage.rejected_key, stage.prompt_key)
    return _policy_share_of(pairs, stage.policy_share, seed)


def _policy_share_of(pairs: list[PreferencePair], share: float, seed: int) -> set[str]:
    """:func:`policy_conversations` of pairs loaded already."""
    prompts = list(dict.fromkeys(p.prompt for p in pairs))
    keys = list(dict.fromkeys(conversation_key(p) for p in prompts))
    n_policy = int(round(share * len(keys)))
    if not 0 < n_policy < len(keys):
        raise ValueError(
            f"reward.train.policy_share = {share} of {len(keys)} conversations leaves the policy or the "
            "reward model none"
        )
    order = np.random.default_rng(seed).permutation(len(keys))
    chosen = {keys[i] for i in order[:n_policy]}
    return {p for p in prompts if conversation_key(p) in chosen}


def reward_training_pairs(
    stage: RewardModelTrainingSection, seed: int, judge_share: float = 0.0
) -> tuple[list[PreferencePair], LoadReport]:
    """The comparisons of a ``[reward.train]`` stage: a file's pairs (plain, HH or conversational), labelled
    texts paired positive-over-negative (seeded), or the same from a ``datasets`` data set; with
    ``policy_share``, only the pairs of the conversations the policy does not get (:func:`policy_conversations`).

    :param judge_share: leave this share of labelled texts out (:func:`labelled_halves`): a second judge's.
    :raises ValueError: a missing column, naming it and the columns present.
    """
    if judge_share > 0:
        (positives, negatives), _, report = labelled_halves(stage, judge_share, seed)
        return pairs_from_labels(positives, negatives, seed=seed), report
    source, positive_label = _comparison_source(stage)
    if stage.format == "labels":
        positives, negatives, report = load_labelled_texts(
            source, stage.text_column, stage.label_column, positive_label
        )
        pairs = pairs_from_labels(positives, negatives, seed=seed)
    else:
        pairs, report = load_preference_pairs(source, stage.chosen_key, stage.rejected_key, stage.prompt_key)
        if stage.policy_share is not None:  # the file is read once: its pairs are the ones split
            policy = _policy_share_of(pairs, stage.policy_share, seed)
            pairs = [p for p in pairs if p.prompt not in policy]
    return pairs, report
