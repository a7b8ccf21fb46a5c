"""The ``triton`` backend of the GIST op: composes the segment launchers of :mod:`st_fast.ops.triton_lse` with the
guide's mask inside the kernels (the same kernel family as the MNRL op, guide flag on).

Three guided segments, as laid out in :mod:`st_fast.ops.gist.spec`: ``[AP | AN..]`` (kind OWN_POSITIVE, the target
column g = o + i protected from the mask), AA (contrast_anchors) and PP (contrast_positives), of the spec's
``self_block_kind`` (OWN_MASKED: the row's own column g masked; PLAIN: nothing masked but by the guide). Every row is
shifted by its positive score h_i = <a_i, c_0[g]> and masked where the guide's float32 tile similarity exceeds
threshold_i (computed from the float32 guide diagonal), so that an entry within float32 rounding
of its threshold may be decided differently from stock (see :data:`st_fast.ops.backends.GIST`).

Forward: log Z_i = logsumexp over the segments' lse (B,) fp32; loss_i = log Z_i - (positive_i - h_i)/T = log Z_i.
Backward: one ``segment_lse_backward`` per segment with lse_ref = log Z, w = grad/B, plus the positive term
-grad/(B·T) on a_i and c_0[g]; the score and guide tiles are recomputed. Kept for backward: the operands and
B-sized fp32 statistics, never a score tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from st_fast.ops.gist.spec import GuidedProblem
from st_fast.ops.layout import SegmentKind
from st_fast.ops.triton_lse import SegmentGuide, segment_lse_backward, segment_lse_forward, triton_available_for


class _Segment(NamedTuple):
    """One guided segment: its rows and columns, the segment layout the launchers check, the guide's side, and
    which slices of the two operands' gradients its row and column gradients add to."""

    rows: torch.Tensor
    cols: torch.Tensor
    kind: SegmentKind
    row_start: int
    width: int
    guide: SegmentGuide
    row_target: tuple[str, slice]
    column_target: tuple[str, slice]


@dataclass
class TritonState:
    anchors: torch.Tensor
    candidates: torch.Tensor
    problem: GuidedProblem
    shift: torch.Tensor  # (B,) fp32: the positive scores
    threshold: torch.Tensor  # (B,) fp32
    log_z: torch.Tensor  # (B,) fp32, in shifted units


def _segments(anchors, candidates, problem: GuidedProblem, shift, threshold) -> list[_Segment]:
    spec, offset, width = problem.spec, problem.row_offset, problem.width
    anchors_guide, candidates_guide = problem.anchors_guide, problem.candidates_guide
    batch_size = anchors.shape[0]
    local, everything = slice(offset, offset + batch_size), slice(None)

    def guide(rows: torch.Tensor, cols: torch.Tensor, protect: bool) -> SegmentGuide:
        return SegmentGuide(rows, cols, shift, threshold, protect)

    self_kind = spec.self_block_kind
    segments = [
        _Segment(anchors, candidates, SegmentKind.OWN_POSITIVE, offset, width,
                 guide(anchors_guide, candidates_guide, True), ("anchors", everything), ("candidates", everything)),
    ]  # fmt: skip
    if spec.contrast_anchors:
        segments.append(
            _Segment(anchors, anchors, self_kind, 0, batch_size, guide(anchors_guide, anchors_guide, False),
                     ("anchors", everything), ("anchors", everything))
        )  # fmt: skip
    if spec.contrast_positives:
        positives_guide = guide(candidates_guide[local], candidates_guide[:width], False)
        segments.append(
            _Segment(candidates[local], candidates[:width], self_kind, offset, width, positives_guide,
                     ("candidates", local), ("candidates", slice(0, width)))
        )  # fmt: skip
    return segments


class TritonBackend:
    """Takes unit-normalized operands in the input dtype (a float64 guide in float32); fp32 math inside the
    kernels."""

    name = "triton"

    def takes_raw_operands(self, dtype: torch.dtype, device: torch.device) -> bool:
        return False

    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype == torch.float64 else dtype

    def forward(self, anchors, candidates, problem: GuidedProblem, need_grad: bool):
        triton_available_for(anchors)
        spec, local = problem.spec, slice(problem.row_offset, problem.row_offset + anchors.shape[0])
        positive_guide = problem.anchors_guide.float() * problem.candidates_guide[local].float()
        threshold = spec.thresholds(positive_guide.sum(dim=1))[:, 0].contiguous()
        shift = (anchors.float() * candidates[local].float()).sum(dim=1)
        scale = 1.0 / spec.temperature
        lses = torch.stack(
            [
                segment_lse_forward(
                    s.rows, s.cols, kind=s.kind, scale=scale, row_start=s.row_start, width=s.width, guide=s.guide
                )
                for s in _segments(anchors, candidates, problem, shift, threshold)
            ]
        )
        log_z = torch.logsumexp(lses, dim=0)
        state = TritonState(anchors, candidates, problem, shift, threshold, log_z) if need_grad else None
        return log_z.mean(), state  # loss_i = log Z_i - scale·(positive_i - shift_i) = log Z_i in shifted units

    def backward(self, state: TritonState, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anchors, candidates, problem = state.anchors, state.candidates, state.problem
        batch_size, scale = anchors.shape[0], 1.0 / problem.spec.temperature
        grads = {"anchors": torch.zeros(anchors.shape, dtype=torch.float32, device=anchors.device)}
        grads["candidates"] = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
        row_grad = (grad_loss.float() / batch_size).expand(batch_size).contiguous()
        for s in _segments(anchors, candidates, problem, state.shift, state.threshold):
            d_rows, d_cols = segment_lse_backward(
                s.rows, s.cols, state.log_z, row_grad, kind=s.kind, scale=scale, row_start=s.row_start,
                width=s.width, guide=s.guide,
            )  # fmt: skip
            (row_name, row_slice), (column_name, column_slice) = s.row_target, s.column_target
            grads[row_name][row_slice] += d_rows
            grads[column_name][column_slice] += d_cols
        local = slice(problem.row_offset, problem.row_offset + batch_size)
        positive_grad = row_grad[:, None] * scale  # the positive term -scale·<a_i, c_0[g]> / B
        grads["anchors"] -= positive_grad * candidates[local].float()
        grads["candidates"][local] -= positive_grad * anchors.float()
        return grads["anchors"], grads["candidates"]
