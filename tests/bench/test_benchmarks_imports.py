"""The benchmarks' import graph: parsed from benchmarks/*.py with ``ast`` (nothing is imported), it has no cycle and
the parts import only the toolkit (``benchmarks.common``) and their own helper modules, never another part."""

from __future__ import annotations

from import_graph import ROOT, find_cycle, import_graph

PACKAGE = "benchmarks"
FOLDER = ROOT / PACKAGE
# modules a part may import besides the toolkit: the CLI's registry (imports the parts), the GPU-check summary, and
# the anchor adapters of the fused_loss and maxsim parts
NOT_PARTS = {"benchmarks", "benchmarks.__main__", "benchmarks.common", "benchmarks.summarize",
             "benchmarks.gpu_profile", "benchmarks.anchors", "benchmarks.maxsim_anchors"}  # fmt: skip


def test_benchmarks_have_no_import_cycle():
    assert find_cycle(import_graph(FOLDER, PACKAGE)) is None


def test_parts_import_only_the_toolkit():
    graph = import_graph(FOLDER, PACKAGE)
    parts = set(graph) - NOT_PARTS
    assert "benchmarks.fused_loss" in parts and "benchmarks.cached_loss" in parts
    crossings = {part: sorted(graph[part] & parts) for part in parts if graph[part] & parts}
    assert not crossings, f"parts importing other parts (move what they share to benchmarks.common): {crossings}"
