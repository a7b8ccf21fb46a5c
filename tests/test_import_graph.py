"""No import cycle among st_fast's modules (:mod:`import_graph`: every import, module level or in a function, and
``importlib.import_module`` literals, read with ``ast``), and the graph reader itself."""

from __future__ import annotations

from import_graph import ROOT, find_cycle, import_graph


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_reads_every_kind_of_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg import a\n")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("import importlib\nimportlib.import_module('pkg.c')\n")
    (package / "c.py").write_text("import pkg.a\nimport os\n")
    graph = import_graph(package, "pkg")
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub", "pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
    }  # the package itself is no edge of its modules
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_st_fast_has_no_import_cycle():
    graph = import_graph(ROOT / "st_fast", "st_fast")
    assert "st_fast.swaps" in graph and "st_fast.report" in graph["st_fast.swaps"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
