"""Drop-in SparseMultipleNegativesRankingLoss (the MNRL subclass that SpladeLoss / CSRLoss wrap) on the fused op."""

from __future__ import annotations

from typing import Any

from sentence_transformers.sparse_encoder.losses import (
    SparseMultipleNegativesRankingLoss as StockSparseMultipleNegativesRankingLoss,
)

from st_fast.losses.multiple_negatives_ranking import FusedMNRLMixin
from st_fast.losses.plan import replaces


@replaces(StockSparseMultipleNegativesRankingLoss)
class SparseMultipleNegativesRankingLoss(FusedMNRLMixin, StockSparseMultipleNegativesRankingLoss):
    """sentence-transformers' SparseMultipleNegativesRankingLoss with ``compute_loss_from_embeddings`` computed by the
    fused op (dense (B, vocab) embeddings, dot similarity by default). Same arguments as the stock class plus
    ``backend``; like the stock class it is used inside SpladeLoss / CSRLoss / CachedSpladeLoss."""

    mask_duplicates_applies = False  # its wrappers give it embeddings, not features: no texts to compare

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend
