"""The swaps st_fast makes in a sentence-transformers trainer, as functions of a trainer instance.

:class:`st_fast.SentenceTransformerTrainer` calls them from its overridden hooks and :func:`st_fast.patch` from the
stock ``BaseTrainer`` methods it wraps, so both ways of adopting st_fast make the same decisions:

* :func:`fuse_loss` / :func:`fuse_trainer_losses`: every loss through :func:`st_fast.losses.fuse`;
* :func:`fast_batch_sampler`: a stock no-duplicates batch sampler becomes :class:`st_fast.NoDuplicatesBatchSampler`
  (same batches); :func:`fast_multi_dataset_batch_sampler`: ``set_epoch`` reaches the per-dataset samplers;
* :func:`finish_init`: the model card names fused losses by their stock classes and gets the ``st_fast`` tag;
* :func:`swap_report` and :class:`SwapReportCallback`: what was swapped, logged once at train begin (INFO, logger
  ``st_fast.trainer``).

:class:`StFastConfig` holds the options (``st_fast=`` of the trainer, the argument of :func:`st_fast.patch`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
from sentence_transformers.base import sampler as stock_sampler
from transformers import TrainerCallback

logger = logging.getLogger("st_fast.trainer")  # the name users configure: the report is the trainer's

_NO_DUPLICATES_VALUES = ("no_duplicates", "no_duplicates_hashed")


@dataclasses.dataclass(frozen=True)
class StFastConfig:
    """Which parts st_fast swaps in. ``loss``: fuse the losses; ``sampler``: the native NoDuplicatesBatchSampler;
    ``backend``: the fused losses' backend (``"auto"``, ``"triton"``, ``"native"`` or ``"torch"``)."""

    loss: bool = True
    sampler: bool = True
    backend: str = "auto"

    @classmethod
    def coerce(cls, value: StFastConfig | dict[str, Any] | bool | None) -> StFastConfig:
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(loss=False, sampler=False)
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {field.name for field in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"st_fast: unknown option(s) {sorted(unknown)}; known: loss, sampler, backend")
            return cls(**value)
        raise TypeError(f"st_fast= takes a dict, a StFastConfig or a bool, got {type(value).__name__}")


def swap_report(trainer: Any) -> dict[str, str]:
    """The trainer's record of what st_fast swapped (``part -> what happened``), logged at train begin."""
    report = trainer.__dict__.get("_st_fast_report")
    if report is None:
        report = trainer.__dict__["_st_fast_report"] = {}
    return report


def _record(trainer: Any, part: str, message: str) -> None:
    swap_report(trainer)[part] = message
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
    if callbacks is not None and not any(isinstance(cb, SwapReportCallback) for cb in callbacks):
        trainer.add_callback(SwapReportCallback(trainer))


def _loss_name(loss: Any) -> str:
    return type(loss).__name__


def _describe_fused(loss: torch.nn.Module) -> str:
    """A note for each fused loss (wrapper children included) that its current configuration makes compute stock."""
    notes = []
    for module in loss.modules():  # the loss itself first, then its children (wrappers' inner losses)
        reason = module.fallback_reason() if hasattr(module, "fallback_reason") else None
        if reason is not None:
            notes.append(f"{_loss_name(module)}: {reason}, computed stock")
    return "; ".join(dict.fromkeys(notes))


def _why_not_fused(loss: torch.nn.Module) -> str:
    from st_fast.losses.fuse import FUSED_CLASSES

    if type(loss).__module__.startswith("st_fast."):
        return "already an st_fast loss"
    stock_bases = [base.__name__ for base in FUSED_CLASSES if isinstance(loss, base)]
    if stock_bases:
        return f"left stock (a subclass of {stock_bases[0]}: st_fast cannot know what its overrides change)"
    return f"left stock ({type(loss).__module__}.{_loss_name(loss)} has no st_fast equivalent)"


def fuse_loss(trainer: Any, loss: Any, config: StFastConfig) -> Any:
    """``loss`` (an ``nn.Module`` after the stock ``prepare_loss``) fused, with the decision recorded."""
    if not isinstance(loss, torch.nn.Module):
        return loss
    part = f"loss {_loss_name(loss)}"
    if not config.loss:
        _record(trainer, part, "left stock (st_fast loss=False)")
        return loss
    from st_fast.losses import fuse

    fused = fuse(loss, backend=config.backend)
    if fused is loss:
        _record(trainer, part, _why_not_fused(loss))
        return loss
    note = _describe_fused(fused)
    _record(trainer, part, f"fused (st_fast, backend={config.backend})" + (f"; {note}" if note else ""))
    return fused


def fuse_trainer_losses(trainer: Any, config: StFastConfig) -> None:
    """Fuse ``trainer.loss`` in place (single loss or dict), e.g. after ``call_model_init`` re-created it."""
    loss = getattr(trainer, "loss", None)
    if isinstance(loss, dict):
        for key, value in loss.items():
            loss[key] = fuse_loss(trainer, value, config)
    elif loss is not None:
        trainer.loss = fuse_loss(trainer, loss, config)


def _is_stock_no_duplicates(batch_sampler_arg: Any) -> bool:
    if batch_sampler_arg is stock_sampler.NoDuplicatesBatchSampler:
        return True
    return isinstance(batch_sampler_arg, str) and str(getattr(batch_sampler_arg, "value", batch_sampler_arg)) in (
        _NO_DUPLICATES_VALUES
    )


def fast_batch_sampler(trainer: Any, stock_method: Any, config: StFastConfig, dataset: Any, *args: Any, **kwargs: Any):
    """``stock_method(dataset, *args, **kwargs)`` (the stock ``get_batch_sampler``), except that a stock
    NoDuplicatesBatchSampler becomes st_fast's, built with the same arguments (whatever this version passes)."""
    from datasets import Dataset

    choice = trainer.args.batch_sampler
    part = "batch sampler"
    if not _is_stock_no_duplicates(choice):
        name = getattr(choice, "value", None) or getattr(choice, "__name__", None) or type(choice).__name__
        _record(trainer, part, f"{name} left stock (st_fast replaces only no_duplicates / no_duplicates_hashed)")
        return stock_method(dataset, *args, **kwargs)
    if not config.sampler:
        _record(trainer, part, "left stock NoDuplicatesBatchSampler (st_fast sampler=False)")
        return stock_method(dataset, *args, **kwargs)
    if not isinstance(dataset, Dataset):
        _record(trainer, part, f"left stock (dataset is a {type(dataset).__name__}, not a datasets.Dataset)")
        return stock_method(dataset, *args, **kwargs)
    from st_fast.sampler import NoDuplicatesBatchSampler

    # Bind against the stock signature so that positional / keyword calls and older versions (6.0.x: no `seed`)
    # give the st_fast sampler exactly what the stock one would have received.
    bound = inspect.signature(stock_method).bind(dataset, *args, **kwargs)
    sampler_kwargs = {name: value for name, value in bound.arguments.items() if name != "dataset"}
    hashed = str(getattr(choice, "value", choice)) == "no_duplicates_hashed"
    _record(trainer, part, "NoDuplicatesBatchSampler -> st_fast.NoDuplicatesBatchSampler (same batches)")
    return NoDuplicatesBatchSampler(dataset, precompute_hashes=hashed, **sampler_kwargs)


def fast_multi_dataset_batch_sampler(trainer: Any, stock_method: Any, config: StFastConfig, *args: Any, **kwargs: Any):
    """``stock_method(*args, **kwargs)`` (the stock ``get_multi_dataset_batch_sampler``) with ``set_epoch`` made
    reachable under accelerate's batch-sampler sharding, which otherwise never reaches the round-robin /
    proportional sampler (nor, through it, its per-dataset samplers), so every epoch would repeat epoch 0's batches."""
    multi = stock_method(*args, **kwargs)
    if multi is None or not config.sampler:
        return multi
    from st_fast.sampler import forward_set_epoch

    _record(trainer, "multi-dataset batch sampler", f"{type(multi).__name__}: set_epoch forwarded under DDP sharding")
    return forward_set_epoch(multi)


def _stock_fullnames() -> dict[str, str]:
    from st_fast.losses.fuse import FUSED_CLASSES

    return {f"{fast.__module__}.{fast.__name__}": f"{stock.__module__}.{stock.__name__}" for stock, fast in
            FUSED_CLASSES.items()}  # fmt: skip


def finish_init(trainer: Any) -> None:
    """After the stock ``__init__`` (whose model card callback recorded each dataset's loss by its class's full
    name): name the fused losses by their stock classes, so that the card renders exactly as stock's (the template
    links only ``sentence_transformers.`` names), and tag the card ``st_fast`` when a loss was fused."""
    card = getattr(getattr(trainer, "model", None), "model_card_data", None)
    if card is None:
        return
    stock_names = _stock_fullnames()
    for datasets in (getattr(card, "train_datasets", None), getattr(card, "eval_datasets", None)):
        for info in datasets or []:
            loss = info.get("loss") if isinstance(info, dict) else None
            if isinstance(loss, dict) and loss.get("fullname") in stock_names:
                loss["fullname"] = stock_names[loss["fullname"]]
    if any(message.startswith("fused") for message in swap_report(trainer).values()) and hasattr(card, "add_tags"):
        card.add_tags(["st_fast"])


class SwapReportCallback(TrainerCallback):
    """Logs the trainer's swap report once, at the first train begin, and tags the model card ``st_fast``."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.logged = False

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        report = swap_report(self.trainer)
        if any(message.startswith(("fused", "already", "NoDuplicates")) for message in report.values()):
            card = getattr(getattr(self.trainer, "model", None), "model_card_data", None)
            if card is not None and hasattr(card, "add_tags"):
                card.add_tags(["st_fast"])
        if self.logged or not report:
            return
        self.logged = True
        lines = "\n".join(f"  {part}: {message}" for part, message in report.items())
        logger.info("st_fast swapped parts of %s:\n%s", type(self.trainer).__name__, lines)
