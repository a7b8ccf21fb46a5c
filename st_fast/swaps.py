"""The swaps st_fast makes in a sentence-transformers trainer, as functions of a trainer instance.

:class:`st_fast.SentenceTransformerTrainer` calls them from its overridden hooks and :func:`st_fast.patch` from the
stock ``BaseTrainer`` methods it wraps, so both ways of adopting st_fast make the same decisions
(:mod:`st_fast.decisions`):

* :func:`fuse_loss` / :func:`fuse_trainer_losses`: every loss through :func:`st_fast.losses.fuse`;
* :func:`fast_batch_sampler`: a stock no-duplicates batch sampler becomes :class:`st_fast.NoDuplicatesBatchSampler`
  (same batches); :func:`fast_multi_dataset_batch_sampler`: ``set_epoch`` reaches the per-dataset samplers;
* :func:`finish_init`: after the stock constructor, the fused losses' plans are checked against the device and
  dtype the model trains in (:func:`check_backends`: a backend that cannot run there fails here, not at the first
  step), the model card names fused losses by their stock classes and gets the ``st_fast`` tag, and the report's
  callback is added (:mod:`st_fast.report`).

The options are :class:`st_fast.config.StFastConfig` (``st_fast=`` of the trainer, the argument of
:func:`st_fast.patch`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from st_fast.config import StFastConfig
from st_fast.decisions import (
    is_hashed,
    multi_part,
    record_sampler,
    record_sampler_object,
    sampler_part,
    trainer_losses,
    training_plan,
)
from st_fast.losses.fuse import fuse
from st_fast.losses.plan import FUSED_CLASSES, fused_modules
from st_fast.report import dtype_name, ensure_report_callback, place_name

__all__ = [
    "StFastConfig",
    "check_backends",
    "fast_batch_sampler",
    "fast_multi_dataset_batch_sampler",
    "finish_init",
    "fuse_loss",
    "fuse_trainer_losses",
]


def fuse_loss(trainer: Any, loss: Any, config: StFastConfig) -> Any:
    """``loss`` (an ``nn.Module`` after the stock ``prepare_loss``) through :func:`st_fast.losses.fuse`."""
    if not isinstance(loss, torch.nn.Module):
        return loss
    ensure_report_callback(trainer)
    if not config.loss:
        return loss
    fused = fuse(loss, backend=config.backend)
    if not config.self_check:  # not a change of the numbers: every fused loss of the trainer, the user's too
        for module in fused_modules(fused):
            module.self_check = False
    if config.mask_duplicates:
        # only the fused views fuse() just built: an st_fast loss the user passed keeps its own setting (the trainer
        # never changes the state of an object the user built; the report says so)
        users = {id(module) for module in fused_modules(loss)}
        for module in fused_modules(fused):
            if getattr(module, "mask_duplicates_applies", False) and id(module) not in users:
                module.mask_duplicates = True
    return fused


def fuse_trainer_losses(trainer: Any, config: StFastConfig) -> None:
    """Fuse ``trainer.loss`` in place (single loss or dict), e.g. after ``call_model_init`` re-created it, and check
    the fused losses' backends on the (new) model."""
    loss = getattr(trainer, "loss", None)
    if isinstance(loss, dict):
        for key, value in loss.items():
            loss[key] = fuse_loss(trainer, value, config)
    elif loss is not None:
        trainer.loss = fuse_loss(trainer, loss, config)
    check_backends(trainer)


def fast_batch_sampler(trainer: Any, stock_method: Any, config: StFastConfig, dataset: Any, *args: Any, **kwargs: Any):
    """``stock_method(dataset, *args, **kwargs)`` (the stock ``get_batch_sampler``), except that a stock
    NoDuplicatesBatchSampler becomes st_fast's, built with the same arguments (whatever this version passes)."""
    entry = sampler_part(trainer, config, dataset)
    record_sampler(trainer, "batch sampler", entry)
    ensure_report_callback(trainer)
    if not entry.fast:
        return stock_method(dataset, *args, **kwargs)
    from st_fast.sampler import NoDuplicatesBatchSampler

    # Bind against the stock signature so that positional / keyword calls and older versions (6.0.x: no `seed`)
    # give the st_fast sampler exactly what the stock one would have received.
    bound = inspect.signature(stock_method).bind(dataset, *args, **kwargs)
    sampler_kwargs = {name: value for name, value in bound.arguments.items() if name != "dataset"}
    hashed = is_hashed(trainer.args.batch_sampler)
    sampler = NoDuplicatesBatchSampler(
        dataset, precompute_hashes=hashed, self_check=config.self_check, **sampler_kwargs
    )
    record_sampler_object(trainer, sampler)  # the report reads what the sampler's self-check found
    return sampler


def fast_multi_dataset_batch_sampler(trainer: Any, stock_method: Any, config: StFastConfig, *args: Any, **kwargs: Any):
    """``stock_method(*args, **kwargs)`` (the stock ``get_multi_dataset_batch_sampler``) with ``set_epoch`` made
    reachable under accelerate's batch-sampler sharding, which otherwise never reaches the round-robin /
    proportional sampler (nor, through it, its per-dataset samplers), so every epoch would repeat epoch 0's batches."""
    multi = stock_method(*args, **kwargs)
    if multi is None or not config.sampler:
        return multi
    from st_fast.sampler import forward_set_epoch

    record_sampler(trainer, "multi-dataset batch sampler", multi_part(trainer))
    ensure_report_callback(trainer)
    return forward_set_epoch(multi)


def _stock_fullnames() -> dict[str, str]:
    return {f"{fast.__module__}.{fast.__name__}": f"{stock.__module__}.{stock.__name__}" for stock, fast in
            FUSED_CLASSES.items()}  # fmt: skip


def finish_init(trainer: Any, config: StFastConfig) -> None:
    """After the stock ``__init__``: remember ``config`` (the report's), check the fused losses' backends on the
    model's device and dtype (:func:`check_backends`), add the report callback, and, in the model card (whose callback
    recorded each dataset's loss by its class's full name), name the fused losses by their stock classes, so that the
    card renders exactly as stock's (the template links only ``sentence_transformers.`` names), and tag it
    ``st_fast`` when an st_fast loss is in place."""
    trainer.__dict__["_st_fast_config"] = config
    check_backends(trainer)
    ensure_report_callback(trainer)
    card = getattr(getattr(trainer, "model", None), "model_card_data", None)
    if card is None:
        return
    stock_names = _stock_fullnames()
    for datasets in (getattr(card, "train_datasets", None), getattr(card, "eval_datasets", None)):
        for info in datasets or []:
            loss = info.get("loss") if isinstance(info, dict) else None
            if isinstance(loss, dict) and loss.get("fullname") in stock_names:
                loss["fullname"] = stock_names[loss["fullname"]]
    if any(fused_modules(loss) for _, loss in trainer_losses(trainer)) and hasattr(card, "add_tags"):
        card.add_tags(["st_fast"])


def check_backends(trainer: Any) -> None:
    """Check the plan of every fused loss of ``trainer`` for the device and dtype it trains in
    (:func:`st_fast.decisions.training_plan`), so that a
    backend that cannot run there (``triton`` on CPU without ``TRITON_INTERPRET=1``, ``native`` where its extension is
    not built, ``native`` / ``triton`` for float64) fails when the trainer is built, not at the first step.

    Raises:
        RuntimeError, TypeError: as :func:`st_fast.ops.backends.resolve_backend`, with the loss and device named.
    """
    for part, loss in trainer_losses(trainer):
        for module in fused_modules(loss):
            plan = training_plan(trainer, module)
            exc = plan.error
            if exc is not None:
                kind = type(exc) if type(exc) in (RuntimeError, TypeError, ValueError) else RuntimeError
                where = f"{place_name(plan.device)} with {dtype_name(plan.dtype)} embeddings"
                raise kind(
                    f"st_fast: the {part} ({type(module).__name__}) cannot run with backend={module.backend!r} on "
                    f"{where}: {exc}"
                ) from exc
