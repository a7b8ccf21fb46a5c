"""Drop-in CachedMultipleNegativesRankingLoss (GradCache) whose loss stage is the fused op in one call."""

from __future__ import annotations

import inspect
from typing import Any

from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss as StockCachedMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesSymmetricRankingLoss as StockCachedMultipleNegativesSymmetricRankingLoss,
)
from torch import Tensor

from st_fast.losses.cached_stage import concatenate_mini_batches, finish_loss_stage, fused_loss_stage
from st_fast.losses.multiple_negatives_ranking import FusedMNRLMixin
from st_fast.losses.plan import replaces
from st_fast.losses.self_check import stock_function, stock_view
from st_fast.losses.stock_contract import (
    subclassing_deprecated_stock,
    warn_deprecated_like_stock,
    warn_stock_fallback_once,
)


class FusedCachedLossStageMixin(FusedMNRLMixin):
    """Replaces the loss stage of a stock cached MNRL-family class (``calculate_loss``); the mini-batch embedding,
    RandContext replay, backward hook, DDP handling and ``mini_batch_num_tokens`` stay the stock machinery."""

    _replaced_method = "calculate_loss"

    @fused_loss_stage
    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False):
        """Loss of the cached embeddings ``reps[column][mini_batch]`` (each (mb, D)).

        With ``with_backward`` the gradient of every cached embedding is written to its ``.grad`` by one backward
        through the fused op (no autograd graph over scores; cosine normalization back-propagated once) and the
        detached loss is returned. Without gradients enabled (evaluation) only the loss is computed.
        """
        reason = self.fallback_reason()
        if reason is not None:
            self.check_stock_fallback(reason)
            warn_stock_fallback_once(self, reason)
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        if len(reps) < 2:
            raise ValueError(f"Expected at least 2 embedding columns, got {len(reps)}")
        columns = [concatenate_mini_batches(column) for column in reps]
        if self.computes_stock(columns):
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        loss = self.fused_loss(columns[0], columns[1:])
        return finish_loss_stage(loss, with_backward)

    def stock_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """Stock's loss stage on ``columns`` as one mini-batch each (one device, no gathering, no backward)."""
        view = stock_view(self, gather_across_devices=False, show_progress_bar=False)
        stock = stock_function(self, "calculate_loss")
        reps = [[column] for column in columns]
        if "labels" in inspect.signature(stock).parameters:
            return stock(view, reps, None, with_backward=False)
        return stock(view, reps, with_backward=False)


@replaces(StockCachedMultipleNegativesRankingLoss)
class CachedMultipleNegativesRankingLoss(FusedCachedLossStageMixin, StockCachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesRankingLoss (GradCache)
    with its loss stage computed by st_fast's fused op: for B cached embeddings per column the stock class builds a
    mini_batch_size x N autograd graph per chunk and re-normalizes all candidates in each; here the loss and every
    embedding gradient come from one fused call (row chunks sized from a memory budget, gradients written directly).

    Args:
        Same as the stock class, plus ``backend``: ``"auto"`` (native C++/CUDA kernels when built, else Triton
        on CUDA, else torch), ``"triton"``, ``"native"`` or ``"torch"``, and ``mask_duplicates`` (default False; see
        :class:`st_fast.losses.MultipleNegativesRankingLoss`: the texts come from the features ``forward`` receives,
        so the masking covers the whole batch, across its mini-batches).

    The loss is computed in float32 and returned in stock's dtype (see
    :class:`st_fast.losses.MultipleNegativesRankingLoss`); a learnable ``scale`` gets its gradient during the loss
    stage, as in stock. Everything else — configuration, ``get_config_dict()``, citation, MatryoshkaLoss decoration
    (``uses_gradient_cache``) — is the stock class's.
    """

    def __init__(self, *args: Any, backend: str = "auto", mask_duplicates: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.mask_duplicates = mask_duplicates


with subclassing_deprecated_stock():

    @replaces(StockCachedMultipleNegativesSymmetricRankingLoss)
    class CachedMultipleNegativesSymmetricRankingLoss(
        FusedCachedLossStageMixin, StockCachedMultipleNegativesSymmetricRankingLoss
    ):
        """Deprecated upstream alias (CMNRL with ``directions=("query_to_doc", "doc_to_query")``,
        ``partition_mode="per_direction"``) on the fused op. Same arguments as the stock class plus ``backend`` and
        ``mask_duplicates``."""

        def __init__(self, *args: Any, backend: str = "auto", mask_duplicates: bool = False, **kwargs: Any) -> None:
            warn_deprecated_like_stock(StockCachedMultipleNegativesSymmetricRankingLoss)
            super().__init__(*args, **kwargs)
            self.backend = backend
            self.mask_duplicates = mask_duplicates
