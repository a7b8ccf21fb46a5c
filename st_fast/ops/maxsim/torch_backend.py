"""The ``torch`` backend of the MaxSim op: the readable reference (any device, float64 capable), tiled so that it
never holds more than ``tile_elements`` products, and the sparse backward that every backend shares.

Forward, per tile of ``qc`` queries x ``dc`` documents (:func:`tile_counts`)::

    products = Q_tile (qc·Lq, D) @ D_tile (dc·Ld, D)ᵀ        one GEMM in the embeddings' dtype, as stock's einsum
    products[..., masked t] = -inf                             only for tiles with masked document tokens
    best, index = products.view(qc, Lq, dc, Ld).max(-1)        first index of a tie (torch.max)
    best, index = with_masked_tokens(best, index, ...)         stock's masked_fill(finfo(dtype).min): the first
                                                               masked token t wins where no unmasked product is
                                                               above the fill (ties: the first position), written
                                                               as index -1 - t (a constant: no gradient)
    sums[q, d] = Σ_s mask_q · float32(best)

Backward (:func:`maxsim_backward`), with w[i, s, m] = dL/dsums[i, m] · mask_q[i, s] rounded to the embeddings' dtype
(stock's gradient passes the ``.float()`` cast back into that dtype; 0 where index < 0) and t* = index[i, s, m]::

    dQ[i, s]     = Σ_m w[i, s, m] · d[m, t*]      a gather and a batched dot, float32 accumulation
    dD[m, t*]   += w[i, s, m] · q[i, s]           a deterministic row scatter-add (index_add_ in a fixed order)

No (B, M, Lq, Ld) tensor, no atomics: the result is the same run to run.
"""

from __future__ import annotations

import math

import torch

from st_fast.ops.maxsim.spec import DEFAULT_TILE_ELEMENTS, sum_dtype


def tile_counts(queries: int, documents: int, per_pair: int, budget: int, row_target: int) -> tuple[int, int]:
    """(queries, documents) per tile: about ``row_target`` query-token rows for the GEMM, then as many documents
    as keep ``queries · documents · per_pair`` within ``budget`` elements (at least one of each)."""
    query_tile = max(1, min(queries, row_target))
    while query_tile > 1 and query_tile * per_pair > budget:
        query_tile //= 2
    document_tile = max(1, min(documents, budget // max(1, query_tile * per_pair)))
    return query_tile, document_tile


def _row_target(query_tokens: int) -> int:
    return max(1, math.ceil(512 / max(1, query_tokens)))  # ~512 GEMM rows per tile


def length_order(document_mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Documents longest first (stable) and, per position in that order, the token width up to the last unmasked
    token of the document there (at least 1). Tiles of similar widths skip the products of trailing masked tokens,
    which stock computes only to fill them with finfo(dtype).min (:func:`with_masked_tokens` adds that fill). One
    host read of the widths per call."""
    positions = torch.arange(1, document_mask.shape[1] + 1, device=document_mask.device)
    lengths = torch.where(document_mask, positions, 0).amax(dim=1).clamp(min=1)
    lengths, order = torch.sort(lengths, descending=True, stable=True)
    return order, lengths.tolist()


def first_masked_tokens(document_mask: torch.Tensor) -> torch.Tensor:
    """(M,) int64: each document's first masked token position, Ld where none is masked."""
    document_tokens = document_mask.shape[1]
    positions = torch.arange(document_tokens, device=document_mask.device)
    return torch.where(document_mask, document_tokens, positions).amin(dim=1)


def with_masked_tokens(best: torch.Tensor, at: torch.Tensor, first_masked: torch.Tensor, document_tokens: int,
                       fill: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Stock's max over all of a document's tokens, masked ones included as ``fill`` (its masked_fill), from the max
    ``best`` (..., dc) over the unmasked tokens (-inf if none) and its first position ``at``; ``first_masked`` (dc,)
    from :func:`first_masked_tokens`. The first masked token wins where no unmasked product is above the fill, or
    ties it from an earlier position; it is written as ``-1 - t`` (the backward skips it: the fill is a constant).
    The formula of csrc/include/st_fast/maxsim_formulas.h."""
    has_masked = first_masked < document_tokens
    wins = has_masked & ((best < fill) | ((best == fill) & (first_masked < at)))
    return torch.where(wins, torch.full_like(best, fill), best), torch.where(wins, -1 - first_masked, at)


def maxsim_forward(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    documents: torch.Tensor,
    document_mask: torch.Tensor,
    need_indices: bool,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MaxSim sums (B, M) float32 (float64 for float64 embeddings) and, with ``need_indices``, the arg-max
    (B, Lq, M) int32, of queries (B, Lq, D) against documents (M, Ld, D) under boolean masks (B, Lq) / (M, Ld).
    A document without an unmasked token gets a meaningless sum here (the caller applies the sentinel)."""
    num_queries, query_tokens, dim = queries.shape
    num_documents, document_tokens = documents.shape[:2]
    accumulate = sum_dtype(queries.dtype)
    sums = torch.zeros(num_queries, num_documents, dtype=accumulate, device=queries.device)
    index = None
    if need_indices:
        index = torch.zeros(num_queries, query_tokens, num_documents, dtype=torch.int32, device=queries.device)
    if 0 in (num_queries, query_tokens, num_documents, document_tokens):
        return sums, index
    query_tile, document_tile = tile_counts(
        num_queries, num_documents, query_tokens * document_tokens, tile_elements, _row_target(query_tokens)
    )
    query_rows = queries.reshape(num_queries * query_tokens, dim)
    query_weight = query_mask.to(accumulate).unsqueeze(-1)  # (B, Lq, 1): stock multiplies by the mask
    fill = torch.finfo(queries.dtype).min
    order, widths = length_order(document_mask)
    first_masked = first_masked_tokens(document_mask)
    for d0 in range(0, num_documents, document_tile):
        d1 = min(num_documents, d0 + document_tile)
        chosen, width = order[d0:d1], widths[d0]  # the tile's documents, longest first: its token width
        document_block = documents[chosen, :width].reshape(-1, dim).t()
        holes = ~document_mask[chosen, :width]
        has_holes = queries.device.type != "cpu" or bool(holes.any())  # no host sync off the CPU: always fill
        for q0 in range(0, num_queries, query_tile):
            q1 = min(num_queries, q0 + query_tile)
            products = query_rows[q0 * query_tokens : q1 * query_tokens] @ document_block
            products = products.view(q1 - q0, query_tokens, d1 - d0, width)
            if has_holes:
                products.masked_fill_(holes.view(1, 1, d1 - d0, width), float("-inf"))
            best, where = products.max(dim=-1)  # (qc, Lq, dc)
            best, where = with_masked_tokens(best, where, first_masked[chosen], document_tokens, fill)
            sums[q0:q1, chosen] = (best.to(accumulate) * query_weight[q0:q1]).sum(dim=1)
            if index is not None:
                index[q0:q1, :, chosen] = where.to(torch.int32)
    return sums, index


def scatter_add_rows(target: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """target[rows[k]] += values[k] in the order of k, deterministically: ``index_add_`` on the CPU (a serial loop
    over k), ``index_put_(accumulate=True)`` elsewhere (sorted, no atomics)."""
    if target.device.type == "cpu":
        target.index_add_(0, rows, values)
    else:
        target.index_put_((rows,), values, accumulate=True)


def maxsim_backward(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    documents: torch.Tensor,
    index: torch.Tensor,
    grad_sums: torch.Tensor,
    tile_elements: int = DEFAULT_TILE_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dqueries (B, Lq, D), dL/ddocuments (M, Ld, D)), float32 (float64 for float64 embeddings), from the
    forward's arg-max ``index`` (B, Lq, M) and ``grad_sums`` = dL/dsums (B, M) (see the module docstring)."""
    num_queries, query_tokens, dim = queries.shape
    num_documents, document_tokens = documents.shape[:2]
    accumulate = sum_dtype(queries.dtype)
    grad_queries = torch.zeros(num_queries, query_tokens, dim, dtype=accumulate, device=queries.device)
    grad_rows = torch.zeros(num_documents * document_tokens, dim, dtype=accumulate, device=queries.device)
    if 0 in (num_queries, query_tokens, num_documents, document_tokens):
        return grad_queries, grad_rows.view(num_documents, document_tokens, dim)
    query_tile, document_tile = tile_counts(
        num_queries, num_documents, query_tokens * dim, tile_elements, _row_target(query_tokens)
    )
    document_rows = documents.reshape(num_documents * document_tokens, dim)
    first_rows = torch.arange(num_documents, device=queries.device) * document_tokens
    grad_sums = grad_sums.to(accumulate)
    query_weight = query_mask.to(accumulate).unsqueeze(-1)  # (B, Lq, 1)
    for q0 in range(0, num_queries, query_tile):
        q1 = min(num_queries, q0 + query_tile)
        query_block = queries[q0:q1].to(accumulate).unsqueeze(2)  # (qc, Lq, 1, D)
        for d0 in range(0, num_documents, document_tile):
            d1 = min(num_documents, d0 + document_tile)
            at = index[q0:q1, :, d0:d1].long()
            weights = grad_sums[q0:q1, None, d0:d1] * query_weight[q0:q1]  # (qc, Lq, dc)
            weights = torch.where(at >= 0, weights, 0.0)  # a masked token's fill won: no gradient
            if queries.dtype != accumulate:
                weights = weights.to(queries.dtype).to(accumulate)
            rows = (at.clamp(min=0) + first_rows[d0:d1]).reshape(-1)
            picked = document_rows.index_select(0, rows).to(accumulate).view(-1, d1 - d0, dim)
            grad_queries[q0:q1] += torch.bmm(weights.reshape(-1, 1, d1 - d0), picked).view(q1 - q0, query_tokens, dim)
            scatter_add_rows(grad_rows, rows, (weights.unsqueeze(-1) * query_block).reshape(-1, dim))
    return grad_queries, grad_rows.view(num_documents, document_tokens, dim)


def torch_computes(queries: torch.Tensor, documents: torch.Tensor) -> bool:
    """Whether the call goes to the torch backend, which computes it as stock does: an empty token axis (Lq or Ld
    0), or an embedding value that is not finite (stock's max propagates a NaN product and its index, and inf · 0
    is NaN; the native and Triton kernels' comparisons would skip a NaN and return a finite score). Tested on each
    tensor's sum, which is not finite where any value is not (a NaN or an inf stays in a sum; +inf and -inf make
    NaN): one reduction, without an elementwise mask. A sum that overflows on finite values sends the call to the
    torch backend too, which computes every call as stock does."""
    if 0 in (queries.shape[1], documents.shape[1]):
        return True
    return not (bool(torch.isfinite(queries.sum())) and bool(torch.isfinite(documents.sum())))


class TorchBackend:
    """The torch backend object (see :mod:`st_fast.ops.maxsim.dispatch`)."""

    name = "torch"

    def __init__(self, tile_elements: int = DEFAULT_TILE_ELEMENTS) -> None:
        self.tile_elements = tile_elements

    def forward(self, queries, query_mask, documents, document_mask, need_indices):
        return maxsim_forward(queries, query_mask, documents, document_mask, need_indices, self.tile_elements)

    def backward(self, queries, query_mask, documents, index, grad_sums):
        return maxsim_backward(queries, query_mask, documents, index, grad_sums, self.tile_elements)
