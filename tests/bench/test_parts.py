"""Smoke test of the benchmark CLI: every part runs at its tiny --smoke sizes and writes a non-empty table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ("fused_loss", "cached_loss", "sampler", "gist", "training")


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks", *PARTS, "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    return out, process


def test_smoke_run_succeeds(smoke_results):
    _, process = smoke_results
    assert process.returncode == 0, f"stdout:\n{process.stdout[-4000:]}\nstderr:\n{process.stderr[-4000:]}"


@pytest.mark.parametrize("part", PARTS)
def test_smoke_part_writes_rows(smoke_results, part):
    out, process = smoke_results
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads((out / f"{part}.json").read_text())
    assert result["name"] == part and result["rows"], result
    table = (out / f"{part}.md").read_text()
    assert table.startswith("## ") and table.count("\n|") >= 3, table  # header, separator, at least one row


@pytest.mark.parametrize("part", ["fused_loss", "cached_loss"])
def test_smoke_loss_parts_match_stock(smoke_results, part):
    out, _ = smoke_results
    rows = json.loads((out / f"{part}.json").read_text())["rows"]
    backends = {row["backend"] for row in rows}
    assert {"stock", "torch"} <= backends and "triton" not in backends  # triton is never timed in the interpreter
    for row in rows:
        assert isinstance(row["time_ms"], float) and row["time_ms"] > 0 and row["peak_mb"] is not None
        if row["backend"] != "stock":
            assert row["loss_err"] < 1e-4 and row["grad_err"] < 1e-5, row
