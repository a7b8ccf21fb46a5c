"""``python -m benchmarks fused_loss --anchors`` on CPU: the float64 reference against stock sentence-transformers,
each public anchor against the reference where it runs here (Triton's interpreter) or its reason where it cannot,
and the rows the CLI writes (timed, with a reason, skipped by the budget, or with the error of a failing anchor).

Passes with and without the anchors' packages (the ``anchors`` extra) installed: an absent package is a reason."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks import anchors
from benchmarks.common import SCALE

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def make_embeddings(batch: int, dim: int, k: int = 1, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 13 + dim + k)
    return [
        torch.randn(batch, dim, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
        for _ in range(1 + k)
    ]


def stock_loss_and_grads(embeddings: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    stock = MultipleNegativesRankingLoss(torch.nn.Sequential(torch.nn.Identity()), scale=SCALE)
    loss = stock.compute_loss_from_embeddings(embeddings, None)
    loss.backward()
    return float(loss.detach()), [x.grad for x in embeddings]


def plain_torch_loss(q: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    """The anchors' loss in plain torch (a stand-in anchor that runs anywhere)."""
    logits = scale * F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T
    return F.cross_entropy(logits.float(), torch.arange(q.shape[0]))


@pytest.mark.parametrize("batch, k", [(5, 1), (67, 1), (67, 2)])
@pytest.mark.parametrize("chunk_rows", [1, 7, None], ids=["rows1", "rows7", "one_chunk"])
def test_reference_matches_stock(batch, k, chunk_rows):
    """float64 inputs: the row-chunked reference (one chunk, 7-row chunks with a partial last one, single rows) gives
    stock MultipleNegativesRankingLoss's loss and gradients (hard negatives included as extra candidate columns)."""
    embeddings = make_embeddings(batch, 33, k)
    chunk = chunk_rows * k * batch if chunk_rows else anchors.REFERENCE_CHUNK_ELEMENTS
    ref_loss, ref_grads = anchors.reference_loss_and_grads(embeddings, SCALE, chunk_elements=chunk)
    stock_loss, stock_grads = stock_loss_and_grads(embeddings)
    assert ref_loss == pytest.approx(stock_loss, rel=1e-12)
    assert [g.shape for g in ref_grads] == [x.shape for x in embeddings]
    for ref, stock in zip(ref_grads, stock_grads, strict=True):
        torch.testing.assert_close(ref, stock, rtol=1e-10, atol=1e-13)
    loss_err, grad_err = anchors.relative_errors(stock_loss, stock_grads, ref_loss, ref_grads)
    assert loss_err < 1e-12 and grad_err < 1e-10


@pytest.mark.parametrize("anchor", anchors.ANCHORS, ids=anchors.ANCHOR_NAMES)
def test_anchor_matches_reference_or_says_why(anchor, monkeypatch):
    """fp32, B 67, D 32 on CPU under TRITON_INTERPRET=1: an anchor that can run here equals the float64 reference;
    one that cannot gives its reason (package absent, or needs CUDA)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = anchor.unavailable(CPU, torch.float32, 32)
    if reason is not None:
        assert "not installed" in reason or "CUDA" in reason, reason
        return
    embeddings = make_embeddings(67, 32, dtype=torch.float32)
    loss = anchor.loss(embeddings[0], embeddings[1], SCALE)
    loss.backward()
    ref_loss, ref_grads = anchors.reference_loss_and_grads(embeddings, SCALE)
    loss_err, grad_err = anchors.relative_errors(float(loss), [x.grad for x in embeddings], ref_loss, ref_grads)
    assert loss_err < 1e-5 and grad_err < 1e-5, (loss_err, grad_err)


def test_reasons_for_dtypes_and_shapes():
    """Reasons that need no GPU to check: Inf-CL's head_dim, dtypes no kernel takes, CCE's bf16-only backward and
    Liger's SM90 kernel away from CUDA."""
    assert [anchors.inf_cl_head_dim(d) for d in (384, 768, 1024, 32, 48, 33)] == [128, 256, 256, 32, 16, None]
    for anchor in anchors.ANCHORS:
        assert anchor.unavailable(CPU, torch.float64, 32) is not None
    cuda = torch.device("cuda")  # type only: nothing below touches the device
    cce_reason = anchors.cce_unavailable(cuda, torch.float32, 64)
    assert "not installed" in cce_reason or "bf16" in cce_reason
    sm90_reason = anchors.liger_scaled_sm90_unavailable(CPU, torch.bfloat16, 64)
    assert "CUDA" in sm90_reason or "not installed" in sm90_reason


def test_gpu_grid_runs_smallest_first():
    """--gpu --anchors: B {1024, 4096, 16384, 65536} x D {384, 768, 1024} x {fp32, bf16}, k = 1, by B·N·D (fp32 first
    at equal cost), so that a short --budget-s drops the B = 65536 cases at the largest D."""
    from benchmarks.fused_loss import anchor_cases, case_cost

    args = argparse.Namespace(smoke=False, gpu=True, fused_batch_sizes=None, fused_k=None, fused_dim=None,
                              fused_dtypes=None)  # fmt: skip
    cases = anchor_cases(args)
    assert len(cases) == 24 and {k for _, k, _, _ in cases} == {1}
    assert cases[:2] == [(1024, 1, 384, torch.float32), (1024, 1, 384, torch.bfloat16)]
    assert cases[-2:] == [(65536, 1, 1024, torch.float32), (65536, 1, 1024, torch.bfloat16)]
    costs = [case_cost(case) for case in cases]
    assert costs == sorted(costs)
    args.fused_dim, args.fused_dtypes, args.fused_batch_sizes = 768, ["bf16"], [4096, 1024]
    assert anchor_cases(args) == [(1024, 1, 768, torch.bfloat16), (4096, 1, 768, torch.bfloat16)]


def run_cli(out: Path, *extra: str) -> list[dict]:
    from benchmarks.__main__ import main

    assert main(["fused_loss", "--smoke", "--out", str(out), *extra]) == 0
    return json.loads((out / "fused_loss.json").read_text())["rows"]


@pytest.mark.parametrize("mode", [["--anchors"], []], ids=["anchors", "plain"])
def test_budget_zero_skips_every_case(tmp_path, mode, monkeypatch):
    """No time left: every case is rows that say so (an anchor that cannot run here keeps its own reason)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rows = run_cli(tmp_path, "--budget-s", "0", *mode)
    assert rows and all(row.get("time_ms") is None for row in rows), rows
    reasons = {a.name: a.unavailable(CPU, torch.float32, 32) or "skipped (budget)" for a in anchors.ANCHORS}
    assert all(row["note"] == reasons.get(row["backend"], "skipped (budget)") for row in rows), rows
    assert {"stock", "torch"} <= {row["backend"] for row in rows}
    if mode:
        assert set(anchors.ANCHOR_NAMES) <= {row["backend"] for row in rows}


def test_failing_anchor_is_a_row_and_the_run_goes_on(tmp_path, monkeypatch):
    def boom(q, d, scale):
        raise RuntimeError("boom\nsecond line")

    fake = (
        anchors.Anchor("boom", "torch", boom, lambda device, dtype, dim: None),
        anchors.Anchor("plain_torch", "torch", plain_torch_loss, lambda device, dtype, dim: None),
    )
    monkeypatch.setattr(anchors, "ANCHORS", fake)
    rows = run_cli(tmp_path, "--anchors", "--fused-batch-sizes", "9", "--fused-backends", "torch")
    by_name = {row["backend"]: row for row in rows}
    assert list(by_name) == ["stock", "torch", "boom", "plain_torch"]
    assert by_name["boom"]["note"] == "error: RuntimeError: boom second line" and by_name["boom"]["time_ms"] is None
    for name in ("stock", "torch", "plain_torch"):
        row = by_name[name]
        assert row["time_ms"] > 0 and row["floor_fraction"] > 0 and row["matmul_precision"] == "fp32", row
        assert row["loss_rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-5, row
    assert by_name["plain_torch"]["impl"] == "anchor" and by_name["torch"]["impl"] == "st_fast"
    assert by_name["plain_torch"]["note"] == f"torch {torch.__version__}"


@pytest.fixture(scope="module")
def smoke_anchor_rows(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench_anchors")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.run(
        [sys.executable, "-m", "benchmarks", "fused_loss", "--smoke", "--anchors", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, f"stdout:\n{process.stdout[-4000:]}\nstderr:\n{process.stderr[-4000:]}"
    assert (out / "fused_loss.md").read_text().count("\n|") >= 3
    return json.loads((out / "fused_loss.json").read_text())["rows"]


def test_smoke_anchors_writes_every_implementation(smoke_anchor_rows, monkeypatch):
    """Each smoke case (B 64 and 67, D 32, fp32) has rows for stock, torch, native (when built) and every anchor: timed
    with errors against the reference, or with the reason it cannot run here."""
    from st_fast.ops.backends import native_available

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    expected = ["stock", "torch", *(["native"] if native_available(CPU) else []), *anchors.ANCHOR_NAMES]
    for batch in (64, 67):
        rows = {row["backend"]: row for row in smoke_anchor_rows if row["B"] == batch}
        assert list(rows) == expected
        for anchor in anchors.ANCHORS:
            reason = anchor.unavailable(CPU, torch.float32, 32)
            if reason is not None:
                assert rows.pop(anchor.name)["note"] == reason
                continue
        for row in rows.values():
            assert row["D"] == 32 and row["dtype"] == "fp32" and row["k"] == 1 and row["N"] == batch
            assert isinstance(row["time_ms"], float) and row["time_ms"] > 0 and row["peak_mb"] is not None, row
            assert row["loss_rel_err"] < 1e-5 and row["grad_rel_err"] < 1e-5, row
