"""What st_fast does with each part of a trainer, as data: the swaps (:mod:`st_fast.swaps`) act on it and the
report (:mod:`st_fast.report`) says it.

* the losses: :func:`trainer_losses` (``loss`` or ``loss[<dataset>]`` -> the loss module), the st_fast losses in each
  (:func:`st_fast.losses.plan.fused_modules`) and their plans for the device and dtype the trainer trains in
  (:func:`training_plan`, the losses' own :meth:`~st_fast.losses.plan.StFastLoss.training_plan`);
* the batch samplers: :class:`Part` entries (:func:`sampler_part`, :func:`multi_part`), recorded on the trainer when
  its dataloaders are built (:func:`record_sampler`, :func:`record_sampler_object`, :func:`recorded_samplers`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from sentence_transformers.base import sampler as stock_sampler

from st_fast.config import StFastConfig
from st_fast.losses.plan import LossPlan, StFastLoss

_NO_DUPLICATES_VALUES = ("no_duplicates", "no_duplicates_hashed")


# --------------------------------------------------------------------------------------------------------------------
# The losses and their plans on the device and dtype the model trains in


def trainer_losses(trainer: Any) -> list[tuple[str, torch.nn.Module]]:
    """(report part, loss module) for ``trainer.loss``: ``loss``, or ``loss[<dataset>]`` for a loss dict."""
    loss = getattr(trainer, "loss", None)
    if isinstance(loss, dict):
        return [(f"loss[{key}]", value) for key, value in loss.items() if isinstance(value, torch.nn.Module)]
    return [("loss", loss)] if isinstance(loss, torch.nn.Module) else []


def training_device(trainer: Any) -> torch.device:
    """The device the trainer computes on: ``args.device``, where it places the model (also under DeepSpeed / FSDP,
    which place it at train time), or, for a model it does not place (model parallel), the model's own device."""
    model = getattr(trainer, "model", None)
    if getattr(trainer, "is_model_parallel", False) and isinstance(model, torch.nn.Module):
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            return device
    return torch.device(trainer.args.device)


def _first_floating_dtype(model: Any) -> torch.dtype | None:
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.dtype for p in parameters if p.is_floating_point()), None)


def embedding_dtype(trainer: Any, model: Any) -> torch.dtype:
    """The dtype of ``model``'s embeddings in training (``None``: the trainer's model): its parameters' (float32
    ones under ``bf16`` / ``fp16`` mixed precision: the autocast dtype; autocast leaves float64 alone)."""
    model = getattr(trainer, "model", None) if model is None else model
    dtype = _first_floating_dtype(model) or torch.float32
    args = getattr(trainer, "args", None)
    if dtype == torch.float32 and getattr(args, "bf16", False):
        return torch.bfloat16
    if dtype == torch.float32 and getattr(args, "fp16", False):
        return torch.float16
    return dtype


def training_plan(trainer: Any, module: StFastLoss) -> LossPlan:
    """What the st_fast loss ``module`` will run in ``trainer``'s training, and why: its own plan for the training
    device and the dtype of each model's embeddings there."""
    return module.training_plan(training_device(trainer), lambda model: embedding_dtype(trainer, model))


# --------------------------------------------------------------------------------------------------------------------
# The samplers


@dataclasses.dataclass(frozen=True)
class Part:
    """One entry of the swap report: ``text``; ``fast``: st_fast computes this part (the report's first line, else
    its second: left stock); ``tagged``: an st_fast class is in place (the model card's ``st_fast`` tag); ``shown``:
    printed at train start (False for a part left stock where nobody expects st_fast, e.g. the default batch
    sampler; it stays in :func:`st_fast.report.swap_report`)."""

    text: str
    fast: bool
    tagged: bool
    shown: bool = True


def is_stock_no_duplicates(batch_sampler_arg: Any) -> bool:
    """Whether ``args.batch_sampler`` asks for the stock no-duplicates sampler (by name or by class)."""
    if batch_sampler_arg is stock_sampler.NoDuplicatesBatchSampler:
        return True
    return isinstance(batch_sampler_arg, str) and str(getattr(batch_sampler_arg, "value", batch_sampler_arg)) in (
        _NO_DUPLICATES_VALUES
    )


def is_hashed(batch_sampler_arg: Any) -> bool:
    """Whether ``args.batch_sampler`` is ``no_duplicates_hashed``."""
    return str(getattr(batch_sampler_arg, "value", batch_sampler_arg)) == "no_duplicates_hashed"


def _choice_name(choice: Any) -> str:
    return getattr(choice, "value", None) or getattr(choice, "__name__", None) or type(choice).__name__


def sampler_part(trainer: Any, config: StFastConfig, dataset: Any) -> Part:
    """What the batch sampler swap does for ``dataset`` (and why)."""
    from datasets import Dataset

    choice = trainer.args.batch_sampler
    if not is_stock_no_duplicates(choice):
        reason = "st_fast replaces only no_duplicates / no_duplicates_hashed"
        return Part(f"{_choice_name(choice)} left stock ({reason})", fast=False, tagged=False, shown=False)
    if not config.sampler:
        return Part("NoDuplicatesBatchSampler left stock (st_fast sampler=False)", fast=False, tagged=False)
    if not isinstance(dataset, Dataset):
        reason = f"the dataset is a {type(dataset).__name__}, not a datasets.Dataset"
        return Part(f"NoDuplicatesBatchSampler left stock ({reason})", fast=False, tagged=False)
    hashed = ", hashed" if is_hashed(choice) else ""
    return Part(f"st_fast NoDuplicatesBatchSampler (same batches as stock's{hashed})", fast=True, tagged=True)


def multi_part(trainer: Any) -> Part:
    """What the multi-dataset batch sampler swap does."""
    name = _choice_name(trainer.args.multi_dataset_batch_sampler)
    return Part(f"{name}: set_epoch forwarded to the per-dataset samplers under DDP sharding", fast=True, tagged=False)


def record_sampler(trainer: Any, part: str, entry: Part) -> None:
    """Record the decision ``entry`` for ``part`` of ``trainer``."""
    trainer.__dict__.setdefault("_st_fast_samplers", {})[part] = entry


def record_sampler_object(trainer: Any, sampler: Any) -> None:
    """Record the st_fast ``sampler`` built for its dataset, whose self-check the report reads (one sampler per
    dataset of a DatasetDict: a new one replaces the one built earlier for the same dataset)."""
    samplers = trainer.__dict__.setdefault("_st_fast_sampler_objects", [])
    samplers[:] = [s for s in samplers if s.dataset is not sampler.dataset] + [sampler]


def recorded_samplers(trainer: Any) -> tuple[dict[str, Part], list[Any]]:
    """(part -> decision, st_fast samplers built) as recorded when the trainer's dataloaders were built."""
    return trainer.__dict__.get("_st_fast_samplers", {}), trainer.__dict__.get("_st_fast_sampler_objects", [])
