"""The chunked driver of the GIST op (``torch`` and ``native`` backends, :class:`st_fast.ops.chunked.ChunkedBackend`),
for the logits and masks of :mod:`st_fast.ops.gist.spec`.

For each chunk of rows (:func:`st_fast.ops.chunked.row_chunks`): the trainable and the guide GEMMs of every block
(:class:`st_fast.ops.operands.Operands`, one for the trainable operands and one for the guide's, with buffers from
the scratch arena of :mod:`st_fast.ops.workspace`), the guide masks applied to the trainable scores in place (-inf,
decided as stock decides them by :class:`st_fast.ops.gist.spec.StockGuide`), then the row kernel of the MNRL op
(:mod:`st_fast.ops.row_kernel`, PyTorch or native C++/CUDA) with one joint partition at scale 1/T: segment 0 is
``[AP | AN_1 | ..]`` (kind OWN_POSITIVE: positive at column g), AA and PP are OWN_MASKED segments (the row's own
column g masked by the kernel: ``mask_self_negatives``) or PLAIN (nothing masked by the kernel). AA is laid out W
wide with the local anchors at columns o .. o+B and -inf elsewhere, so that the kernel's own-column index g is the
row's own anchor. Each row is shifted by its positive score first (the softmax CE is invariant; it keeps the loss free
of the cancellation log Z - positive logit at logits of magnitude 1/T). Then ``d_rows += G @ columns`` and
``d_columns += Gᵀ @ rows`` per block (:meth:`st_fast.ops.operands.Operands.accumulate`). Memory beyond the inputs:
the fp32 gradients and one chunk of scores and guide scores (chunk x (k+2)·W), never B x N at once, never (B, N, D).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from st_fast.ops.chunked import LossAndGrad, chunk_rows_for_budget, row_chunks
from st_fast.ops.gist.spec import GuidedProblem, GuidedSpec
from st_fast.ops.operands import ColumnRanges, Operands
from st_fast.ops.row_kernel import RowKernel
from st_fast.ops.workspace import Arena, with_scratch


class _Block(NamedTuple):
    """One block of the joint softmax as a segment of the row kernel: the rows of operand ``rows`` against the
    columns of operand ``columns`` (``column_ranges`` only, when given), ``width`` columns wide, the guide deciding
    the false negatives of its columns ``decided`` (the others are -inf)."""

    rows: str
    columns: str
    width: int
    decided: slice
    column_ranges: ColumnRanges | None = None


def _blocks(spec: GuidedSpec, offset: int, batch_size: int, width: int, candidates: int) -> list[_Block]:
    """The blocks in the row kernel's segment order (``spec.row_spec().kinds``): [AP | AN_1 | ..], then AA (W wide,
    so that the kernel's own column g is the row's anchor: the local anchors at columns o .. o+B) and PP (the
    positives, candidates 0 .. W) when contrasted."""
    blocks = [_Block("anchors", "candidates", candidates, slice(0, candidates))]
    if spec.contrast_anchors:
        blocks.append(_Block("anchors", "anchors", width, slice(offset, offset + batch_size)))
    if spec.contrast_positives:
        blocks.append(_Block("candidates", "candidates", width, slice(0, width), [(0, width)]))
    return blocks


@with_scratch
def loss_and_grad(
    anchors: torch.Tensor, candidates: torch.Tensor, problem: GuidedProblem, row_kernel: RowKernel, *, need_grad: bool,
    arena: Arena,
) -> LossAndGrad:  # fmt: skip
    """The mean loss over the local rows and, with ``need_grad``, its gradients d loss / d anchors (B, D) and
    d loss / d candidates (k·W, D) in the operands' dtype (fp32, fp64 for fp64). anchors and candidates are
    normalized, column j at rows j·W .. (j+1)·W; the guide's normalized embeddings (``problem``) have the same row
    counts (their own dimension); the masks are decided as stock decides them (``problem.stock_guide()``).
    ``arena``: the call's scratch memory (:func:`st_fast.ops.workspace.with_scratch` passes it; callers leave it
    out)."""
    spec, offset, width, batch_size = problem.spec, problem.row_offset, problem.width, anchors.shape[0]
    # the anchors are the local rows only (global rows o .. o+B), the candidates every rank's; the guide alike
    first_row = {"anchors": offset}
    ops = Operands.prepare({"anchors": anchors, "candidates": candidates}, arena, need_grad=need_grad,
                           first_row=first_row)  # fmt: skip
    guide = Operands.prepare({"anchors": problem.anchors_guide, "candidates": problem.candidates_guide}, arena,
                             need_grad=False, first_row=first_row)  # fmt: skip
    stock_guide = problem.stock_guide()
    raw = {"anchors": stock_guide.anchors, "candidates": stock_guide.candidates}  # the guide's raw embeddings
    row_spec = spec.row_spec()
    blocks = _blocks(spec, offset, batch_size, width, candidates.shape[0])
    widths = [block.width for block in blocks]
    # a chunk's buffers hold a trainable and a guide score per entry
    chunk = chunk_rows_for_budget(batch_size, sum(widths), anchors.device, problem.chunk_bytes, 2 * ops.bytes_per_score)
    buffers = ops.buffers(chunk, widths, ops.math_dtype)
    (guide_buffer,) = guide.buffers(chunk, widths[:1], guide.math_dtype)
    loss_sum = torch.zeros((), dtype=ops.math_dtype, device=anchors.device)
    for rows in row_chunks(batch_size, chunk, offset):
        n = rows.size
        local_index = torch.arange(n, device=anchors.device)
        diagonal = (local_index, local_index + rows.start)  # (chunk row, its target column)
        positive_guide = stock_guide.similarity(raw["anchors"][rows.local], raw["candidates"][rows.global_rows])
        threshold = spec.thresholds(positive_guide)
        segments = []
        for block, buffer in zip(blocks, buffers, strict=True):
            pair = (block.rows, block.columns, rows.global_rows)
            scores = ops.scores_into(*pair, buffer[:n], block.column_ranges)
            guide_scores = guide.scores_into(*pair, guide_buffer[:n, : block.width], block.column_ranges)
            raw_rows = raw[block.rows][ops.own(block.rows, rows.global_rows)]
            raw_columns = raw[block.columns][ops.own(block.columns, block.decided)]
            masked = stock_guide.false_negatives(guide_scores[:, block.decided], threshold, raw_rows, raw_columns)
            if not segments:
                masked[diagonal] = False  # the positive column g of [AP | AN_1 | ..] is never masked
            scores[:, block.decided].masked_fill_(masked, float("-inf"))
            segments.append(scores)
        # Shift each row by its positive score: the loss and its gradient are invariant, and the row kernel's
        # loss = log Z - positive logit then no longer cancels two large numbers (logits reach 1/T = 100).
        positive = segments[0][diagonal].clone()[:, None]
        for segment in segments:
            segment.sub_(positive)
        grad_scale = 1.0 / batch_size if need_grad else None
        loss_sum += row_kernel(segments, row_spec, rows.start, width, grad_scale).sum()
        if need_grad:  # the row kernel left the gradient coefficients d(loss)/d(score) in the segments
            for block, segment in zip(blocks, segments, strict=True):
                ops.accumulate(block.rows, block.columns, rows.global_rows, segment, 1.0, block.column_ranges)
    return ops.result(loss_sum / batch_size)
