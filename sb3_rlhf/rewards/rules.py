"""Rule rewards for smoke tests and examples, importable by task files as ``module:function``."""

from __future__ import annotations


def share_of_good(prompts: list[str], completions: list[str]) -> list[float]:
    """The share of the completion's words that are "good" (0 for an empty completion)."""
    return [c.split().count("good") / max(1, len(c.split())) for c in completions]
