"""The fused in-batch contrastive op: MultipleNegativesRankingLoss without a B x N score matrix.

    loss = mean_i [ log Z_i - scale · sim(q_g, d_g) ],   g = row_offset + i,  i < batch_size

where log Z_i is the joint (or per-direction mean) log-partition over the selected directions; see
:mod:`st_fast.ops.layout` for the segments and masks and :mod:`st_fast.ops.backends` for how it is computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from st_fast.ops.backends import Backend, resolve_backend
from st_fast.ops.learnable_scale import as_scale_gradient, learnable, score_coefficient_sum
from st_fast.ops.spec import SIMILARITIES, ContrastiveSpec, check_embeddings, compute_dtype


class FusedContrastiveLoss(torch.autograd.Function):
    """queries (W, D), docs (k·W, D) -> 0-dim loss; the backend computes loss and gradients. With ``normalize`` the
    operands are raw embeddings and the backend applies (and differentiates) the cosine normalization itself, so
    that the gradient is rounded to the input dtype once. ``scale`` is the loss's scale tensor when it needs a
    gradient (None otherwise); see :mod:`st_fast.ops.learnable_scale`."""

    @staticmethod
    def forward(
        ctx, queries, docs, scale, spec: ContrastiveSpec, row_offset: int, batch_size: int, backend: Backend,
        normalize: bool,
    ):  # fmt: skip
        need_grad = any(ctx.needs_input_grad[:3])
        with torch.autocast(queries.device.type, enabled=False):  # fp32 math whatever the autocast context
            loss, state = backend.forward(queries, docs, spec, row_offset, batch_size, need_grad, normalize=normalize)
        ctx.backend, ctx.state, ctx.spec = backend, state, spec
        ctx.input_dtypes = (queries.dtype, docs.dtype)
        if ctx.needs_input_grad[2]:
            ctx.save_for_backward(queries, docs, scale)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.state is None:
            raise RuntimeError("st_fast fused loss: backward called twice on the same graph")
        with torch.autocast(grad_loss.device.type, enabled=False):
            grad_queries, grad_docs = ctx.backend.backward(ctx.state, grad_loss)
        ctx.state = None  # a second backward through the same graph is an error, as for stock autograd
        grad_scale = None
        if ctx.needs_input_grad[2]:
            queries, docs, scale = ctx.saved_tensors
            total = score_coefficient_sum((queries, docs), (grad_queries, grad_docs))
            grad_scale = as_scale_gradient(total / ctx.spec.scale, scale)
        grads = grad_queries.to(ctx.input_dtypes[0]), grad_docs.to(ctx.input_dtypes[1])
        return *grads, grad_scale, None, None, None, None, None


def prepare_operand(x: torch.Tensor, similarity: str, operand_dtype: torch.dtype) -> torch.Tensor:
    """Upcast (as stock does), normalize once for cosine (eps 1e-12, as F.normalize in cos_sim), cast to the dtype
    the backend consumes. Differentiable: autograd takes the gradient back through the normalization."""
    x = x.to(compute_dtype(x.dtype))
    if similarity == "cos":
        x = F.normalize(x, p=2, dim=-1)
    return x.to(operand_dtype).contiguous()


def fused_mnrl_loss(
    queries: torch.Tensor,
    docs: Sequence[torch.Tensor],
    *,
    row_offset: int = 0,
    batch_size: int | None = None,
    scale: float | torch.Tensor = 20.0,
    similarity: str = "cos",
    directions: Sequence[str] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """MultipleNegativesRankingLoss of the local rows ``row_offset .. row_offset + batch_size`` of ``queries``.

    Args:
        queries: (W, D) query (anchor) embeddings of every rank (W = B without gathering).
        docs: k tensors (W, D): the positives, then the hard-negative columns, of every rank.
        row_offset, batch_size: the local rows (default: all W rows).
        scale: a number or a one-element tensor; a tensor that requires grad gets d loss / d scale.
        similarity: ``"cos"`` or ``"dot"``. Other arguments as in sentence-transformers' MNRL.
    Returns:
        0-dim loss, float32 (float64 for float64 embeddings).
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    check_embeddings(queries, list(docs))
    width = queries.shape[0]
    batch_size = width if batch_size is None else batch_size
    if not (0 < batch_size and 0 <= row_offset and row_offset + batch_size <= width):
        raise ValueError(f"local rows [{row_offset}, {row_offset + batch_size}) are outside the {width} query rows")
    spec = ContrastiveSpec.from_loss_config(
        scale=scale, directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
        hardness_strength=hardness_strength,
    )  # fmt: skip
    chosen = resolve_backend(backend, queries.device, queries.dtype)
    doc_columns = torch.cat(list(docs), dim=0)
    scale_input = scale if learnable(scale) else None
    # a learnable scale takes its gradient from the normalized operands' (Euler's identity needs bilinear scores)
    if scale_input is None and chosen.takes_raw_operands(queries.dtype, queries.device):
        query_operand, doc_operand, normalize = queries.contiguous(), doc_columns.contiguous(), similarity == "cos"
    else:
        operand_dtype = chosen.operand_dtype(queries.dtype)
        query_operand = prepare_operand(queries, similarity, operand_dtype)
        doc_operand = prepare_operand(doc_columns, similarity, operand_dtype)
        normalize = False
    return FusedContrastiveLoss.apply(
        query_operand, doc_operand, scale_input, spec, row_offset, batch_size, chosen, normalize
    )
