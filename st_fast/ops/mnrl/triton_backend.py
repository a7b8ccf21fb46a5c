"""The ``triton`` backend of the MNRL op: composes the segment launchers of :mod:`st_fast.ops.triton_lse`.

Forward: one ``segment_lse_forward`` per selected direction gives lse_x (B,) fp32; log Z = logsumexp_x lse_x (joint)
or mean_x lse_x (per_direction); the positive logit scale·<q_g, d_g> is an O(B·D) row-wise dot here.
Backward: one ``segment_lse_backward`` per direction with lse_ref = log Z, w = grad/B (joint) or lse_ref = lse_x,
w = grad/(B·#directions) (per_direction), plus the positive term -scale·grad/B on q_g and d_g.
Saved for backward: the two operands and B x #directions fp32 statistics, never a score tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from st_fast.ops.layout import COLUMN_SOURCE, ROW_SOURCE
from st_fast.ops.mnrl.spec import ContrastiveProblem, ContrastiveSpec
from st_fast.ops.triton_lse import segment_lse_backward, segment_lse_forward, triton_available_for


@dataclass
class TritonState:
    queries: torch.Tensor
    docs: torch.Tensor
    problem: ContrastiveProblem
    segment_lse: torch.Tensor  # (#directions, B) fp32
    log_z: torch.Tensor  # (B,) fp32


def _segment_args(spec: ContrastiveSpec, row_offset: int, width: int) -> dict:
    return dict(scale=spec.scale, row_start=row_offset, width=width, hardness=spec.hardness, alpha=spec.alpha)


def _column_labels(problem: ContrastiveProblem, kind) -> torch.Tensor | None:
    """mask_duplicates' labels of the segment's columns (the query or doc labels), or None."""
    if problem.labels is None:
        return None
    return problem.labels[0] if COLUMN_SOURCE[kind] == "queries" else problem.labels[1]


class TritonBackend:
    """Takes unit-normalized operands in the input dtype (fp32 math inside the kernels)."""

    name = "triton"

    def takes_raw_operands(self, dtype: torch.dtype, device: torch.device) -> bool:
        return False

    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype

    def forward(self, queries, docs, problem: ContrastiveProblem, need_grad: bool):
        if problem.normalize:
            raise ValueError("the triton backend takes normalized operands")
        triton_available_for(queries)
        spec, row_offset = problem.spec, problem.row_offset
        operands = {"queries": queries, "docs": docs}
        local = slice(row_offset, row_offset + problem.batch_size)
        args = _segment_args(spec, row_offset, queries.shape[0])
        segment_lse = torch.stack(
            [
                segment_lse_forward(
                    operands[ROW_SOURCE[kind]][local],
                    operands[COLUMN_SOURCE[kind]],
                    kind=kind,
                    labels=_column_labels(problem, kind),
                    **args,
                )  # fmt: skip
                for kind in spec.kinds
            ]
        )
        log_z = torch.logsumexp(segment_lse, dim=0) if spec.joint else segment_lse.mean(dim=0)
        positive = spec.scale * (queries[local].float() * docs[local].float()).sum(dim=1)
        loss = (log_z - positive).mean()
        state = TritonState(queries, docs, problem, segment_lse, log_z) if need_grad else None
        return loss, state

    def backward(self, state: TritonState, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spec, row_offset, batch_size = state.problem.spec, state.problem.row_offset, state.problem.batch_size
        operands = {"queries": state.queries, "docs": state.docs}
        grads = {name: torch.zeros(x.shape, dtype=torch.float32, device=x.device) for name, x in operands.items()}
        local = slice(row_offset, row_offset + batch_size)
        args = _segment_args(spec, row_offset, state.queries.shape[0])
        row_grad = grad_loss.float() / batch_size
        for x, kind in enumerate(spec.kinds):
            lse_ref = state.log_z if spec.joint else state.segment_lse[x]
            weight = row_grad if spec.joint else row_grad / len(spec.kinds)
            row_weight = weight.expand(batch_size).contiguous()
            row_name, column_name = ROW_SOURCE[kind], COLUMN_SOURCE[kind]
            d_rows, d_cols = segment_lse_backward(
                operands[row_name][local], operands[column_name], lse_ref, row_weight, kind=kind,
                labels=_column_labels(state.problem, kind), **args,
            )  # fmt: skip
            grads[row_name][local] += d_rows
            grads[column_name] += d_cols
        # positive term of the loss: -scale · <q_g, d_g> / B
        positive_grad = spec.scale * row_grad
        grads["queries"][local] -= positive_grad * state.docs[local].float()
        grads["docs"][local] -= positive_grad * state.queries[local].float()
        return grads["queries"], grads["docs"]
