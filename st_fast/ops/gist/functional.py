"""The GIST op, functional form: GISTEmbedLoss with in-batch negatives and no (B, N, D) tensors, no B x N scores.

See :mod:`st_fast.ops.gist.spec` for the logits, masks and loss and :mod:`st_fast.ops.backends` for how it is
computed (``auto`` never takes the guided Triton kernels: :data:`st_fast.ops.backends.GIST`). This module only
checks the inputs, builds the spec, resolves the backend, prepares the operands and applies
:class:`st_fast.ops.autograd.FusedLoss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from st_fast.ops.autograd import FusedLoss
from st_fast.ops.backends import GIST, resolve_backend
from st_fast.ops.gist.spec import COSINE_EPS, GuidedProblem, GuidedSpec, check_inputs
from st_fast.ops.learnable_scale import learnable, scalar_value
from st_fast.ops.mixed_matmul import compute_dtype
from st_fast.ops.normalization import normalized


def fused_gist_loss(
    anchors: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    anchors_guide: torch.Tensor,
    candidates_guide: Sequence[torch.Tensor],
    *,
    row_offset: int = 0,
    temperature: float | torch.Tensor = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    mask_dtype: torch.dtype | None = None,
    mask_self_negatives: bool = True,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """GISTEmbedLoss of B local anchors against k >= 1 candidate columns of W rows each (gathered across ranks:
    row i's positive is candidates[0][row_offset + i]), guided by the guide's embeddings of the same rows.

    Args:
        anchors: (B, D) trainable anchor embeddings of this rank.
        candidates: k tensors (W, D): the positives, then the negative columns (W = B without gathering).
        anchors_guide, candidates_guide: the guide's embeddings (B, D') and k x (W, D'); no gradient flows to them.
        temperature: a number or a one-element tensor; a tensor that requires grad gets d loss / d temperature.
        mask_dtype: the dtype stock computes the guide similarities in (``nn.CosineSimilarity``'s output dtype: the
            guide's, or float32 under CUDA autocast); default: the guide embeddings' dtype. The torch / native
            backends decide every mask as stock does in that dtype (see :class:`st_fast.ops.gist.spec.StockGuide`).
        mask_self_negatives: mask each row's own entry of the anchor-anchor and positive-positive blocks, as
            sentence-transformers >= 6.3 does (default); False: only the guide masks it, as 6.0-6.2 do.
        Other arguments as in sentence-transformers' GISTEmbedLoss; ``backend``: ``"auto"`` (native when built,
        else torch), ``"native"``, ``"torch"`` or ``"triton"`` (CUDA, or CPU under TRITON_INTERPRET=1; the Triton
        kernels decide the masks on their float32 tile similarities, so an entry within ~1e-5 of its threshold may
        be decided differently from stock; with a ``mask_dtype`` other than float32 the torch backend computes).
        chunk_bytes: sizes the row chunks of the torch / native backends (default: chunked.DEFAULT_CHUNK_BYTES).
    Returns:
        0-dim loss, float32 (float64 for float64 embeddings); gradients reach ``anchors`` and ``candidates``.
    Raises:
        TypeError: non-floating embeddings; ``native`` / ``triton`` for float64 embeddings.
        ValueError: shapes, devices or local rows that do not fit (:func:`st_fast.ops.gist.spec.check_inputs`), an
            unknown backend or margin strategy, a temperature that is not positive.
        RuntimeError: a backend that cannot run on the embeddings' device.
    """
    candidates, candidates_guide = list(candidates), list(candidates_guide)
    check_inputs(anchors, candidates, anchors_guide, candidates_guide, row_offset)
    spec = GuidedSpec(
        scalar_value(temperature), margin_strategy, scalar_value(margin), bool(contrast_anchors),
        bool(contrast_positives),
        anchors_guide.dtype if mask_dtype is None else mask_dtype, bool(mask_self_negatives),
    )  # fmt: skip
    chosen = resolve_backend(backend, anchors.device, anchors.dtype, GIST, mask_dtype=spec.mask_dtype)
    dtype, guide_dtype = compute_dtype(anchors.dtype), compute_dtype(anchors_guide.dtype)
    operand_dtype = chosen.operand_dtype(anchors.dtype)
    anchor_operand = normalized(anchors, dtype, COSINE_EPS).to(operand_dtype)
    candidate_operand = normalized(torch.cat(candidates, dim=0), dtype, COSINE_EPS).to(operand_dtype)
    with torch.no_grad():  # the guide's similarities in the backend's dtype for it (float64 stays float64 in torch)
        guide_operand_dtype = chosen.operand_dtype(anchors_guide.dtype)
        anchor_guide = normalized(anchors_guide.detach(), guide_dtype, COSINE_EPS).to(guide_operand_dtype)
        candidate_guide = normalized(torch.cat([c.detach() for c in candidates_guide], dim=0), guide_dtype, COSINE_EPS)
        candidate_guide = candidate_guide.to(guide_operand_dtype)
    problem = GuidedProblem(
        spec, row_offset, candidates[0].shape[0], anchor_guide, candidate_guide, anchors_guide.detach(),
        tuple(c.detach() for c in candidates_guide), chunk_bytes,
    )  # fmt: skip
    return FusedLoss.apply(
        anchor_operand, candidate_operand, temperature if learnable(temperature) else None, problem, chosen
    )
