"""The row kernel's shared test cases: parameter grids and checks that more than one test module runs (not a test
module itself). tests/ops/test_raw_16bit.py and tests/ops/test_symmetric_row_kernel.py run them on the shipped
builds; tests/ops/test_emulated_lanes.py re-runs them with the CUDA build's lane algorithm emulated on the CPU.

Each grid is a list of ``pytest.mark.parametrize`` marks (apply them with :func:`cases`); each check takes the grid's
arguments plus the build to run (``kernel`` / ``device`` / ``backend``).
"""

from __future__ import annotations

import math

import pytest
import torch
from parity import assert_close_to_reference, assert_coefficients_close, random_columns

from st_fast.ops import chunked as chunked_common  # noqa: I001
from st_fast.ops import fused_mnrl_loss
from st_fast.ops.layout import SegmentKind
from st_fast.ops.mnrl import chunked as mnrl_chunked
from st_fast.ops.mnrl.spec import ContrastiveSpec
from st_fast.ops.row_kernel import PositiveBlock, SegmentScales, column_lse, reference_factors
from st_fast.ops.row_kernel_torch import torch_row_coefficients, torch_row_kernel, torch_row_statistics


def cases(grid):
    """A decorator applying the parametrize marks of ``grid``."""

    def decorate(function):
        for mark in reversed(grid):
            function = mark(function)
        return function

    return decorate


# ---- The one-pass kernel and the 16-bit path (tests/ops/test_raw_16bit.py).

HALF_DTYPES = [torch.bfloat16, torch.float16]
CONFIGS = [
    dict(),
    dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), hardness_mode="all_negatives",
         hardness_strength=5.0),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
         hardness_mode="in_batch_negatives", hardness_strength=9.0),
]  # fmt: skip

ROW_KERNEL_LAYOUTS = {  # directions, partition, segment lengths in units of the width
    "joint-4": (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", [2, 1, 1, 2]),
    "per_direction-2": (("query_to_doc", "doc_to_query"), "per_direction", [2, 1]),
}
COEFFICIENT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

ONE_PASS_GRID = [
    pytest.mark.parametrize("coefficient_dtype", COEFFICIENT_DTYPES, ids=str),
    pytest.mark.parametrize("hardness", ["hard_negatives", "in_batch_negatives"]),
    pytest.mark.parametrize("rows, width", [(1, 1), (13, 29)]),
    pytest.mark.parametrize("layout", ROW_KERNEL_LAYOUTS),
]
SINGLE_COLUMN_GRID = [
    pytest.mark.parametrize("coefficient_dtype", COEFFICIENT_DTYPES, ids=str),
    pytest.mark.parametrize("with_scales", [False, True], ids=["unit", "scaled"]),
    pytest.mark.parametrize("directions", [("query_to_doc",), ("query_to_doc", "doc_to_query")], ids=len),
]
STOCK_16BIT_GRID = [
    pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str),
    pytest.mark.parametrize("similarity", ["cos", "dot"]),
    pytest.mark.parametrize("config", range(len(CONFIGS))),
    pytest.mark.parametrize("batch, dim, columns", [(1, 16, 2), (7, 48, 4), (33, 16, 3)]),
]


def stock_mnrl(embeddings, similarity, **config):
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    similarity_fct = util.cos_sim if similarity == "cos" else util.dot_score
    stock = MultipleNegativesRankingLoss(None, similarity_fct=similarity_fct, **config)
    loss = stock.compute_loss_from_embeddings(embeddings, None)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, embeddings)]


def flush_bound(embeddings, similarity: str, scale: float = 20.0) -> float:
    """Norm of the most a gradient can lose to float16 coefficients flushed to zero: entries of d(B·loss)/dS below
    τ = 2^-37 · scale · r_max² (γ keeps the largest possible coefficient at 2^14 or less, float16's smallest
    subnormal is 2^-24; r: inverse norms, 1 for dot), each times a column of norm <= max ||x||, over at most 4·N
    columns, divided by B, over every row. Only reached where the exact gradient is ~0 anyway (a saturated
    softmax leaves a column a gradient of ~1e-33 that stock keeps in fp32 and float16 cannot hold)."""
    norms = torch.cat([x.detach().double().norm(dim=1) for x in embeddings])
    r_max = float((1.0 / norms).max()) if similarity == "cos" else 1.0
    tau = 2.0**-37 * scale * r_max * r_max
    batch, rows = embeddings[0].shape[0], norms.numel()
    return tau * 4 * rows / batch * float(norms.max()) * math.sqrt(rows)


def assert_16bit_parity(loss, grads, reference, baseline, dtype, flush: float):
    """Loss as in the fp32 parity tests; gradients within 1e-4 relative plus twice the larger of the rounding of the
    exact gradient to ``dtype`` and stock's own error (the latter decides where the exact gradient is ~0, B = 1),
    plus ``flush`` (see flush_bound)."""
    (ref_loss, ref_grads), (base_loss, base_grads) = reference, baseline
    assert torch.isfinite(loss)
    assert_close_to_reference(loss, ref_loss, base_loss, rtol=1e-5, what="loss")
    for column, (grad, ref_grad, base_grad) in enumerate(zip(grads, ref_grads, base_grads, strict=True)):
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        rounding = float((ref_grad.to(dtype).double() - ref_grad).norm())
        stock_error = float((base_grad.double() - ref_grad).norm())
        error = float((grad.double() - ref_grad).norm())
        allowed = 1e-4 * float(ref_grad.norm()) + 2 * max(rounding, stock_error) + flush
        assert error <= allowed, f"gradient of column {column}: error {error:.3g} > {allowed:.3g}"


def one_pass_kernel_matches_the_torch_row_kernel(coefficient_dtype, hardness, rows, width, layout):
    """The native one-pass kernel with row / column scales against the PyTorch row kernel in float64."""
    directions, partition, blocks = ROW_KERNEL_LAYOUTS[layout]
    spec = ContrastiveSpec.from_loss_config(
        scale=20.0, directions=directions, partition_mode=partition, hardness_mode=hardness, hardness_strength=5.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(11)
    lengths = [block * width for block in blocks]
    scores = [torch.rand(rows, n, generator=generator) * 4 - 2 for n in lengths]
    scales = [SegmentScales(torch.rand(rows, generator=generator) + 0.3, torch.rand(n, generator=generator) + 0.3)
              for n in lengths]  # fmt: skip
    expected_out = [torch.empty(s.shape, dtype=torch.float64) for s in scores]
    expected = torch_row_kernel(
        [s.double() for s in scores], spec, width - rows, width, 1.0 / rows,
        [SegmentScales(s.rows.double(), s.columns.double()) for s in scales], expected_out,
    )  # fmt: skip
    from st_fast.ops.row_kernel_native import native_row_kernel

    actual_out = [torch.full(s.shape, float("nan")).to(coefficient_dtype) for s in scores]
    actual = native_row_kernel(scores, spec, width - rows, width, 1.0 / rows, scales, actual_out)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    assert_coefficients_close(actual_out, expected_out, scales, 1.0 / rows, spec.scale, coefficient_dtype)


def single_column_coefficients_are_exactly_zero(kernel, coefficient_dtype, with_scales, directions):
    """B = 1 without negatives: every direction's softmax has one column, the loss is LSE([s]) - s = 0 for any
    embeddings and every coefficient is 0 exactly (as stock's float32 gradient is), not -w/2 in Q2D and +w/2 in D2Q
    whose products with the embeddings would leave a rounding residue in the gradient GEMMs."""
    spec = ContrastiveSpec.from_loss_config(scale=20.0, directions=directions, partition_mode="per_direction")
    value = 0.7316  # the same pair's score in Q2D and D2Q
    scores = [torch.full((1, 1), value) for _ in directions]
    scales = [SegmentScales(torch.tensor([1.37]), torch.tensor([0.61])) for _ in directions] if with_scales else None
    out = [torch.full((1, 1), float("nan")).to(coefficient_dtype) for _ in directions]
    if kernel == "native":
        from st_fast.ops.row_kernel_native import native_row_kernel as row_kernel
    else:
        row_kernel = torch_row_kernel
    loss = row_kernel(scores, spec, 0, 1, 1.0, scales, out)
    assert float(loss) == 0.0
    for coefficient in out:
        assert torch.equal(coefficient.float(), torch.zeros(1, 1)), coefficient


def sixteen_bit_path_matches_stock(backend, dtype, similarity, config, batch, dim, columns):
    """The raw 16-bit path (the caller selects it, see test_raw_16bit's fixture) against stock in float64."""
    embeddings = random_columns(batch, dim, columns, dtype=dtype, seed=batch * 7 + config)
    reference = stock_mnrl([x.detach().double().requires_grad_() for x in embeddings], similarity, **CONFIGS[config])
    baseline = stock_mnrl(embeddings, similarity, **CONFIGS[config])
    loss = fused_mnrl_loss(embeddings[0], embeddings[1:], similarity=similarity, backend=backend, **CONFIGS[config])
    grads = torch.autograd.grad(loss, embeddings)
    assert_16bit_parity(loss.detach(), grads, reference, baseline, dtype, flush_bound(embeddings, similarity))


# ---- The symmetric path's two passes and driver (tests/ops/test_symmetric_row_kernel.py).

SYMMETRIC = ("query_to_doc", "doc_to_query")
ALL_FOUR = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")

TWO_PASS_GRID = [
    pytest.mark.parametrize(
        "directions, partition, hardness",
        [
            (SYMMETRIC, "per_direction", None),
            (SYMMETRIC, "joint", "hard_negatives"),
            (ALL_FOUR, "joint", "all_negatives"),
            (ALL_FOUR, "joint", "in_batch_negatives"),
        ],
    ),
    pytest.mark.parametrize("with_scales", [False, True], ids=["plain", "scaled"]),
]
DRIVER_GRID = [
    pytest.mark.parametrize(
        "directions, partition, hardness",
        [
            (SYMMETRIC, "per_direction", "in_batch_negatives"),
            (SYMMETRIC, "joint", None),
            (ALL_FOUR, "joint", "hard_negatives"),
        ],
    ),
    pytest.mark.parametrize("offset, batch, width", [(0, 19, 19), (5, 9, 19)], ids=["local", "gathered"]),
]


def random_segments(kinds, width, k, rows, device, generator, *, with_scales):
    """Raw scores of the row segments (D2Q: the other ranks' queries only, local columns -inf) and their scales."""
    lengths = [
        k * width if kind in (SegmentKind.OWN_POSITIVE, SegmentKind.OWN_GROUP_MASKED) else width for kind in kinds
    ]
    scores = [(torch.rand(rows, n, generator=generator) * 2 - 1).to(device) for n in lengths]
    scales = None
    if with_scales:
        scales = [
            SegmentScales((torch.rand(rows, generator=generator) + 0.5).to(device),
                          (torch.rand(n, generator=generator) + 0.5).to(device))
            for n in lengths
        ]  # fmt: skip
    return scores, scales


def in_float64(scores, scales):
    doubled = [s.double() for s in scores]
    return doubled, None if scales is None else [SegmentScales(s.rows.double(), s.columns.double()) for s in scales]


def row_chunk(scores, scales, rows):
    part = [s[rows].contiguous() for s in scores]
    return part, None if scales is None else [SegmentScales(s.rows[rows].contiguous(), s.columns) for s in scales]


def two_passes_match_the_torch_reference(device, directions, partition, hardness, with_scales):
    """The native statistics and coefficient passes (row chunks in order) against the PyTorch reference in float64:
    row by row, column by column, entry by entry (with and without the one-exp column term's factors)."""
    from st_fast.ops.row_kernel_native import native_row_coefficients, native_row_statistics

    width, batch, offset, k, chunk = 13, 7, 4, 2, 3  # local rows 4 .. 11 of 13: other ranks' rows on both sides
    spec = ContrastiveSpec.from_loss_config(
        scale=20.0, directions=directions, partition_mode=partition, hardness_mode=hardness,
        hardness_strength=0.0 if hardness is None else 5.0,
    )  # fmt: skip
    kinds = tuple(kind for kind in spec.kinds if kind != SegmentKind.PLAIN) + (SegmentKind.PLAIN,)
    generator = torch.Generator().manual_seed(len(directions) + 3 * with_scales)
    scores, scales = random_segments(kinds, width, k, batch, device, generator, with_scales=with_scales)
    remote = scores[-1]
    remote[:, offset : offset + batch] = float("-inf")
    block = PositiveBlock(offset, batch)
    ref_scores, ref_scales = in_float64(scores, scales)

    # statistics: the whole tile at once (reference, float64) vs row chunks in order (native, fp32)
    ref_max = torch.full((batch,), float("-inf"), dtype=torch.float64, device=device)
    ref_sum = torch.zeros(batch, dtype=torch.float64, device=device)
    ref_lse, ref_positive = torch_row_statistics(
        ref_scores, kinds, spec, offset, width, block, ref_max, ref_sum, ref_scales
    )
    column_max = torch.full((batch,), float("-inf"), device=device)
    column_sum = torch.zeros(batch, device=device)
    lse, positive = [], []
    for begin in range(0, batch, chunk):
        rows = slice(begin, min(batch, begin + chunk))
        part, part_scales = row_chunk(scores, scales, rows)
        chunk_lse, chunk_positive = native_row_statistics(
            part, kinds, spec, offset + begin, width, block, column_max, column_sum, part_scales
        )
        lse.append(chunk_lse)
        positive.append(chunk_positive)
    lse, positive = torch.cat(lse), torch.cat(positive)
    for row in range(batch):
        torch.testing.assert_close(lse[row].double(), ref_lse[row], rtol=1e-6, atol=1e-5, msg=f"row {row}")
        torch.testing.assert_close(positive[row].double(), ref_positive[row], rtol=1e-6, atol=1e-5)
    columns, ref_columns = column_lse(column_max, column_sum), column_lse(ref_max, ref_sum)
    q2d = ref_scores[0] if ref_scales is None else ref_scores[0] * ref_scales[0].rows[:, None] * ref_scales[0].columns
    direct = torch.logsumexp(spec.scale * q2d[:, offset : offset + batch], dim=0)
    for column in range(batch):
        torch.testing.assert_close(columns[column].double(), ref_columns[column], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(ref_columns[column], direct[column], rtol=1e-12, atol=1e-12)

    # coefficients from references as the driver forms them
    d2q_lse = torch.logaddexp(ref_columns, ref_lse[:, -1])
    directions_lse = torch.cat([ref_lse[:, :-1], d2q_lse[:, None]], dim=1)
    if spec.joint:
        log_z = torch.logsumexp(directions_lse, dim=1)
        row_ref, column_ref = log_z[:, None].expand(-1, len(kinds)).contiguous(), log_z.clone()
    else:
        row_ref, column_ref = directions_lse.clone(), d2q_lse.clone()
    # one row and one column far above the others: their factors are 0 and take the direct exp
    row_ref[1] += 30.0
    column_ref[2] += 30.0
    factors = [f.float() for f in reference_factors(row_ref[:, 0].float(), column_ref.float())]
    assert factors[0][1] == 0 and factors[1][2] == 0 and (factors[0] > 0).sum() > 1 and (factors[1] > 0).sum() > 1
    grad_scale = 1.0 / batch
    expected = [torch.empty_like(s) for s in ref_scores]
    torch_row_coefficients(
        ref_scores, kinds, spec, offset, width, grad_scale, block, row_ref, column_ref, ref_scales, expected
    )
    for dtype, with_factors in ((torch.float32, False), (torch.float32, True), (torch.float16, True)):
        actual = [torch.full(s.shape, float("nan"), device=device).to(dtype) for s in scores]
        for begin in range(0, batch, chunk):
            rows = slice(begin, min(batch, begin + chunk))
            part, part_scales = row_chunk(scores, scales, rows)
            outputs = [torch.empty(p.shape, dtype=dtype, device=device) for p in part]
            native_row_coefficients(
                part, kinds, spec, offset + begin, width, grad_scale, block, row_ref[rows].float().contiguous(),
                column_ref.float().contiguous(), part_scales, outputs,
                (factors[0][rows], factors[1]) if with_factors else None,
            )  # fmt: skip
            for out, piece in zip(actual, outputs, strict=True):
                out[rows] = piece
        pairs = [(s.rows, s.columns) for s in scales] if scales else [(torch.ones(1), torch.ones(1))]
        assert_coefficients_close(actual, expected, pairs, grad_scale, spec.scale, dtype)


def driver_result(queries, docs, problem, backend):
    from st_fast.ops.backends import resolve_backend

    chosen = resolve_backend(backend, queries.device, queries.dtype)
    return chosen.driver(queries, docs, problem, chosen.row_kernel, need_grad=True)


def kept_and_recomputed_tiles_match_the_one_pass_driver(monkeypatch, backend, directions, partition, hardness, offset,
                                                        batch, width):  # fmt: skip
    """The symmetric driver (kept tile, then recomputed chunks of 4 rows) against the one-pass driver."""
    spec = ContrastiveSpec.from_loss_config(
        scale=20.0, directions=directions, partition_mode=partition, hardness_mode=hardness,
        hardness_strength=0.0 if hardness is None else 4.0,
    )  # fmt: skip
    columns = random_columns(width, 12, 3, seed=offset + batch)
    queries = torch.nn.functional.normalize(columns[0].detach(), dim=1)
    docs = torch.nn.functional.normalize(torch.cat([c.detach() for c in columns[1:]]), dim=1)
    calls = []
    segment_scores = mnrl_chunked._segment_scores

    def spy(ops, kind, rows, out, ranges=None):
        calls.append((kind, ranges))
        return segment_scores(ops, kind, rows, out, ranges)

    monkeypatch.setattr(mnrl_chunked, "_segment_scores", spy)
    problem = mnrl_chunked.ContrastiveProblem(spec, offset, batch)
    kept = driver_result(queries, docs, problem, backend)
    # doc_to_query is never its own GEMM over this rank's queries: only over the other ranks' (gathered) ones
    d2q = [ranges for kind, ranges in calls if kind == SegmentKind.PLAIN]
    expected_ranges = [(lo, hi) for lo, hi in ((0, offset), (offset + batch, width)) if hi > lo]
    assert all(ranges == expected_ranges for ranges in d2q) and (len(d2q) > 0) == (batch < width)
    # recomputed: chunks of 4 rows, nothing kept
    monkeypatch.setitem(chunked_common.DEFAULT_KEEP_BYTES, "cpu", 1)
    monkeypatch.setattr(mnrl_chunked, "chunk_rows_for_budget", lambda *args, **kwargs: 4)
    calls.clear()
    recomputed = driver_result(queries, docs, problem, backend)
    row_segments = len(spec.kinds) - (batch == width)  # D2Q is a row segment only against other ranks' queries
    assert len(calls) == 2 * row_segments * -(-batch // 4)  # every chunk's row segments, in both passes
    # the one-pass driver: every direction its own GEMMs
    monkeypatch.setattr(ContrastiveSpec, "fuses_doc_to_query", property(lambda self: False))
    one_pass = driver_result(queries, docs, problem, backend)
    for result in (kept, recomputed):
        torch.testing.assert_close(result.loss, one_pass.loss, rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(result.grad_anchors, one_pass.grad_anchors, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(result.grad_candidates, one_pass.grad_candidates, rtol=1e-5, atol=2e-6)
