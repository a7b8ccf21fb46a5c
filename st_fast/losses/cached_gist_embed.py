"""Drop-in CachedGISTEmbedLoss (GradCache) whose loss stage is the guided fused op in one call."""

from __future__ import annotations

from typing import Any

from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss as StockCachedGISTEmbedLoss
from torch import Tensor

from st_fast.losses.cached_stage import concatenate_mini_batches, finish_loss_stage, fused_loss_stage
from st_fast.losses.gist_embed import FusedGISTMixin
from st_fast.losses.plan import replaces
from st_fast.losses.self_check import stock_function, stock_view
from st_fast.losses.stock_contract import warn_stock_fallback_once


@replaces(StockCachedGISTEmbedLoss)
class CachedGISTEmbedLoss(FusedGISTMixin, StockCachedGISTEmbedLoss):
    """sentence-transformers' :class:`~sentence_transformers.sentence_transformer.losses.CachedGISTEmbedLoss`
    (GradCache) with its loss stage computed by st_fast's guided fused op. Stock builds, per chunk of
    ``mini_batch_size`` anchors, broadcast (chunk, N, D) cosine tensors for every block and back-propagates through
    them; here the loss and the gradient of every cached embedding come from one fused call (row chunks sized from
    a memory budget, gradients written directly, cosine normalization back-propagated once).

    Same math as :class:`st_fast.losses.GISTEmbedLoss`, with any number of negative columns, as stock.

    Args:
        Same as the stock class (model, guide, temperature, mini_batch_size, mini_batch_num_tokens,
        show_progress_bar, margin_strategy, margin, contrast_anchors, contrast_positives, gather_across_devices),
        plus ``backend``: ``"auto"``, ``"native"``, ``"torch"`` or ``"triton"`` (see
        :class:`st_fast.losses.GISTEmbedLoss`).

    The mini-batch embedding, guide embedding and re-tokenization, RandContext replay and backward hook are the
    stock machinery; ``mini_batch_size`` only sizes the embedding passes (the loss stage is chunked by memory).
    """

    _replaced_method = "calculate_loss"

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    @fused_loss_stage
    def calculate_loss(
        self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        """Loss of the cached embeddings ``reps[column][mini_batch]`` guided by ``reps_guided`` (same layout).

        With ``with_backward`` the gradient of every cached embedding is written to its ``.grad`` by one backward
        through the fused op and the detached loss is returned.
        """
        reason = self.fallback_reason()
        if reason is not None:
            warn_stock_fallback_once(self, reason)
            return super().calculate_loss(reps, reps_guided, with_backward=with_backward)
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        if len(reps) < 2:
            raise ValueError(f"Expected at least 2 embedding columns, got {len(reps)}")
        columns = [concatenate_mini_batches(column) for column in reps]
        guide_columns = [concatenate_mini_batches(column) for column in reps_guided]
        if self.computes_stock(columns, guide_columns):
            return super().calculate_loss(reps, reps_guided, with_backward=with_backward)
        loss = self.gist_loss(columns[0], columns[1:], guide_columns[0], guide_columns[1:])
        return finish_loss_stage(loss, with_backward)

    def stock_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """Stock's loss stage on ``columns`` guided by ``guides``, one mini-batch each (one device, no gathering,
        no backward)."""
        view = stock_view(self, gather_across_devices=False, show_progress_bar=False)
        reps, reps_guided = [[column] for column in columns], [[guide] for guide in guides]
        return stock_function(self, "calculate_loss")(view, reps, reps_guided, with_backward=False)
