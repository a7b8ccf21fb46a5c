"""Drop-in CachedMultiVectorMultipleNegativesRankingLoss (GradCache, late interaction) whose loss stage is one fused
MaxSim pass: one forward over every (query, document) tile and one sparse backward writing every cached token
embedding's gradient. Imported lazily, as :mod:`st_fast.losses.multi_vector_multiple_negatives_ranking`."""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.multi_vector_encoder.losses import (
    CachedMultiVectorMultipleNegativesRankingLoss as StockCachedMultiVectorMultipleNegativesRankingLoss,
)
from torch import Tensor

from st_fast.losses.cached_stage import finish_loss_stage, fused_loss_stage
from st_fast.losses.multi_vector_multiple_negatives_ranking import FusedMaxSimMixin
from st_fast.losses.stock_contract import stock_helper


class CachedMultiVectorMultipleNegativesRankingLoss(
    FusedMaxSimMixin, StockCachedMultiVectorMultipleNegativesRankingLoss
):
    """sentence-transformers' :class:`~sentence_transformers.multi_vector_encoder.losses.
    CachedMultiVectorMultipleNegativesRankingLoss` with its loss stage (``calculate_loss``) computed by st_fast's
    fused MaxSim op: where stock scores each ``score_mini_batch_size`` chunk of queries against every document
    through a (chunk, B·N, q_tokens, d_tokens) tensor and back-propagates each chunk, st_fast computes the loss of
    all queries in one call (tiles of at most ``score_mini_batch_size`` queries' worth of products) and one sparse
    backward through the arg-max indices.

    Args:
        Same as the stock class, plus ``backend`` (see
        :class:`st_fast.losses.multi_vector_multiple_negatives_ranking.MultiVectorMultipleNegativesRankingLoss`).

    The mini-batch embedding, RandContext replay, backward hook, ``mini_batch_num_tokens``, the padded gather across
    devices (stock's ``all_gather_padded``, labels offset by rank·B·N) and the configuration are the stock class's,
    read at every call; a learnable ``scale`` gets its gradient in the loss stage, as in stock. Scorings the op does
    not compute (e.g. ``XTRScores``) run the stock loss stage, with one warning.
    """

    _replaced_method = "calculate_loss"

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    @fused_loss_stage
    def calculate_loss(
        self, reps: list[list[Tensor]], masks_chunks: list[list[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        """Loss of the cached token embeddings ``reps[column][mini_batch]`` (each (mb, T, D)) with their scoring
        masks ``masks_chunks``; with ``with_backward`` every cached embedding's ``.grad`` is written by one backward
        and the detached loss is returned (stock's GradCache contract)."""
        scorer = self.fused_scorer()
        if scorer is None:
            return super().calculate_loss(reps, masks_chunks, with_backward=with_backward)
        helper = lambda name: stock_helper(self, "calculate_loss", name)  # noqa: E731 (stock's names, looked up now)
        catted = [helper("cat_padded_token_embeddings")(r, m) for r, m in zip(reps, masks_chunks, strict=True)]
        queries, query_mask = catted[0]
        documents = [embeddings for embeddings, _ in catted[1:]]
        document_masks = [mask for _, mask in catted[1:]]
        batch_size, row_offset = len(queries), 0
        if self.gather_across_devices:
            gather = helper("all_gather_padded")
            gathered = [gather(e, m, with_grad=True) for e, m in zip(documents, document_masks, strict=True)]
            documents = [embeddings for embeddings, _ in gathered]
            document_masks = [mask for _, mask in gathered]
            row_offset = helper("get_rank")() * batch_size
        stacked, stacked_mask = helper("stack_padded_token_embeddings")(documents, document_masks)
        scores = scorer(queries, stacked, queries_mask=query_mask, documents_mask=stacked_mask)
        per_group = len(documents)
        labels = (torch.arange(batch_size, device=scores.device) + row_offset) * per_group
        loss = torch.nn.functional.cross_entropy(scores * self.scale, labels)
        return finish_loss_stage(loss, with_backward)
