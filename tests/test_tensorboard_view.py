"""TensorBoard as a person sees it: benchmarks/tensorboard_check.py trains a tiny run, serves it with
``tensorboard --logdir`` on 127.0.0.1 and screenshots the scalars and text dashboards in headless Chromium.
Skips where no Chromium is installed (Debian: ``apt-get install chromium``), except where
``SB3_RLHF_REQUIRE_CHROMIUM=1`` (``.ci/run`` sets it after installing Chromium): there a missing browser fails."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "tensorboard_check.py")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str | None:
    for name in [os.environ.get("CHROMIUM", ""), *CHROMIUM_NAMES]:
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def assert_rendered_png(path, min_bytes: int = 20_000) -> None:
    """A real screenshot: a PNG of the window's size, not one flat colour (a blank or error page)."""
    assert os.path.getsize(path) > min_bytes, f"{path} is only {os.path.getsize(path)} bytes"
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] >= 800 and image.size[1] >= 600, image.size
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, f"{path} is nearly uniform (std {pixels.std():.1f}): TensorBoard did not render"
    # a rendered dashboard has many grey levels (text, lines, the orange bar), not a two-colour error message
    assert len(np.unique(pixels)) > 32


@pytest.mark.slow
@pytest.mark.skipif(
    chromium() is None and os.environ.get("SB3_RLHF_REQUIRE_CHROMIUM") != "1",
    reason="no Chromium on PATH (Debian: apt-get install chromium)",
)
def test_tensorboard_dashboards_render_the_curves_and_the_sample_table(tmp_path):
    assert chromium() is not None, "CI must see the dashboards: install Chromium first (.ci/run does)"
    result = subprocess.run(
        [sys.executable, SCRIPT, "--out", str(tmp_path), "--chromium", chromium()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "tensorboard_check.json").read_text())
    # what TensorBoard's HTTP data API served (/data/plugin/scalars/tags, /data/plugin/text/tags)
    assert {
        "rollout/ep_rew_mean",
        "rollout/ep_len_mean",
        "rlhf/kl",
        "rlhf/kl_coef",
        "rlhf/scores",
        "train/approx_kl",
        "train/value_loss",
    } <= set(summary["scalar_tags"])
    assert "rlhf/samples/text_summary" in summary["text_tags"]
    assert summary["missing"] == []
    assert "transformers " in summary["versions"] and "torch " in summary["versions"]
    for name in ("tensorboard_scalars.png", "tensorboard_text.png"):
        assert_rendered_png(tmp_path / name)
