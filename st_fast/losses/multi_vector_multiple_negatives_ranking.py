"""Drop-in MultiVectorMultipleNegativesRankingLoss (late interaction, ColBERT-style) on the fused MaxSim op.

sentence-transformers 6.2 added the multi-vector family; everything here is imported from the installed stock
package when this module is imported, so on an older sentence-transformers (no ``MultiVectorEncoder``) importing it
raises ImportError: import it lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from sentence_transformers.multi_vector_encoder.losses import (
    MultiVectorMultipleNegativesRankingLoss as StockMultiVectorMultipleNegativesRankingLoss,
)
from torch import Tensor

from st_fast.losses.plan import LossFamily, StFastLoss, replaces, wraps_a_loss
from st_fast.losses.self_check import stock_function, stock_view
from st_fast.losses.stock_contract import BackendOption, warn_stock_fallback_once
from st_fast.ops.backends import BACKENDS
from st_fast.ops.maxsim import maxsim_scores
from st_fast.ops.maxsim.dispatch import resolve_maxsim_backend
from st_fast.ops.maxsim.spec import DEFAULT_TILE_ELEMENTS, EMPTY_DOCUMENT_SCORE

_COLBERT = "sentence_transformers.multi_vector_encoder.scoring.colbert"
_SIMILARITY = "sentence_transformers.util.similarity"
_FUSABLE_KEYWORDS = {"chunk_elements", "length_normalize"}  # chunk_elements: a memory bound the op keeps anyway


def _stock(module: str, name: str) -> Any:
    return getattr(sys.modules.get(module) or __import__(module, fromlist=[name]), name, None)


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
        model.similarity_fn_name  # noqa: B018 (reading the name initializes the similarity, as model.similarity does)
        similarity = getattr(model, "_similarity", None)
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


def stock_operands(queries: Tensor, documents: Tensor) -> tuple[Tensor, Tensor]:
    """The embeddings in the dtype stock's einsum computes them in now: the autocast dtype when autocast is on for
    their device (einsum autocasts float16 / bfloat16 / float32 operands), else their own."""
    device_type = queries.device.type
    if torch.is_autocast_enabled(device_type) and queries.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        return queries.to(dtype), documents.to(dtype)
    return queries, documents


@dataclasses.dataclass(frozen=True)
class MaxSimFamily(LossFamily):
    """The MaxSim losses' family (st_fast.losses.plan): its op has its own dispatch point
    (:func:`st_fast.ops.maxsim.dispatch.resolve_maxsim_backend`), which raises for a backend that cannot run."""

    def choose_backend(self, asked: str, device: Any, dtype: Any, **inputs: Any) -> tuple[str, str | None]:
        return resolve_maxsim_backend(asked, device, dtype).name, None


class FusedMaxSimMixin(StFastLoss):
    """The MaxSim scoring of a stock multi-vector loss computed by the fused op. ``similarity_fct``, ``scale``,
    ``score_mini_batch_size``, ``gather_across_devices`` and the model's similarity are read at every call (users
    change attributes after construction); a scoring the op does not compute (e.g. ``XTRScores``) is computed by the
    stock method, with one warning. No first-use self-check against stock (``self_check`` False) yet."""

    family = MaxSimFamily("MaxSim")
    backend = BackendOption(BACKENDS)
    self_check = False
    _replaced_method = "forward"

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # the stock constructor, its arguments and checks
        self.backend = backend

    def fallback_reason(self) -> str | None:
        """Why stock computes this call's scoring (None: the fused op computes it)."""
        length_normalize, described = maxsim_length_normalize(self.similarity_fct, self.model)
        return described if length_normalize is None else None

    def fused_scorer(self) -> Callable | None:
        """A scorer with ``colbert_scores``' signature computing this call's MaxSim scoring with the fused op
        (float32 scores, as stock returns them), or None (warned once) when stock must compute it."""
        length_normalize, described = maxsim_length_normalize(self.similarity_fct, self.model)
        if length_normalize is None:
            warn_stock_fallback_once(self, described)
            return None
        default_normalize = length_normalize

        def scorer(queries_embeddings, documents_embeddings, queries_mask=None, documents_mask=None, **kwargs):
            unknown = set(kwargs) - _FUSABLE_KEYWORDS
            if unknown:
                raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
            normalize = kwargs.get("length_normalize")
            queries, documents = stock_operands(queries_embeddings, documents_embeddings)
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
        gather_across_devices), plus ``backend``: ``"auto"`` (native C++ kernels on the CPU for float32 / bfloat16
        when built, else torch), ``"native"``, ``"torch"`` or ``"triton"``.

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


def _register_wrappers() -> None:
    """sentence-transformers >= 6.3 wraps multi-vector losses in MultiVectorMatryoshkaLoss and
    MultiVectorTokenPoolingLoss (the inner loss is their ``loss``): fuse() fuses the inner loss."""
    from sentence_transformers.multi_vector_encoder import losses as stock_losses

    names = ("MultiVectorMatryoshkaLoss", "MultiVectorTokenPoolingLoss")
    wraps_a_loss(*[wrapper for wrapper in (getattr(stock_losses, name, None) for name in names) if wrapper is not None])


_register_wrappers()
