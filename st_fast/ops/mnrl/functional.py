"""The MNRL op, functional form: MultipleNegativesRankingLoss with in-batch negatives and no B x N score matrix.

    loss = mean_i [ log Z_i - scale · sim(q_g, d_g) ],   g = row_offset + i,  i < batch_size

where log Z_i is the joint (or per-direction mean) log-partition over the selected directions; see
:mod:`st_fast.ops.layout` for the segments and masks and :mod:`st_fast.ops.backends` for how it is computed. This
module only checks the inputs, builds the spec, resolves the backend, prepares the operands and applies
:class:`st_fast.ops.autograd.FusedLoss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from st_fast.ops.autograd import FusedLoss
from st_fast.ops.backends import MNRL, resolve_backend
from st_fast.ops.learnable_scale import learnable
from st_fast.ops.mixed_matmul import compute_dtype
from st_fast.ops.mnrl.spec import SIMILARITIES, ContrastiveProblem, ContrastiveSpec, check_embeddings, check_labels
from st_fast.ops.normalization import normalized


def prepare_operand(x: torch.Tensor, similarity: str, operand_dtype: torch.dtype) -> torch.Tensor:
    """Upcast (as stock does), normalize once for cosine (eps 1e-12, as F.normalize in cos_sim), cast to the dtype
    the backend consumes. Differentiable: autograd takes the gradient back through the normalization."""
    dtype = compute_dtype(x.dtype)
    x = normalized(x, dtype) if similarity == "cos" else x.to(dtype)
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
    labels: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """MultipleNegativesRankingLoss of the local rows ``row_offset .. row_offset + batch_size`` of ``queries``.

    Args:
        queries: (W, D) query (anchor) embeddings of every rank (W = B without gathering).
        docs: k tensors (W, D): the positives, then the hard-negative columns, of every rank.
        row_offset, batch_size: the local rows (default: all W rows).
        scale: a number or a one-element tensor; a tensor that requires grad gets d loss / d scale. A tensor is
            read on the host (checked and taken as a number, as the row kernel takes it): the only host syncs of a
            CUDA call, which reads no other tensor value (tests/ops/test_host_sync.py).
        similarity: ``"cos"`` or ``"dot"``. Other arguments as in sentence-transformers' MNRL.
        labels: None (stock's loss), or duplicate masking (``mask_duplicates``, see :mod:`st_fast.ops.layout`):
            (query labels (W,), doc labels (k·W,)) int64 on the embeddings' device, equal iff the texts are equal
            (:func:`st_fast.ops.text_labels.text_labels`); a column whose text equals the row's reference text is
            left out of that row's softmax (every backend masks inside its row kernel / score tile).
    Returns:
        0-dim loss, float32 (float64 for float64 embeddings).

    GEMM FLOPs per forward + backward of the ``torch`` / ``native`` backends (B local rows, N = k·W candidates,
    W = B without gathering; :func:`st_fast.ops.mnrl.chunked.gemm_flops`)::

        directions                          tile kept      tile recomputed
        query_to_doc                        6·B·N·D        6·B·N·D   (one pass)
        + doc_to_query (symmetric, GTE)     6·B·N·D        8·B·N·D   (+ 6·B·(W-B)·D with gathered columns)
        + query_to_query                    + 6·B·W·D      + 8·B·W·D
        + doc_to_doc                        + 6·B·N·D      + 8·B·N·D

    (without doc_to_query every segment is one pass: 6·B·L·D for L columns). The doc_to_query direction is derived
    from the query_to_doc tile's columns (see :mod:`st_fast.ops.mnrl.chunked`); computed as its own segment it
    would add 6·B·W·D (12·B·N·D in all for k = 1, as before).
    Raises:
        TypeError: non-tensor or non-floating embeddings, mixed dtypes; ``native`` / ``triton`` for float64.
        ValueError: shapes, devices or local rows that do not fit (:func:`st_fast.ops.mnrl.spec.check_embeddings`),
            an unknown similarity, direction, partition or hardness mode or backend, a scale that is not positive,
            labels of other shapes, dtype or device.
        RuntimeError: a backend that cannot run on the embeddings' device.
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
    if labels is not None:
        check_labels(labels, width, width * len(docs), queries.device)
        labels = (labels[0].contiguous(), labels[1].contiguous())
    chosen = resolve_backend(backend, queries.device, queries.dtype, MNRL, mask_duplicates=labels is not None)
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
    problem = ContrastiveProblem(spec, row_offset, batch_size, normalize, labels=labels)
    return FusedLoss.apply(query_operand, doc_operand, scale_input, problem, chosen)
