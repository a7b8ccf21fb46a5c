"""The GPU check script's CPU dry run (``benchmarks/gpu_check.sh --smoke``), its summary, and the per-part budget.

The dry run runs every step of the real check at the parts' --smoke sizes, so a broken step, a renamed flag or a
summary that no longer reads the parts' results fails here rather than in a session's 15 GPU minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks import summarize
from benchmarks.common import CaseBudget

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = (
    "machine",
    "wheels",
    "build",
    "native_info",
    "fused",
    "gpu_tests",
    "training",
    "cached",
    "gist",
    "maxsim",
    "sampler",
)
BENCH_STEPS = {
    "fused": "fused_loss",
    "training": "training",
    "cached": "cached_loss",
    "gist": "gist",
    "maxsim": "maxsim",
    "sampler": "sampler",
}


def run_check(out: Path, work: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(work)}
    return subprocess.run(
        ["bash", str(SCRIPT), "--smoke", *args, str(out)], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    root = tmp_path_factory.mktemp("gpu_check")
    process = run_check(root / "out", root / "work")
    return root / "out", root / "work", process


def test_dry_run_passes_every_step(dry_run):
    out, _, process = dry_run
    assert process.returncode == 0, process.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    verdicts = {step["step"]: step["verdict"] for step in summary["steps"]}
    assert list(verdicts) == list(STEPS), verdicts
    skipped = {name for name, verdict in verdicts.items() if verdict.startswith("SKIP")}
    assert skipped == {"wheels", "build"}, verdicts  # the smoke run uses the installed st_fast and packages
    failed = {name: verdict for name, verdict in verdicts.items() if verdict not in ("PASS",) and name not in skipped}
    assert not failed, (failed, process.stdout[-6000:])


def test_dry_run_returns_three_files_that_hold_every_part(dry_run):
    out, _, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["details.tar.gz", "summary.json", "summary.md"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "smoke" and summary["budget_s"] == 500
    markdown = (out / "summary.md").read_text()
    for step, part in BENCH_STEPS.items():
        assert summary["parts"].get(part), f"no rows of {part} (step {step})"
        assert f"## {part}\n" in markdown
    assert "time (ms, median)" in markdown  # the loss parts' pivot
    with tarfile.open(out / "details.tar.gz") as archive:
        names = set(archive.getnames())
    assert {f"logs/{step}.log" for step in STEPS if step not in ("wheels", "build")} <= names
    assert {f"bench/{part}.json" for part in BENCH_STEPS.values()} <= names and "junit_gpu.xml" in names


def test_dry_run_gpu_tests_are_collected_and_skipped_on_cpu(dry_run):
    out, _, _ = dry_run
    tests = json.loads((out / "summary.json").read_text())["gpu_tests"]
    assert tests["tests"] > 0 and tests["failures"] == tests["errors"] == 0, tests
    assert tests["skipped"] == tests["tests"], tests  # no CUDA here: every gpu test skips, none is deselected


def test_bad_budget_is_a_clear_error(tmp_path):
    process = run_check(tmp_path / "out", tmp_path / "work", "--budget", "ten")
    assert process.returncode == 2 and "--budget must be a whole number of seconds" in process.stderr


def test_small_budget_skips_the_later_steps_and_still_summarizes(tmp_path):
    start = time.perf_counter()
    process = run_check(tmp_path / "out", tmp_path / "work", "--budget", "60")
    assert process.returncode == 0, process.stderr[-4000:]
    assert time.perf_counter() - start < 60 + 40  # the budget plus the summary and the step in flight's kill grace
    verdicts = {s["step"]: s["verdict"] for s in json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]}
    assert verdicts["sampler"].startswith("SKIP (under 15 s"), verdicts  # 15 s scaled by 60/500 is under 15 s


# ----------------------------------------------------------------------------------------------------------------
# summarize: the pivot of a loss part and the JUnit counts, on made-up results
# ----------------------------------------------------------------------------------------------------------------


def test_pivot_puts_one_case_per_row_and_one_implementation_per_column():
    rows = [
        {"backend": "stock", "B": 64, "D": 32, "dtype": "fp32", "time_ms": 2.0},
        {"backend": "native", "B": 64, "D": 32, "dtype": "fp32", "time_ms": 0.5},
        {"backend": "stock", "B": 128, "D": 32, "dtype": "fp32", "time_ms": "OOM"},
        {"backend": "inf_cl", "B": 128, "D": 32, "dtype": "fp32", "time_ms": None, "note": "needs CUDA"},
    ]
    table = summarize.pivot(rows, "time_ms").splitlines()
    assert table[0] == "| B | D | dtype | stock | native | inf_cl |"
    assert table[2] == "| 64 | 32 | fp32 | 2 | 0.5 |  |"
    assert table[3] == "| 128 | 32 | fp32 | OOM |  | needs CUDA |"
    assert summarize.pivot([{"trainer": "stock", "batch": 8}], "time_ms") is None


def test_junit_counts_and_failed_ids(tmp_path):
    (tmp_path / "junit_gpu.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad"><failure/></testcase>'
        '<testcase classname="tests.a" name="skip"><skipped/></testcase><testcase classname="tests.b" name="ok"/>'
        "</testsuite></testsuites>"
    )
    counts = summarize.read_junit(str(tmp_path))
    assert counts == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1, "passed": 2, "failed": ["tests.a::bad"]}


# ----------------------------------------------------------------------------------------------------------------
# CaseBudget: smallest cases first, the largest dropped
# ----------------------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_case_budget_predicts_from_the_last_case_and_drops_what_does_not_fit(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("benchmarks.common.time.perf_counter", clock)
    budget = CaseBudget(10.0)
    admitted = []
    for cost in (1, 2, 4, 8, 16):  # each case takes `cost` seconds
        if budget.admit(cost):
            clock.now += cost
            budget.done(cost)
            admitted.append(cost)
    # after 1 + 2 = 3 s, the case of cost 4 is predicted at 2 · 4/2 = 4 s: fits (7 left); then 8 s with 3 s left: not
    assert admitted == [1, 2, 4]
    assert CaseBudget(None).admit(1e9) and CaseBudget(None).time_left() == float("inf")
