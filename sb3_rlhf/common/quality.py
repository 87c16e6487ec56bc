"""Text-quality measures of a policy's responses, beside the score it is trained on: a policy that games its
reward model tends to repeat itself and to shrink its vocabulary, which these show.

- distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"): the
  number of distinct word n-grams over all responses divided by their total number of n-grams (the common
  variant; Li et al. divide by the number of words, the same for n = 1);
- repeated-n-gram rate (seq-rep-n, Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training"):
  per response, 1 − distinct / total of its word n-grams, averaged over the responses that have any (a response
  shorter than n words is left out, not counted as 0). Welleck et al. use token 4-grams over long
  continuations; word bigrams suit responses of a few words.

Words are lower-cased runs of letters, digits and apostrophes, and single punctuation marks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"[\w']+|[^\w\s]")


def words(text: str) -> list[str]:
    """The words of ``text``, lower-cased (punctuation marks count as words)."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all ``texts`` / all their n-grams (0 when there is none)."""
    grams = [gram for text in texts for gram in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_rate(texts: Sequence[str], n: int = 2) -> float:
    """Mean over the responses with at least one word n-gram of 1 − distinct / total n-grams of that response:
    0 when no response repeats itself, near 1 for a response that loops."""
    rates = []
    for text in texts:
        grams = ngrams(words(text), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0


def text_quality(texts: Sequence[str]) -> dict[str, float]:
    """``distinct_1``, ``distinct_2`` and ``repeated_2gram_rate`` of the responses ``texts``."""
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_2gram_rate": repeated_ngram_rate(texts, 2),
    }
