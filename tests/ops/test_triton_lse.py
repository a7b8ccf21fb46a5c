"""The Triton segment-LSE primitive against a float64 torch reference of the same math.

CPU runs use the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest), which computes fp32 ``tl.dot``
exactly: fp32 errors are rounding only. Shapes are small and odd so that row, column and D tails are all masked.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import triton_aot  # noqa: E402 (tests/triton_aot.py)

from st_fast.ops import triton_lse  # noqa: E402
from st_fast.ops.layout import HardnessKind, SegmentKind  # noqa: E402
from st_fast.ops.triton_lse import segment_lse_backward, segment_lse_forward, triton_available_for  # noqa: E402

Q2D, Q2Q, D2Q, D2D = SegmentKind.OWN_POSITIVE, SegmentKind.OWN_MASKED, SegmentKind.PLAIN, SegmentKind.OWN_GROUP_MASKED
NONE, IN_BATCH, HARD, ALL = HardnessKind.NONE, HardnessKind.IN_BATCH, HardnessKind.HARD, HardnessKind.ALL
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------------
# float64 reference
# ----------------------------------------------------------------------------------------------------------------


def reference_logits(rows, cols, *, kind, scale, row_start, width, hardness=NONE, alpha=0.0) -> torch.Tensor:
    """Materialized float64 logits (M, N) with the kind's mask (-inf) and the Q2D hardness penalty (layout.py)."""
    s = rows.double() @ cols.double().T
    g = row_start + torch.arange(rows.shape[0], device=rows.device)[:, None]
    c = torch.arange(cols.shape[0], device=rows.device)[None, :]
    logits = scale * s
    if kind == Q2D and alpha > 0 and hardness != NONE:
        penalized = {IN_BATCH: c % width != g, HARD: (c % width == g) & (c >= width), ALL: c != g}[hardness]
        logits = logits + alpha * s * penalized
    masked = {Q2D: torch.zeros_like(c == g), Q2Q: c == g, D2Q: torch.zeros_like(c == g), D2D: c % width == g}[kind]
    return logits.masked_fill(masked.expand_as(logits), float("-inf"))


def reference_p(rows, cols, lse_ref, row_weight, **seg) -> torch.Tensor:
    """float64 P = w·exp(L - lse_ref) (M, N), zero on masked entries and on dead rows (w = 0 or lse_ref = -inf)."""
    logits = reference_logits(rows, cols, **seg)
    lse = lse_ref.double()[:, None]
    live = (row_weight != 0)[:, None] & torch.isfinite(lse) & torch.isfinite(logits)
    return torch.where(live, row_weight.double()[:, None] * torch.exp(logits - lse.nan_to_num(neginf=0.0)), 0.0)


def reference_backward(rows, cols, lse_ref, row_weight, **seg) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (scale·P @ C, scale·Pᵀ @ R)."""
    p = reference_p(rows, cols, lse_ref, row_weight, **seg)
    return seg["scale"] * p @ cols.double(), seg["scale"] * p.T @ rows.double()


def reference_magnitudes(rows, cols, lse_ref, row_weight, **seg) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 (scale·|P| @ |C|, scale·|P|ᵀ @ |R|): the sum of |terms| of every gradient entry."""
    p = reference_p(rows, cols, lse_ref, row_weight, **seg).abs()
    return seg["scale"] * p @ cols.double().abs(), seg["scale"] * p.T @ rows.double().abs()


def term_error_bound(*, scale, alpha, d, n_terms, u_s=0.0, u_p=0.0, u_c=0.0) -> float:
    """Relative error bound of every term scale·P_ic·X_cd of a gradient sum, for unit-norm rows and columns.

    u_s: rounding of the S operands (TF32), u_p: rounding of P before the product, u_c: of the other operand.
    The logit error scale·(1+alpha)·(d·2^-24 + 2·u_s) (fp32 accumulation over d, |s| <= Σ|r_k c_k| <= 1) moves P
    by the same relative amount; 1e-5 covers exp2 and the rounding of z - lse (|z| <= 50); n_terms·2^-24 is the
    fp32 accumulation of the product. 10% slack for the inputs' norms being 1 only to their rounding.
    """
    e_logit = scale * (1.0 + alpha) * (d * 2.0**-24 + 2.0 * u_s)
    return 1.1 * (e_logit + 1e-5 + u_p + u_c + n_terms * 2.0**-24)


def assert_within_bound(actual, expected, magnitude, rel, atol=0.0):
    """|actual - expected| <= rel · magnitude + atol on every entry (magnitude = Σ|terms| of the entry)."""
    excess = (actual.double() - expected).abs() - rel * magnitude - atol
    worst = excess.argmax()
    assert excess.max().item() <= 0.0, (
        f"error {(actual.double() - expected).abs().flatten()[worst]:.3e} exceeds {rel:.2e} x "
        f"{magnitude.flatten()[worst]:.3e} + {atol:.1e}"
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error max|a - e| / max|e| (float64)."""
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


def make_segment(m, k, width, d, dtype=torch.float32, device="cpu", normalize=True):
    """Random rows (m, d) and columns (k·width, d); unit-norm like sentence embeddings when normalize."""
    rows, cols = torch.randn(m, d, device=device), torch.randn(k * width, d, device=device)
    if normalize:
        rows, cols = rows / rows.norm(dim=1, keepdim=True), cols / cols.norm(dim=1, keepdim=True)
    return rows.to(dtype), cols.to(dtype)


def joint_lse_ref(logits: torch.Tensor) -> torch.Tensor:
    """A joint LSE over this segment and a random second segment (>= this segment's LSE), as the op passes it."""
    other = torch.randn(logits.shape[0], 5, dtype=torch.float64, device=logits.device) * 3
    return torch.logsumexp(torch.cat([logits, other], dim=1), dim=1).float()


# ----------------------------------------------------------------------------------------------------------------
# fp32: every kind and hardness, exact to rounding under the interpreter
# ----------------------------------------------------------------------------------------------------------------

# kind, hardness, alpha, k, M, width, row_start ("late" = width - M, a later rank's rows), D
CASES = [
    (Q2D, NONE, 0.0, 1, 7, 33, 0, 48),
    (Q2D, IN_BATCH, 0.5, 2, 7, 33, "late", 16),
    (Q2D, HARD, 0.5, 4, 7, 33, 0, 48),
    (Q2D, HARD, 0.5, 2, 1, 33, "late", 16),
    (Q2D, ALL, 0.5, 4, 7, 33, "late", 48),
    (Q2D, ALL, 0.0, 2, 7, 33, 0, 16),  # alpha 0: no penalty at all
    (Q2D, IN_BATCH, 0.5, 1, 1, 17, 0, 100),  # D = 100: two BLOCK_K chunks, the second masked
    (Q2Q, NONE, 0.0, 1, 7, 33, "late", 48),
    (Q2Q, NONE, 0.0, 1, 1, 19, 0, 16),
    (D2Q, NONE, 0.0, 1, 7, 33, 0, 16),
    (D2Q, NONE, 0.0, 1, 1, 33, "late", 48),
    (D2D, NONE, 0.0, 4, 7, 33, "late", 16),
    (D2D, NONE, 0.0, 2, 1, 33, 0, 48),
    (D2D, NONE, 0.0, 1, 7, 7, 0, 200),  # D = 200: two D-output tiles in the backward
]


@pytest.mark.parametrize(("kind", "hardness", "alpha", "k", "m", "width", "row_start", "d"), CASES)
def test_fp32_matches_float64_reference(kind, hardness, alpha, k, m, width, row_start, d):
    row_start = width - m if row_start == "late" else row_start
    rows, cols = make_segment(m, k, width, d)
    seg = dict(kind=kind, scale=20.0, row_start=row_start, width=width, hardness=hardness, alpha=alpha)
    logits = reference_logits(rows, cols, **seg)

    lse = segment_lse_forward(rows, cols, **seg)
    assert lse.dtype == torch.float32 and lse.shape == (m,)
    assert torch.isfinite(lse).all()
    assert rel_err(lse, torch.logsumexp(logits, dim=1)) < 1e-5

    lse_ref, row_weight = joint_lse_ref(logits), torch.rand(m) + 0.1
    d_rows, d_cols = segment_lse_backward(rows, cols, lse_ref, row_weight, **seg)
    exp_rows, exp_cols = reference_backward(rows, cols, lse_ref, row_weight, **seg)
    assert d_rows.dtype == d_cols.dtype == torch.float32
    assert d_rows.shape == rows.shape and d_cols.shape == cols.shape
    assert torch.isfinite(d_rows).all() and torch.isfinite(d_cols).all()
    assert rel_err(d_rows, exp_rows) < 1e-5
    assert rel_err(d_cols, exp_cols) < 1e-5


def test_reference_backward_is_the_gradient_of_weighted_lse():
    """Guards the reference itself: with lse_ref = own LSE it equals autograd of Σ w_i·lse_i (penalty detached)."""
    rows, cols = make_segment(5, 2, 11, 16, dtype=torch.float64)
    rows.requires_grad_(True)
    cols.requires_grad_(True)
    seg = dict(kind=Q2D, scale=20.0, row_start=3, width=11, hardness=ALL, alpha=0.5)
    s = rows @ cols.T
    g, c = 3 + torch.arange(5)[:, None], torch.arange(22)[None, :]
    logits = 20.0 * s + 0.5 * s.detach() * (c != g)
    weight = torch.rand(5, dtype=torch.float64)
    (weight * torch.logsumexp(logits, dim=1)).sum().backward()
    lse = torch.logsumexp(logits, dim=1).detach()
    exp_rows, exp_cols = reference_backward(rows.detach(), cols.detach(), lse, weight, **seg)
    torch.testing.assert_close(exp_rows, rows.grad)
    torch.testing.assert_close(exp_cols, cols.grad)


@pytest.mark.parametrize("n_split", [2, 3, 100])
def test_split_loops_merge_to_the_same_result(n_split):
    """Column splits in the forward (logsumexp merge) and loop splits in both backward kernels (sum of partials)."""
    m, k, width, d = 130, 1, 131, 16  # 3 row tiles and 3 column tiles of 64, both with a tail
    rows, cols = make_segment(m, k, width, d)
    seg = dict(kind=Q2D, scale=20.0, row_start=width - m, width=width, hardness=IN_BATCH, alpha=0.5)
    logits = reference_logits(rows, cols, **seg)
    lse = segment_lse_forward(rows, cols, **seg, n_split=n_split)
    assert rel_err(lse, torch.logsumexp(logits, dim=1)) < 1e-5
    lse_ref, row_weight = joint_lse_ref(logits), torch.rand(m)
    d_rows, d_cols = segment_lse_backward(rows, cols, lse_ref, row_weight, **seg, n_split=n_split)
    exp_rows, exp_cols = reference_backward(rows, cols, lse_ref, row_weight, **seg)
    assert rel_err(d_rows, exp_rows) < 1e-5
    assert rel_err(d_cols, exp_cols) < 1e-5


@pytest.mark.parametrize(("kind", "hardness", "d"), [(Q2D, ALL, 200), (D2D, NONE, 48), (Q2Q, NONE, 80)])
def test_backward_d_windows_across_programs(monkeypatch, kind, hardness, d):
    """D wider than one program's window (1024 on CUDA; 32 here) is split into windows across programs, each
    recomputing the score tiles: D = 200 in 7 windows (the last one 8 wide), 48 and 80 in 2 and 3."""
    monkeypatch.setattr(triton_lse, "_MAX_D_WINDOW", 32)
    m, k, width = 7, 2 if kind != Q2Q else 1, 33
    rows, cols = make_segment(m, k, width, d)
    seg = dict(kind=kind, scale=20.0, row_start=width - m, width=width, hardness=hardness, alpha=0.5)
    logits = reference_logits(rows, cols, **seg)
    lse_ref, row_weight = joint_lse_ref(logits), torch.rand(m) + 0.1
    d_rows, d_cols = segment_lse_backward(rows, cols, lse_ref, row_weight, **seg)
    exp_rows, exp_cols = reference_backward(rows, cols, lse_ref, row_weight, **seg)
    assert rel_err(d_rows, exp_rows) < 1e-5 and rel_err(d_cols, exp_cols) < 1e-5


def test_d_window_is_a_power_of_two_plus_a_tail():
    """One program holds all of D up to 1024 (each score tile computed once per (row tile, column tile)): a power of
    two plus a power-of-two tail where that saves over padding to the next power of two (384 = 256 + 128)."""
    window = triton_lse._d_window
    assert window(16, 1024) == (16, 0, 1) and window(7, 1024) == (16, 0, 1)
    assert window(48, 1024) == (32, 16, 1) and window(80, 1024) == (64, 16, 1)
    assert window(100, 1024) == (128, 0, 1) and window(256, 1024) == (256, 0, 1)
    assert window(384, 1024) == (256, 128, 1) and window(768, 1024) == (512, 256, 1)
    assert window(1000, 1024) == (1024, 0, 1) and window(1024, 1024) == (1024, 0, 1)
    assert window(1100, 1024) == (1024, 0, 2) and window(4096, 1024) == (1024, 0, 4)
    for d in range(1, 1025):
        main, tail, count = window(d, 1024)
        assert count == 1 and main + tail >= d and main >= 16 and (tail == 0 or tail >= 16)
        assert main & (main - 1) == 0 and tail & (tail - 1) == 0


def test_backward_tile_table():
    """The CUDA table covers D up to 1024 per operand size, tiles >= 16 (tl.dot); the interpreter takes one config."""
    for element_size, table in triton_lse._CUDA_BACKWARD_TILES.items():
        assert [row[0] for row in table] == [128, 256, 512, 1024], element_size
        for d in (16, 128, 129, 384, 768, 1024, 4096):
            for guided in (False, True):
                config = triton_lse._backward_config(4096, 8192, d, "cuda", element_size, guided)
                assert min(config.block_owned, config.block_loop, config.block_k) >= 16
                dr, dc = config.blocks(False), config.blocks(True)
                assert (dr["BLOCK_M"], dr["BLOCK_N"]) == (dc["BLOCK_N"], dc["BLOCK_M"]) == (
                    config.block_owned, config.block_loop)  # fmt: skip
    cpu = triton_lse._backward_config(7, 66, 48, "cpu", 4, False)
    assert cpu == triton_lse.BackwardConfig(16, 64, 64, 32, 16, 4, 1)


# ----------------------------------------------------------------------------------------------------------------
# fp16 and bf16 inputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "kind", "hardness"), [(torch.float16, Q2D, HARD), (torch.float16, D2D, NONE), (torch.bfloat16, Q2D, ALL)]
)
def test_half_inputs_match_float64_reference(dtype, kind, hardness):
    """The reference takes the same rounded inputs, so only the kernel's own roundings count.

    Forward: products of half inputs are exact in fp32 and accumulated in fp32, so the LSE is as good as in fp32
    (1e-5). Backward: P̂ = P / max|w| in [-1, 1] is rounded to fp16 before the P·C products, a relative error of at
    most u = 2^-11 per term (fp16 subnormals below 2^-14: an absolute 2^-25 per term instead), so every gradient entry
    is checked against u times the sum of its |terms| (term_error_bound); a normwise tolerance could not be
    justified, as cancellation in the sum can make it exceed u. Under the interpreter bf16 is upcast to fp32 after
    the load (the interpreter's bf16 arithmetic is wrong), so bf16 is exact to fp32 here; its tensor-core rounding
    (u = 2^-8) is checked by the GPU test.
    """
    m, k, width, d = 7, 2, 33, 48
    rows, cols = make_segment(m, k, width, d, dtype=dtype)
    seg = dict(kind=kind, scale=20.0, row_start=width - m, width=width, hardness=hardness, alpha=0.5)
    logits = reference_logits(rows, cols, **seg)
    lse = segment_lse_forward(rows, cols, **seg)
    assert rel_err(lse, torch.logsumexp(logits, dim=1)) < 1e-5
    lse_ref, row_weight = joint_lse_ref(logits), torch.rand(m) * 1e-4  # small weights: fp16 must not underflow
    d_rows, d_cols = segment_lse_backward(rows, cols, lse_ref, row_weight, **seg)
    exp_rows, exp_cols = reference_backward(rows, cols, lse_ref, row_weight, **seg)
    mag_rows, mag_cols = reference_magnitudes(rows, cols, lse_ref, row_weight, **seg)
    u_p = 2.0**-11 if dtype == torch.float16 else 0.0
    w_max = row_weight.abs().max().item()
    for actual, expected, magnitude, n_terms in (
        (d_rows, exp_rows, mag_rows, k * width),
        (d_cols, exp_cols, mag_cols, m),
    ):
        rel = term_error_bound(scale=20.0, alpha=0.5, d=d, n_terms=n_terms, u_p=u_p)
        assert_within_bound(actual, expected, magnitude, rel, atol=20.0 * w_max * n_terms * 2.0**-25)
    if dtype == torch.bfloat16:
        assert rel_err(d_rows, exp_rows) < 1e-5 and rel_err(d_cols, exp_cols) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Edge cases: fully masked rows, dead rows, large scale
# ----------------------------------------------------------------------------------------------------------------


def test_fully_masked_row_gives_minus_inf_and_zero_gradient():
    """Q2Q with width 1: the only column is the query itself."""
    rows, cols = make_segment(1, 1, 1, 16)
    seg = dict(kind=Q2Q, scale=20.0, row_start=0, width=1)
    lse = segment_lse_forward(rows, cols, **seg)
    assert lse.item() == float("-inf")
    for lse_ref in (lse, torch.tensor([0.7])):  # its own -inf LSE, or a finite joint LSE from another segment
        d_rows, d_cols = segment_lse_backward(rows, cols, lse_ref, torch.ones(1), **seg)
        assert torch.equal(d_rows, torch.zeros_like(d_rows)) and torch.equal(d_cols, torch.zeros_like(d_cols))


def test_dead_rows_contribute_nothing():
    """Rows with weight 0 or lse_ref = -inf give zero gradient rows and no NaN anywhere."""
    m, width, d = 7, 33, 48
    rows, cols = make_segment(m, 1, width, d)
    seg = dict(kind=D2Q, scale=20.0, row_start=0, width=width)
    lse_ref = segment_lse_forward(rows, cols, **seg)
    lse_ref[2] = float("-inf")
    row_weight = torch.rand(m) + 0.1
    row_weight[4] = 0.0
    d_rows, d_cols = segment_lse_backward(rows, cols, lse_ref, row_weight, **seg)
    exp_rows, exp_cols = reference_backward(rows, cols, lse_ref, row_weight, **seg)
    assert torch.isfinite(d_rows).all() and torch.isfinite(d_cols).all()
    assert not d_rows[2].any() and not d_rows[4].any()
    assert rel_err(d_rows, exp_rows) < 1e-5 and rel_err(d_cols, exp_cols) < 1e-5
    zero_w = torch.zeros(m)
    assert not any(t.any() for t in segment_lse_backward(rows, cols, lse_ref, zero_w, **seg))


@pytest.mark.parametrize("kind", [Q2D, D2D])
def test_scale_100_near_orthogonal_vectors_stay_finite(kind):
    """exp(-100) is an fp32 denormal: an online max keeps lse finite (≈ log N) where a fixed max = scale would not."""
    m, k, width, d = 7, 2, 9, 48
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].T  # orthonormal rows
    rows = (basis[:m] + 1e-3 * torch.randn(m, d, dtype=torch.float64)).float()
    cols = (basis[m : m + k * width] + 1e-3 * torch.randn(k * width, d, dtype=torch.float64)).float()
    rows, cols = rows / rows.norm(dim=1, keepdim=True), cols / cols.norm(dim=1, keepdim=True)
    seg = dict(kind=kind, scale=100.0, row_start=width - m, width=width)
    logits = reference_logits(rows, cols, **seg)
    lse = segment_lse_forward(rows, cols, **seg)
    assert torch.isfinite(lse).all()
    assert (lse.double() - torch.logsumexp(logits, dim=1)).abs().max() < 1e-5
    d_rows, d_cols = segment_lse_backward(rows, cols, lse, torch.ones(m), **seg)
    exp_rows, exp_cols = reference_backward(rows, cols, lse, torch.ones(m), **seg)
    assert torch.isfinite(d_rows).all() and torch.isfinite(d_cols).all()
    assert rel_err(d_rows, exp_rows) < 1e-5 and rel_err(d_cols, exp_cols) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# Input validation and availability
# ----------------------------------------------------------------------------------------------------------------

R7, C33 = torch.randn(7, 16), torch.randn(33, 16)
SEG = dict(kind=Q2D, scale=20.0, row_start=0, width=33)
BAD_FORWARD = [
    ("not a tensor", TypeError, lambda: segment_lse_forward(R7.tolist(), C33, **SEG)),
    ("1-D rows", ValueError, lambda: segment_lse_forward(R7[0], C33, **SEG)),
    ("dtype mismatch", TypeError, lambda: segment_lse_forward(R7, C33.half(), **SEG)),
    ("float64", TypeError, lambda: segment_lse_forward(R7.double(), C33.double(), **SEG)),
    ("D mismatch", ValueError, lambda: segment_lse_forward(R7, torch.randn(33, 17), **SEG)),
    ("M == 0", ValueError, lambda: segment_lse_forward(R7[:0], C33, **SEG)),
    ("N == 0", ValueError, lambda: segment_lse_forward(R7, C33[:0], **{**SEG, "width": 0})),
    ("N not k·W", ValueError, lambda: segment_lse_forward(R7, C33, **{**SEG, "width": 10})),
    ("Q2Q N != W", ValueError, lambda: segment_lse_forward(R7, torch.randn(66, 16), **{**SEG, "kind": Q2Q})),
    ("rows past W", ValueError, lambda: segment_lse_forward(R7, C33, **{**SEG, "row_start": 30})),
    ("negative alpha", ValueError, lambda: segment_lse_forward(R7, C33, **SEG, hardness=ALL, alpha=-1.0)),
    ("n_split 0", ValueError, lambda: segment_lse_forward(R7, C33, **SEG, n_split=0)),
    ("device mismatch", ValueError, lambda: segment_lse_forward(R7, C33.to("meta"), **SEG)),
]
BAD_BACKWARD = [
    (
        "lse_ref float64",
        TypeError,
        lambda: segment_lse_backward(R7, C33, torch.zeros(7).double(), torch.ones(7), **SEG),
    ),
    ("lse_ref shape", ValueError, lambda: segment_lse_backward(R7, C33, torch.zeros(6), torch.ones(7), **SEG)),
    ("weight shape", ValueError, lambda: segment_lse_backward(R7, C33, torch.zeros(7), torch.ones(7, 1), **SEG)),
    ("weight missing", TypeError, lambda: segment_lse_backward(R7, C33, torch.zeros(7), None, **SEG)),
]


@pytest.mark.parametrize(
    ("case", "error", "call"), BAD_FORWARD + BAD_BACKWARD, ids=[c[0] for c in BAD_FORWARD + BAD_BACKWARD]
)
def test_bad_inputs_raise(case, error, call):
    with pytest.raises(error):
        call()


def test_non_unit_stride_rows_are_accepted():
    rows, cols = make_segment(7, 1, 33, 16)
    lse = segment_lse_forward(rows.T.contiguous().T, cols[:, :].T.contiguous().T, **SEG)
    assert rel_err(lse, torch.logsumexp(reference_logits(rows, cols, **SEG), dim=1)) < 1e-5


def test_auto_split_fills_the_gpu(monkeypatch):
    """On CUDA the loop is split until about two programs per SM run; no split is ever empty; 1 split on CPU."""
    monkeypatch.setattr(triton_lse, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert triton_lse._split(16, 16, cuda, None) == (16, 1)  # 264 / 16 programs -> 17 splits, capped at 16 tiles
    assert triton_lse._split(100, 10, cuda, None) == (25, 4)  # 27 wanted, 4 tiles each -> 25 non-empty splits
    assert triton_lse._split(100, 1000, cuda, None) == (1, 100)
    assert triton_lse._split(100, 1, torch.device("cpu"), None) == (1, 100)
    assert triton_lse._split(5, 1, torch.device("cpu"), 2) == (2, 3)


def test_triton_available_for(monkeypatch):
    triton_available_for(torch.zeros(1))  # CPU under the interpreter: fine
    with pytest.raises(RuntimeError, match="meta"):
        triton_available_for(torch.zeros(1, device="meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_available_for(torch.zeros(1))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        segment_lse_forward(R7, C33, **SEG)
    monkeypatch.setattr(triton_lse, "_TRITON_IMPORT_ERROR", "No module named 'triton'")
    with pytest.raises(RuntimeError, match="not importable"):
        triton_available_for(torch.zeros(1))


@pytest.mark.parametrize(
    ("preamble", "message"),
    [("", "TRITON_INTERPRET=1"), ("import sys; sys.modules['triton'] = None\n", "not importable")],
    ids=["interpreter unset", "triton missing"],
)
def test_cpu_without_interpreter_raises_in_a_clean_process(preamble, message):
    """A fresh process without TRITON_INTERPRET (or without triton: the module still imports) raises clearly."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = preamble + (
        "import torch\n"
        "from st_fast.ops.triton_lse import triton_available_for\n"
        "try:\n    triton_available_for(torch.zeros(1))\nexcept RuntimeError as e:\n    print('raised:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "raised:" in out.stdout and message in out.stdout and 'backend="torch"' in out.stdout, (
        out.stdout + out.stderr
    )


# ----------------------------------------------------------------------------------------------------------------
# Compiled mode without a GPU: the interpreter runs Python, so it accepts code that the compiler would reject
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels for real")
def test_kernels_compile_for_sm90_without_spills():
    """Ahead-of-time compilation to H100 cubins with the launchers' constexprs and tiles (every row of the backward's
    CUDA tile table, both directions, bf16 / fp16 / fp32 with ieee and tf32 dots, D > 1024 in windows), in a process
    without the interpreter (which runs kernels as Python and so accepts code that the compiler would reject); the
    register spills are read from ptxas -v (tests/triton_aot.py)."""
    pytest.importorskip("triton.backends.nvidia")
    triton_aot.assert_no_spills(triton_aot.compile_in_subprocess("mnrl"), len(triton_aot.MNRL_VARIANTS))


# ----------------------------------------------------------------------------------------------------------------
# GPU (skipped on CPU by conftest)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "matmul_precision", "u_s", "u_p", "u_c"),
    [
        (torch.float32, "highest", 0.0, 0.0, 0.0),  # ieee fp32 tl.dot: fp32 rounding only
        (torch.float32, "high", 2.0**-11, 2.0**-11, 2.0**-11),  # TF32 (10-bit mantissa) operands everywhere
        (torch.float16, "highest", 0.0, 2.0**-11, 0.0),  # exact products, fp32 accumulation; P rounded to fp16
        (torch.bfloat16, "highest", 0.0, 2.0**-8, 0.0),  # exact products, fp32 accumulation; P rounded to bf16
    ],
)
@pytest.mark.parametrize(("kind", "hardness"), [(Q2D, ALL), (D2D, NONE)])
def test_gpu_large_segment_matches_float64_reference(dtype, matmul_precision, u_s, u_p, u_c, kind, hardness):
    """M ≈ N ≈ 1000, D = 384 on CUDA (auto n_split > 1), against float64 on the same rounded inputs.

    Tolerances are rounding bounds (term_error_bound): the LSE may move by the logit error, every gradient entry by
    the per-term relative error times the sum of its |terms|.
    """
    m, k, width, d = 997, 1, 1003, 384
    if kind == D2D:
        m, k, width = 499, 2, 509
    rows, cols = make_segment(m, k, width, d, dtype=dtype, device="cuda")
    seg = dict(kind=kind, scale=20.0, row_start=width - m, width=width, hardness=hardness, alpha=0.5)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(matmul_precision)
    try:
        logits = reference_logits(rows, cols, **seg)
        lse = segment_lse_forward(rows, cols, **seg)
        lse_ref, row_weight = joint_lse_ref(logits), torch.rand(m, device="cuda") / m
        d_rows, d_cols = segment_lse_backward(rows, cols, lse_ref, row_weight, **seg)
        torch.cuda.synchronize()
    finally:
        torch.set_float32_matmul_precision(previous)
    exp_rows, exp_cols = reference_backward(rows, cols, lse_ref, row_weight, **seg)
    assert torch.isfinite(lse).all() and torch.isfinite(d_rows).all() and torch.isfinite(d_cols).all()
    expected_lse = torch.logsumexp(logits, dim=1)
    lse_tol = 1.1 * 20.0 * 1.5 * (d * 2.0**-24 + 2.0 * u_s) + 1e-6 * expected_lse.abs().max().item() + 1e-6
    assert (lse.double() - expected_lse).abs().max().item() <= lse_tol
    mag_rows, mag_cols = reference_magnitudes(rows, cols, lse_ref, row_weight, **seg)
    w_max = row_weight.abs().max().item()
    for actual, expected, magnitude, n_terms in (
        (d_rows, exp_rows, mag_rows, k * width),
        (d_cols, exp_cols, mag_cols, m),
    ):
        rel = term_error_bound(scale=20.0, alpha=0.5, d=d, n_terms=n_terms, u_s=u_s, u_p=u_p, u_c=u_c)
        atol = 20.0 * w_max * n_terms * 2.0**-25 if dtype == torch.float16 else 0.0  # fp16 subnormal P
        assert_within_bound(actual, expected, magnitude, rel, atol=atol)
    if u_s == 0.0:  # normwise sanity check too (TF32's logit error makes a normwise bound too loose to be useful)
        assert rel_err(d_rows, exp_rows) < 4 * u_p + 2e-5 and rel_err(d_cols, exp_cols) < 4 * u_p + 2e-5
