"""The package's layering, read from the source: ``common/`` never imports upwards, and no import cycle exists.

Every ``import`` of an ``sb3_rlhf`` module counts, at module level or inside a function (a lazy import that
only hides a cycle is still a cycle). Imports under ``if TYPE_CHECKING:`` do not run, so they make no cycle,
but ``common/`` may not name an upper module even there.
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

import sb3_rlhf
from sb3_rlhf.algorithms import ALGORITHM_NAMES, ONLINE_ALGORITHMS, accepted_arguments, algorithm_class
from sb3_rlhf.common.on_policy_algorithm import RLHFOnPolicyAlgorithm
from sb3_rlhf.reward_modeling import RewardModelTrainer
from sb3_rlhf.sft import SFTTrainer

PACKAGE = pathlib.Path(sb3_rlhf.__file__).parent
#: what ``common/`` may not import: the algorithms and trainers, the task runner, the CLI
ABOVE_COMMON = ("ppo", "grpo", "rloo", "p3o", "nlpo", "dpo", "sft", "reward_modeling", "algorithms", "tasks", "cli")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, source: str | None = None, type_checking: bool = False) -> set[str]:
    """The sb3_rlhf modules that ``module`` imports when it runs (with ``type_checking``: also those it imports
    for annotations only).

    :param source: the module's text (default: its file).
    """
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from package import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def _is_above_common(module: str) -> bool:
    # the package itself counts: sb3_rlhf/__init__ imports every algorithm
    return module == "sb3_rlhf" or module.split(".")[1] in ABOVE_COMMON


def test_the_graph_sees_imports():
    # the checks below are only as good as the graph: it must see module-level, function-level and relative imports
    assert "sb3_rlhf.common.on_policy_algorithm" in GRAPH["sb3_rlhf.ppo.ppo"]
    assert "sb3_rlhf.buffers" in GRAPH["sb3_rlhf.common.on_policy_algorithm"]
    assert GRAPH["sb3_rlhf"] >= {"sb3_rlhf.ppo", "sb3_rlhf.grpo"}
    assert "sb3_rlhf.algorithms" in GRAPH["sb3_rlhf.tasks.config"]  # imported inside a function
    assert "sb3_rlhf.common.on_policy_algorithm" not in GRAPH["sb3_rlhf.common.checkpoints"]  # TYPE_CHECKING only
    assert "sb3_rlhf.common.on_policy_algorithm" in _imports("sb3_rlhf.common.checkpoints", type_checking=True)
    planted = "def f():\n    from ..ppo import ppo\n    from .. import tasks\n    import sb3_rlhf.cli\n"
    assert _imports("sb3_rlhf.common.io", planted) >= {
        "sb3_rlhf.ppo",
        "sb3_rlhf.ppo.ppo",
        "sb3_rlhf.tasks",
        "sb3_rlhf.cli",
    }
    assert all(_is_above_common(m) for m in ("sb3_rlhf", "sb3_rlhf.ppo.ppo", "sb3_rlhf.cli", "sb3_rlhf.tasks.run"))
    assert not any(_is_above_common(m) for m in ("sb3_rlhf.common.io", "sb3_rlhf.policies", "sb3_rlhf.buffers"))


def test_common_never_imports_upwards():
    upward = {
        (module, target)
        for module in MODULES
        if module.startswith("sb3_rlhf.common")
        for target in _imports(module, type_checking=True)
        if _is_above_common(target)
    }
    assert not upward, f"modules under common/ import from above it: {sorted(upward)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (depth-first search; the first back edge closes it), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]  # it finds one
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    cycle = find_cycle(GRAPH)
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"


@pytest.mark.parametrize("cls", [*(algorithm_class(n) for n in ALGORITHM_NAMES), SFTTrainer, RewardModelTrainer])
def test_algorithms_and_trainers_declare_their_arguments(cls):
    # what a task file may set is read off the signature: an argument hidden in **kwargs could not be set
    parameters = inspect.signature(cls).parameters.values()
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters), (
        f"{cls.__name__} takes *args/**kwargs"
    )
    assert {"learning_rate", "batch_size", "n_epochs", "seed", "max_grad_norm"} <= accepted_arguments(cls)


@pytest.mark.parametrize("name", list(ONLINE_ALGORITHMS))
def test_online_algorithms_are_siblings_on_one_base(name):
    cls = ONLINE_ALGORITHMS[name]
    assert issubclass(cls, RLHFOnPolicyAlgorithm)
    assert {"n_episodes", "clip_range", "target_kl", "max_batch_tokens"} <= accepted_arguments(cls)
    if name == "nlpo":
        # PPO on a masked action space: the GAE family, PPO's own settings
        assert cls.__mro__[1] is ONLINE_ALGORITHMS["ppo"]
    elif name != "ppo":
        # the critic-free family neither takes nor pins GAE or value-loss settings
        assert cls.__mro__[1] is RLHFOnPolicyAlgorithm
        assert not {"gamma", "gae_lambda", "vf_coef", "clip_range_vf"} & accepted_arguments(cls)
