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
"""

from __future__ import annotations

import math

import torch

from st_fast.ops.chunked import LossAndGrad, chunk_rows_for_budget
from st_fast.ops.layout import COLUMN_SOURCE, ROW_SOURCE
from st_fast.ops.mixed_matmul import accumulate_product, as_float16_operand, compute_dtype, matmul_fp32
from st_fast.ops.mnrl.spec import ContrastiveProblem, ContrastiveSpec
from st_fast.ops.row_kernel import RowKernel, SegmentScales

NORMALIZE_EPS = 1e-12  # F.normalize's default, used by stock cos_sim


def coefficient_scale(operand_dtype: torch.dtype, spec: ContrastiveSpec, scales: list[torch.Tensor]) -> float:
    """The factor γ the coefficients are stored with before the gradient GEMMs divide it out again.

    |coefficient| <= scale · r_max² (softmax weights are <= 1; r: the inverse norms, 1 without), so float16
    coefficients are stored with γ = 2^(14 - ceil(log2(scale · r_max²))), a power of two (exact) that keeps them
    within 2^14 (float16 overflows past 65504) and leaves 38 binades below the largest before subnormals; every
    other dtype stores them with γ = 1.
    Zero-norm rows (r = 1/eps) are left out of r_max: their coefficients saturate at the float16 maximum and multiply
    the zero vector, instead of flushing every other row's coefficients to zero.
    """
    if operand_dtype != torch.float16:
        return 1.0
    # one device sync for every scale tensor (zero-norm rows masked out as 0)
    regular = [torch.where(s < 0.5 / NORMALIZE_EPS, s, 0).max() for s in scales if s.numel()]
    r_max = float(torch.stack(regular).max()) if regular else 1.0
    r_max = r_max if r_max > 0 else 1.0
    bound = spec.scale * r_max * r_max
    if not math.isfinite(bound) or bound <= 0:
        return 1.0  # non-finite embeddings: the loss is non-finite anyway
    return 2.0 ** (14 - math.ceil(math.log2(bound)))


def loss_and_grad(
    queries: torch.Tensor, docs: torch.Tensor, problem: ContrastiveProblem, row_kernel: RowKernel, *, need_grad: bool
) -> LossAndGrad:
    """The mean loss over the local rows and, with ``need_grad``, its gradients d loss / d queries (W, D) and
    d loss / d docs (k·W, D), fp32 (fp64 for fp64 operands); see the module docstring."""
    spec, row_offset, batch_size, normalize = problem.spec, problem.row_offset, problem.batch_size, problem.normalize
    width = queries.shape[0]
    device = queries.device
    operands = {"queries": queries, "docs": docs}
    scales = {name: inverse_norm(x) if normalize else None for name, x in operands.items()}
    math_dtype = compute_dtype(queries.dtype)
    # 16-bit operands: float16 coefficients and float16 copies of the operands (exact, scaled by σ) for the gradient
    # GEMMs; float16 rounds the coefficients 8x finer than bf16 would
    separate_coefficients = need_grad and queries.dtype != math_dtype
    coefficient_dtype = torch.float16 if separate_coefficients else math_dtype
    gradient_operands, sigma = operands, {name: 1.0 for name in operands}
    if separate_coefficients:
        converted = {name: as_float16_operand(x) for name, x in operands.items()}
        gradient_operands = {name: x16 for name, (x16, _) in converted.items()}
        sigma = {name: factor for name, (_, factor) in converted.items()}
    total_columns = sum(operands[COLUMN_SOURCE[kind]].shape[0] for kind in spec.kinds)
    bytes_per_score = 4 + (2 if separate_coefficients else 0)
    chunk = chunk_rows_for_budget(batch_size, total_columns, device, problem.chunk_bytes, bytes_per_score)
    # coefficients are stored times gamma (see coefficient_scale); the gradient GEMMs are accumulated times 1/(B·γ·σ)
    gamma = coefficient_scale(coefficient_dtype, spec, [s for s in scales.values() if s is not None])
    grads = {name: torch.zeros(x.shape, dtype=math_dtype, device=device) for name, x in operands.items()}
    if not need_grad:
        grads = {}

    def new_buffers(dtype: torch.dtype) -> list[torch.Tensor]:
        shapes = [operands[COLUMN_SOURCE[kind]].shape[0] for kind in spec.kinds]
        return [torch.empty(chunk, columns, dtype=dtype, device=device) for columns in shapes]

    score_buffers = new_buffers(math_dtype)
    coefficient_buffers = new_buffers(coefficient_dtype) if separate_coefficients else score_buffers
    loss_sum = torch.zeros((), dtype=math_dtype, device=device)
    for begin in range(0, batch_size, chunk):
        n = min(chunk, batch_size - begin)
        rows_start = row_offset + begin
        local_rows = slice(rows_start, rows_start + n)
        scores, segment_scales = [], []
        for kind, buffer in zip(spec.kinds, score_buffers, strict=True):
            row_name, column_name = ROW_SOURCE[kind], COLUMN_SOURCE[kind]
            scores.append(matmul_fp32(operands[row_name][local_rows], operands[column_name].T, out=buffer[:n]))
            if normalize:
                segment_scales.append(SegmentScales(scales[row_name][local_rows], scales[column_name]))
        coefficients = [buffer[:n] for buffer in coefficient_buffers]
        row_losses = row_kernel(
            scores, spec, rows_start, width, gamma if need_grad else None, segment_scales or None, coefficients
        )
        loss_sum += row_losses.sum()
        if need_grad:
            alpha = 1.0 / (batch_size * gamma)
            for kind, coefficient in zip(spec.kinds, coefficients, strict=True):
                row_name, column_name = ROW_SOURCE[kind], COLUMN_SOURCE[kind]
                rows, columns = gradient_operands[row_name][local_rows], gradient_operands[column_name]
                accumulate_product(grads[row_name][local_rows], coefficient, columns, alpha / sigma[column_name])
                accumulate_product(grads[column_name], coefficient.T, rows, alpha / sigma[row_name])
    result = LossAndGrad(loss_sum / batch_size, grads.get("queries"), grads.get("docs"))
    if need_grad and normalize:
        _add_normalization_term(result.grad_anchors, queries, scales["queries"])
        _add_normalization_term(result.grad_candidates, docs, scales["docs"])
    return result


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
