"""The one autograd.Function of the MaxSim op: a backend's MaxSim sums, and their gradient through the stored
arg-max indices only (no (B, M, Lq, Ld) tensor in either direction)."""

from __future__ import annotations

from typing import Any

import torch


class MaxSimSums(torch.autograd.Function):
    """queries (B, Lq, D), documents (M, Ld, D), masks (B, Lq) / (M, Ld) bool -> sums (B, M) float32 (float64 for
    float64 embeddings): Σ_s mask_q · max_t <q_s, d_t> over unmasked t (see :mod:`st_fast.ops.maxsim.spec`).

    The forward keeps the arg-max (B, Lq, M) int32 when a gradient is needed; the backward gives float32 gradients
    to the backend and returns them in the embeddings' dtypes. ``backend``: an object of
    :func:`st_fast.ops.maxsim.dispatch.resolve_maxsim_backend`.
    """

    @staticmethod
    def forward(ctx, queries, documents, query_mask, document_mask, backend: Any):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        with torch.autocast(queries.device.type, enabled=False):  # products in the embeddings' dtype, as stock
            sums, index = backend.forward(queries, query_mask, documents, document_mask, need_grad)
        ctx.backend = backend
        if need_grad:
            ctx.save_for_backward(queries, documents, query_mask, index)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        queries, documents, query_mask, index = ctx.saved_tensors
        with torch.autocast(grad_sums.device.type, enabled=False):
            grad_queries, grad_documents = ctx.backend.backward(
                queries, query_mask, documents, index, grad_sums.contiguous()
            )
        grad_queries = grad_queries.to(queries.dtype) if ctx.needs_input_grad[0] else None
        grad_documents = grad_documents.to(documents.dtype) if ctx.needs_input_grad[1] else None
        return grad_queries, grad_documents, None, None, None
