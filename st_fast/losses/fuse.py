"""``fuse(loss)``: the st_fast equivalent of a stock sentence-transformers loss, wrappers included.

A stock loss of a class st_fast replaces (exact class, not user subclasses, whose overrides st_fast cannot know)
becomes a new st_fast object built with the same configuration and the same ``model`` object. A wrapper
(MatryoshkaLoss, Matryoshka2dLoss, AdaptiveLayerLoss, SpladeLoss, CSRLoss, CachedSpladeLoss) is copied with its
inner loss fused, keeping its other children; a per-instance ``calculate_loss`` decoration (MatryoshkaLoss's
CachedLossDecorator) is carried over to the fused loss. Anything else is returned unchanged (the same object).
"""

from __future__ import annotations

import copy
import inspect
import warnings

from sentence_transformers.sentence_transformer import losses as stock_losses
from sentence_transformers.sparse_encoder import losses as stock_sparse_losses
from torch import nn

from st_fast.losses.cached_gist_embed import CachedGISTEmbedLoss
from st_fast.losses.cached_multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
)
from st_fast.losses.gist_embed import GISTEmbedLoss
from st_fast.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)
from st_fast.losses.sparse_multiple_negatives_ranking import SparseMultipleNegativesRankingLoss

# stock class -> st_fast class (both take the same constructor arguments; st_fast's add ``backend``)
FUSED_CLASSES: dict[type, type] = {
    stock_losses.MultipleNegativesRankingLoss: MultipleNegativesRankingLoss,
    stock_losses.MultipleNegativesSymmetricRankingLoss: MultipleNegativesSymmetricRankingLoss,
    stock_losses.CachedMultipleNegativesRankingLoss: CachedMultipleNegativesRankingLoss,
    stock_losses.CachedMultipleNegativesSymmetricRankingLoss: CachedMultipleNegativesSymmetricRankingLoss,
    stock_sparse_losses.SparseMultipleNegativesRankingLoss: SparseMultipleNegativesRankingLoss,
    stock_losses.GISTEmbedLoss: GISTEmbedLoss,  # same model and guide objects
    stock_losses.CachedGISTEmbedLoss: CachedGISTEmbedLoss,
}

WRAPPER_CLASSES: tuple[type, ...] = (
    stock_losses.MatryoshkaLoss,
    stock_losses.AdaptiveLayerLoss,  # Matryoshka2dLoss is an AdaptiveLayerLoss around a MatryoshkaLoss
    stock_sparse_losses.SpladeLoss,  # CachedSpladeLoss is a SpladeLoss
    stock_sparse_losses.CSRLoss,
)


def fuse(loss: nn.Module, *, backend: str = "auto") -> nn.Module:
    """The st_fast equivalent of ``loss`` (see the module docstring); ``loss`` itself is never modified."""
    fused_class = FUSED_CLASSES.get(type(loss))
    if fused_class is not None:
        return _rebuild(loss, fused_class, backend)
    if isinstance(loss, WRAPPER_CLASSES) and isinstance(getattr(loss, "loss", None), nn.Module):
        inner = fuse(loss.loss, backend=backend)
        if inner is not loss.loss:
            wrapper = copy.copy(loss)
            wrapper._modules = dict(loss._modules)
            wrapper._modules["loss"] = inner
            return wrapper
    return loss


def _rebuild(loss: nn.Module, fused_class: type, backend: str) -> nn.Module:
    parameters = inspect.signature(type(loss).__init__).parameters
    kwargs = {name: getattr(loss, name) for name in parameters if name not in ("self", "model") and hasattr(loss, name)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stock constructor's deprecation / configuration warnings were shown once
        fused = fused_class(loss.model, backend=backend, **kwargs)
    fused.train(loss.training)
    decoration = loss.__dict__.get("calculate_loss")  # e.g. MatryoshkaLoss's CachedLossDecorator
    if decoration is not None and hasattr(decoration, "fn"):
        decoration = copy.copy(decoration)
        decoration.fn = fused.calculate_loss
        fused.calculate_loss = decoration
    return fused
