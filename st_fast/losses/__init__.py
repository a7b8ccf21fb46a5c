"""Drop-in replacements of sentence-transformers' in-batch-negative losses, computed by st_fast's fused ops."""

from st_fast.losses.cached_gist_embed import CachedGISTEmbedLoss
from st_fast.losses.cached_multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
)
from st_fast.losses.fuse import fuse
from st_fast.losses.gist_embed import GISTEmbedLoss
from st_fast.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)
from st_fast.losses.sparse_multiple_negatives_ranking import SparseMultipleNegativesRankingLoss

__all__ = [
    "CachedGISTEmbedLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "SparseMultipleNegativesRankingLoss",
    "fuse",
]

try:  # the multi-vector (MaxSim) family: sentence-transformers versions without MultiVectorEncoder have none
    from st_fast.losses.cached_multi_vector_multiple_negatives_ranking import (
        CachedMultiVectorMultipleNegativesRankingLoss,
    )
    from st_fast.losses.multi_vector_multiple_negatives_ranking import MultiVectorMultipleNegativesRankingLoss
except ImportError:
    pass
else:
    __all__ += ["CachedMultiVectorMultipleNegativesRankingLoss", "MultiVectorMultipleNegativesRankingLoss"]
