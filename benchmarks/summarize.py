"""One summary of a ``benchmarks/gpu_check.sh`` run: ``summary.md`` and ``summary.json`` from its working folder.

    python -m benchmarks.summarize WORK OUT [--budget S] [--elapsed S] [--mode gpu|smoke]

``WORK`` holds what the check's steps wrote: ``status.tsv`` (step, verdict, seconds), ``logs/<step>.log``,
``bench/<part>.json`` (rows from ``benchmarks.common.report``) and ``junit_gpu.xml``. The Markdown gives the machine,
the steps, for the loss parts a pivot per case (one column per implementation) of time, peak memory and error
against the reference, then every part's full table; the JSON holds the same as data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import xml.etree.ElementTree as ElementTree
from typing import Any

from benchmarks.common import format_table

# parts in the order the summary shows them, with the check's step name
PARTS = (("fused", "fused_loss"), ("training", "training"), ("cached", "cached_loss"), ("gist", "gist"),
         ("maxsim", "maxsim"), ("sampler", "sampler"))  # fmt: skip
# pivots of the loss parts: (case columns, implementation column, value columns)
CASE_KEYS = ("B", "k", "D", "dtype", "stage")
IMPL_KEYS = ("backend",)
PIVOT_VALUES = (
    ("time_ms", "time (ms, median)"),
    ("peak_mb", "peak memory (MiB)"),
    ("floor_fraction", "fraction of the 8·B·N·D floor at the same run's matmul rate"),
    ("grad_rel_err", "gradient error vs the float64 reference (max |g - g_ref| / max |g_ref|)"),
)


def read_steps(work: str) -> list[dict[str, Any]]:
    steps = []
    path = os.path.join(work, "status.tsv")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                name, verdict, seconds = (line.rstrip("\n").split("\t") + ["", ""])[:3]
                if name:
                    steps.append({"step": name, "verdict": verdict, "seconds": int(seconds or 0)})
    return steps


def read_log(work: str, step: str, limit: int = 4000) -> str:
    path = os.path.join(work, "logs", f"{step}.log")
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f.read()[-limit:]


def read_parts(work: str) -> dict[str, list[dict[str, Any]]]:
    parts = {}
    for _, part in PARTS:
        path = os.path.join(work, "bench", f"{part}.json")
        if os.path.exists(path):
            with open(path) as f:
                parts[part] = json.load(f).get("rows", [])
    return parts


def read_junit(work: str) -> dict[str, Any]:
    """Counts of the GPU tests' JUnit report and the ids of those that failed or errored."""
    path = os.path.join(work, "junit_gpu.xml")
    if not os.path.exists(path):
        return {"report": "missing"}
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


def pivot(rows: list[dict[str, Any]], value: str) -> str | None:
    """Markdown table with one row per case and one column per implementation holding ``value`` (or the row's
    note / OOM marker when it has none); None when the rows are not a loss part's."""
    impl_key = next((k for k in IMPL_KEYS if rows and k in rows[0]), None)
    case_keys = [k for k in CASE_KEYS if rows and k in rows[0]]
    if impl_key is None or not case_keys or not any(value in row for row in rows):
        return None
    implementations: list[str] = []
    cases: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        name = str(row.get(impl_key))
        if name not in implementations:
            implementations.append(name)
        case = tuple(row.get(k) for k in case_keys)
        cell = row.get(value)
        if not isinstance(cell, (int, float)):
            cell = cell or row.get("note") or row.get("time_ms") or ""
        cases.setdefault(case, dict(zip(case_keys, case, strict=True)))[name] = cell
    return format_table(list(cases.values()))


def render(summary: dict[str, Any]) -> str:
    lines = [f"# st_fast GPU check — {summary['machine']} ({summary['date']})", ""]
    lines += [f"mode `{summary['mode']}`, budget {summary['budget_s']} s, elapsed {summary['elapsed_s']} s", ""]
    lines += ["## Steps", "", format_table(summary["steps"]), ""]
    if summary["machine_log"]:
        lines += ["## Machine", "", "```", summary["machine_log"].strip(), "```", ""]
    for step, part in PARTS:
        rows = summary["parts"].get(part)
        if not rows:
            verdict = next((s["verdict"] for s in summary["steps"] if s["step"] == step), "not run")
            lines += [f"## {part}: no rows ({verdict}; logs/{step}.log in details.tar.gz)", ""]
            continue
        lines += [f"## {part}", ""]
        for value, title in PIVOT_VALUES:
            table = pivot(rows, value)
            if table is not None:
                lines += [f"### {part}: {title}", "", table, ""]
        lines += [f"### {part}: every row", "", format_table(rows), ""]
    tests = summary["gpu_tests"]
    lines += ["## GPU tests", ""]
    if tests.get("report") == "missing":
        lines += ["no JUnit report (see logs/gpu_tests.log)", ""]
    else:
        counts = ", ".join(f"{tests[k]} {k}" for k in ("passed", "failures", "errors", "skipped"))
        lines += [counts, ""] + [f"- FAILED {name}" for name in tests["failed"]] + [""]
    return "\n".join(lines)


def summarize(work: str, out: str, *, budget: int | None, elapsed: int | None, mode: str) -> dict[str, Any]:
    machine_log = read_log(work, "machine")
    gpu_line = next((line for line in machine_log.splitlines() if "torch" in line and "." in line), "")
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": gpu_line.strip() or "unknown machine",
        "mode": mode,
        "budget_s": budget,
        "elapsed_s": elapsed,
        "machine_log": machine_log,
        "native_info": read_log(work, "native_info"),
        "steps": read_steps(work),
        "parts": read_parts(work),
        "gpu_tests": read_junit(work),
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(render(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summarize", description=__doc__)
    parser.add_argument("work")
    parser.add_argument("out")
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--elapsed", type=int, default=None)
    parser.add_argument("--mode", default="gpu")
    args = parser.parse_args(argv)
    summarize(args.work, args.out, budget=args.budget, elapsed=args.elapsed, mode=args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
