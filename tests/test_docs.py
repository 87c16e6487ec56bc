"""The documentation's references hold offline: every repository path the README and the site name exists (the
Sphinx build, ``make docs`` with warnings as errors, checks the links between pages), and the README stays a page
a newcomer reads in two minutes."""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: a path written in backticks, under one of the repository's folders
PATH = re.compile(r"`((?:benchmarks|examples|envs|tests|sb3_rlhf|docs)/[\w./*<>-]*[\w*])`")
#: named as what a run will write, not as something already there
NOT_YET = {"benchmarks/results/gpu.md"}
#: where ``make docs`` writes the site: named by the README before a fresh clone has built it
SITE = "docs/_build/html"


def documentation() -> list[str]:
    pages = glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    return [os.path.join(ROOT, "README.md"), *(p for p in pages if "_build" not in p)]


def named_paths(text: str) -> set[str]:
    # not a template (`<name>`) nor a Gymnasium id (`sb3_rlhf/TokenGeneration-v0`)
    return {path for path in PATH.findall(text) if "<" not in path and not re.search(r"-v\d+$", path)}


def test_every_repository_path_the_documentation_names_exists():
    missing = []
    for page in documentation():
        with open(page, encoding="utf-8") as f:
            for path in named_paths(f.read()) - NOT_YET:
                if path == SITE or path.startswith(SITE + "/"):
                    continue  # a build output: the test below checks that `make docs` writes there
                if not glob.glob(os.path.join(ROOT, path.rstrip("/"))):
                    missing.append(f"{os.path.relpath(page, ROOT)}: {path}")
    assert not missing, "the documentation names paths that do not exist: " + "; ".join(missing)
    assert not any(glob.glob(os.path.join(ROOT, path)) for path in NOT_YET), f"{NOT_YET} exist now: drop them here"


def test_make_docs_writes_the_site_where_the_documentation_says():
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    build = re.search(r"^\t\S*sphinx-build .* docs (\S+)$", makefile, re.M)
    assert build is not None and build.group(1) == SITE, "the Makefile's sphinx-build no longer writes to " + SITE


def test_the_path_check_sees_paths():
    """What the check above reads: backticked paths under the repository's folders, globs included."""
    text = (
        "see `benchmarks/results/kl_reward_frontier_*` and `examples/ppo_rule_reward.py`, not `runs/x`, `a/b` or "
        "`sb3_rlhf/TokenGeneration-v0`"
    )
    assert named_paths(text) == {"benchmarks/results/kl_reward_frontier_*", "examples/ppo_rule_reward.py"}


def test_the_readme_is_a_two_minute_read_that_points_into_the_docs():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert len(readme.splitlines()) < 200
    for needed in ("make main", "make test", "make docs", "model.learn(", "| trained |"):
        assert needed in readme
