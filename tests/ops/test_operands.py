"""The operands of a chunked-driver call and their GEMMs (st_fast/ops/operands.py): score segments placed at their
global columns (-inf elsewhere), the two gradient GEMMs of a segment's coefficients against a float64 reference,
the raw 16-bit path's float16 copies with γ and σ divided out, and the result with the normalization term."""

from __future__ import annotations

import pytest
import torch

from st_fast.ops.normalization import add_normalization_term, inverse_norm
from st_fast.ops.operands import Operands
from st_fast.ops.raw_16bit import as_float16_operand
from st_fast.ops.workspace import scratch

WIDTH, OFFSET, BATCH, K, DIM = 9, 3, 4, 2, 7


def _operands(dtype=torch.float64, seed=0):
    """GIST's layout: anchors hold the local rows only (global rows OFFSET .. OFFSET + BATCH), candidates K·W rows."""
    generator = torch.Generator().manual_seed(seed)
    anchors = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64).to(dtype)
    candidates = torch.randn(K * WIDTH, DIM, generator=generator, dtype=torch.float64).to(dtype)
    return anchors, candidates


def _prepare(anchors, candidates, arena, **kwargs):
    return Operands.prepare({"anchors": anchors, "candidates": candidates}, arena, need_grad=True,
                            first_row={"anchors": OFFSET}, **kwargs)  # fmt: skip


GLOBAL_ROWS = slice(OFFSET + 1, OFFSET + 3)  # a chunk of two local rows (local rows 1, 2)


@pytest.mark.parametrize(
    "columns, width, ranges, present",
    [
        ("candidates", K * WIDTH, None, [(0, K * WIDTH)]),  # every column: one GEMM into the segment
        ("candidates", WIDTH, [(0, WIDTH)], [(0, WIDTH)]),  # the first W candidates only
        ("candidates", K * WIDTH, [(0, 2), (5, 11)], [(0, 2), (5, 11)]),  # some columns, -inf in the others
        ("anchors", WIDTH, None, [(OFFSET, OFFSET + BATCH)]),  # local anchors at their global columns
    ],
)
def test_scores_land_at_their_global_columns(columns, width, ranges, present):
    anchors, candidates = _operands()
    with scratch(torch.device("cpu")) as arena:
        ops = _prepare(anchors, candidates, arena)
        out = torch.full((2, width), float("nan"), dtype=torch.float64)
        ops.scores_into("anchors", columns, GLOBAL_ROWS, out, ranges)
    by_global = {"anchors": torch.full((WIDTH, DIM), float("nan"), dtype=torch.float64), "candidates": candidates}
    by_global["anchors"][OFFSET : OFFSET + BATCH] = anchors
    expected = torch.full((2, width), float("-inf"), dtype=torch.float64)
    for lo, hi in present:
        expected[:, lo:hi] = anchors[1:3] @ by_global[columns][lo:hi].T
    assert torch.equal(out, expected)


@pytest.mark.parametrize("rows, columns, ranges", [("anchors", "candidates", None), ("anchors", "anchors", None),
                                                   ("candidates", "candidates", [(0, WIDTH)])])  # fmt: skip
def test_the_gradient_gemms_of_a_segment(rows, columns, ranges):
    """d rows += factor · C @ columns and d columns += factor · Cᵀ @ rows, on the columns the segment covers."""
    anchors, candidates = _operands()
    operands = {"anchors": anchors, "candidates": candidates}
    width = {"anchors": WIDTH, "candidates": WIDTH if ranges else K * WIDTH}[columns]
    coefficient = torch.randn(2, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with scratch(torch.device("cpu")) as arena:
        ops = _prepare(anchors, candidates, arena)
        ops.accumulate(rows, columns, GLOBAL_ROWS, coefficient, 0.5, ranges)
    first = {"anchors": OFFSET, "candidates": 0}
    expected = {name: torch.zeros_like(x) for name, x in operands.items()}
    local_rows = slice(GLOBAL_ROWS.start - first[rows], GLOBAL_ROWS.stop - first[rows])
    lo, hi = (0, width) if ranges else (first[columns], first[columns] + operands[columns].shape[0])
    part, own = coefficient[:, lo:hi], slice(lo - first[columns], hi - first[columns])
    expected[rows][local_rows] += 0.5 * part @ operands[columns][own]
    expected[columns][own] += 0.5 * part.T @ operands[rows][local_rows]
    for name in operands:
        torch.testing.assert_close(ops.grads[name], expected[name], rtol=1e-14, atol=1e-14)


def test_the_16bit_gradient_gemms_divide_gamma_and_sigma_out():
    """bf16 operands: coefficients stored in float16 times γ, float16 copies times σ (exact for bf16); the gradients
    are the products of the stored coefficients / γ with the operands, to fp32 accumulation."""
    anchors, candidates = _operands(torch.bfloat16, seed=2)
    anchors, candidates = anchors * 1e-3, candidates * 50
    coefficient = torch.randn(2, K * WIDTH, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1e-4
    gamma = 2.0**20
    with scratch(torch.device("cpu")) as arena:
        float16 = {"anchors": as_float16_operand(anchors), "candidates": as_float16_operand(candidates)}
        ops = _prepare(anchors, candidates, arena, float16=float16)
        assert ops.coefficient_dtype == torch.float16 and ops.separate_coefficients and ops.bytes_per_score == 6
        ops.set_coefficient_scale(gamma)
        stored = (coefficient * gamma).half()
        ops.accumulate("anchors", "candidates", GLOBAL_ROWS, stored, 1.0)
    unscaled = stored.double() / gamma
    assert ops.grads["anchors"].dtype == torch.float32
    torch.testing.assert_close(ops.grads["anchors"][1:3].double(), unscaled @ candidates.double(), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(ops.grads["candidates"].double(), unscaled.T @ anchors[1:3].double(), rtol=1e-5,
                               atol=1e-12)  # fmt: skip


def test_the_result_adds_the_normalization_term_of_raw_operands():
    anchors, candidates = _operands()
    scales = {"anchors": inverse_norm(anchors), "candidates": inverse_norm(candidates)}
    with scratch(torch.device("cpu")) as arena:
        ops = _prepare(anchors, candidates, arena, scales=scales)
        ops.grads["anchors"].fill_(0.25)
        ops.grads["candidates"].fill_(-0.5)
        result = ops.result(torch.tensor(1.5))
    for name, grad, value in (("anchors", result.grad_anchors, 0.25), ("candidates", result.grad_candidates, -0.5)):
        expected = torch.full_like(grad, value)
        add_normalization_term(expected, ops.scores[name], scales[name])
        assert torch.equal(grad, expected)
    with scratch(torch.device("cpu")) as arena:
        plain = Operands.prepare({"anchors": anchors, "candidates": candidates}, arena, need_grad=False)
        assert plain.result(torch.tensor(1.5)).grad_anchors is None and not plain.separate_coefficients
