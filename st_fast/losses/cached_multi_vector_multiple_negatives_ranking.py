"""Drop-in CachedMultiVectorMultipleNegativesRankingLoss (GradCache, late interaction) whose loss stage is computed by
the MaxSim op's backends: each cached document mini-batch scored against every query where it lies (no joined copy
of the documents), and one sparse backward per mini-batch writing its token embeddings' gradient. Imported lazily,
as :mod:`st_fast.losses.multi_vector_multiple_negatives_ranking`."""

from __future__ import annotations

import torch
from sentence_transformers.multi_vector_encoder.losses import (
    CachedMultiVectorMultipleNegativesRankingLoss as StockCachedMultiVectorMultipleNegativesRankingLoss,
)
from torch import Tensor

from st_fast.losses.cached_stage import finish_loss_stage, fused_loss_stage
from st_fast.losses.multi_vector_multiple_negatives_ranking import (
    _SIMILARITY,
    FusedMaxSimMixin,
    _stock,
    maxsim_length_normalize,
    token_columns,
)
from st_fast.losses.plan import replaces
from st_fast.losses.self_check import SLICE_ROWS, stock_function, stock_view
from st_fast.losses.stock_contract import stock_helper
from st_fast.ops.backends import MAXSIM, resolve_backend
from st_fast.ops.maxsim.functional import finish_scores
from st_fast.ops.maxsim.spec import EMPTY_DOCUMENT_SCORE, token_mask


@replaces(StockCachedMultiVectorMultipleNegativesRankingLoss)
class CachedMultiVectorMultipleNegativesRankingLoss(
    FusedMaxSimMixin, StockCachedMultiVectorMultipleNegativesRankingLoss
):
    """sentence-transformers' :class:`~sentence_transformers.multi_vector_encoder.losses.
    CachedMultiVectorMultipleNegativesRankingLoss` with its loss stage (``calculate_loss``) computed by st_fast's
    fused MaxSim op: where stock scores each ``score_mini_batch_size`` chunk of queries against every document
    through a (chunk, B·N, q_tokens, d_tokens) tensor and back-propagates each chunk, st_fast scores every query
    against each cached document mini-batch in place (tiles of at most ``score_mini_batch_size`` queries' worth of
    products, the arg-max kept in int16), then one cross-entropy over all the scores and one sparse backward per
    mini-batch through the arg-max indices, written as that mini-batch's ``.grad`` (see
    :meth:`loss_stage_with_gradients`; the self-check and the calls without gradients use the joined op).

    Args:
        Same as the stock class, plus ``backend`` (see
        :class:`st_fast.losses.multi_vector_multiple_negatives_ranking.MultiVectorMultipleNegativesRankingLoss`).

    The mini-batch embedding, RandContext replay, backward hook, ``mini_batch_num_tokens``, the padded gather across
    devices (stock's ``all_gather_padded``, labels offset by rank·B·N) and the configuration are the stock class's,
    read at every call; a learnable ``scale`` gets its gradient in the loss stage, as in stock. Scorings the op does
    not compute (e.g. ``XTRScores``) run the stock loss stage, with one warning.
    """

    _replaced_method = "calculate_loss"

    @fused_loss_stage
    def calculate_loss(
        self, reps: list[list[Tensor]], masks_chunks: list[list[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        """Loss of the cached token embeddings ``reps[column][mini_batch]`` (each (mb, T, D)) with their scoring
        masks ``masks_chunks``; with ``with_backward`` every cached embedding's ``.grad`` is written by one backward
        and the detached loss is returned (stock's GradCache contract)."""
        scorer = self.fused_scorer(checked=False)
        if scorer is None or self.computes_stock(*self.first_rows(reps, masks_chunks)):
            return super().calculate_loss(reps, masks_chunks, with_backward=with_backward)
        device = reps[0][0].device
        if with_backward and not self.gather_across_devices and not torch.is_autocast_enabled(device.type):
            return self.loss_stage_with_gradients(reps, masks_chunks)
        queries, query_mask, stacked, stacked_mask, row_offset = self.joined_columns(reps, masks_chunks)
        return finish_loss_stage(
            self.loss_of(scorer, queries, query_mask, stacked, stacked_mask, row_offset), with_backward
        )

    def first_rows(self, reps: list[list[Tensor]], masks_chunks: list[list[Tensor]]):
        """(token embeddings, masks) of the first rows of each column (what the self-check compares), joined as
        stock joins a column's mini-batches, without copying the whole batch."""
        if not self.self_check:
            return [], []
        join = stock_helper(self, "calculate_loss", "cat_padded_token_embeddings")
        embeddings, masks = [], []
        for column, column_masks in zip(reps, masks_chunks, strict=True):
            pieces, piece_masks, rows = [], [], 0
            for rep, mask in zip(column, column_masks, strict=True):
                if rows >= SLICE_ROWS:
                    break
                pieces.append(rep[: SLICE_ROWS - rows])
                piece_masks.append(mask[: SLICE_ROWS - rows])
                rows += pieces[-1].shape[0]
            joined, joined_mask = join(pieces, piece_masks)
            embeddings.append(joined)
            masks.append(joined_mask.bool())
        return embeddings, masks

    def stock_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """Stock's loss stage (one device, no gathering, no backward) on flat token embeddings (see the self-check
        note of :class:`FusedMaxSimMixin`), each column as one mini-batch."""
        embeddings, masks = token_columns(columns, guides)
        view = stock_view(self, gather_across_devices=False, show_progress_bar=False)
        stock = stock_function(self, "calculate_loss")
        return stock(view, [[e] for e in embeddings], [[m] for m in masks], with_backward=False)

    def fused_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """st_fast's loss stage (one device, no gathering, no backward) on flat token embeddings."""
        embeddings, masks = token_columns(columns, guides)
        view = stock_view(self, gather_across_devices=False)
        joined = view.joined_columns([[e] for e in embeddings], [[m] for m in masks])
        return view.loss_of(self.fused_scorer(checked=False), *joined)

    def joined_columns(self, reps: list[list[Tensor]], masks_chunks: list[list[Tensor]]):
        """(queries (B, Lq, D), query mask, stacked documents (W, N, Ld, D), their mask, row offset) as stock's
        loss stage joins the cached mini-batches: stock's helpers, looked up now, gathered across devices (labels
        offset by rank·B) with ``gather_across_devices``."""
        helper = lambda name: stock_helper(self, "calculate_loss", name)  # noqa: E731 (stock's names, looked up now)
        catted = [helper("cat_padded_token_embeddings")(r, m) for r, m in zip(reps, masks_chunks, strict=True)]
        queries, query_mask = catted[0]
        documents = [embeddings for embeddings, _ in catted[1:]]
        document_masks = [mask for _, mask in catted[1:]]
        row_offset = 0
        if self.gather_across_devices:
            gather = helper("all_gather_padded")
            gathered = [gather(e, m, with_grad=True) for e, m in zip(documents, document_masks, strict=True)]
            documents = [embeddings for embeddings, _ in gathered]
            document_masks = [mask for _, mask in gathered]
            row_offset = helper("get_rank")() * len(queries)
        stacked, stacked_mask = helper("stack_padded_token_embeddings")(documents, document_masks)
        return queries, query_mask, stacked, stacked_mask, row_offset

    def loss_of(self, scorer, queries, query_mask, stacked, stacked_mask, row_offset) -> Tensor:
        """Stock's loss (the mean cross-entropy of scale · scores, positive of query i at column (offset + i)·N) with
        the fused scores."""
        scores = scorer(queries, stacked, queries_mask=query_mask, documents_mask=stacked_mask)
        labels = (torch.arange(len(queries), device=scores.device) + row_offset) * stacked.shape[1]
        return torch.nn.functional.cross_entropy(scores * self.scale, labels)

    def loss_stage_with_gradients(self, reps: list[list[Tensor]], masks_chunks: list[list[Tensor]]) -> Tensor:
        """The GradCache loss stage on one device, the documents never joined: the queries are joined once (a
        (B, Lq, D) copy); each cached document mini-batch (b, T, D) is scored against every query by one call of the
        backend (its sums written into the (B, B·N) matrix at its columns j·N + n, its arg-max kept as int16 where
        T < 32768); the cross-entropy back-propagates to the sums (and a learnable scale); each mini-batch's backward
        call then writes its gradient as its ``.grad`` (no joined gradient) and adds its part of the queries'.

        Same sums, scores and loss as the joined op (each (query, document) pair is computed alone); the queries'
        gradient is summed per document mini-batch, then across them (float32 rounding of a different order)."""
        queries_buffer, query_mask = padded_rows(reps[:1], masks_chunks[:1])
        queries, query_mask = queries_buffer[:, 0], query_mask[:, 0]
        length_normalize, _ = maxsim_length_normalize(self.similarity_fct, self.model)
        batch_size, per_group = queries.shape[0], len(reps) - 1
        largest = max((rep for column in reps[1:] for rep in column), key=lambda rep: rep.numel())
        backend = resolve_backend(
            self.plan(queries.device, queries.dtype).runs(),  # what the report says runs, or its error
            queries.device, queries.dtype, MAXSIM, tile_elements=self.tile_elements(queries, largest.unsqueeze(1)),
        )  # fmt: skip
        pieces = []  # (mini-batch, first row, column, arg-max)
        sums, has_token = None, torch.zeros(batch_size, per_group, dtype=torch.bool, device=queries.device)
        for column, (mini_batches, masks) in enumerate(zip(reps[1:], masks_chunks[1:], strict=True)):
            start = 0
            for rep, mask in zip(mini_batches, masks, strict=True):
                mask = token_mask(rep, mask, "documents_mask")
                with torch.no_grad(), torch.autocast(queries.device.type, enabled=False):
                    part, index = backend.forward(queries, query_mask, rep.detach(), mask, True)
                if sums is None:
                    sums = part.new_empty(batch_size, batch_size, per_group)
                sums[:, start : start + len(rep), column] = part
                has_token[start : start + len(rep), column] = mask.any(dim=-1)
                pieces.append((rep, start, column, compact_index(index, rep.shape[1])))
                start += len(rep)
        sums = sums.view(batch_size, batch_size * per_group).requires_grad_()
        scores = finish_scores(
            sums, query_mask, has_token.view(-1, 1), length_normalize,
            _stock(_SIMILARITY, "_EMPTY_DOCUMENT_SCORE") or EMPTY_DOCUMENT_SCORE,
        )  # fmt: skip
        labels = torch.arange(batch_size, device=queries.device) * per_group
        loss = torch.nn.functional.cross_entropy(scores.float() * self.scale, labels)
        loss.backward()  # the sums' gradient, and a learnable scale's
        grad_sums = sums.grad.view(batch_size, batch_size, per_group)
        grad_queries = None
        for rep, start, column, index in pieces:
            with torch.autocast(queries.device.type, enabled=False):
                part_queries, part_documents = backend.backward(
                    queries, query_mask, rep.detach(), index.to(torch.int32),
                    grad_sums[:, start : start + len(rep), column].contiguous(),
                )  # fmt: skip
            grad_queries = part_queries if grad_queries is None else grad_queries.add_(part_queries)
            part_documents = part_documents.to(rep.dtype)
            if rep.grad is None:
                rep.grad = part_documents
            else:
                rep.grad += part_documents
        add_row_gradients(reps[0], grad_queries.to(queries.dtype))
        return loss.detach()


def compact_index(index: Tensor, tokens: int) -> Tensor:
    """The arg-max (token positions t < ``tokens``, or -1 - t for a masked token's fill) in int16 where it fits, else
    as it is (int32)."""
    return index.to(torch.int16) if tokens <= torch.iinfo(torch.int16).max else index


def padded_rows(columns: list[list[Tensor]], masks: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
    """Columns of cached mini-batches (each (b, T, D), masks (b, T)) written once into one zero-padded (B, k, T_max, D)
    tensor and a (B, k, T_max) mask (False on padding), without autograd: what stock's cat_padded_token_embeddings
    and stack_padded_token_embeddings give, in one copy instead of two."""
    first = columns[0][0]
    rows = sum(rep.shape[0] for rep in columns[0])
    width = max(rep.shape[1] for column in columns for rep in column)
    out = first.new_zeros(rows, len(columns), width, first.shape[-1])
    out_mask = torch.zeros(rows, len(columns), width, dtype=torch.bool, device=first.device)
    with torch.no_grad():
        for index, (column, column_masks) in enumerate(zip(columns, masks, strict=True)):
            start = 0
            for rep, mask in zip(column, column_masks, strict=True):
                out[start : start + rep.shape[0], index, : rep.shape[1]] = rep
                out_mask[start : start + rep.shape[0], index, : rep.shape[1]] = mask
                start += rep.shape[0]
    return out, out_mask


def add_row_gradients(mini_batches: list[Tensor], grad: Tensor) -> None:
    """Add to each mini-batch (b, T, D) of one column its rows and first T tokens of ``grad`` (B, T_max, D), in the
    order the mini-batches were joined, accumulating into ``.grad`` as autograd does."""
    start = 0
    for rep in mini_batches:
        piece = grad[start : start + rep.shape[0], : rep.shape[1]].to(rep.dtype)
        start += rep.shape[0]
        if rep.grad is None:
            rep.grad = piece  # a view of the joined gradient, as autograd's cat / stack backward would leave it
        else:
            rep.grad += piece
