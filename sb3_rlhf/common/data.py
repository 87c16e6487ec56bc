"""Data loading in one place: preference pairs, demonstrations, labelled texts, splits and data-file lookup (a
task file's sections are read by :mod:`sb3_rlhf.tasks.data`).

Every loader takes a file path (JSONL, gzip'd JSONL or CSV) or any iterable of mappings (a Hugging Face
``datasets.Dataset`` is one), and returns the items with a :class:`LoadReport` of what was skipped and why.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

#: Environment variable naming a folder of data files (checked before the data shipped with the package).
DATA_DIR_ENV = "SB3_RLHF_DATA_DIR"
#: The data shipped inside the package (``sb3_rlhf/data``: the IMDB subset and the HH harmless-base pairs).
PACKAGE_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


@dataclass(frozen=True)
class PreferencePair:
    """A human comparison: ``chosen`` was preferred to ``rejected`` as a response to ``prompt``.

    ``margin`` (optional) is how strongly, e.g. a rating difference; the reward-model loss can use it.
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class Demonstration:
    """A (prompt, response) example for supervised fine-tuning."""

    prompt: str
    response: str


@dataclass
class LoadReport:
    """How many items a loader kept, and how many it skipped for each reason."""

    source: str
    loaded: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def __str__(self) -> str:
        text = f"{self.source}: {self.loaded} loaded"
        if self.skipped:
            text += ", skipped " + ", ".join(f"{n} ({reason})" for reason, n in self.skipped.most_common())
        return text


# ---------------------------------------------------------------------------------------------- files
def find_data_file(name: str, data_dir: str | None = None) -> str:
    """Resolve a data file: an existing path as given, else in ``data_dir``, ``$SB3_RLHF_DATA_DIR``, the data
    shipped with the package (:data:`PACKAGE_DATA_DIR`), and last ``../shared/data`` beside the working
    directory or the checkout (a development layout, for files the package does not ship).

    :raises FileNotFoundError: listing every place looked at.
    """
    if os.path.exists(name):
        return name
    checkout = os.path.dirname(os.path.dirname(PACKAGE_DATA_DIR))
    candidates = [d for d in (data_dir, os.environ.get(DATA_DIR_ENV)) if d] + [PACKAGE_DATA_DIR]
    candidates += [os.path.join(os.getcwd(), "..", "shared", "data"), os.path.join(checkout, "..", "shared", "data")]
    for folder in candidates:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return os.path.normpath(path)
    raise FileNotFoundError(
        f"data file {name!r} not found (looked in: {', '.join(dict.fromkeys(os.path.normpath(c) for c in candidates))}); "
        f"pass its path or set {DATA_DIR_ENV}"
    )


#: The data sets the package ships, for error messages about unreachable hub data sets.
SHIPPED_DATA = ("imdb_subset.csv", "hh_harmless_base_test.jsonl.gz")


def load_hub_dataset(
    name: str,
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
    data_dir: str | None = None,
    data_files: str | list[str] | None = None,
) -> Any:
    """One split of a data set through ``datasets.load_dataset``: a hub name (``"stanfordnlp/imdb"``, found in
    ``datasets``' own cache when offline), a local folder, or a packaged builder with files
    (``"parquet"``, ``"json"``, ``"csv"`` with ``data_files``).

    :param name: the data set's hub name, folder or builder.
    :param config: its configuration (subset) name.
    :param split: which split, e.g. ``"train"`` or ``"test[:1000]"``.
    :param revision: branch, tag or commit of a hub data set.
    :param data_dir: a folder inside the data set (``Anthropic/hh-rlhf`` has ``harmless-base``).
    :param data_files: files for a packaged builder.
    :return: a ``datasets.Dataset`` (an iterable of records, as every loader here takes).
    :raises ImportError: ``datasets`` is not installed (the message says ``pip install datasets``).
    :raises FileNotFoundError: the data set cannot be found or reached; the message names it, the offline
        setting and the data shipped with the package.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"loading the data set {name!r} needs the `datasets` package: pip install datasets "
            f"(or pip install sb3-rlhf[datasets]); or use a local file, e.g. the shipped {' or '.join(SHIPPED_DATA)}"
        ) from error
    from huggingface_hub.errors import HfHubHTTPError

    try:
        dataset = datasets.load_dataset(
            name, config, split=split, revision=revision, data_dir=data_dir, data_files=data_files
        )
    except (ConnectionError, FileNotFoundError, HfHubHTTPError) as error:
        # ConnectionError: offline (HF_HUB_OFFLINE) or no network and not cached; FileNotFoundError: unknown name;
        # HfHubHTTPError: the hub answered with an error (down, gated, private)
        offline = "HF_HUB_OFFLINE=1" if datasets.config.HF_HUB_OFFLINE else "online mode (HF_HUB_OFFLINE unset)"
        raise FileNotFoundError(
            f"data set {name!r}{f' ({config})' if config else ''} could not be loaded with {offline}: it is neither "
            f"in the datasets cache ({datasets.config.HF_DATASETS_CACHE}) nor reachable on the hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); load it once online, "
            f"or use a local file such as the shipped {' or '.join(SHIPPED_DATA)}"
        ) from error
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"data set {name!r}: split={split!r} did not select one split; name one, e.g. 'train'")
    return dataset


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file {path!r} does not exist: check the path")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder: pass a .jsonl, .jsonl.gz or .csv file")


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file, gzip'd or not (detected from the bytes, not the name)."""
    _check_file(path)
    if path.endswith(".gz") and not _is_gzip(path):
        raise ValueError(f"{path!r} ends in .gz but is not a gzip file")
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"line {line_number} of {path!r} is not JSON ({error.msg}): expected one JSON object per line"
                ) from error
            if not isinstance(record, dict):
                raise ValueError(
                    f"line {line_number} of {path!r} is a JSON {type(record).__name__}, expected an object"
                )
            yield record


def read_csv(path: str) -> Iterator[dict[str, Any]]:
    """Rows of a CSV file with a header line."""
    _check_file(path)
    csv.field_size_limit(1 << 30)
    with open(path, newline="", encoding="utf-8") as f:
        yield from csv.DictReader(f)


def read_records(source: str | Iterable[Mapping[str, Any]]) -> tuple[Iterator[Mapping[str, Any]], str]:
    """Records from a path (``.csv`` by name, else JSONL) or an iterable of mappings; and a name for reports."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if path.lower().endswith((".csv", ".csv.gz")):
            return read_csv(path), path
        return read_jsonl(path), path
    return iter(source), type(source).__name__


def _require_columns(
    record: Mapping[str, Any], columns: Sequence[str], source: str, hint: str = "e.g. chosen_key=..., rejected_key=..."
) -> None:
    missing = [c for c in columns if c not in record]
    if missing:
        raise ValueError(
            f"{source}: column(s) {missing} missing; the records have {sorted(record)}; name the right columns ({hint})"
        )


# ---------------------------------------------------------------------------------------------- HH transcripts
def split_hh_transcript(transcript: str) -> tuple[str, str]:
    """Split an Anthropic HH transcript ``"\\n\\nHuman: ... \\n\\nAssistant: ..."`` before its final answer.

    :return: ``(prompt, answer)`` with the prompt ending in ``"\\n\\nAssistant:"``; ``prompt + answer == transcript``.
    :raises ValueError: the text has no ``"\\n\\nAssistant:"`` turn.
    """
    index = transcript.rfind(HH_ASSISTANT)
    if index < 0:
        raise ValueError("not an HH transcript: no '\\n\\nAssistant:' turn")
    cut = index + len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


# ---------------------------------------------------------------------------------------------- conversations
#: One chat turn, as chat templates and TRL's conversational datasets have it: ``{"role": ..., "content": ...}``.
Message = dict[str, str]
_HH_NAMES = {"system": "System", "user": "Human", "assistant": "Assistant"}
_HH_ROLES = {name: role for role, name in _HH_NAMES.items()}
_HH_TURN = re.compile(r"\n\n(System|Human|Assistant):")


def is_hh_transcript(text: Any) -> bool:
    """Whether ``text`` is an HH-style conversation (``"\\n\\nHuman: ..."``, optionally after a System turn)."""
    return isinstance(text, str) and text.startswith((HH_HUMAN, "\n\nSystem:"))


def hh_to_messages(transcript: str) -> list[Message]:
    """Parse an HH transcript into chat messages: ``"\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:"``
    gives user ``a``, assistant ``b``, user ``c``; a final empty Assistant turn (the cue to answer) is dropped.

    :raises ValueError: the text is not an HH transcript.
    """
    if not is_hh_transcript(transcript):
        raise ValueError("not an HH transcript: it does not start with '\\n\\nHuman:'")
    parts = _HH_TURN.split(transcript)  # ["", "Human", " a", "Assistant", " b", ...]
    messages = [{"role": _HH_ROLES[name], "content": text.strip()} for name, text in zip(parts[1::2], parts[2::2])]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def messages_to_hh(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """Render chat messages as an HH transcript (the inverse of :func:`hh_to_messages`): the plain-text form in
    which reward models read conversations. ``add_generation_prompt`` ends it with ``"\\n\\nAssistant:"``."""
    text = "".join(f"\n\n{_HH_NAMES[m['role']]}: {m['content']}" for m in as_messages(messages))
    return text + HH_ASSISTANT if add_generation_prompt else text


def as_messages(value: Any) -> list[Message]:
    """Check a conversation: a list of ``{"role": "system" | "user" | "assistant", "content": str}``.

    :raises ValueError: naming what is wrong with it.
    """
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"a conversation is a non-empty list of messages, got {type(value).__name__}")
    messages = []
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            raise ValueError(f"a message is {{'role': ..., 'content': str}}, got {message!r:.80}")
        if message.get("role") not in _HH_NAMES:
            raise ValueError(f"a message role is one of {list(_HH_NAMES)}, got {message.get('role')!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def prompt_messages(prompt: str) -> list[Message]:
    """The chat messages of a prompt text: an HH transcript as its turns, any other text as one user turn."""
    return hh_to_messages(prompt) if is_hh_transcript(prompt) else [{"role": "user", "content": prompt}]


def _conversation_prompt(value: Any) -> str:
    """A prompt column's value as prompt text: a string as it is (an HH transcript cut before its final answer);
    a conversation rendered as an HH transcript up to the assistant's turn (a final assistant answer dropped)."""
    if isinstance(value, str):
        return split_hh_transcript(value)[0] if is_hh_transcript(value) else value
    messages = as_messages(value)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise ValueError("the conversation has no turn before the assistant's answer")
    return messages_to_hh(messages, add_generation_prompt=True)


def load_prompt_texts(
    source: str | Iterable[Mapping[str, Any]], column: str = "prompt", clean_html: bool = True
) -> tuple[list[str], LoadReport]:
    """Prompt texts from ``column`` of a file or records (a Hugging Face dataset is one), in order.

    A value is a plain text, an HH transcript (cut before its final answer, so a ``chosen`` column gives the
    conversations), or a conversation (TRL's conversational format: a list of ``{"role", "content"}``, e.g. a
    ``messages`` or ``prompt`` column), kept as an HH transcript ending in ``"\\n\\nAssistant:"``: the form reward
    models read, and the one :func:`prompt_messages` turns back into turns for a chat template.

    :param clean_html: turn ``<br />`` tags of plain texts into spaces (the IMDB reviews have them).
    :raises ValueError: the column is missing (the message lists the columns present), or no usable prompt.
    """
    records, name = read_records(source)
    report = LoadReport(name)
    texts = []
    for i, record in enumerate(records):
        if i == 0:
            _require_columns(record, [column], name, hint="prompts.column = ...")
        try:
            text = _conversation_prompt(record.get(column))
        except ValueError:
            report.skip("not a text or conversation")
            continue
        if not text.strip():
            report.skip("empty text")
            continue
        texts.append(clean_html_breaks(text, " ") if clean_html and not is_hh_transcript(text) else text)
    report.loaded = len(texts)
    if not texts:
        raise ValueError(f"{report}: no usable prompt in column {column!r}")
    return texts, report


# ---------------------------------------------------------------------------------------------- pairs
def load_preference_pairs(
    source: str | Iterable[Mapping[str, Any]],
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    prompt_key: str = "prompt",
    margin_key: str | None = None,
    split_transcripts: bool | None = None,
) -> tuple[list[PreferencePair], LoadReport]:
    """Preference pairs from JSONL/gzip'd JSONL or records with ``chosen``/``rejected`` (and optionally ``prompt``).

    Without a prompt column, HH-style transcripts are split into the shared conversation and the two final
    answers (``split_transcripts=None`` detects them); pairs whose conversations differ are skipped.
    Conversations (TRL's conversational format: lists of ``{"role", "content"}``) are taken with an explicit
    ``prompt`` list, or else the prompt is the turns the two conversations share; all of it is kept as HH text
    (``"\\n\\nHuman: ...\\n\\nAssistant:"`` and the answers `` ...``), the form the reward model then reads.
    Pairs with an empty text or identical chosen and rejected are skipped; every skip is counted in the report.

    :raises FileNotFoundError: the file does not exist.
    :raises ValueError: not JSONL/gzip, or a column missing (the message lists the columns present).
    """
    records, name = read_records(source)
    report = LoadReport(name)
    pairs = []
    for i, record in enumerate(records):
        if i == 0:
            _require_columns(record, [chosen_key, rejected_key], name)
        chosen, rejected = record.get(chosen_key), record.get(rejected_key)
        prompt = record.get(prompt_key)
        if any(isinstance(v, Sequence) and not isinstance(v, str) for v in (prompt, chosen, rejected)):
            try:
                prompt, chosen, rejected = _conversation_pair(prompt, chosen, rejected)
            except ValueError:
                report.skip("not a conversation")
                continue
        elif not isinstance(chosen, str) or not isinstance(rejected, str):
            report.skip("not text")
            continue
        elif not isinstance(prompt, str):
            prompt = ""
            split = split_transcripts if split_transcripts is not None else HH_ASSISTANT in chosen
            if split:
                try:
                    (prompt, chosen), (rejected_prompt, rejected) = (
                        split_hh_transcript(chosen),
                        split_hh_transcript(rejected),
                    )
                except ValueError:
                    report.skip("not an HH transcript")
                    continue
                if prompt != rejected_prompt:
                    report.skip("chosen and rejected continue different conversations")
                    continue
        if not chosen.strip() or not rejected.strip():
            report.skip("empty text")
            continue
        if chosen == rejected:
            report.skip("identical chosen and rejected")
            continue
        margin = float(record[margin_key]) if margin_key and record.get(margin_key) is not None else None
        pairs.append(PreferencePair(prompt, chosen, rejected, margin))
    report.loaded = len(pairs)
    if not pairs:
        raise ValueError(f"{report}: no usable preference pair")
    return pairs, report


def _conversation_pair(prompt: Any, chosen: Any, rejected: Any) -> tuple[str, str, str]:
    """A conversational comparison as HH text ``(prompt, chosen, rejected)``: the prompt is the ``prompt``
    messages or, without them (TRL's implicit prompt), the leading turns the two conversations share; the
    answers are the rest, starting with the assistant's turn. A plain-text part is one user/assistant turn.

    :raises ValueError: not conversations, no shared prompt, or an answer that is not the assistant's.
    """

    def turns(value: Any, role: str) -> list[Message]:
        return as_messages([{"role": role, "content": value}] if isinstance(value, str) else value)

    chosen, rejected = turns(chosen, "assistant"), turns(rejected, "assistant")
    if prompt is None:
        n = 0  # the shared turns, leaving each side at least its last one
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        context, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        context = turns(prompt, "user")
    if not context or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        raise ValueError("the answers must be assistant turns after a shared prompt")
    head = messages_to_hh(context, add_generation_prompt=True)
    # the answers as HH text continue the prompt's final "\n\nAssistant:" with " ..."
    return head, messages_to_hh(context + chosen)[len(head) :], messages_to_hh(context + rejected)[len(head) :]


def pairs_from_ranking(prompt: str, ranked_responses: Sequence[str]) -> list[PreferencePair]:
    """All K·(K−1)/2 pairs of a ranked list (best first): each response is preferred to every later one."""
    if len(ranked_responses) < 2:
        raise ValueError("a ranking needs at least 2 responses")
    if len(set(ranked_responses)) != len(ranked_responses):
        raise ValueError("a ranking has the same response twice")
    return [
        PreferencePair(prompt, ranked_responses[i], ranked_responses[j])
        for i in range(len(ranked_responses))
        for j in range(i + 1, len(ranked_responses))
    ]


def pairs_from_ratings(prompt: str, responses: Sequence[str], ratings: Sequence[float]) -> list[PreferencePair]:
    """Pairs from scalar ratings: every higher-rated response beats every lower-rated one, with the rating
    difference as margin; ties give no pair."""
    if len(responses) != len(ratings):
        raise ValueError(f"{len(responses)} responses but {len(ratings)} ratings")
    order = sorted(range(len(responses)), key=lambda i: -ratings[i])
    return [
        PreferencePair(prompt, responses[i], responses[j], float(ratings[i] - ratings[j]))
        for a, i in enumerate(order)
        for j in order[a + 1 :]
        if ratings[i] > ratings[j]
    ]


_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def clean_html_breaks(text: str, replacement: str = "\n") -> str:
    """Replace HTML line breaks (``<br />``, as in the IMDB reviews) with ``replacement``."""
    return _HTML_BREAK.sub(replacement, text)


def load_labelled_texts(
    source: str | Iterable[Mapping[str, Any]],
    text_column: str = "review",
    label_column: str = "sentiment",
    positive_label: str = "positive",
    clean_html: bool = True,
) -> tuple[list[str], list[str], LoadReport]:
    """Texts with a label column (e.g. IMDB reviews), split into positives and the rest.

    :param clean_html: turn ``<br />`` tags into newlines.
    :return: ``(positives, negatives, report)``.
    """
    records, name = read_records(source)
    report = LoadReport(name)
    positives: list[str] = []
    negatives: list[str] = []
    for i, record in enumerate(records):
        if i == 0:
            _require_columns(record, [text_column, label_column], name)
        text = record.get(text_column)
        if not isinstance(text, str) or not text.strip():
            report.skip("empty text")
            continue
        if clean_html:
            text = clean_html_breaks(text)
        (positives if str(record[label_column]) == positive_label else negatives).append(text)
    report.loaded = len(positives) + len(negatives)
    if not positives or not negatives:
        raise ValueError(
            f"{report}: need texts of both classes, got {len(positives)} labelled {positive_label!r} and {len(negatives)} others"
        )
    return positives, negatives, report


def pairs_from_labels(
    positives: Sequence[str], negatives: Sequence[str], seed: int = 0, prompt: str = ""
) -> list[PreferencePair]:
    """Pair each positive text with a negative one (shuffled by ``seed``, each text used once): the positive
    is chosen. Gives ``min(len(positives), len(negatives))`` pairs."""
    rng = np.random.default_rng(seed)
    pos = [positives[i] for i in rng.permutation(len(positives))]
    neg = [negatives[i] for i in rng.permutation(len(negatives))]
    return [PreferencePair(prompt, p, n) for p, n in zip(pos, neg)]


# ---------------------------------------------------------------------------------------------- demonstrations
def load_demonstrations(
    source: str | Iterable[Mapping[str, Any]], prompt_key: str = "prompt", response_key: str = "response"
) -> tuple[list[Demonstration], LoadReport]:
    """(prompt, response) demonstrations from JSONL/CSV/records; HH records (``chosen`` transcripts and no
    response column) become the conversation and its preferred final answer."""
    records, name = read_records(source)
    report = LoadReport(name)
    demos = []
    for i, record in enumerate(records):
        prompt: object
        response: object
        hh = response_key not in record and "chosen" in record
        if i == 0 and not hh:
            _require_columns(record, [prompt_key, response_key], name)
        if hh:
            try:
                prompt, response = split_hh_transcript(record["chosen"])
            except (ValueError, AttributeError):
                report.skip("not an HH transcript")
                continue
        else:
            prompt, response = record.get(prompt_key), record.get(response_key)
        if not isinstance(prompt, str) or not isinstance(response, str) or not response.strip():
            report.skip("empty text")
            continue
        demos.append(Demonstration(prompt, response))
    report.loaded = len(demos)
    if not demos:
        raise ValueError(f"{report}: no usable demonstration")
    return demos, report


# ---------------------------------------------------------------------------------------------- splits
def train_test_split(
    items: Sequence[T],
    test_size: int | float,
    seed: int = 0,
    name: str = "test_size",
    groups: Sequence[Hashable] | None = None,
) -> tuple[list[T], list[T]]:
    """A deterministic shuffle by ``seed``, then the last ``test_size`` items (a count, or a fraction) held out.

    :param name: the setting's name in errors (``prompts.test_size``, ``--test-size``, ...).
    :param groups: a key per item (items of one conversation share one): ``test_size`` then counts groups, a
        group lands whole on one side, and a held-out group is tested on one item only (the first of the
        shuffle), so that the test items are independent; its other items are neither trained nor tested on.
        With a distinct key per item, the split is the one without ``groups``.
    """
    fraction = isinstance(test_size, float) and 0.0 < test_size < 1.0
    count = isinstance(test_size, int) and not isinstance(test_size, bool) and test_size >= 1
    if not (fraction or count):  # a negative share would hold out one item without a word
        raise ValueError(f"{name} must be a share in (0, 1) or a whole number >= 1 of items, got {test_size!r}")
    if groups is not None and len(groups) != len(items):
        raise ValueError(f"{name}: {len(groups)} group keys for {len(items)} items")
    order = np.random.default_rng(seed).permutation(len(items))
    # the groups in the order their first item comes in the shuffle, with their items in that order
    by_group: dict[Hashable, list[int]] = {}
    for i in order:
        by_group.setdefault(i if groups is None else groups[i], []).append(int(i))
    members = list(by_group.values())
    n = len(members)
    n_test = max(1, int(round(test_size * n))) if isinstance(test_size, float) else int(test_size)
    if not 0 < n_test < n:
        unit = "items" if groups is None else "groups"
        raise ValueError(f"{name}={test_size} leaves no train or no test {unit} out of {n}")
    train = [items[i] for group in members[: n - n_test] for i in group]
    return train, [items[group[0]] for group in members[n - n_test :]]
