"""The project's own import graph: no cycles anywhere, not even between folders, and the layers point one way
(app → avatars → ispa).

Every import counts, function-local ones too (a shim inside a function is still a cycle a reader must hold in mind).
Folders count as a whole: `a/x.py → b/y.py` and `b/z.py → a/w.py` make no cycle of modules, yet a reader of either folder must hold the other in mind, so two sibling folders import one way only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ispa", "avatars", "app")
# What each layer may import from the project (itself included).
ALLOWED = {"ispa": {"ispa"}, "avatars": {"ispa", "avatars"}, "app": {"ispa", "avatars", "app"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an import refers to (`a.b.c` may name a module or an object in `a.b`)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            target = resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def folder_graph(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The imports between sibling folders: `p.x.m → p.y.n` counts as `p.x → p.y` when `p.x` and `p.y` are both
    folders (packages), whatever lies below them; imports within one folder, or to or from a plain module, drop out."""
    names = set(edges).union(*edges.values())
    folders = {".".join(name.split(".")[:depth]) for name in names for depth in range(1, name.count(".") + 1)}
    between: dict[str, set[str]] = {}
    for source, targets in edges.items():
        for target in targets:
            a, b = source.split("."), target.split(".")
            shared = 0
            while shared < min(len(a), len(b)) and a[shared] == b[shared]:
                shared += 1
            if shared == min(len(a), len(b)):
                continue  # one is the other's package: no siblings
            a_folder, b_folder = ".".join(a[: shared + 1]), ".".join(b[: shared + 1])
            if a_folder in folders and b_folder in folders:
                between.setdefault(a_folder, set()).add(b_folder)
    return between


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_folder_graph_joins_sibling_folders_only() -> None:
    edges = {
        "p.dit.attention": {"p.weights.fp8", "p.dit.layers", "p.config"},  # config: a module, not a folder
        "p.weights.loader": {"p.dit"},  # a folder's own package module stands for the folder
        "p.loading": {"p.dit.model.blocks", "p.weights.loader"},
        "p.dit.model.blocks": {"p.dit.attention", "p.dit.kernels.rope"},  # attention: a module
    }
    folders = folder_graph(edges)
    assert folders == {"p.dit": {"p.weights"}, "p.weights": {"p.dit"}, "p.dit.model": {"p.dit.kernels"}}
    assert find_cycle(folders) == ["p.dit", "p.weights", "p.dit"]
    # the same modules with the shared code moved to a module below both folders: no cycle left
    assert (
        find_cycle(folder_graph({"p.dit.attention": {"p.fp8"}, "p.weights.fp8": {"p.fp8", "p.dit"}})) is None
    )


def test_function_local_and_relative_imports_are_seen(tmp_path: Path) -> None:
    """The kind of shim this test exists to catch: an import inside a function."""
    source = tmp_path / "shim.py"
    source.write_text(
        "def load():\n    from avatars.liveavatar.loading import load_pipeline\n    from . import cache\n"
    )
    found = imports_of("ispa.shim", source, project_modules())
    assert found == {"avatars.liveavatar.loading", "ispa", "ispa.cache"}


def test_no_import_cycle_in_the_project() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " → ".join(cycle)


def test_no_import_cycle_between_sibling_folders() -> None:
    cycle = find_cycle(folder_graph(graph()))
    assert cycle is None, "folders import each other: " + " → ".join(cycle)


@pytest.mark.parametrize("layer", PACKAGES)
def test_layers_import_only_downwards(layer: str) -> None:
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph().items()
        if module.split(".")[0] == layer
        for target in targets
        if target.split(".")[0] not in ALLOWED[layer]
    )
    assert not wrong, wrong


def test_the_app_knows_a_backend_only_through_the_protocol() -> None:
    """`app/` imports no backend internals (the pipeline of ranks, the memory plan, the pipeline class) but at
    the torchrun entry point, which builds the backend it serves."""
    internals = (
        "avatars.liveavatar.distributed",
        "avatars.liveavatar.memory_plan",
        "avatars.liveavatar.pipeline",
    )
    reached = {
        (module, target)
        for module, targets in graph().items()
        if module.startswith("app") and module != "app.serve_on_ranks"
        for target in targets
        if target.startswith(internals)
    }
    assert reached == set()
