"""Sphinx configuration: the guides in Markdown (MyST), the API reference from the docstrings (autodoc and
autosummary, Sphinx ``:param:`` fields as SB3 writes them), Read the Docs' theme as SB3's site. Built by
``make docs`` with warnings as errors; nothing here needs the network."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
import sb3_rlhf  # noqa: E402

project = "sb3_rlhf"
author = "the sb3_rlhf developers"
copyright = "2026, the sb3_rlhf developers"
release = version = sb3_rlhf.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
templates_path = ["_templates"]

# Markdown: ::: fences, and the headings' anchors for links such as guide/tasks.md#resume; equations are written
# in Unicode, as in the code, so that the pages read the same offline (MathJax would load from the network)
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# the API reference: one page per module, members in source order, signatures with their type hints
autosummary_generate = True
autodoc_default_options = {"members": True, "member-order": "bysource", "show-inheritance": True}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
autodoc_preserve_defaults = True

html_theme = "sphinx_rtd_theme"
html_title = f"sb3_rlhf {release}"
html_static_path: list[str] = []
