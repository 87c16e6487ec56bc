"""The package versions a benchmark ran with, as one line for its results file.

Every script here that writes under ``benchmarks/results/`` puts ``versions_line()`` in it, so that a figure names
the set it was measured with (``make install`` installs the pinned set of ``constraints.txt``).
"""

from __future__ import annotations

import importlib.metadata
import platform

# what decides the numbers: the numerics (torch, transformers, tokenizers, peft), the RL side, the data stack
PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "peft",
    "accelerate",
    "stable-baselines3",
    "sb3-contrib",
    "gymnasium",
    "numpy",
    "safetensors",
    "sb3-rlhf",
)


def versions_line(packages: tuple[str, ...] = PACKAGES) -> str:
    """One line naming Python and the installed version of each package, e.g.
    ``"python 3.11.7, torch 2.13.0+cpu, transformers 5.23.0, ..."``; a package that is not installed is left out.

    :param packages: distribution names, in the order to list them.
    :return: the comma-separated line, without a trailing period.
    """
    parts = [f"python {platform.python_version()}"]
    for name in packages:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


if __name__ == "__main__":
    print(versions_line())
