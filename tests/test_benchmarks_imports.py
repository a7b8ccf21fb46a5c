"""The benchmarks' import graph: parsed from benchmarks/*.py with ``ast`` (nothing is imported), it has no cycle and
the parts import only the toolkit (``benchmarks.common``) and their own helper modules, never another part."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "benchmarks"
FOLDER = Path(__file__).resolve().parents[1] / PACKAGE
# modules a part may import besides the toolkit: the CLI's registry (imports the parts), the GPU-check summary, and
# the anchor adapters of the fused_loss part
NOT_PARTS = {"benchmarks.__init__", "benchmarks.__main__", "benchmarks.common", "benchmarks.summarize",
             "benchmarks.gpu_profile", "benchmarks.anchors"}  # fmt: skip


def import_graph(folder: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports (at any depth in the file, lazy imports included)."""
    modules = {f"{package}.{path.stem}" for path in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[f"{package}.{path.stem}"] = targets & modules
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_benchmarks_have_no_import_cycle():
    assert find_cycle(import_graph(FOLDER, PACKAGE)) is None


def test_parts_import_only_the_toolkit():
    graph = import_graph(FOLDER, PACKAGE)
    parts = set(graph) - NOT_PARTS
    assert "benchmarks.fused_loss" in parts and "benchmarks.cached_loss" in parts
    crossings = {part: sorted(graph[part] & parts) for part in parts if graph[part] & parts}
    assert not crossings, f"parts importing other parts (move what they share to benchmarks.common): {crossings}"
