"""The chunked driver of the MNRL op (``torch`` and ``native`` backends, :class:`st_fast.ops.chunked.ChunkedBackend`).

Operands: queries (W, D) and docs (k·W, D); the local rows are queries[offset : offset+B] with their positives
docs[offset : offset+B]. They come in one of two forms (chosen by the backend's ``takes_raw_operands``, see
:func:`st_fast.ops.mnrl.functional.fused_mnrl_loss`):

* fp32 / fp64, already unit-normalized for cosine similarity (no scales): score GEMMs in that dtype, gradient
  coefficients written over the fp32 scores;
* raw embeddings (16-bit) with ``normalize=True`` for cosine similarity: the raw 16-bit path
  (:mod:`st_fast.ops.raw_16bit`): score GEMMs of the raw operands with fp32 output, the inverse norms
  (:func:`st_fast.ops.normalization.inverse_norm`) applied by the row kernel as row and column scales, float16
  coefficients and float16 copies of the operands for the two gradient GEMMs.

For each chunk of local rows (:func:`st_fast.ops.chunked.row_chunks`): S_x = rows_x @ cols_xᵀ (fp32), the row
kernel turns S into per-row losses and coefficients C_x (= d loss / d S_x), then ``d_rows += C_x @ cols`` and
``d_cols += C_xᵀ @ rows`` (:class:`st_fast.ops.operands.Operands`, whose row and column operands of each segment
kind are :data:`st_fast.ops.layout.ROW_SOURCE` / ``COLUMN_SOURCE``). After the chunks, with ``normalize``, the
normalization's own term (:func:`st_fast.ops.normalization.add_normalization_term`), in fp32 (the caller rounds the
result to the input dtype once).

Memory beyond the inputs: the fp32 gradients (O((W + k·W)·D)) and one chunk of scores (chunk x total columns, plus
its 16-bit coefficients), never B x N at once.

The symmetric path (doc_to_query selected, always with query_to_doc): the doc_to_query segment of local row j,
sim(d_g, q_c) over the W queries, is for this rank's queries c = o .. o+B the column g = o + j of the Q2D tile's
positive block, so it is not computed again. Two passes over the row chunks:

1. statistics: the scores of the row segments (Q2D, Q2Q, D2D and, with gathered columns, D2Q against the other
   ranks' queries only: columns 0 .. o and o+B .. W, the local ones -inf); the row kernel's ``statistics`` gives each
   row segment's LSE and the positive logit, and continues the online max / sum of every column of the positive
   block over the chunk's rows (fp32, rows in order: deterministic). The column statistics of a rank cover its local
   queries only; the other ranks' queries enter row j's doc_to_query LSE through that second D2Q segment, so
   lse_d2q[j] = logaddexp(column LSE of j, LSE of the other ranks' columns), exactly stock's D2Q row over all W
   gathered queries. Then log_z per row (joint: log-add-exp of the directions' LSEs; per_direction: their mean) and
   the loss.
2. coefficients: on the kept tile (when every row segment of all B rows fits ``problem.chunk_bytes``, default
   st_fast.ops.chunked.DEFAULT_KEEP_BYTES) or on recomputed chunks, the row kernel's ``coefficients`` writes one
   coefficient per entry: row-softmax term + column-softmax term on the positive block, minus the one-hot
   positives on its diagonal (the native kernel takes an unpenalized entry's column term as its row term times a
   row and a column factor, st_fast.ops.row_kernel.reference_factors: one exp per entry); then the two gradient
   GEMMs of each row segment (the D2Q one on the other ranks' columns only). The coefficients of the other ranks'
   queries go back to them through the gather's backward, as with stock.

GEMM FLOPs per forward + backward (B local rows, W columns per block, k blocks, D; :func:`gemm_flops`): each row
segment of L columns costs 2·B·L·D for its scores, again in the coefficient pass unless the tile is kept, and 4·B·L·D
for its gradients. One direction (L = k·W): 6·B·k·W·D. Without gathering the symmetric directions need no D2Q
segment: 6·B·k·W·D with the tile kept, 8·B·k·W·D recomputed (independent GEMMs per direction: 6·B·(k+1)·W·D);
query_to_query adds a W-wide segment and doc_to_doc a k·W-wide one at the same rates.
"""

from __future__ import annotations

import math

import torch

from st_fast.ops.chunked import DEFAULT_KEEP_BYTES, LossAndGrad, RowChunk, chunk_rows_for_budget, row_chunks
from st_fast.ops.layout import COLUMN_SOURCE, ROW_SOURCE, HardnessKind, SegmentKind
from st_fast.ops.mnrl.spec import ContrastiveProblem, ContrastiveSpec
from st_fast.ops.normalization import NORMALIZE_EPS, inverse_norm  # noqa: F401 (NORMALIZE_EPS: read here by tests)
from st_fast.ops.operands import ColumnRanges, Operands
from st_fast.ops.raw_16bit import as_float16_operand, coefficient_scale, stores_float16_coefficients
from st_fast.ops.row_kernel import (
    FIXED_SHIFT_LIMIT,
    DuplicateLabels,
    PositiveBlock,
    RowKernel,
    SegmentScales,
    column_lse,
    combine_partitions,
    reference_factors,
)
from st_fast.ops.workspace import Arena, with_scratch


@with_scratch
def loss_and_grad(
    queries: torch.Tensor, docs: torch.Tensor, problem: ContrastiveProblem, row_kernel: RowKernel, *, need_grad: bool,
    arena: Arena,
) -> LossAndGrad:  # fmt: skip
    """The mean loss over the local rows and, with ``need_grad``, its gradients d loss / d queries (W, D) and
    d loss / d docs (k·W, D), fp32 (fp64 for fp64 operands); see the module docstring. ``arena``: the call's
    scratch memory (:func:`st_fast.ops.workspace.with_scratch` passes it; callers leave it out)."""
    ops = _operands(queries, docs, problem, need_grad, arena)
    # coefficients are stored times gamma (see coefficient_scale); the gradient GEMMs are accumulated times 1/(B·γ·σ)
    gamma = coefficient_scale(ops.coefficient_dtype, problem.spec, [s for s in ops.scales.values() if s is not None])
    ops.set_coefficient_scale(gamma)
    if problem.spec.fuses_doc_to_query:
        loss = _symmetric_passes(ops, problem, row_kernel, gamma, need_grad)
    else:
        loss = _one_pass(ops, problem, row_kernel, gamma, need_grad)
    return ops.result(loss)


def _operands(
    queries: torch.Tensor, docs: torch.Tensor, problem: ContrastiveProblem, need_grad: bool, arena: Arena
) -> Operands:
    """The call's operands: the raw operands' inverse norms with ``normalize`` (cosine similarity applied by the row
    kernel), float16 copies of 16-bit operands for the gradient GEMMs (:mod:`st_fast.ops.raw_16bit`)."""
    operands = {"queries": queries, "docs": docs}
    scales = {name: inverse_norm(x) for name, x in operands.items()} if problem.normalize else None
    float16 = None
    if stores_float16_coefficients(queries.dtype, need_grad):
        float16 = {name: as_float16_operand(x) for name, x in operands.items()}
    return Operands.prepare(operands, arena, need_grad=need_grad, scales=scales, float16=float16)


def _sources(kind: SegmentKind) -> tuple[str, str]:
    """The operands of a segment kind's rows and columns (:mod:`st_fast.ops.layout`)."""
    return ROW_SOURCE[kind], COLUMN_SOURCE[kind]


def _duplicate_labels(problem: ContrastiveProblem, kinds: tuple[SegmentKind, ...]) -> DuplicateLabels | None:
    """The row kernels' form of ``problem.labels`` (mask_duplicates) for the row segments ``kinds``: the int64
    labels renumbered to int32 0 .. texts - 1 (exact: one sort of the W·(k+1) labels, a host sync on CUDA), which
    the native CPU kernel compares in the floats' lane width."""
    if problem.labels is None:
        return None
    queries, docs = problem.labels
    dense = torch.unique(torch.cat([queries, docs]), return_inverse=True)[1].to(torch.int32)
    by_source = {"queries": dense[: queries.shape[0]], "docs": dense[queries.shape[0] :]}
    return DuplicateLabels(tuple(by_source[COLUMN_SOURCE[kind]] for kind in kinds), by_source["queries"])


def _one_pass(
    ops: Operands, problem: ContrastiveProblem, row_kernel: RowKernel, gamma: float | torch.Tensor, need_grad: bool
) -> torch.Tensor:
    """Every segment its own GEMMs: per chunk the scores, the row kernel (losses and coefficients), the gradient
    GEMMs."""
    spec, batch_size = problem.spec, problem.batch_size
    width = ops.rows("queries")
    lengths = [ops.rows(COLUMN_SOURCE[kind]) for kind in spec.kinds]
    device = ops.scores["queries"].device
    chunk = chunk_rows_for_budget(batch_size, sum(lengths), device, problem.chunk_bytes, ops.bytes_per_score)
    score_buffers = ops.buffers(chunk, lengths, ops.math_dtype)
    coefficient_buffers = ops.coefficient_buffers(chunk, lengths, score_buffers)
    loss_sum = torch.zeros((), dtype=ops.math_dtype, device=device)
    labels = _duplicate_labels(problem, spec.kinds)
    for rows in row_chunks(batch_size, chunk, problem.row_offset):
        scores = [
            _segment_scores(ops, kind, rows.global_rows, buffer[: rows.size])
            for kind, buffer in zip(spec.kinds, score_buffers, strict=True)
        ]
        scales = _segment_scales(ops, spec.kinds, rows, problem.normalize)
        coefficients = [buffer[: rows.size] for buffer in coefficient_buffers]
        row_losses = row_kernel(
            scores, spec, rows.start, width, gamma if need_grad else None, scales, coefficients, labels=labels
        )
        loss_sum += row_losses.sum()
        if need_grad:
            for kind, coefficient in zip(spec.kinds, coefficients, strict=True):
                ops.accumulate(*_sources(kind), rows.global_rows, coefficient, 1.0 / batch_size)
    return loss_sum / batch_size


def _segment_scores(ops: Operands, kind: SegmentKind, local_rows: slice, out: torch.Tensor,
                    column_ranges: ColumnRanges | None = None) -> torch.Tensor:  # fmt: skip
    """Raw scores of one segment of the rows ``local_rows`` (global indices) into ``out``; with ``column_ranges``
    only those columns, -inf in the others (:meth:`Operands.scores_into`)."""
    return ops.scores_into(*_sources(kind), local_rows, out, column_ranges)


def _segment_scales(
    ops: Operands, kinds: tuple[SegmentKind, ...], rows: RowChunk, normalize: bool
) -> list[SegmentScales] | None:
    """The row kernel's scales of each segment of a chunk (raw operands with cosine similarity), else None."""
    return [ops.segment_scales(*_sources(kind), rows.global_rows) for kind in kinds] if normalize else None


def _symmetric_passes(
    ops: Operands, problem: ContrastiveProblem, row_kernel: RowKernel, gamma: float | torch.Tensor, need_grad: bool
) -> torch.Tensor:
    """query_to_doc with doc_to_query from one Q2D tile (the symmetric path, see the module docstring): a
    statistics pass (row LSEs of the row segments, column statistics of the positive block), the log-partitions,
    then a coefficient pass (on the kept tile, or on recomputed chunks) with the gradient GEMMs of each row
    segment."""
    spec, offset, batch_size = problem.spec, problem.row_offset, problem.batch_size
    width = ops.rows("queries")
    device = ops.scores["queries"].device
    # the row segments: every direction but D2Q, and D2Q against the other ranks' queries (local columns -inf)
    remote = [(lo, hi) for lo, hi in ((0, offset), (offset + batch_size, width)) if hi > lo]
    kinds = tuple(kind for kind in spec.kinds if kind != SegmentKind.PLAIN) + ((SegmentKind.PLAIN,) if remote else ())
    ranges = [remote if kind == SegmentKind.PLAIN else None for kind in kinds]
    lengths = [ops.rows(COLUMN_SOURCE[kind]) for kind in kinds]
    block = PositiveBlock(offset, batch_size)
    labels = _duplicate_labels(problem, kinds)
    # keep the whole tile when it fits (no recompute: 6·B·N·D FLOPs of GEMMs for Q2D + D2Q, instead of 8)
    keep_budget = problem.chunk_bytes or DEFAULT_KEEP_BYTES.get(device.type, DEFAULT_KEEP_BYTES["cpu"])
    if batch_size * sum(lengths) * ops.bytes_per_score <= keep_budget:
        chunk = batch_size
    else:
        chunk = chunk_rows_for_budget(batch_size, sum(lengths), device, problem.chunk_bytes, ops.bytes_per_score)
    score_buffers = ops.buffers(chunk, lengths, ops.math_dtype)

    def chunk_scores(rows: RowChunk) -> list[torch.Tensor]:
        return [
            _segment_scores(ops, kind, rows.global_rows, buffer[: rows.size], columns)
            for kind, buffer, columns in zip(kinds, score_buffers, ranges, strict=True)
        ]

    row_lse = torch.empty(batch_size, len(kinds), dtype=ops.math_dtype, device=device)
    positive = torch.empty(batch_size, dtype=ops.math_dtype, device=device)
    column_max = torch.full((batch_size,), float("-inf"), dtype=ops.math_dtype, device=device)
    column_sum = torch.zeros(batch_size, dtype=ops.math_dtype, device=device)
    shift = fixed_shift(ops, problem, row_kernel)
    for rows in row_chunks(batch_size, chunk, offset):
        scores = chunk_scores(rows)
        if shift is not None:  # the scores become their e = exp(scale·score - shift)
            lse, pos = row_kernel.exp_statistics(
                scores, kinds, spec, rows.start, width, block, column_max, column_sum, shift, labels=labels
            )
        else:
            scales = _segment_scales(ops, kinds, rows, problem.normalize)
            lse, pos = row_kernel.statistics(
                scores, kinds, spec, rows.start, width, block, column_max, column_sum, scales, labels=labels
            )
        row_lse[rows.local], positive[rows.local] = lse, pos
    # D2Q of row j: its column of the positive block (this rank's queries) with the other ranks' queries
    d2q_lse = column_lse(column_max, column_sum)
    if remote:
        d2q_lse = torch.logaddexp(d2q_lse, row_lse[:, -1])
    own = len(kinds) - (1 if remote else 0)  # the row segments of their own direction (Q2D, Q2Q, D2D)
    direction_lses = torch.cat([row_lse[:, :own], d2q_lse[:, None]], dim=1)
    log_z = combine_partitions(direction_lses, spec.joint)
    loss = (log_z - positive).sum() / batch_size
    if not need_grad:
        return loss
    # the references of each softmax: log_z (joint), or the direction's own LSE (per_direction)
    if spec.joint:
        row_ref, column_ref = log_z[:, None].expand(-1, len(kinds)).contiguous(), log_z.contiguous()
    else:
        row_ref = direction_lses if remote else direction_lses[:, :own]
        column_ref = d2q_lse.contiguous()
    row_ref = row_ref.contiguous()
    row_factor, column_factor = reference_factors(row_ref[:, 0], column_ref)
    coefficient_buffers = ops.coefficient_buffers(chunk, lengths, score_buffers)
    for rows in row_chunks(batch_size, chunk, offset):
        # the kept tile (one chunk of all B rows) holds the scores of the statistics pass; else recompute them
        scores = chunk_scores(rows) if chunk < batch_size else [buffer[: rows.size] for buffer in score_buffers]
        coefficients = [buffer[: rows.size] for buffer in coefficient_buffers]
        if shift is not None and chunk == batch_size:  # the kept tile holds e
            row_kernel.exp_coefficients(
                scores, kinds, spec, rows.start, width, gamma, block, torch.exp(shift - row_ref),
                torch.exp(shift - column_ref), coefficients, labels=labels,
            )  # fmt: skip
        else:
            row_kernel.coefficients(
                scores, kinds, spec, rows.start, width, gamma, block, row_ref[rows.local], column_ref,
                _segment_scales(ops, kinds, rows, problem.normalize), coefficients,
                (row_factor[rows.local], column_factor), labels=labels,
            )  # fmt: skip
        for kind, coefficient, columns in zip(kinds, coefficients, ranges, strict=True):
            ops.accumulate(*_sources(kind), rows.global_rows, coefficient, 1.0 / batch_size, columns)
    return loss


def fixed_shift(ops: Operands, problem: ContrastiveProblem, row_kernel: RowKernel) -> float | None:
    """The shift of the symmetric path's fixed-shift form (:mod:`st_fast.ops.row_kernel`), or None where it does not
    apply: a row kernel that offers it, CPU float32 operands without scales (``normalize``), no hardness penalty,
    at least 2 columns per row (a single-column softmax keeps its exact 0 gradient in the general form), and a
    bound K = scale · max(||q||, ||d||)² >= |logit| (Cauchy-Schwarz) with 2K <= FIXED_SHIFT_LIMIT: cosine
    similarity at scale <= 40 (stock's default is 20). Reads two norms from the CPU operands (no device sync)."""
    queries, docs = ops.scores["queries"], ops.scores["docs"]
    if (
        row_kernel.exp_statistics is None
        or queries.device.type != "cpu"
        or ops.math_dtype != torch.float32
        or ops.coefficient_dtype != torch.float32
        or problem.normalize
        or problem.spec.hardness != HardnessKind.NONE
        or queries.shape[0] < 2
    ):
        return None
    norm = max(float(torch.linalg.vector_norm(x, dim=1).max()) for x in (queries, docs))
    shift = problem.spec.scale * norm * norm
    return shift if math.isfinite(shift) and 2 * shift <= FIXED_SHIFT_LIMIT else None


def gemm_flops(
    directions: tuple[str, ...] | list[str], batch_size: int, width: int, k: int, dim: int, *, kept: bool = True
) -> int:
    """GEMM FLOPs of one forward + backward of this driver (see the module docstring): per row segment of L columns
    2·B·L·D for the scores (twice when doc_to_query is derived from a tile that is not kept) and 4·B·L·D for the two
    gradient GEMMs. ``kept=False`` with doc_to_query gives the 4-GEMM floor of a fused design that keeps nothing."""
    spec = ContrastiveSpec.from_loss_config(scale=1.0, directions=directions)
    columns = {"queries": width, "docs": k * width}
    lengths = [columns[COLUMN_SOURCE[kind]] for kind in spec.kinds if kind != SegmentKind.PLAIN]
    if not spec.fuses_doc_to_query:
        return sum(6 * batch_size * length * dim for length in lengths)
    lengths.append(width - batch_size)  # D2Q against the other ranks' queries
    per_column = 6 if kept else 8
    return sum(per_column * batch_size * length * dim for length in lengths)
