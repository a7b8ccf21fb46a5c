"""Drop-in MultiVectorMultipleNegativesRankingLoss (late interaction, ColBERT-style) on the fused MaxSim op.

sentence-transformers 6.2 added the multi-vector family; everything here is imported from the installed stock
package when this module is imported, so on an older sentence-transformers (no ``MultiVectorEncoder``) importing it
raises ImportError: import it lazily.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from sentence_transformers.multi_vector_encoder.losses import (
    MultiVectorMultipleNegativesRankingLoss as StockMultiVectorMultipleNegativesRankingLoss,
)
from torch import Tensor

from st_fast.losses import self_check
from st_fast.losses.plan import LossFamily, StFastLoss, replaces, wraps_a_loss
from st_fast.losses.self_check import SelfCheckOption, stock_function, stock_view
from st_fast.losses.stock_contract import BackendOption, warn_stock_fallback_once
from st_fast.ops.backends import BACKENDS, MAXSIM
from st_fast.ops.maxsim import maxsim_scores
from st_fast.ops.maxsim.spec import DEFAULT_TILE_ELEMENTS, EMPTY_DOCUMENT_SCORE, autocast_operands, token_mask

_COLBERT = "sentence_transformers.multi_vector_encoder.scoring.colbert"
_SIMILARITY = "sentence_transformers.util.similarity"
_FUSABLE_KEYWORDS = {"chunk_elements", "length_normalize"}  # chunk_elements: a memory bound the op keeps anyway


def _stock(module: str, name: str) -> Any:
    return getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name, None)


def _model_similarity(model: Any) -> Any:
    """The function stock's ``similarity_fct=None`` scores with: ``model.similarity`` (all stock reads), resolved to
    the function behind stock ``MultiVectorEncoder.similarity`` (its ``_similarity``, after the lazy initialization
    that reading ``similarity_fn_name`` does) only where the model uses that very method; an instance override
    (``model.similarity = fn``), a subclass's own method or another model class gives its own callable."""
    encoder = _stock("sentence_transformers.multi_vector_encoder.model", "MultiVectorEncoder")
    own_method = (
        encoder is not None
        and "similarity" not in vars(model)
        and getattr(type(model), "similarity", None) is getattr(encoder, "similarity", None)
    )
    if not own_method:
        return getattr(model, "similarity", None)
    model.similarity_fn_name  # noqa: B018 (reading the name initializes the similarity, as model.similarity does)
    return getattr(model, "_similarity", None)


def maxsim_length_normalize(similarity_fct: Any, model: Any) -> tuple[bool | None, str]:
    """(length_normalize, description) of the MaxSim scoring ``similarity_fct`` computes, or (None, why) when it is
    not one the fused op computes. Fused: ``colbert_scores`` / ``mean_colbert_scores`` (also as a
    ``functools.partial`` binding only ``chunk_elements`` / ``length_normalize``) and, for ``None`` (6.3), the
    model's similarity when it is ``maxsim`` / ``mean_maxsim`` or the 6.3 MaxSim scorer (``use_kernels``, whose
    hub kernel replaces stock's per-chunk function with the same math)."""
    keywords: dict[str, Any] = {}
    function = similarity_fct
    if isinstance(function, functools.partial):
        if function.args or not set(function.keywords) <= _FUSABLE_KEYWORDS:
            return None, f"similarity_fct={function!r} binds arguments the fused MaxSim op does not take"
        keywords, function = dict(function.keywords), function.func
    if function is None:
        similarity = _model_similarity(model)
        scorer = _stock(_COLBERT, "_MaxSimScorer")
        if similarity is _stock(_SIMILARITY, "maxsim"):
            return False, "model.similarity (maxsim)"
        if similarity is _stock(_SIMILARITY, "mean_maxsim"):
            return True, "model.similarity (mean_maxsim)"
        if scorer is not None and isinstance(similarity, scorer):
            return bool(similarity.length_normalize), "model.similarity (MaxSim scorer)"
        return None, f"the model's similarity {similarity!r} has no fused kernel"
    if function is _stock(_COLBERT, "colbert_scores"):
        return bool(keywords.get("length_normalize", False)), "colbert_scores"
    if function is _stock(_COLBERT, "mean_colbert_scores"):
        return bool(keywords.get("length_normalize", True)), "mean_colbert_scores"
    name = getattr(function, "__name__", type(function).__name__)
    return None, f"similarity_fct={name} has no fused kernel (only colbert_scores and mean_colbert_scores do)"


def finite_scale(scale: Any) -> bool:
    """False for a NaN / infinite ``scale`` (a number, or a tensor on the CPU: a device tensor is not read, no host
    sync per call; a learnable scale is checked at its first use, when it is finite)."""
    if isinstance(scale, Tensor):
        return scale.device.type != "cpu" or bool(torch.isfinite(scale.detach()).all())
    try:
        return math.isfinite(scale)
    except TypeError:  # not a number: stock's `scores * scale` says what it is
        return True


class FusedMaxSimMixin(StFastLoss):
    """The MaxSim scoring of a stock multi-vector loss computed by the fused op. ``similarity_fct``, ``scale``,
    ``score_mini_batch_size``, ``gather_across_devices`` and the model's similarity are read at every call (users
    change attributes after construction); a scoring the op does not compute (e.g. ``XTRScores``) is computed by the
    stock method, with one warning.

    The first-use self-check (:mod:`st_fast.losses.self_check`): the first call of each configuration compares the
    fused loss and token-embedding gradients with the stock method's on a few rows of the call's own token embeddings
    and a seeded random batch; on a mismatch stock computes that configuration from then on (one warning).
    ``self_check = False`` turns it off. The check compares flat rows: a multi-vector row is its (T, D) token
    vectors flattened to T·D values, with its token mask as the row's guide (1.0 / 0.0; the random batch's guides
    are Gaussian, a token counts where its guide is positive: random holes in both masks)."""

    family = LossFamily("MaxSim", MAXSIM)
    backend = BackendOption(BACKENDS)
    self_check = SelfCheckOption()
    _replaced_method = "forward"

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the stock constructor, its arguments and checks
        self.backend = backend

    def fallback_reason(self) -> str | None:
        """Why stock computes this call's scoring (None: the fused op computes it)."""
        length_normalize, described = maxsim_length_normalize(self.similarity_fct, self.model)
        return described if length_normalize is None else None

    def fused_scorer(self, checked: bool = True) -> Callable | None:
        """A scorer with ``colbert_scores``' signature computing this call's MaxSim scoring with the fused op
        (float32 scores, as stock returns them), or None (warned once) when stock must compute it. With
        ``checked`` the scorer runs the first-use self-check on its first call's embeddings (see
        :meth:`checked_scores`)."""
        length_normalize, described = maxsim_length_normalize(self.similarity_fct, self.model)
        if length_normalize is None:
            warn_stock_fallback_once(self, described)
            return None
        default_normalize = length_normalize
        stock_scoring = self.stock_scoring() if checked else None

        def scorer(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None, **kwargs):
            unknown = set(kwargs) - _FUSABLE_KEYWORDS
            if unknown:
                raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
            normalize = kwargs.get("length_normalize")
            if stock_scoring is not None and self.checked_scores(
                queries_embeddings, documents_embeddings, queries_mask, documents_mask
            ):
                return stock_scoring(queries_embeddings, documents_embeddings, queries_mask, documents_mask, **kwargs)
            queries, documents = autocast_operands(queries_embeddings, documents_embeddings)
            backend = self.plan(queries.device, queries.dtype).runs()  # what the report says runs, or its error
            scores = maxsim_scores(
                queries, documents, queries_mask, documents_mask,
                length_normalize=default_normalize if normalize is None else bool(normalize),
                empty_score=_stock(_SIMILARITY, "_EMPTY_DOCUMENT_SCORE") or EMPTY_DOCUMENT_SCORE,
                backend=backend, tile_elements=self.tile_elements(queries, documents),
            )  # fmt: skip
            return scores.float()

        scorer.__name__ = f"st_fast_maxsim[{described}]"
        return scorer

    def stock_scoring(self) -> Callable:
        """The scoring the stock method computes this call with: ``similarity_fct``, or for None the function stock's
        method binds to the model's similarity (``_colbert_scores``, looked up where that method is defined)."""
        if self.similarity_fct is not None:
            return self.similarity_fct
        stock = stock_function(self, self._replaced_method)
        bind = stock.__globals__.get("_colbert_scores") or _stock(_COLBERT, "_colbert_scores")
        return functools.partial(bind, self.model.similarity)

    # ----------------------------------------------------------------------------------------------------------------
    # The first-use self-check (st_fast.losses.self_check)

    def self_check_config(self, columns: list[Tensor]) -> dict[str, Any]:
        """Everything the comparison with stock depends on besides the embeddings."""
        length_normalize, described = maxsim_length_normalize(self.similarity_fct, self.model)
        return {
            "scoring": described, "length_normalize": length_normalize, "scale": self.scale,
            "score_mini_batch_size": self.score_mini_batch_size, "columns": len(columns), "backend": self.backend,
            "device": columns[0].device.type,
        }  # fmt: skip

    def computes_stock(self, embeddings: list[Tensor], masks: list[Tensor]) -> bool:
        """Run the first-use self-check of this configuration (once per process) on token embeddings ``embeddings``
        (each column (rows, T, D)) with their boolean masks; True when the stock method must compute it (a
        mismatch: see :mod:`st_fast.losses.self_check`)."""
        if not self.self_check or any(e.shape[1] == 0 or e.shape[2] == 0 for e in embeddings):
            return False  # (rows without tokens prove nothing: checked on a later call)
        if not finite_scale(self.scale):
            # stock's loss is NaN whatever the scores (the check would call that a mismatch and blame st_fast), and
            # the scale multiplies the fused scores as stock's own cross-entropy code does: nothing to compare
            return False
        rows = self_check.SLICE_ROWS  # the rows the check compares (no copy of the whole batch)
        columns = [e[:rows].flatten(1) for e in embeddings]
        guides = [m[:rows].to(e.dtype) for e, m in zip(embeddings, masks, strict=True)]
        return not self_check.run(self, columns, guides).passed

    def checked_scores(self, queries: Tensor, documents: Tensor, queries_mask, documents_mask) -> bool:
        """The self-check from a scorer's arguments (queries (Q, Lq, D), stacked documents (G, N, Ld, D)): True
        when stock must score this call."""
        if not self.self_check or documents.dim() != 4:
            return False
        rows = self_check.SLICE_ROWS
        queries, documents = queries[:rows], documents[:rows]
        query_mask = token_mask(queries, None if queries_mask is None else queries_mask[:rows], "queries_mask")
        document_mask = token_mask(
            documents, None if documents_mask is None else documents_mask[:rows], "documents_mask"
        )
        embeddings = [queries, *documents.unbind(1)]
        return self.computes_stock(embeddings, [query_mask, *document_mask.unbind(1)])

    def tile_elements(self, queries: Tensor, documents: Tensor) -> int | None:
        """The products the op may hold at once: its default, and never more than stock's transient for one
        ``score_mini_batch_size`` chunk of queries against every document (a memory bound the user set)."""
        step = self.score_mini_batch_size
        if not step:
            return None
        num_documents = documents[..., 0, 0].numel()  # G·N of stacked (G, N, Ld, D) documents
        per_query = queries.shape[1] * num_documents * documents.shape[-2]
        return max(1, min(DEFAULT_TILE_ELEMENTS, step * per_query))


@replaces(StockMultiVectorMultipleNegativesRankingLoss)
class MultiVectorMultipleNegativesRankingLoss(FusedMaxSimMixin, StockMultiVectorMultipleNegativesRankingLoss):
    """sentence-transformers' :class:`~sentence_transformers.multi_vector_encoder.losses.
    MultiVectorMultipleNegativesRankingLoss` with its MaxSim scoring computed by st_fast's fused op: no
    (B, B·N, q_tokens, d_tokens) similarity tensor, a sparse backward through the arg-max of each (query, query
    token, document)::

        loss = mean_i [ log Σ_c exp(scale · MaxSim(q_i, c)) - scale · MaxSim(q_i, d_i) ]

    Args:
        Same as the stock class (model, scale, similarity_fct, mini_batch_size, score_mini_batch_size,
        gather_across_devices), plus ``backend``: ``"auto"`` (the native C++ kernels on the CPU for float32 / bfloat16
        when built, else torch; torch on CUDA until the CUDA kernels are timed on a GPU), ``"native"`` (the CPU
        kernels, or on CUDA st_fast._C_cuda's), ``"torch"`` or ``"triton"``.

    Everything but the scoring is the stock ``forward`` (the embedding pass, the padded gather across devices with
    its label offsets, the query chunks of ``score_mini_batch_size``, the cross-entropy and a learnable ``scale``),
    run on a shallow view of this loss whose ``similarity_fct`` is the fused scorer. Fused: ``similarity_fct=None``
    (6.3: the model's similarity), ``colbert_scores`` and ``mean_colbert_scores``; anything else (e.g. ``XTRScores``)
    is computed by the stock class, with one warning.

    Example::

        from st_fast.losses.multi_vector_multiple_negatives_ranking import MultiVectorMultipleNegativesRankingLoss

        loss = MultiVectorMultipleNegativesRankingLoss(model)  # instead of sentence_transformers' class
    """

    def forward(self, sentence_features: Any, labels: Tensor | None = None) -> Tensor:
        scorer = self.fused_scorer()
        if scorer is None:
            return super().forward(sentence_features, labels)
        view = stock_view(self, similarity_fct=scorer)
        return stock_function(self, "forward")(view, sentence_features, labels)

    def stock_on_embeddings(self, columns: list[Tensor], guides: list[Tensor], scorer: Callable | None = None):
        """Stock's ``forward`` (one device, no gathering) on flat token embeddings (see the self-check note of
        :class:`FusedMaxSimMixin`), the model replaced by a stand-in returning them; ``scorer``: a similarity_fct
        for it (default: this loss's own)."""
        embeddings, masks = token_columns(columns, guides)
        stand_in = EmbeddedColumns(embeddings, masks, self.model)
        overrides = {"model": stand_in, "gather_across_devices": False, "mini_batch_size": None}
        if scorer is not None:
            overrides["similarity_fct"] = scorer
        view = stock_view(self, **overrides)
        features = [{EmbeddedColumns.KEY: index} for index in range(len(columns))]
        return stock_function(self, "forward")(view, features, None)

    def fused_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """st_fast's loss of flat token embeddings: stock's ``forward`` with the fused scorer (unchecked)."""
        return self.stock_on_embeddings(columns, guides, scorer=self.fused_scorer(checked=False))


def token_columns(columns: list[Tensor], guides: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The self-check's flat rows back as token embeddings (rows, T, D) and boolean masks (rows, T): T is the
    guide's width, a token counts where its guide is positive."""
    embeddings = [c.view(c.shape[0], g.shape[1], -1) for c, g in zip(columns, guides, strict=True)]
    return embeddings, [_token_mask(g) for g in guides]


def _token_mask(guide: Tensor) -> Tensor:
    """Tokens where the guide is positive; a row of the self-check's random batch (Gaussian guides) keeps at least
    its largest-guide token, so that stock's side of the check never meets an empty document the data did not have
    (stock warns once per process for one, and a real one later would go unreported). A real mask row (1.0 / 0.0)
    is unchanged, an all-zero one (a real empty document) included."""
    mask = guide > 0
    emptied = ~mask.any(dim=-1) & (guide != 0).any(dim=-1)
    if bool(emptied.any()):
        mask[emptied, guide[emptied].argmax(dim=-1)] = True
    return mask


class EmbeddedColumns(torch.nn.Module):
    """A stand-in for the multi-vector model in the self-check: ``model(features, task=...)`` returns the
    ``token_embeddings`` / ``attention_mask`` of the column ``features[KEY]`` names; ``similarity`` is the real
    model's (stock binds it when ``similarity_fct`` is None)."""

    KEY = "st_fast_self_check_column"

    def __init__(self, embeddings: list[Tensor], masks: list[Tensor], model: Any) -> None:
        super().__init__()
        self.embeddings, self.masks = embeddings, masks
        self.similarity = getattr(model, "similarity", None)

    def forward(self, features: dict[str, Any], task: str | None = None) -> dict[str, Tensor]:
        index = features[self.KEY]
        return {"token_embeddings": self.embeddings[index], "attention_mask": self.masks[index]}


def _register_wrappers() -> None:
    """sentence-transformers >= 6.3 wraps multi-vector losses in MultiVectorMatryoshkaLoss and
    MultiVectorTokenPoolingLoss (the inner loss is their ``loss``): fuse() fuses the inner loss."""
    from sentence_transformers.multi_vector_encoder import losses as stock_losses

    names = ("MultiVectorMatryoshkaLoss", "MultiVectorTokenPoolingLoss")
    wraps_a_loss(*[wrapper for wrapper in (getattr(stock_losses, name, None) for name in names) if wrapper is not None])


_register_wrappers()
