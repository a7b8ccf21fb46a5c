"""The chunked driver of the GIST op (``torch`` and ``native`` backends, :class:`st_fast.ops.chunked.ChunkedBackend`),
for the logits and masks of :mod:`st_fast.ops.gist.spec`.

For each chunk of rows: the trainable and the guide GEMMs of every block, the guide masks applied to the trainable
scores in place (-inf, decided as stock decides them by :class:`st_fast.ops.gist.spec.StockGuide`), then the row
kernel of the MNRL op (:mod:`st_fast.ops.row_kernel`, PyTorch or native C++/CUDA) with one joint partition at scale
1/T: segment 0 is ``[AP | AN_1 | ..]`` (kind Q2D, positive at column g), AA and PP are kind Q2Q segments (the row's
own column g masked by the kernel: ``mask_self_negatives``) or D2Q (nothing masked by the kernel). AA is laid out W
wide with the local anchors at columns o .. o+B and -inf elsewhere, so that the kernel's own-column index g is the
row's own anchor. Each row is shifted by its positive score first (the softmax
CE is invariant; it keeps the loss free of the cancellation log Z - positive logit at logits of magnitude 1/T).
Then ``d_rows += G @ columns`` and ``d_columns += Gᵀ @ rows`` per block. Memory beyond the inputs: the fp32
gradients and one chunk of scores and guide scores (chunk x (k+2)·W), never B x N at once, never (B, N, D).
"""

from __future__ import annotations

import torch

from st_fast.ops.chunked import LossAndGrad, chunk_rows_for_budget
from st_fast.ops.gist.spec import GuidedProblem
from st_fast.ops.row_kernel import RowKernel


def loss_and_grad(
    anchors: torch.Tensor, candidates: torch.Tensor, problem: GuidedProblem, row_kernel: RowKernel, *, need_grad: bool
) -> LossAndGrad:
    """The mean loss over the local rows and, with ``need_grad``, its gradients d loss / d anchors (B, D) and
    d loss / d candidates (k·W, D) in the operands' dtype (fp32, fp64 for fp64). anchors and candidates are
    normalized, column j at rows j·W .. (j+1)·W; the guide's normalized embeddings (``problem``) have the same row
    counts (their own dimension); the masks are decided as stock decides them (``problem.stock_guide()``)."""
    spec, offset, width, batch_size = problem.spec, problem.row_offset, problem.width, anchors.shape[0]
    anchors_guide, candidates_guide = problem.anchors_guide, problem.candidates_guide
    stock_guide = problem.stock_guide()
    positives, positives_guide = candidates[:width], candidates_guide[:width]
    raw_anchors, raw_candidates = stock_guide.anchors, stock_guide.candidates
    raw_positives = raw_candidates[:width]
    row_spec = spec.row_spec()
    segment_columns = [candidates.shape[0]] + [width] * (len(row_spec.kinds) - 1)
    chunk = chunk_rows_for_budget(batch_size, 2 * sum(segment_columns), anchors.device, problem.chunk_bytes)
    buffers = [torch.empty(chunk, n, dtype=anchors.dtype, device=anchors.device) for n in segment_columns]
    guide_buffer = torch.empty(chunk, candidates.shape[0], dtype=anchors_guide.dtype, device=anchors.device)
    grad_anchors = torch.zeros_like(anchors) if need_grad else None
    grad_candidates = torch.zeros_like(candidates) if need_grad else None
    loss_sum = torch.zeros((), dtype=anchors.dtype, device=anchors.device)
    local_anchors = slice(offset, offset + batch_size)  # columns of the local anchors in the W-wide AA segment
    for begin in range(0, batch_size, chunk):
        n = min(chunk, batch_size - begin)
        rows, global_rows = slice(begin, begin + n), slice(offset + begin, offset + begin + n)
        local_index = torch.arange(n, device=anchors.device)
        diagonal = (local_index, local_index + (offset + begin))  # (chunk row, its target column)
        # [AP | AN_1 | ..]: the positive column offset + begin + r is never masked
        ap_an = torch.matmul(anchors[rows], candidates.T, out=buffers[0][:n])
        guide = torch.matmul(anchors_guide[rows], candidates_guide.T, out=guide_buffer[:n])
        threshold = spec.thresholds(stock_guide.similarity(raw_anchors[rows], raw_positives[global_rows]))
        false_negative = stock_guide.false_negatives(guide, threshold, raw_anchors[rows], raw_candidates)
        false_negative[diagonal] = False
        ap_an.masked_fill_(false_negative, float("-inf"))
        segments, x = [ap_an], 1
        if spec.contrast_anchors:
            aa = buffers[x][:n]
            aa[:, :offset] = float("-inf")
            aa[:, offset + batch_size :] = float("-inf")
            block = aa[:, local_anchors]
            block.copy_(torch.matmul(anchors[rows], anchors.T))
            guide = torch.matmul(anchors_guide[rows], anchors_guide.T, out=guide_buffer[:n, :batch_size])
            masked = stock_guide.false_negatives(guide, threshold, raw_anchors[rows], raw_anchors)
            block.masked_fill_(masked, float("-inf"))
            segments.append(aa)
            x += 1
        if spec.contrast_positives:
            pp = torch.matmul(positives[global_rows], positives.T, out=buffers[x][:n])
            guide = torch.matmul(positives_guide[global_rows], positives_guide.T, out=guide_buffer[:n, :width])
            masked = stock_guide.false_negatives(guide, threshold, raw_positives[global_rows], raw_positives)
            pp.masked_fill_(masked, float("-inf"))
            segments.append(pp)
        # Shift each row by its positive score: the loss and its gradient are invariant, and the row kernel's
        # loss = log Z - positive logit then no longer cancels two large numbers (logits reach 1/T = 100).
        positive = ap_an[diagonal].clone()[:, None]
        for segment in segments:
            segment.sub_(positive)
        grad_scale = 1.0 / batch_size if need_grad else None
        loss_sum += row_kernel(segments, row_spec, offset + begin, width, grad_scale).sum()
        if not need_grad:
            continue
        # the row kernel left the gradient coefficients d(loss)/d(score) in the segments
        grad_anchors[rows].addmm_(segments[0], candidates)
        grad_candidates.addmm_(segments[0].T, anchors[rows])
        x = 1
        if spec.contrast_anchors:
            coefficients = segments[x][:, local_anchors]
            grad_anchors[rows].addmm_(coefficients, anchors)
            grad_anchors.addmm_(coefficients.T, anchors[rows])
            x += 1
        if spec.contrast_positives:
            grad_candidates[global_rows].addmm_(segments[x], positives)
            grad_candidates[:width].addmm_(segments[x].T, positives[global_rows])
    return LossAndGrad(loss_sum / batch_size, grad_anchors, grad_candidates)
