"""What the MaxSim (late interaction) op computes, and the checks on its inputs.

For queries q (B, Lq, D) with a query-token mask (B, Lq) and documents d (M, Ld, D) with a document-token mask
(M, Ld), the MaxSim sums are (sentence-transformers 6.2 / 6.3 ``util.similarity._maxsim_score_documents``)::

    P[i, m, s, t] = <q_is, d_mt>                      in the embeddings' dtype (float32 accumulation, one rounding)
    P[i, m, s, t] = finfo(dtype).min                  where document token t of m is masked
    sums[i, m]    = Σ_s mask_q[i, s] · float32(max_t P[i, m, s, t])

then (the op's functional layer, in this order, as stock does): documents without an unmasked token take the
empty-document sentinel (stock's ``_EMPTY_DOCUMENT_SCORE``, -1e9), MeanMaxSim (``length_normalize``) divides each
row by its real query token count (at least 1), and the loss is the cross-entropy of ``scale · scores`` with the
positive of query i at column (row_offset + i)·N (query-major: ``scores[i, j·N + n]`` is query i against document n
of group j, as ``colbert_scores`` lays them out).

The arg-max ``index[i, s, m]`` is the first document token t reaching the max (``torch.max`` on CPU and CUDA returns
the first index of a tie: ties are common in bf16), so the backward is sparse: one document token per (query,
query token, document).
"""

from __future__ import annotations

import torch

EMPTY_DOCUMENT_SCORE = -1e9  # sentence_transformers.util.similarity._EMPTY_DOCUMENT_SCORE (6.2, 6.3)
DEFAULT_TILE_ELEMENTS = 1 << 21  # products held at once by the chunked backends: 8 MB in float32
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the query-token sum: float32 (as stock's ``.float()``), float64 for float64 embeddings (the
    reference; stock itself sums float64 maxima in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_mask(embeddings: torch.Tensor, mask: torch.Tensor | None, what: str) -> torch.Tensor:
    """The boolean token mask of ``embeddings`` (..., L, D): ``mask`` checked (shape (..., L), bool or 0/1 values,
    same device), or, without one, stock's default (``_zero_row_mask``: a token whose vector is all zero is
    padding)."""
    if mask is None:
        return embeddings.ne(0).any(dim=-1)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(embeddings.shape[:-1]):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected {tuple(embeddings.shape[:-1])}")
    if mask.device != embeddings.device:
        raise ValueError(f"{what} is on {mask.device}, the embeddings are on {embeddings.device}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(
                f"{what} must be a boolean (or integer 0/1) token mask, got {mask.dtype}: stock weights query "
                "tokens by a float mask, which the MaxSim op does not take"
            )
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(
                f"{what} must be a boolean or integer 0/1 token mask; it has other values (stock multiplies scores "
                "by such a mask, which the MaxSim op does not take)"
            )
        mask = mask.bool()
    return mask


def check_embeddings(queries: torch.Tensor, documents: torch.Tensor) -> None:
    """Clear errors for embeddings the op cannot take: queries (B, Lq, D) and documents (M, Ld, D) or stacked
    (G, N, Ld, D), floating point, one dtype, one device, the same dim D."""
    if not isinstance(queries, torch.Tensor) or not isinstance(documents, torch.Tensor):
        raise TypeError("embeddings must be torch.Tensor objects")
    if queries.dim() != 3:
        raise ValueError(f"query embeddings must be 3-D (queries, query tokens, dim), got {tuple(queries.shape)}")
    if documents.dim() not in (3, 4):
        raise ValueError(
            "document embeddings must be 3-D (documents, document tokens, dim) or stacked 4-D "
            f"(groups, documents per group, document tokens, dim), got {tuple(documents.shape)}"
        )
    if queries.dtype not in FLOATING:
        raise TypeError(f"embeddings must be float16, bfloat16, float32 or float64, got {queries.dtype}")
    if documents.dtype != queries.dtype:
        raise TypeError(f"document embeddings have dtype {documents.dtype}, the queries have {queries.dtype}")
    if documents.device != queries.device:
        raise ValueError(f"document embeddings are on {documents.device}, the queries are on {queries.device}")
    if documents.shape[-1] != queries.shape[-1]:
        raise ValueError(f"document embeddings have dim {documents.shape[-1]}, the queries have {queries.shape[-1]}")


def autocast_operands(queries: torch.Tensor, documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings in the dtype stock's einsum computes their products in now: the autocast dtype when autocast is
    on for their device (einsum autocasts float16 / bfloat16 / float32 operands; float64 stays), else their own. The
    cast is differentiable: the gradients reach the embeddings in their own dtype, as stock's."""
    device_type = queries.device.type
    if torch.is_autocast_enabled(device_type) and queries.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        return queries.to(dtype), documents.to(dtype)
    return queries, documents


def flatten_documents(documents: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stacked documents (G, N, Ld, D) and their mask as the query-major flat layout (G·N, Ld, D) / (G·N, Ld)
    (document n of group j at j·N + n, a view when contiguous), with N; 3-D documents are one per group (N = 1)."""
    mask = token_mask(documents, mask, "document_mask")
    if documents.dim() == 3:
        return documents, mask, 1
    groups, per_group = documents.shape[:2]
    return documents.reshape(groups * per_group, *documents.shape[2:]), mask.reshape(groups * per_group, -1), per_group


def query_token_counts(query_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """MeanMaxSim's divisor (B,): the real query tokens, at least 1 (stock's ``_query_token_counts``)."""
    return query_mask.sum(dim=-1).clamp(min=1).to(dtype)
