"""``SentenceTransformerTrainer``: the stock trainer with st_fast's fused losses and duplicate-free sampler swapped in.

Change one import::

    from st_fast import SentenceTransformerTrainer  # instead of: from sentence_transformers import ...

and everything else (arguments, callbacks, evaluators, model cards, checkpoints, ``accelerate launch``) stays the
stock trainer's. Two parts are swapped, each through a stock hook (spec: BaseTrainer.prepare_loss /
get_batch_sampler / call_model_init):

* the loss: after the stock ``prepare_loss``, every loss (a single loss, each value of a loss dict, the result of a
  ``model -> loss`` callable, and the losses re-created by ``model_init`` / hyperparameter search) goes through
  :func:`st_fast.losses.fuse`, which returns the st_fast class with the same configuration and model, or the loss
  unchanged when st_fast has no equivalent. The fused loss shares the stock object's state (see
  :func:`st_fast.losses.fuse`): changes to the user's loss object reach it, and no module's mode is touched. The
  model card is the stock card (same loss names, links and configuration) plus the ``st_fast`` tag.
* the batch sampler: ``BatchSamplers.NO_DUPLICATES`` / ``NO_DUPLICATES_HASHED`` (or the stock
  ``NoDuplicatesBatchSampler`` class given as ``batch_sampler``) become :class:`st_fast.NoDuplicatesBatchSampler`,
  which yields the same batches. The per-dataset samplers inside the multi-dataset samplers (round robin,
  proportional) are built by the same hook, so they are swapped too, for train and eval dataloaders alike.

What was swapped, and what was left stock and why, is logged once (INFO, logger ``st_fast.trainer``) at train begin.
``st_fast=`` turns parts off: ``SentenceTransformerTrainer(..., st_fast={"loss": False})`` or ``st_fast=False``.
:func:`st_fast.patch` applies the same hooks to the stock trainer classes (for code you do not own).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from typing import Any

import torch
from sentence_transformers.base import sampler as stock_sampler
from sentence_transformers.sentence_transformer.trainer import (
    SentenceTransformerTrainer as StockSentenceTransformerTrainer,
)
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------------------
# The swaps, as functions of a trainer instance: used by the subclass below and by st_fast.patch().
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------


class SentenceTransformerTrainer(StockSentenceTransformerTrainer):
    """Drop-in for :class:`sentence_transformers.SentenceTransformerTrainer` that swaps in st_fast's parts.

    Same constructor, plus the keyword ``st_fast``: a :class:`StFastConfig`, a dict with its fields (``loss``,
    ``sampler``, ``backend``) or a bool (``False``: the stock trainer exactly). See the module docstring.

    Example::

        from st_fast import SentenceTransformerTrainer

        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=train_dataset,
            loss=CachedMultipleNegativesRankingLoss(model, mini_batch_size=32),  # the stock class
        )  # trains with st_fast's fused CachedMultipleNegativesRankingLoss and native NoDuplicatesBatchSampler
    """

    _st_fast_owner = True  # st_fast.patch() leaves this class's hooks to the class itself

    def __init__(self, *args: Any, st_fast: StFastConfig | dict[str, Any] | bool | None = None, **kwargs: Any):
        self.st_fast_config = StFastConfig.coerce(st_fast)  # before the stock __init__, which calls prepare_loss
        super().__init__(*args, **kwargs)
        finish_init(self)

    def prepare_loss(self, loss, model):
        return fuse_loss(self, super().prepare_loss(loss, model), self.st_fast_config)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if hasattr(self, "loss"):
            fuse_trainer_losses(self, self.st_fast_config)
        return model

    def get_batch_sampler(self, dataset, *args, **kwargs):
        return fast_batch_sampler(self, super().get_batch_sampler, self.st_fast_config, dataset, *args, **kwargs)

    def get_multi_dataset_batch_sampler(self, *args, **kwargs):
        stock = super().get_multi_dataset_batch_sampler
        return fast_multi_dataset_batch_sampler(self, stock, self.st_fast_config, *args, **kwargs)
