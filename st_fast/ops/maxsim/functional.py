"""The MaxSim op, functional form: ColBERT-style late-interaction scores and their in-batch cross-entropy, without
the (B, M, Lq, Ld) similarity tensor.

    scores[i, m] = Σ_s mask_q[i, s] · max_{t unmasked} <q_is, d_mt>     (-1e9 for a document with no unmasked token;
                                                                         / real query tokens with length_normalize)
    loss         = mean_i [ log Σ_m exp(scale · scores[i, m]) - scale · scores[i, (row_offset + i)·N] ]

as sentence-transformers' ``colbert_scores`` / ``mean_colbert_scores`` and the cross-entropy of
``MultiVectorMultipleNegativesRankingLoss`` compute them (see :mod:`st_fast.ops.maxsim.spec` for the rounding).
This module checks the inputs, resolves the backend and applies :class:`st_fast.ops.maxsim.autograd.MaxSimSums`;
the sentinel, the MeanMaxSim division, the scale and the cross-entropy act on the small (B, M) score matrix.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from st_fast.ops.backends import MAXSIM, resolve_backend
from st_fast.ops.maxsim.autograd import MaxSimSums
from st_fast.ops.maxsim.spec import (
    EMPTY_DOCUMENT_SCORE,
    autocast_operands,
    check_embeddings,
    flatten_documents,
    query_token_counts,
    token_mask,
)


def maxsim_scores(
    queries: torch.Tensor,
    documents: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    document_mask: torch.Tensor | None = None,
    *,
    length_normalize: bool = False,
    empty_score: float = EMPTY_DOCUMENT_SCORE,
    backend: str = "auto",
    tile_elements: int | None = None,
) -> torch.Tensor:
    """MaxSim scores of every query against every document, query-major, differentiable in both embeddings.

    Args:
        queries: (B, Lq, D) query token embeddings, float16 / bfloat16 / float32 / float64.
        documents: (M, Ld, D) document token embeddings, or stacked (G, N, Ld, D) as ``colbert_scores`` takes them
            (flattened query-major: document n of group j is column j·N + n); same dtype and device.
        query_mask, document_mask: boolean (or integer 0/1) token masks (B, Lq) and (M, Ld) / (G, N, Ld), any
            pattern (skiplist holes included); None: a token whose vector is all zero is padding (stock's default).
        length_normalize: MeanMaxSim: divide each row by its real query token count (at least 1).
        empty_score: the score of a document with no unmasked token (stock's ``_EMPTY_DOCUMENT_SCORE``), before
            the MeanMaxSim division, as in stock.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (see :mod:`st_fast.ops.maxsim.dispatch`).
        tile_elements: products a chunked backend holds at once (default
            :data:`st_fast.ops.maxsim.spec.DEFAULT_TILE_ELEMENTS`).

    Under ``torch.autocast`` on the embeddings' device the products are computed in the autocast dtype, as stock's
    einsum computes them (:func:`st_fast.ops.maxsim.spec.autocast_operands`).

    Returns:
        (B, M) scores, float32 (float64 for float64 embeddings).

    Memory: the arg-max (B, Lq, M) int32 when a gradient is needed, the (B, M) scores, one tile; FLOPs 2·B·M·Lq·Ld·D
    forward, O(B·M·Lq·D) backward (a gather and a scatter-add).

    Raises:
        TypeError: non-tensor or non-floating embeddings, mixed dtypes, float masks; ``triton`` / ``native`` for
            float64.
        ValueError: shapes or devices that do not fit (:func:`st_fast.ops.maxsim.spec.check_embeddings`), masks of
            other shapes or devices, an unknown backend.
        RuntimeError: a backend that cannot run on the embeddings' device or dtype (``native``: float16; ``triton``
            without Triton, or on CPU tensors without ``TRITON_INTERPRET=1``).
    """
    check_embeddings(queries, documents)
    queries, documents = autocast_operands(queries, documents)
    query_mask = token_mask(queries, query_mask, "query_mask")
    flat_documents, flat_mask, _ = flatten_documents(documents, document_mask)
    chosen = resolve_backend(backend, queries.device, queries.dtype, MAXSIM, tile_elements=tile_elements)
    sums = MaxSimSums.apply(queries, flat_documents, query_mask, flat_mask, chosen)
    return finish_scores(sums, query_mask, flat_mask, length_normalize, empty_score)


def finish_scores(
    sums: torch.Tensor,
    query_mask: torch.Tensor,
    document_mask: torch.Tensor,
    length_normalize: bool,
    empty_score: float,
) -> torch.Tensor:
    """Stock's steps after the query-token sums, in its order: the empty-document sentinel, then MeanMaxSim."""
    scores = sums.masked_fill(~document_mask.any(dim=-1), empty_score)
    if length_normalize:
        scores = scores / query_token_counts(query_mask, scores.dtype).unsqueeze(1)
    return scores


def fused_maxsim_loss(
    queries: torch.Tensor,
    documents: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    document_mask: torch.Tensor | None = None,
    *,
    scale: float | torch.Tensor = 1.0,
    length_normalize: bool = False,
    row_offset: int = 0,
    empty_score: float = EMPTY_DOCUMENT_SCORE,
    backend: str = "auto",
    tile_elements: int | None = None,
) -> torch.Tensor:
    """In-batch MaxSim cross-entropy (MultiVectorMultipleNegativesRankingLoss): queries (B, Lq, D) against stacked
    documents (G, N, Ld, D) (the positive of query i is document 0 of group row_offset + i, column
    (row_offset + i)·N; G = B without gathering), arguments as in :func:`maxsim_scores`; ``scale`` a number or a
    tensor (one that requires grad gets its gradient). Returns the 0-dim mean loss, float32 (float64 for float64).

    ``scale`` multiplies the scores as the stock loss classes multiply them (``scores * scale``): any real number,
    0, negative, NaN and infinite included (the stock constructors refuse a non-positive one, but a scale set
    afterwards is multiplied as it is), or a one-element tensor on the embeddings' device (a 0-dim CPU tensor on
    any device, as torch multiplies one). See :func:`check_scale`.

    Raises:
        TypeError: a ``scale`` that is neither a real number nor a tensor (a numpy array: pass ``float(scale)``), a
            ``row_offset`` that is not an int, and what :func:`maxsim_scores` raises.
        ValueError: 3-D documents (pass them stacked, (G, N, Ld, D)), local rows outside the document groups, a
            tensor ``scale`` of more than one element or on another device, and everything :func:`maxsim_scores`
            raises.
    """
    check_embeddings(queries, documents)
    check_scale(scale, queries.device)
    if documents.dim() != 4:
        raise ValueError("fused_maxsim_loss takes stacked documents (groups, documents per group, tokens, dim)")
    groups, per_group = documents.shape[:2]
    if not isinstance(row_offset, numbers.Integral) or isinstance(row_offset, bool):
        raise TypeError(f"row_offset must be an int (the first local query's document group), got {row_offset!r}")
    if not (0 <= row_offset and row_offset + queries.shape[0] <= groups):
        raise ValueError(
            f"query rows [{row_offset}, {row_offset + queries.shape[0]}) are outside the {groups} document groups"
        )
    scores = maxsim_scores(
        queries, documents, query_mask, document_mask, length_normalize=length_normalize, empty_score=empty_score,
        backend=backend, tile_elements=tile_elements,
    )  # fmt: skip
    labels = (torch.arange(queries.shape[0], device=queries.device) + row_offset) * per_group
    return F.cross_entropy(scores * scale, labels)


def check_scale(scale: object, device: torch.device) -> None:
    """Raise where ``scale`` is a mistake that ``scores * scale`` would not catch, or would answer with other than the
    loss classes' scalar-scaled cross-entropy: a tensor of more than one element (broadcast over the score matrix's
    rows or columns: a different loss, or an error only for some batch shapes), a non-number (None, a string, a
    list), or a tensor on another device than the embeddings (torch's device error, said clearly; a 0-dim CPU
    tensor is multiplied on any device, as torch and the loss classes multiply it, and gets its gradient there)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(
                f"scale must be a number or a one-element tensor, got a tensor of shape {tuple(scale.shape)}"
            )
        cpu_scalar = scale.dim() == 0 and scale.device.type == "cpu"
        if scale.device != device and not cpu_scalar:
            raise ValueError(f"scale is on {scale.device}, the embeddings on {device}: move it to {device}")
        if scale.is_complex():
            raise TypeError(f"scale must be real, got a {scale.dtype} tensor")
        return
    if isinstance(scale, numbers.Real):  # (a bool is an int: True multiplies as 1, as in the loss classes)
        return
    if hasattr(scale, "__array__") and hasattr(scale, "dtype"):
        # a numpy array: the loss classes' `scores * scale` goes through numpy, which fails on scores that require
        # grad (training) and computes float64 scores otherwise
        raise TypeError("scale must be a real number or a one-element tensor, got a numpy array: pass float(scale)")
    raise TypeError(f"scale must be a real number or a one-element tensor, got {type(scale).__name__}")
