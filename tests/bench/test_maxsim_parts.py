"""Smoke test of the ``maxsim`` benchmark part: its three stages run at the --smoke sizes, stock first, st_fast's rows
match stock's scores, loss and gradients (the part's error columns), and each public MaxSim kernel has a row: timed
with its score error, or with the reason it cannot run here (CI installs none of them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.maxsim_anchors import ANCHOR_NAMES

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
    stages = {(row["stage"], row["backend"]) for row in rows}
    assert result["name"] == "maxsim" and stages >= {(stage, backend) for stage in ("scores", "loss", "cached")
                                                     for backend in ("stock", "torch")}  # fmt: skip
    assert [row["stage"] for row in rows][0] == "scores"
    assert {("scores", name) for name in ANCHOR_NAMES} <= stages and {("loss", name) for name in ANCHOR_NAMES} <= stages
    assert "triton" not in {row["backend"] for row in rows}  # never timed in the interpreter
    for row in rows:
        assert row["gemm_ms"] > 0 and row["impl"] in ("stock", "st_fast", "anchor"), row
        if row["impl"] == "anchor":
            assert row["math"].startswith("same") and row["note"], row
            if row["time_ms"] is None:  # an anchor that cannot run here says why
                continue
        assert isinstance(row["time_ms"], float) and row["time_ms"] > 0 and row["peak_mb"] is not None, row
        if row["backend"] == "stock":
            continue
        if row["stage"] == "scores":
            limit = 1e-5 if row["impl"] == "st_fast" or row["backend"] == "fast_maxsim" else 6 * 2.0**-10
            assert row["score_err"] < limit and row["loss_err"] is None, row
        else:
            assert row["loss_err"] < 1e-5 and row["grad_err"] < 1e-6 and row["score_err"] is None, row
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
