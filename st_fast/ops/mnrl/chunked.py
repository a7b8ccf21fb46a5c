"""The chunked driver of the MNRL op (``torch`` and ``native`` backends, :class:`st_fast.ops.chunked.ChunkedBackend`).

Operands: queries (W, D) and docs (k·W, D); the local rows are queries[offset : offset+B] with their positives
docs[offset : offset+B]. They come in one of two forms (chosen by the backend's ``takes_raw_operands``, see
:func:`st_fast.ops.mnrl.functional.fused_mnrl_loss`):

* fp32 / fp64, already unit-normalized for cosine similarity (no scales): score GEMMs in that dtype, gradient
  coefficients written over the fp32 scores;
* raw embeddings (16-bit) with ``normalize=True`` for cosine similarity: r_a = 1 / max(||a||, 1e-12) in fp32 (as
  F.normalize after stock's upcast), the score GEMMs multiply the raw operands with fp32 accumulation and output
  (products of 16-bit numbers are exact, see :mod:`st_fast.ops.mixed_matmul`), the row kernel applies r as row and
  column scales, and the coefficients are stored in float16 for the two gradient GEMMs (fp32 outputs), which take
  float16 copies of the operands (exact for bf16 up to a power-of-two scale σ, divided out afterwards).

For each chunk of local rows: S_x = rows_x @ cols_xᵀ (fp32), the row kernel turns S into per-row losses and
coefficients C_x (= d loss / d S_x), then ``d_rows += C_x @ cols`` and ``d_cols += C_xᵀ @ rows``. After the chunks,
with ``normalize``, the normalization's own term: every score of a is linear in r_a, so
dL/dr_a = <g_a, a> / r_a with g_a the gradient at fixed r, and dr_a/da = -r_a³·a (0 below the eps), giving
dL/da = g_a - r_a²·<g_a, a>·a, all in fp32 (the caller rounds the result to the input dtype once).

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
from dataclasses import dataclass

import torch

from st_fast.ops.chunked import DEFAULT_KEEP_BYTES, LossAndGrad, chunk_rows_for_budget
from st_fast.ops.layout import COLUMN_SOURCE, ROW_SOURCE, HardnessKind, SegmentKind
from st_fast.ops.mixed_matmul import (
    accumulate_product,
    as_float16_operand,
    compute_dtype,
    matmul_fp32,
    power_of_two_scale,
)
from st_fast.ops.mnrl.spec import ContrastiveProblem, ContrastiveSpec
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
from st_fast.ops.workspace import Arena, scratch

NORMALIZE_EPS = 1e-12  # F.normalize's default, used by stock cos_sim


def coefficient_scale(
    operand_dtype: torch.dtype, spec: ContrastiveSpec, scales: list[torch.Tensor]
) -> float | torch.Tensor:
    """The factor γ the coefficients are stored with before the gradient GEMMs divide it out again.

    |coefficient| <= scale · r_max² (softmax weights are <= 1; r: the inverse norms, 1 without; twice that on the
    symmetric path's positive block, a row-softmax plus a column-softmax term), so float16 coefficients are stored
    with γ = 2^(14 - ceil(log2(scale · r_max²))), a power of two (exact) that keeps them within 2^14 (2^15 on the
    positive block; float16 overflows past 65504) and leaves 38 binades below the largest before subnormals; every
    other dtype stores them with γ = 1.
    Zero-norm rows (r = 1/eps) are left out of r_max: their coefficients saturate at the float16 maximum and multiply
    the zero vector, instead of flushing every other row's coefficients to zero.
    With scales, γ is a 0-dim float32 tensor on their device, computed there (no host sync: the row kernel and the
    gradient GEMMs consume it on the device; :func:`st_fast.ops.mixed_matmul.power_of_two_scale`, 1 where the bound is
    not finite); without, a number (r_max = 1).
    """
    if operand_dtype != torch.float16:
        return 1.0
    regular = [torch.where(s < 0.5 / NORMALIZE_EPS, s, 0).max() for s in scales if s.numel()]
    if not regular:
        bound = spec.scale
        return 2.0 ** (14 - math.ceil(math.log2(bound))) if math.isfinite(bound) and bound > 0 else 1.0
    r_max = torch.stack(regular).max()
    r_max = torch.where(r_max > 0, r_max, 1.0).double()  # NaN too: the loss is non-finite anyway
    return power_of_two_scale(spec.scale * r_max * r_max, 14)


@dataclass
class _Operands:
    """The operands of one call as the driver's passes use them: the score operands, their scales (raw path), the
    operands of the gradient GEMMs (float16 copies times σ on the 16-bit path), the fp32 / fp64 gradients. σ and the
    coefficients' γ (:func:`coefficient_scale`) are numbers, or 0-dim tensors on the device on the 16-bit path
    (never read on the host)."""

    scores: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor | None]
    gradient: dict[str, torch.Tensor]
    sigma: dict[str, float | torch.Tensor]
    grads: dict[str, torch.Tensor]
    math_dtype: torch.dtype
    coefficient_dtype: torch.dtype
    separate_coefficients: bool
    arena: Arena
    # 1 / (γ·σ) per operand: the powers of two that the gradient GEMMs with it as the column operand divide out
    unscale: dict[str, float | torch.Tensor] | None = None

    def set_coefficient_scale(self, gamma: float | torch.Tensor) -> None:
        self.unscale = {name: 1.0 / (gamma * sigma) for name, sigma in self.sigma.items()}

    @classmethod
    def prepare(
        cls, queries: torch.Tensor, docs: torch.Tensor, normalize: bool, need_grad: bool, arena: Arena
    ) -> _Operands:
        operands = {"queries": queries, "docs": docs}
        scales = {name: inverse_norm(x) if normalize else None for name, x in operands.items()}
        math_dtype = compute_dtype(queries.dtype)
        # 16-bit operands: float16 coefficients and float16 copies of the operands (exact, scaled by σ) for the
        # gradient GEMMs; float16 rounds the coefficients 8x finer than bf16 would
        separate = need_grad and queries.dtype != math_dtype
        gradient, sigma = operands, {name: 1.0 for name in operands}
        if separate:
            converted = {name: as_float16_operand(x) for name, x in operands.items()}
            gradient = {name: x16 for name, (x16, _) in converted.items()}
            sigma = {name: factor for name, (_, factor) in converted.items()}
        grads = {}
        if need_grad:
            grads = {name: torch.zeros(x.shape, dtype=math_dtype, device=x.device) for name, x in operands.items()}
        coefficient_dtype = torch.float16 if separate else math_dtype
        return cls(operands, scales, gradient, sigma, grads, math_dtype, coefficient_dtype, separate, arena)

    @property
    def bytes_per_score(self) -> int:
        return 4 + (2 if self.separate_coefficients else 0)

    def columns(self, kind: SegmentKind) -> int:
        return self.scores[COLUMN_SOURCE[kind]].shape[0]

    def buffers(self, rows: int, lengths: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """Uninitialized (rows, length) buffers of the call's scratch memory (:mod:`st_fast.ops.workspace`)."""
        return [self.arena.take((rows, length), dtype) for length in lengths]

    def segment_scales(self, kind: SegmentKind, local_rows: slice) -> SegmentScales:
        return SegmentScales(self.scales[ROW_SOURCE[kind]][local_rows], self.scales[COLUMN_SOURCE[kind]])

    def accumulate(self, kind: SegmentKind, local_rows: slice, coefficient: torch.Tensor, factor: float,
                   column_ranges: list[tuple[int, int]] | None = None) -> None:  # fmt: skip
        """The two gradient GEMMs of one segment's coefficients (columns ``column_ranges`` only, when given):
        d rows += factor · C @ columns, d columns += factor · Cᵀ @ rows (γ and σ divided out, on the device)."""
        row_name, column_name = ROW_SOURCE[kind], COLUMN_SOURCE[kind]
        rows, columns = self.gradient[row_name][local_rows], self.gradient[column_name]
        for lo, hi in column_ranges or [(0, columns.shape[0])]:
            part = coefficient[:, lo:hi]
            accumulate_product(
                self.grads[row_name][local_rows], part, columns[lo:hi], factor, self.unscale[column_name]
            )
            accumulate_product(self.grads[column_name][lo:hi], part.T, rows, factor, self.unscale[row_name])


def loss_and_grad(
    queries: torch.Tensor, docs: torch.Tensor, problem: ContrastiveProblem, row_kernel: RowKernel, *, need_grad: bool
) -> LossAndGrad:
    """The mean loss over the local rows and, with ``need_grad``, its gradients d loss / d queries (W, D) and
    d loss / d docs (k·W, D), fp32 (fp64 for fp64 operands); see the module docstring."""
    with scratch(queries.device) as arena:
        return _loss_and_grad(queries, docs, problem, row_kernel, need_grad, arena)


def _loss_and_grad(
    queries: torch.Tensor, docs: torch.Tensor, problem: ContrastiveProblem, row_kernel: RowKernel, need_grad: bool,
    arena: Arena,
) -> LossAndGrad:  # fmt: skip
    ops = _Operands.prepare(queries, docs, problem.normalize, need_grad, arena)
    # coefficients are stored times gamma (see coefficient_scale); the gradient GEMMs are accumulated times 1/(B·γ·σ)
    gamma = coefficient_scale(ops.coefficient_dtype, problem.spec, [s for s in ops.scales.values() if s is not None])
    ops.set_coefficient_scale(gamma)
    if problem.spec.fuses_doc_to_query:
        loss = _symmetric_passes(ops, problem, row_kernel, gamma, need_grad)
    else:
        loss = _one_pass(ops, problem, row_kernel, gamma, need_grad)
    result = LossAndGrad(loss, ops.grads.get("queries"), ops.grads.get("docs"))
    if need_grad and problem.normalize:
        _add_normalization_term(result.grad_anchors, queries, ops.scales["queries"])
        _add_normalization_term(result.grad_candidates, docs, ops.scales["docs"])
    return result


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
    ops: _Operands, problem: ContrastiveProblem, row_kernel: RowKernel, gamma: float | torch.Tensor, need_grad: bool
) -> torch.Tensor:
    """Every segment its own GEMMs: per chunk the scores, the row kernel (losses and coefficients), the gradient
    GEMMs."""
    spec, row_offset, batch_size = problem.spec, problem.row_offset, problem.batch_size
    width = ops.scores["queries"].shape[0]
    lengths = [ops.columns(kind) for kind in spec.kinds]
    device = ops.scores["queries"].device
    chunk = chunk_rows_for_budget(batch_size, sum(lengths), device, problem.chunk_bytes, ops.bytes_per_score)
    score_buffers = ops.buffers(chunk, lengths, ops.math_dtype)
    coefficient_buffers = ops.buffers(chunk, lengths, ops.coefficient_dtype) if ops.separate_coefficients else None
    coefficient_buffers = coefficient_buffers or score_buffers
    loss_sum = torch.zeros((), dtype=ops.math_dtype, device=device)
    labels = _duplicate_labels(problem, spec.kinds)
    for begin in range(0, batch_size, chunk):
        n = min(chunk, batch_size - begin)
        rows_start = row_offset + begin
        local_rows = slice(rows_start, rows_start + n)
        scores = [
            _segment_scores(ops, kind, local_rows, buffer[:n])
            for kind, buffer in zip(spec.kinds, score_buffers, strict=True)
        ]
        segment_scales = [ops.segment_scales(kind, local_rows) for kind in spec.kinds] if problem.normalize else None
        coefficients = [buffer[:n] for buffer in coefficient_buffers]
        row_losses = row_kernel(
            scores, spec, rows_start, width, gamma if need_grad else None, segment_scales, coefficients, labels=labels
        )
        loss_sum += row_losses.sum()
        if need_grad:
            for kind, coefficient in zip(spec.kinds, coefficients, strict=True):
                ops.accumulate(kind, local_rows, coefficient, 1.0 / batch_size)
    return loss_sum / batch_size


def _segment_scores(ops: _Operands, kind: SegmentKind, local_rows: slice, out: torch.Tensor,
                    column_ranges: list[tuple[int, int]] | None = None) -> torch.Tensor:  # fmt: skip
    """Raw scores rows @ columnsᵀ of one segment into ``out``; with ``column_ranges`` only those columns, -inf in
    the others."""
    rows, columns = ops.scores[ROW_SOURCE[kind]][local_rows], ops.scores[COLUMN_SOURCE[kind]]
    if column_ranges is None:
        return matmul_fp32(rows, columns.T, out=out)
    out.fill_(float("-inf"))
    for lo, hi in column_ranges:
        out[:, lo:hi] = matmul_fp32(rows, columns[lo:hi].T)
    return out


def _symmetric_passes(
    ops: _Operands, problem: ContrastiveProblem, row_kernel: RowKernel, gamma: float | torch.Tensor, need_grad: bool
) -> torch.Tensor:
    """query_to_doc with doc_to_query from one Q2D tile (the symmetric path, see the module docstring): a
    statistics pass (row LSEs of the row segments, column statistics of the positive block), the log-partitions,
    then a coefficient pass (on the kept tile, or on recomputed chunks) with the gradient GEMMs of each row
    segment."""
    spec, offset, batch_size = problem.spec, problem.row_offset, problem.batch_size
    width = ops.scores["queries"].shape[0]
    device = ops.scores["queries"].device
    # the row segments: every direction but D2Q, and D2Q against the other ranks' queries (local columns -inf)
    remote = [(lo, hi) for lo, hi in ((0, offset), (offset + batch_size, width)) if hi > lo]
    kinds = tuple(kind for kind in spec.kinds if kind != SegmentKind.D2Q) + ((SegmentKind.D2Q,) if remote else ())
    ranges = [remote if kind == SegmentKind.D2Q else None for kind in kinds]
    lengths = [ops.columns(kind) for kind in kinds]
    block = PositiveBlock(offset, batch_size)
    labels = _duplicate_labels(problem, kinds)
    # keep the whole tile when it fits (no recompute: 6·B·N·D FLOPs of GEMMs for Q2D + D2Q, instead of 8)
    keep_budget = problem.chunk_bytes or DEFAULT_KEEP_BYTES.get(device.type, DEFAULT_KEEP_BYTES["cpu"])
    if batch_size * sum(lengths) * ops.bytes_per_score <= keep_budget:
        chunk = batch_size
    else:
        chunk = chunk_rows_for_budget(batch_size, sum(lengths), device, problem.chunk_bytes, ops.bytes_per_score)
    score_buffers = ops.buffers(chunk, lengths, ops.math_dtype)

    def chunk_scores(begin: int, n: int) -> tuple[slice, list[torch.Tensor], list[SegmentScales] | None]:
        local_rows = slice(offset + begin, offset + begin + n)
        scores = [
            _segment_scores(ops, kind, local_rows, buffer[:n], columns)
            for kind, buffer, columns in zip(kinds, score_buffers, ranges, strict=True)
        ]
        scales = [ops.segment_scales(kind, local_rows) for kind in kinds] if problem.normalize else None
        return local_rows, scores, scales

    row_lse = torch.empty(batch_size, len(kinds), dtype=ops.math_dtype, device=device)
    positive = torch.empty(batch_size, dtype=ops.math_dtype, device=device)
    column_max = torch.full((batch_size,), float("-inf"), dtype=ops.math_dtype, device=device)
    column_sum = torch.zeros(batch_size, dtype=ops.math_dtype, device=device)
    shift = fixed_shift(ops, problem, row_kernel)
    for begin in range(0, batch_size, chunk):
        n = min(chunk, batch_size - begin)
        local_rows, scores, scales = chunk_scores(begin, n)
        if shift is not None:  # the scores become their e = exp(scale·score - shift)
            lse, pos = row_kernel.exp_statistics(
                scores, kinds, spec, local_rows.start, width, block, column_max, column_sum, shift, labels=labels
            )
        else:
            lse, pos = row_kernel.statistics(
                scores, kinds, spec, local_rows.start, width, block, column_max, column_sum, scales, labels=labels
            )
        row_lse[begin : begin + n], positive[begin : begin + n] = lse, pos
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
    coefficient_buffers = ops.buffers(chunk, lengths, ops.coefficient_dtype) if ops.separate_coefficients else None
    coefficient_buffers = coefficient_buffers or score_buffers
    for begin in range(0, batch_size, chunk):
        n = min(chunk, batch_size - begin)
        if chunk < batch_size:  # the tile was not kept: recompute this chunk's scores
            local_rows, scores, scales = chunk_scores(begin, n)
        else:
            local_rows = slice(offset, offset + batch_size)
            scores = [buffer[:n] for buffer in score_buffers]
            scales = [ops.segment_scales(kind, local_rows) for kind in kinds] if problem.normalize else None
        coefficients = [buffer[:n] for buffer in coefficient_buffers]
        if shift is not None and chunk == batch_size:  # the kept tile holds e
            row_kernel.exp_coefficients(
                scores, kinds, spec, local_rows.start, width, gamma, block, torch.exp(shift - row_ref),
                torch.exp(shift - column_ref), coefficients, labels=labels,
            )  # fmt: skip
        else:
            row_kernel.coefficients(
                scores, kinds, spec, local_rows.start, width, gamma, block, row_ref[begin : begin + n], column_ref,
                scales, coefficients, (row_factor[begin : begin + n], column_factor), labels=labels,
            )  # fmt: skip
        for kind, coefficient, columns in zip(kinds, coefficients, ranges, strict=True):
            ops.accumulate(kind, local_rows, coefficient, 1.0 / batch_size, columns)
    return loss


def fixed_shift(ops: _Operands, problem: ContrastiveProblem, row_kernel: RowKernel) -> float | None:
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
    lengths = [columns[COLUMN_SOURCE[kind]] for kind in spec.kinds if kind != SegmentKind.D2Q]
    if not spec.fuses_doc_to_query:
        return sum(6 * batch_size * length * dim for length in lengths)
    lengths.append(width - batch_size)  # D2Q against the other ranks' queries
    per_column = 6 if kept else 8
    return sum(per_column * batch_size * length * dim for length in lengths)


def inverse_norm(x: torch.Tensor) -> torch.Tensor:
    """r = 1 / max(||x_i||, 1e-12) per row, fp32 (fp64 for fp64): the scale F.normalize divides by."""
    return torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype)).clamp_min(NORMALIZE_EPS).reciprocal()


def _add_normalization_term(grad: torch.Tensor, operand: torch.Tensor, scale: torch.Tensor) -> None:
    """grad_a -= r_a²·<grad_a, a>·a in place, for the rows whose norm is not below the eps (where F.normalize's
    clamp passes no gradient to the norm)."""
    x = operand.to(grad.dtype)
    coefficient = scale * scale * (grad * x).sum(dim=1)
    coefficient = coefficient.masked_fill(torch.linalg.vector_norm(x, dim=1) < NORMALIZE_EPS, 0.0)
    grad.sub_(coefficient[:, None] * x)
