"""A second judge the policy never trains against: logistic regression on a bag of words.

A policy trained against a reward model can learn what that model likes rather than what it was meant to
measure. A judge of a different kind (no transformer, no shared weights or tokenizer) trained on labelled
texts the reward model never saw is a check on that: text that fools the reward model without carrying the
label's meaning rarely fools both. Evaluation reports show the share of responses it judges positive.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from safetensors.torch import load_file, save_file

from sb3_rlhf.common.io import atomic_directory
from sb3_rlhf.common.quality import ngrams, words

CONFIG_FILE, WEIGHTS_FILE = "judge.json", "judge.safetensors"


def _features_of(text: str) -> set[str]:
    """The text's word unigrams and bigrams, as strings."""
    tokens = words(text)
    return set(tokens) | {" ".join(gram) for gram in ngrams(tokens, 2)}


class BagOfWordsJudge:
    """L2-regularised logistic regression on binary word-unigram and -bigram features.

    p(positive | text) = σ(w · x(text) + b), x(text) ∈ {0, 1}^V marks which vocabulary entries occur.
    Fitted by L-BFGS on ½‖w‖² + C Σ_i log(1 + exp(−y_i (w · x_i + b))) (scikit-learn's objective, ``C``).

    A text with no known feature (an empty or all-unknown response) gets p = σ(b), about ½: it counts as
    positive only when the training data had more positives.

    :param vocabulary: the feature names (unigrams and bigrams), in weight order.
    :param weight: ``(V,)`` float32.
    :param bias: b.
    :param metadata: saved with the judge (what it was trained on, its held-out accuracy).
    """

    def __init__(
        self, vocabulary: Sequence[str], weight: th.Tensor, bias: float, metadata: dict[str, Any] | None = None
    ) -> None:
        if len(vocabulary) != weight.numel():
            raise ValueError(f"{len(vocabulary)} vocabulary entries but {weight.numel()} weights")
        self.vocabulary = list(vocabulary)
        self.index = {name: i for i, name in enumerate(self.vocabulary)}
        self.weight = weight.detach().float().reshape(-1)
        self.bias = float(bias)
        self.metadata = dict(metadata or {})

    @classmethod
    def fit(
        cls,
        positives: Sequence[str],
        negatives: Sequence[str],
        max_features: int = 20_000,
        min_count: int = 2,
        C: float = 1.0,
        max_iter: int = 300,
    ) -> BagOfWordsJudge:
        """Fit on labelled texts (deterministic: no random state).

        :param max_features: keep the features that occur in the most texts (ties by name).
        :param min_count: ... and in at least this many texts.
        :param C: inverse regularisation strength.
        """
        if not positives or not negatives:
            raise ValueError(f"the judge needs texts of both labels, got {len(positives)} and {len(negatives)}")
        texts = [*positives, *negatives]
        document_frequency = Counter(feature for text in texts for feature in _features_of(text))
        kept = sorted(
            (f for f, n in document_frequency.items() if n >= min_count), key=lambda f: (-document_frequency[f], f)
        )
        judge = cls(kept[:max_features], th.zeros(min(len(kept), max_features)), 0.0)
        x = judge.features(texts, th.float64)
        y = th.cat([th.ones(len(positives)), -th.ones(len(negatives))]).double()
        w = th.zeros(x.shape[1], dtype=th.float64, requires_grad=True)
        b = th.zeros((), dtype=th.float64, requires_grad=True)
        optimizer = th.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def objective() -> th.Tensor:
            optimizer.zero_grad()
            margins = -y * (th.sparse.mm(x, w.unsqueeze(1)).squeeze(1) + b)
            loss = 0.5 * w.square().sum() + C * th.nn.functional.softplus(margins).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        return cls(judge.vocabulary, w.detach().float(), float(b.detach()))

    def features(self, texts: Sequence[str], dtype: th.dtype = th.float32) -> th.Tensor:
        """``(len(texts), V)`` sparse (COO), 1 where the feature occurs: a data set of 25,000 reviews and 20,000
        features would take gigabytes dense."""
        rows, columns = [], []
        for row, text in enumerate(texts):
            found = sorted(self.index[f] for f in _features_of(text) if f in self.index)
            rows += [row] * len(found)
            columns += found
        indices = th.tensor([rows, columns], dtype=th.long).reshape(2, -1)
        values = th.ones(indices.shape[1], dtype=dtype)
        shape = (len(texts), len(self.vocabulary))
        return th.sparse_coo_tensor(indices, values, shape, check_invariants=True).coalesce()

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """p(positive | text) for each text."""
        if not texts:
            return np.zeros(0)
        logits = th.sparse.mm(self.features(texts), self.weight.unsqueeze(1)).squeeze(1) + self.bias
        return th.sigmoid(logits).numpy()

    def positive_share(self, texts: Sequence[str]) -> float:
        """The share of ``texts`` judged positive (p > 0.5)."""
        return float(np.mean(self.probabilities(texts) > 0.5)) if texts else float("nan")

    def accuracy(self, positives: Sequence[str], negatives: Sequence[str]) -> float:
        correct = int((self.probabilities(positives) > 0.5).sum()) + int((self.probabilities(negatives) <= 0.5).sum())
        return correct / (len(positives) + len(negatives))

    def save(self, folder: str) -> None:
        """``judge.json`` (kind, vocabulary, bias) and ``judge.safetensors`` (the weights), written atomically."""
        with atomic_directory(folder) as tmp:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                config = {"kind": "bag_of_words", "bias": self.bias, "metadata": self.metadata}
                json.dump({**config, "vocabulary": self.vocabulary}, f)
            save_file({"weight": self.weight.contiguous()}, os.path.join(tmp, WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: str) -> BagOfWordsJudge:
        path = os.path.join(folder, CONFIG_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{folder} holds no judge ({CONFIG_FILE} missing): train one with a [judge] section"
            )
        with open(path) as f:
            config = json.load(f)
        if config.get("kind") != "bag_of_words":
            raise ValueError(f"{path}: unknown judge kind {config.get('kind')!r}")
        weights = os.path.join(folder, WEIGHTS_FILE)
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}: train the judge again")
        weight = load_file(weights)["weight"]
        if weight.numel() != len(config["vocabulary"]):
            raise ValueError(f"{folder}: {len(config['vocabulary'])} vocabulary entries but {weight.numel()} weights")
        return cls(config["vocabulary"], weight, config["bias"], config.get("metadata"))
