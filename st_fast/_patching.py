"""``st_fast.patch()`` / ``st_fast.unpatch()``: st_fast's swaps for trainers built by code you do not own.

``patch()`` wraps five methods of the stock ``sentence_transformers.base.trainer.BaseTrainer`` — ``__init__`` (the
fused losses' backends checked on the model, the model card naming them by their stock classes, the swap report's
callback), ``prepare_loss``, ``call_model_init``, ``get_batch_sampler`` and ``get_multi_dataset_batch_sampler`` —
with the hooks of :class:`st_fast.SentenceTransformerTrainer`, and adds the ``st_fast_report`` property.
Patching the methods rather than the exported names covers every way a trainer is built: a direct
``SentenceTransformerTrainer(...)`` whatever module it was imported from (even before ``patch()``), the legacy
``model.fit(...)`` (which builds one internally), user subclasses that do not override those methods, and the
other 6.x trainers (SparseEncoderTrainer, whose SparseMultipleNegativesRankingLoss st_fast fuses;
CrossEncoderTrainer, whose losses st_fast leaves as they are). Trainers constructed while patched get fused losses
(they are fused in ``__init__``); the sampler is chosen when a dataloader is built, so it follows the patch state at
that time. ``patch()`` is idempotent (a second call only updates the options); ``unpatch()`` puts the original
methods back and removes the property. :class:`st_fast.SentenceTransformerTrainer` is unaffected either way (it
applies its own ``st_fast=``). The swaps themselves are the functions of :mod:`st_fast.swaps`, shared with that class;
the options of the ``patch()`` in effect are kept by :mod:`st_fast.config`.
"""

from __future__ import annotations

import functools
from typing import Any

from st_fast.config import StFastConfig, patch_config, set_patch_config
from st_fast.report import swap_report
from st_fast.swaps import (
    fast_batch_sampler,
    fast_multi_dataset_batch_sampler,
    finish_init,
    fuse_loss,
    fuse_trainer_losses,
)

_PATCHED_METHODS = (
    "__init__", "prepare_loss", "call_model_init", "get_batch_sampler", "get_multi_dataset_batch_sampler",
)  # fmt: skip
_originals: dict[str, Any] = {}


def _base_trainer():
    from sentence_transformers.base.trainer import BaseTrainer

    return BaseTrainer


def _owned(trainer: Any) -> bool:
    return getattr(trainer, "_st_fast_owner", False)


def _wrap_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not _owned(self):
            finish_init(self, current_config())

    return __init__


def _wrap_prepare_loss(original):
    @functools.wraps(original)
    def prepare_loss(self, loss, model):
        prepared = original(self, loss, model)
        return prepared if _owned(self) else fuse_loss(self, prepared, current_config())

    return prepare_loss


def _wrap_call_model_init(original):
    @functools.wraps(original)
    def call_model_init(self, trial=None):
        model = original(self, trial)
        if hasattr(self, "loss") and not _owned(self):
            fuse_trainer_losses(self, current_config())
        return model

    return call_model_init


def _wrap_get_batch_sampler(original):
    @functools.wraps(original)
    def get_batch_sampler(self, dataset, *args, **kwargs):
        stock = functools.partial(original, self)
        stock.__signature__ = _bound_signature(original)  # type: ignore[attr-defined]
        if _owned(self):
            return stock(dataset, *args, **kwargs)
        return fast_batch_sampler(self, stock, current_config(), dataset, *args, **kwargs)

    return get_batch_sampler


def _wrap_get_multi_dataset_batch_sampler(original):
    @functools.wraps(original)
    def get_multi_dataset_batch_sampler(self, *args, **kwargs):
        stock = functools.partial(original, self)
        if _owned(self):
            return stock(*args, **kwargs)
        return fast_multi_dataset_batch_sampler(self, stock, current_config(), *args, **kwargs)

    return get_multi_dataset_batch_sampler


@functools.cache
def _bound_signature(function):
    import inspect

    parameters = list(inspect.signature(function).parameters.values())[1:]  # drop `self`
    return inspect.Signature(parameters)


_WRAPPERS = {
    "__init__": _wrap_init,
    "prepare_loss": _wrap_prepare_loss,
    "call_model_init": _wrap_call_model_init,
    "get_batch_sampler": _wrap_get_batch_sampler,
    "get_multi_dataset_batch_sampler": _wrap_get_multi_dataset_batch_sampler,
}


_REPORT_PROPERTY = "st_fast_report"


def patch(st_fast: StFastConfig | dict[str, Any] | bool | None = None) -> None:
    """Make the stock trainers swap in st_fast's fused losses and sampler (see the module docstring).

    ``st_fast`` takes the same options as ``st_fast.SentenceTransformerTrainer(st_fast=...)``, validated here
    (TypeError / ValueError); a backend that cannot run on a trainer's model fails when that trainer is built.
    Patched trainers show the swap report at train start and have ``trainer.st_fast_report``. Idempotent.
    """
    set_patch_config(StFastConfig.coerce(st_fast))
    if _originals:
        return
    base = _base_trainer()
    _warn_trainers_built_before(base)
    for name in _PATCHED_METHODS:
        original = base.__dict__.get(name)
        if original is None:  # not a hook of this sentence-transformers version
            continue
        _originals[name] = original
        setattr(base, name, _WRAPPERS[name](original))
    if _REPORT_PROPERTY not in base.__dict__:
        _originals[_REPORT_PROPERTY] = None  # added, not replaced: unpatch() deletes it
        setattr(base, _REPORT_PROPERTY, property(swap_report, doc=swap_report.__doc__))


def _warn_trainers_built_before(base: type) -> None:
    """Say where the mistake is made: a stock trainer built before ``patch()`` keeps its stock loss (losses are fused
    in the constructor), which its report would never show. Found among the live objects (one scan, at the first
    ``patch()``); st_fast's own trainers and those built under an earlier ``patch()`` are not counted."""
    import gc
    import logging

    from st_fast.trainer import StFastTrainerMixin

    gc.collect()  # trainers that are only garbage no longer count
    # by type(), not isinstance(): isinstance reads __class__, which some live objects answer with a warning
    early = [
        o for o in gc.get_objects()
        if issubclass(type(o), base) and not issubclass(type(o), StFastTrainerMixin)
        and "_st_fast_config" not in vars(o)
    ]  # fmt: skip
    if early:
        names = ", ".join(sorted({type(trainer).__name__ for trainer in early}))
        logging.getLogger("st_fast.trainer").warning(
            "st_fast.patch(): %d trainer(s) (%s) were built before this call and keep their stock loss (losses are "
            "fused when a trainer is built; its batch sampler is still swapped when its dataloader is built). Call "
            "st_fast.patch() before building the trainer, or use st_fast.SentenceTransformerTrainer.",
            len(early), names,
        )  # fmt: skip


def unpatch() -> None:
    """Restore the stock trainer methods that :func:`patch` replaced; a no-op when not patched."""
    base = _base_trainer()
    for name, original in _originals.items():
        if original is None:
            delattr(base, name)
        else:
            setattr(base, name, original)
    _originals.clear()
    set_patch_config(None)


def current_config() -> StFastConfig:
    """The options of the :func:`patch` in effect (the defaults when not patched)."""
    return patch_config() or StFastConfig()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return bool(_originals)
