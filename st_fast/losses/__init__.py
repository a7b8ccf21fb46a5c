"""Drop-in replacements of sentence-transformers' in-batch-negative losses, computed by st_fast's fused ops."""

from st_fast.losses.cached_multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
)
from st_fast.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)

__all__ = [
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]
