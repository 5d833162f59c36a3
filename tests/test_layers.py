"""The package's layering, read from the source: every ``train`` import (at module level and inside functions) points
to the importer's own layer or a lower one, no task imports another task, and the import graph has no cycles."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "train"
# lowest first; a module belongs to the longest prefix that names it and may import its own layer or lower ones
LAYERS = (
    ("train", "train.errors", "train.utils", "train.extras", "train.configs", "train.weights"),  # no train imports
    ("train.runs", "train.metrics", "train.optim", "train.utils.console"),
    ("train.data", "train.models"),
    ("train.predictions", "train.calibration", "train.export"),
    ("train.tiers", "train.config_checks"),  # a tier's folder, train/tiers/<name>/, and what tiers share
    ("train.tasks.registry",),
    ("train.tasks",),
    ("train.tasks.pipeline", "train.__main__", "train.bench", "train.analysis", "train.hydra_plugins"),
)


def module_files() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the ``train`` modules it imports anywhere in its file."""
    modules = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "train"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.split(".")[0] == "train":
                    found |= {resolve(f"{base}.{a.name}") for a in node.names}
        graph[name] = found - {None, name}
    return graph


def layer(module: str) -> int:
    matches = [(len(prefix), i) for i, group in enumerate(LAYERS) for prefix in group
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        pytest.fail(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return max(matches)[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_imports_point_down_the_layers_and_no_task_imports_another():
    graph = import_graph()
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(sorted(upward))
    task = lambda m: layer(m) == LAYERS.index(("train.tasks",)) and m != "train.tasks"  # noqa: E731
    across = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if task(a) and task(b)]
    assert not across, "tasks importing tasks (shared code belongs in train/tiers or below):\n" + "\n".join(across)


def tier_folder(module: str) -> str | None:
    """The tier folder (``train/tiers/<name>/``) that holds ``module``, if any."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["train", "tiers"] and len(parts) > 2 and (ROOT / "tiers" / parts[2]).is_dir() \
        else None


def test_no_tier_folder_imports_another():
    """A tier is one folder: it reads shared code (train/tiers/*.py and below), never another tier's folder."""
    graph = import_graph()
    assert {tier_folder(m) for m in graph} >= {None, "stage1", "apt", "draft", "difficulty", "prm", "fusion"}
    across = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if tier_folder(a) and tier_folder(b) and tier_folder(a) != tier_folder(b)]
    assert not across, "tier folders importing each other:\n" + "\n".join(sorted(across))


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_the_check_sees_imports_inside_functions_and_finds_a_cycle():
    """The checker itself: a function-level import counts, and a two-module loop is reported."""
    graph = import_graph()
    assert "train.tasks.registry" in graph["train.tasks.pipeline"]
    assert "train.tiers.stage1" in graph["train.tasks.export"]  # imported inside from_checkpoint
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
