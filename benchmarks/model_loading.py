"""Benchmark: the packaged SmolLM2 policy, first conversion (GGUF de-quantized into a cache) against reloads.

    python benchmarks/model_loading.py              # converts into a fresh temporary cache, then reloads 5 times

Writes ``benchmarks/results/model_loading.md``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

import torch as th
from transformers import AutoTokenizer
from versions import versions_line  # benchmarks/versions.py

from sb3_rlhf.common.models import CACHE_DIR_ENV, load_causal_lm, packaged_model_path

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "model_loading.md")


def main() -> int:
    th.set_num_threads(2)
    with tempfile.TemporaryDirectory() as cache:
        os.environ[CACHE_DIR_ENV] = cache
        start = time.perf_counter()
        path = packaged_model_path("SmolLM2-135M-Instruct")
        convert = time.perf_counter() - start
        reloads = []
        for _ in range(5):
            start = time.perf_counter()
            load_causal_lm(packaged_model_path("SmolLM2-135M-Instruct"))
            AutoTokenizer.from_pretrained(path)
            reloads.append(time.perf_counter() - start)
    lines = [
        "# Loading the packaged SmolLM2-135M-Instruct policy",
        "",
        "Command: `python benchmarks/model_loading.py`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, 2 torch threads.",
        f"Versions: {versions_line()}.",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| first use: GGUF de-quantized, rebuilt and saved to the cache | {convert:.1f} |",
        f"| reload from the cache (model + tokenizer), median of {len(reloads)} | {statistics.median(reloads):.2f} |",
        "",
    ]
    print("\n".join(lines))
    with open(RESULTS, "w") as f:
        f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
