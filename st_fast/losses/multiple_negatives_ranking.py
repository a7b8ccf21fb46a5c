"""Drop-in MultipleNegativesRankingLoss and MultipleNegativesSymmetricRankingLoss on the fused contrastive op."""

from __future__ import annotations

from typing import Any

from sentence_transformers.sentence_transformer.losses import (
    MultipleNegativesRankingLoss as StockMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses import (
    MultipleNegativesSymmetricRankingLoss as StockMultipleNegativesSymmetricRankingLoss,
)
from sentence_transformers.util import all_gather_with_grad, get_rank
from torch import Tensor

from st_fast.losses.similarity import fused_similarity_name, warn_fallback_once
from st_fast.ops import BACKENDS, fused_mnrl_loss
from st_fast.ops.spec import check_embeddings


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class FusedMNRLMixin:
    """Replaces ``compute_loss_from_embeddings`` of a stock MNRL-family class with the fused op.

    The configuration attributes (scale, similarity_fct, directions, partition_mode, hardness_mode,
    hardness_strength, gather_across_devices) are the stock class's own; ``backend`` picks the kernels.
    """

    backend: str

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if fused_similarity_name(self.similarity_fct) is None:
            warn_fallback_once(type(self).__name__, self.similarity_fct)
            return super().compute_loss_from_embeddings(embeddings, labels)
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        return self.fused_loss(embeddings[0], list(embeddings[1:]))

    def fused_loss(self, queries: Tensor, docs: list[Tensor]) -> Tensor:
        """The loss of local anchors (B, D) against candidate columns k x (B, D), gathered across ranks when
        ``gather_across_devices`` (local rows against every rank's columns, positive of row i at rank·B + i)."""
        check_embeddings(queries, docs)
        batch_size, offset = queries.shape[0], 0
        if self.gather_across_devices:
            queries = all_gather_with_grad(queries)
            docs = [all_gather_with_grad(doc) for doc in docs]
            offset = get_rank() * batch_size
        return fused_mnrl_loss(
            queries, docs, row_offset=offset, batch_size=batch_size, scale=self.scale,
            similarity=fused_similarity_name(self.similarity_fct), directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, backend=self.backend,
        )  # fmt: skip


class MultipleNegativesRankingLoss(FusedMNRLMixin, StockMultipleNegativesRankingLoss):
    """sentence-transformers' :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss`
    computed by st_fast's fused op: the same loss and gradients without the (B, k·W) score matrices.

    For row i with query q_i, positive d_i and candidates c (all positives and hard negatives of the batch)::

        loss = mean_i [ log Σ_c exp(scale · sim(q_i, c)) - scale · sim(q_i, d_i) ]

    extended by ``directions``, ``partition_mode`` and ``hardness_mode`` exactly as the stock class.

    Args:
        Same as the stock class (model, scale, similarity_fct, gather_across_devices, directions, partition_mode,
        hardness_mode, hardness_strength), plus
        backend: ``"auto"`` (native C++/CUDA kernels when built, else Triton on CUDA, else torch),
            ``"triton"``, ``"native"`` or ``"torch"``.

    ``similarity_fct`` other than ``util.cos_sim`` / ``util.dot_score`` falls back to the stock computation with a
    one-time warning. Non-finite embeddings give a non-finite loss, as in stock (no error, so that fp16 loss scaling
    keeps working). Under autocast the loss is computed and returned in float32.

    Example::

        from st_fast.losses import MultipleNegativesRankingLoss

        loss = MultipleNegativesRankingLoss(model, scale=20.0)  # instead of sentence_transformers' class
    """

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = validate_backend(backend)


class MultipleNegativesSymmetricRankingLoss(FusedMNRLMixin, StockMultipleNegativesSymmetricRankingLoss):
    """Deprecated upstream alias (MNRL with ``directions=("query_to_doc", "doc_to_query")`` and
    ``partition_mode="per_direction"``) on the fused op. Same arguments as the stock class plus ``backend``."""

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = validate_backend(backend)
