"""``fuse(loss)``: the st_fast equivalent of a stock sentence-transformers loss, wrappers included.

A stock loss of a class st_fast replaces (exact class, not user subclasses, whose overrides st_fast cannot know;
the drop-in classes register themselves in :data:`st_fast.losses.plan.FUSED_CLASSES`)
becomes an object of the st_fast class that shares the stock object's state (its ``__dict__``: attributes,
submodules, parameters, hooks, training flag), so that the fused loss reads the live stock configuration at every
call: an attribute changed later on either object (``loss.scale = 30``, a learnable scale, a replaced
``cross_entropy_loss``) is seen by both, exactly as with the stock trainer, where ``trainer.loss`` is the user's
loss object. Nothing is constructed, so no constructor re-validates, warns, or re-derives state, and no module's
mode is touched. The stock object keeps its class and computes as before; a per-instance ``calculate_loss``
decoration (MatryoshkaLoss's CachedLossDecorator) wraps the fused method when called through the fused object (see
:class:`st_fast.losses.cached_stage.fused_loss_stage`).

A wrapper (MatryoshkaLoss, Matryoshka2dLoss, AdaptiveLayerLoss, SpladeLoss, CSRLoss, CachedSpladeLoss, and those a
family registers with :func:`st_fast.losses.plan.wraps_a_loss`) is copied
(shallow: its own attributes as they are now) with its inner loss fused, keeping its other children. Anything else is
returned unchanged (the same object).
"""

from __future__ import annotations

import copy

from sentence_transformers.sentence_transformer import losses as stock_losses
from sentence_transformers.sparse_encoder import losses as stock_sparse_losses
from torch import nn

from st_fast.losses.duplicate_masking import MaskDuplicatesOption
from st_fast.losses.plan import FUSED_CLASSES, is_wrapper, wraps_a_loss
from st_fast.ops import BACKENDS

__all__ = ["FUSED_CLASSES", "fuse"]  # FUSED_CLASSES: stock class -> st_fast class (see plan.py)

wraps_a_loss(
    stock_losses.MatryoshkaLoss,
    stock_losses.AdaptiveLayerLoss,  # Matryoshka2dLoss is an AdaptiveLayerLoss around a MatryoshkaLoss
    stock_sparse_losses.SpladeLoss,  # CachedSpladeLoss is a SpladeLoss
    stock_sparse_losses.CSRLoss,
)


def fuse(loss: nn.Module, *, backend: str = "auto") -> nn.Module:
    """The st_fast equivalent of ``loss`` (see the module docstring); ``loss`` keeps its class and computes as before.
    Raises ValueError for an unknown ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fused_class = FUSED_CLASSES.get(type(loss))
    if fused_class is not None:
        return _fused_view(loss, fused_class, backend)
    if is_wrapper(loss):
        inner = fuse(loss.loss, backend=backend)
        if inner is not loss.loss:
            wrapper = copy.copy(loss)
            wrapper._modules = dict(loss._modules)
            wrapper._modules["loss"] = inner
            return wrapper
    return loss


def _fused_view(loss: nn.Module, fused_class: type, backend: str) -> nn.Module:
    fused = fused_class.__new__(fused_class)
    object.__setattr__(fused, "__dict__", loss.__dict__)  # one state, two classes (see the module docstring)
    fused.backend = backend
    if isinstance(getattr(fused_class, "mask_duplicates", None), MaskDuplicatesOption):
        # the stock object's equivalent computes what stock computes: an earlier view's mask_duplicates (e.g. set
        # by the trainer's option on this shared state) does not carry over; the trainer sets it after fuse()
        fused.mask_duplicates = False
    return fused
