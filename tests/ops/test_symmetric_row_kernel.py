"""The symmetric path (query_to_doc with doc_to_query from one score tile, st_fast/ops/mnrl/chunked.py) at the row
kernel level and in the chunked driver.

1. The row kernel's two passes (csrc/include/st_fast/row_kernel_*.h: CPU build here, CUDA build under the ``gpu``
   marker) against the PyTorch reference (st_fast/ops/row_kernel_torch.py) on float64 copies of the same scores:
   the statistics row by row (each row segment's LSE, the positive logit) and column by column (each column's LSE
   from its online max / sum, continued over several row chunks), the coefficients entry by entry (with and without
   the row / column factors of the one-exp column term); the reference's column statistics against a plain
   logsumexp over the columns.
2. The driver: the kept tile and the recomputed chunks against the one-pass driver (every direction its own GEMMs,
   the path the parity grids checked before), with local rows inside a wider gathered block (the other ranks'
   queries before and after them), and the doc_to_query GEMM restricted to the other ranks' queries.
"""

from __future__ import annotations

import pytest
import row_kernel_cases as shared
import torch
from parity import assert_coefficients_close, random_columns
from row_kernel_cases import cases

from st_fast.ops import chunked as chunked_common  # noqa: I001
from st_fast.ops import fused_mnrl_loss
from st_fast.ops.backends import native_available
from st_fast.ops.layout import SegmentKind
from st_fast.ops.mnrl import chunked as mnrl_chunked
from st_fast.ops.mnrl.spec import ContrastiveSpec
from st_fast.ops.row_kernel import PositiveBlock, column_lse
from st_fast.ops.row_kernel_torch import torch_row_coefficients, torch_row_statistics

SYMMETRIC = shared.SYMMETRIC
ALL_FOUR = shared.ALL_FOUR

DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not native_available(torch.device("cpu")), reason="native CPU kernel not built")
    ),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device", DEVICES)
@cases(shared.TWO_PASS_GRID)
def test_two_passes_match_the_torch_reference_row_by_row_and_column_by_column(
    device, directions, partition, hardness, with_scales
):
    shared.two_passes_match_the_torch_reference(device, directions, partition, hardness, with_scales)


BACKENDS = ["torch"] + (["native"] if native_available(torch.device("cpu")) else [])


@pytest.mark.parametrize("backend", BACKENDS)
@cases(shared.DRIVER_GRID)
def test_kept_and_recomputed_tiles_match_the_one_pass_driver(
    monkeypatch, backend, directions, partition, hardness, offset, batch, width
):
    shared.kept_and_recomputed_tiles_match_the_one_pass_driver(
        monkeypatch, backend, directions, partition, hardness, offset, batch, width
    )


def test_symmetric_loss_is_the_mean_of_both_directions():
    """per_direction over query_to_doc and doc_to_query is the mean of the two one-direction losses (doc_to_query
    being query_to_doc with the roles swapped): a check of the derived direction independent of stock."""
    queries, docs = (x.detach() for x in random_columns(11, 16, 2, seed=3))
    symmetric = fused_mnrl_loss(queries, [docs], directions=SYMMETRIC, partition_mode="per_direction", backend="torch")
    forward = fused_mnrl_loss(queries, [docs], backend="torch")
    backward = fused_mnrl_loss(docs, [queries], backend="torch")
    torch.testing.assert_close(symmetric, (forward + backward) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("partition", ["joint", "per_direction"])
def test_learnable_scale_gets_stocks_gradient(backend, partition):
    """The scale's gradient comes from the operand gradients (Euler's identity), which the symmetric path's
    combined coefficients must give exactly as the separate directions did."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    embeddings = random_columns(9, 16, 3, seed=11)
    grads = {}
    for name, dtype in (("stock", torch.float64), ("fast", torch.float32)):
        scale = torch.tensor(17.0, dtype=dtype, requires_grad=True)
        inputs = [x.detach().to(dtype) for x in embeddings]
        if name == "stock":
            loss = MultipleNegativesRankingLoss(None, scale=scale, directions=SYMMETRIC, partition_mode=partition)
            value = loss.compute_loss_from_embeddings(inputs, None)
        else:
            value = fused_mnrl_loss(inputs[0], inputs[1:], scale=scale, directions=SYMMETRIC, partition_mode=partition,
                                    backend=backend)  # fmt: skip
        (grads[name],) = torch.autograd.grad(value, [scale])
    torch.testing.assert_close(grads["fast"].double(), grads["stock"], rtol=1e-5, atol=1e-7)


NATIVE_CPU = pytest.mark.skipif(not native_available(torch.device("cpu")), reason="native CPU kernel not built")


@NATIVE_CPU
@pytest.mark.parametrize("directions, partition", [(SYMMETRIC, "per_direction"), (ALL_FOUR, "joint"),
                                                   (ALL_FOUR, "per_direction")])  # fmt: skip
@pytest.mark.parametrize("offset, batch, width", [(0, 11, 11), (4, 7, 13)], ids=["local", "gathered"])
def test_fixed_shift_passes_match_the_torch_reference(directions, partition, offset, batch, width):
    """The fixed-shift form (row_kernel_fixed_shift.h: e = exp(logit - K) written over the scores, then the coefficients
    from e) against the PyTorch reference's two passes in float64: row LSEs, positives, the column LSEs continued
    over row chunks, and every coefficient (the aliased in-place store included)."""
    from st_fast.ops.row_kernel_native import native_row_exp_coefficients, native_row_exp_statistics

    k, chunk, scale = 2, 3, 20.0
    spec = ContrastiveSpec.from_loss_config(scale=scale, directions=directions, partition_mode=partition)
    remote_columns = batch < width
    kinds = tuple(kind for kind in spec.kinds if kind != SegmentKind.PLAIN) + (
        (SegmentKind.PLAIN,) if remote_columns else ()
    )
    generator = torch.Generator().manual_seed(batch + len(directions))
    scores, _ = shared.random_segments(
        kinds, width, k, batch, "cpu", generator, with_scales=False
    )  # cosines in [-1, 1)
    if remote_columns:
        scores[-1][:, offset : offset + batch] = float("-inf")
    block = PositiveBlock(offset, batch)
    ref_scores, _ = shared.in_float64(scores, None)
    ref_max = torch.full((batch,), float("-inf"), dtype=torch.float64)
    ref_sum = torch.zeros(batch, dtype=torch.float64)
    ref_lse, ref_positive = torch_row_statistics(ref_scores, kinds, spec, offset, width, block, ref_max, ref_sum)

    exps = [s.clone() for s in scores]
    column_max, column_sum = torch.full((batch,), float("-inf")), torch.zeros(batch)
    lse, positive = [], []
    for begin in range(0, batch, chunk):
        rows = slice(begin, min(batch, begin + chunk))
        part = [e[rows] for e in exps]  # row slices of contiguous tiles: contiguous views, written in place
        chunk_lse, chunk_positive = native_row_exp_statistics(
            part, kinds, spec, offset + begin, width, block, column_max, column_sum, scale
        )
        lse.append(chunk_lse)
        positive.append(chunk_positive)
    torch.testing.assert_close(torch.cat(lse).double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.cat(positive).double(), ref_positive, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(column_lse(column_max, column_sum).double(), column_lse(ref_max, ref_sum), rtol=1e-6,
                               atol=1e-5)  # fmt: skip
    # e = exp(scale·s - K), 0 at masked own columns; the fp32 roundings of scale·s and of l - K are absolute errors
    # up to 2K·2^-24 each: relative errors of e
    exp_rtol = 4 * 2 * scale * 2.0**-24
    for e, s in zip(exps, scores, strict=True):
        unmasked = e != 0
        expected_e = torch.exp(scale * s[unmasked].double() - scale)
        torch.testing.assert_close(e[unmasked].double(), expected_e, rtol=exp_rtol, atol=0)

    d2q_lse = column_lse(ref_max, ref_sum)
    if remote_columns:
        d2q_lse = torch.logaddexp(d2q_lse, ref_lse[:, -1])
    own = len(kinds) - remote_columns
    directions_lse = torch.cat([ref_lse[:, :own], d2q_lse[:, None]], dim=1)
    if spec.joint:
        log_z = torch.logsumexp(directions_lse, dim=1)
        row_ref, column_ref = log_z[:, None].expand(-1, len(kinds)).contiguous(), log_z.clone()
    else:
        row_ref = (directions_lse if remote_columns else directions_lse[:, :own]).contiguous()
        column_ref = d2q_lse.clone()
    grad_scale = 1.0 / batch
    expected = [torch.empty_like(s) for s in ref_scores]
    torch_row_coefficients(ref_scores, kinds, spec, offset, width, grad_scale, block, row_ref, column_ref, None,
                           expected)  # fmt: skip
    row_factor = torch.exp(scale - row_ref).float()
    column_factor = torch.exp(scale - column_ref).float()
    separate = [torch.full(e.shape, float("nan")) for e in exps]
    native_row_exp_coefficients(exps, kinds, spec, offset, width, grad_scale, block, row_factor, column_factor,
                                separate)  # fmt: skip
    native_row_exp_coefficients(exps, kinds, spec, offset, width, grad_scale, block, row_factor, column_factor)
    ones = [(torch.ones(1), torch.ones(1))]
    assert_coefficients_close(separate, expected, ones, grad_scale, scale, torch.float32)
    assert_coefficients_close(exps, expected, ones, grad_scale, scale, torch.float32)  # in place, over e


def _symmetric_inputs(width, dim, k, seed, norm=1.0):
    columns = random_columns(width, dim, k, seed=seed)
    queries = torch.nn.functional.normalize(columns[0].detach(), dim=1) * norm
    docs = torch.nn.functional.normalize(torch.cat([c.detach() for c in columns[1:]]), dim=1) * norm
    return queries, docs


@NATIVE_CPU
@pytest.mark.parametrize(
    "scale, norm, hardness, width, takes_fixed_shift",
    [
        (20.0, 1.0, None, 17, True),  # cosine at stock's default scale
        (40.0, 1.0, None, 17, True),  # 2K = 80: the limit
        (45.0, 1.0, None, 17, False),  # 2K = 90: exp(logit - K) could leave the normal floats
        (20.0, 3.0, None, 17, False),  # dot products of norm-3 embeddings: |logit| <= 180
        (20.0, 1.0, "hard_negatives", 17, False),  # penalized logits are not exp(scale·s - K)
        (20.0, 1.0, None, 1, False),  # one column: the exact 0 gradient of the general form
    ],
)
def test_driver_takes_the_fixed_shift_form_only_where_it_is_exact(monkeypatch, scale, norm, hardness, width,
                                                                  takes_fixed_shift):  # fmt: skip
    """The native CPU driver takes the fixed-shift form exactly where every logit is within [-K, K] with 2K <= 80
    and nothing is penalized, and gives the general form's loss and gradients there (kept tile and recomputed
    chunks)."""
    from st_fast.ops.row_kernel_native import NATIVE_ROW_KERNEL

    queries, docs = _symmetric_inputs(width, 12, 2, seed=width, norm=norm)
    spec = ContrastiveSpec.from_loss_config(
        scale=scale, directions=SYMMETRIC, partition_mode="per_direction", hardness_mode=hardness,
        hardness_strength=0.0 if hardness is None else 3.0,
    )  # fmt: skip
    problem = mnrl_chunked.ContrastiveProblem(spec, 0, width)
    shifts = []
    fixed_shift = mnrl_chunked.fixed_shift
    monkeypatch.setattr(mnrl_chunked, "fixed_shift", lambda *a: shifts.append(fixed_shift(*a)) or shifts[-1])
    results = [mnrl_chunked.loss_and_grad(queries, docs, problem, NATIVE_ROW_KERNEL, need_grad=True)]
    assert (shifts[-1] is not None) == takes_fixed_shift
    if takes_fixed_shift:
        assert shifts[-1] == pytest.approx(scale * norm * norm, rel=1e-6)
    monkeypatch.setattr(mnrl_chunked, "chunk_rows_for_budget", lambda *args, **kwargs: 4)
    monkeypatch.setitem(chunked_common.DEFAULT_KEEP_BYTES, "cpu", 1)
    results.append(mnrl_chunked.loss_and_grad(queries, docs, problem, NATIVE_ROW_KERNEL, need_grad=True))
    monkeypatch.setattr(mnrl_chunked, "fixed_shift", lambda *a: None)
    results.append(mnrl_chunked.loss_and_grad(queries, docs, problem, NATIVE_ROW_KERNEL, need_grad=True))
    from st_fast.ops.row_kernel_torch import TORCH_ROW_KERNEL

    exact = mnrl_chunked.loss_and_grad(queries.double(), docs.double(), problem, TORCH_ROW_KERNEL, need_grad=True)

    def errors(result):
        return [float((getattr(result, name).double() - getattr(exact, name)).abs().max())
                for name in ("loss", "grad_anchors", "grad_candidates")]  # fmt: skip

    general = errors(results[-1])
    # the fixed-shift form is as accurate as the general one against float64 (within 2x of its fp32 error, or a
    # few fp32 roundings of the largest gradient term scale / B)
    floor = 4 * 2.0**-24 * scale / width
    for result in results[:-1]:
        for got, bound in zip(errors(result), general, strict=True):
            assert got <= 2 * bound + floor, (got, bound)
