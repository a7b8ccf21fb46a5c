"""Smoke test of the ``maxsim`` benchmark part: both stages run at the --smoke sizes, stock first, and st_fast's rows
match stock's loss and gradients (the part's error columns)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers.multi_vector_encoder.losses")

REPO = Path(__file__).resolve().parents[2]


def test_maxsim_part_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks", "maxsim", "--smoke", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, f"stdout:\n{process.stdout[-4000:]}\nstderr:\n{process.stderr[-4000:]}"
    result = json.loads((tmp_path / "maxsim.json").read_text())
    rows = result["rows"]
    assert result["name"] == "maxsim" and {(row["stage"], row["backend"]) for row in rows} >= {
        ("loss", "stock"),
        ("loss", "torch"),
        ("cached", "stock"),
        ("cached", "torch"),
    }
    assert "triton" not in {row["backend"] for row in rows}  # never timed in the interpreter
    for row in rows:
        assert isinstance(row["time_ms"], float) and row["time_ms"] > 0 and row["peak_mb"] is not None
        assert row["gemm_ms"] > 0
        if row["backend"] != "stock":
            assert row["loss_err"] < 1e-5 and row["grad_err"] < 1e-6, row
    assert (tmp_path / "maxsim.md").read_text().startswith("## ")


def test_maxsim_training_part_smoke(tmp_path):
    """The end-to-end part at --smoke sizes (the real all-MiniLM-L6-v2 as a MultiVectorEncoder,
    one step of 4 rows, the cached loss): both trainers train, and st_fast's step losses equal stock's."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    command = [sys.executable, "-m", "benchmarks", "maxsim_training", "--smoke", "--mvtrain-losses", "cached",
               "--mvtrain-steps", "1", "--out", str(tmp_path)]  # fmt: skip
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, f"stdout:\n{process.stdout[-4000:]}\nstderr:\n{process.stderr[-4000:]}"
    rows = json.loads((tmp_path / "maxsim_training.json").read_text())["rows"]
    assert [(row["loss"], row["trainer"]) for row in rows] == [("cached", "stock"), ("cached", "st_fast")]
    for row in rows:
        assert row["samples_per_s"] > 0 and row["peak_mb"] > 0 and len(row["losses"].split()) == 1
    assert rows[1]["max_loss_abs_diff"] < 1e-4, rows
