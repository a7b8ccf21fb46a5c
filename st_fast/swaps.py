"""The swaps st_fast makes in a sentence-transformers trainer, as functions of a trainer instance.

:class:`st_fast.SentenceTransformerTrainer` calls them from its overridden hooks and :func:`st_fast.patch` from the
stock ``BaseTrainer`` methods it wraps, so both ways of adopting st_fast make the same decisions:

* :func:`fuse_loss` / :func:`fuse_trainer_losses`: every loss through :func:`st_fast.losses.fuse`;
* :func:`fast_batch_sampler`: a stock no-duplicates batch sampler becomes :class:`st_fast.NoDuplicatesBatchSampler`
  (same batches); :func:`fast_multi_dataset_batch_sampler`: ``set_epoch`` reaches the per-dataset samplers;
* :func:`finish_init`: after the stock constructor, the fused losses' backends are checked against the device and
  dtype the model trains in (:func:`check_backends`: a backend that cannot run there fails here, not at the first
  step), the model card names fused losses by their stock classes and gets the ``st_fast`` tag, and the
  :class:`SwapReportCallback` is added;
* :func:`swap_report` (``trainer.st_fast_report``): part -> what st_fast did with it, with the backend that runs
  (resolved by :func:`st_fast.ops.backends.resolve_backend` for the training device and the embeddings' dtype) or
  why the part was left stock; :class:`SwapReportCallback` shows it at each ``train()`` start, on the main process
  (see :func:`emit_report` for the channel).

:class:`StFastConfig` holds the options (``st_fast=`` of the trainer, the argument of :func:`st_fast.patch`) and
validates them when built.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from typing import Any

import torch
from sentence_transformers.base import sampler as stock_sampler
from transformers import TrainerCallback

from st_fast.ops.backends import BACKENDS, GIST, MNRL, drop_in_backend, resolve_backend

logger = logging.getLogger("st_fast.trainer")  # the name users configure: the report is the trainer's

_NO_DUPLICATES_VALUES = ("no_duplicates", "no_duplicates_hashed")
_FLAGS = ("loss", "sampler", "report", "mask_duplicates", "self_check")


@dataclasses.dataclass(frozen=True)
class StFastConfig:
    """What st_fast swaps in, and whether it says so.

    ``loss``: fuse the losses; ``sampler``: the native NoDuplicatesBatchSampler; ``backend``: the fused losses'
    backend (one of :data:`st_fast.ops.BACKENDS`: ``"auto"``, ``"triton"``, ``"native"``, ``"torch"``); ``report``:
    show the swap report at each ``train()`` start (main process only); ``mask_duplicates`` (default False, not in
    stock): set ``mask_duplicates=True`` on every fused MNRL-family loss (also inside wrappers such as
    MatryoshkaLoss; see :class:`st_fast.losses.MultipleNegativesRankingLoss`): a candidate whose text equals the
    row's positive or anchor leaves that row's softmax, so that random batches need no duplicate-free sampler;
    ``self_check`` (default True): each fused loss and the sampler compare themselves with the installed stock code
    on the first batch of each configuration and compute stock from then on where they differ
    (:mod:`st_fast.losses.self_check`); False turns the check off on every fused loss of the trainer.

    Raises TypeError for a flag that is not a bool, ValueError for an unknown backend or ``mask_duplicates`` without
    ``loss``. Whether the backend can run on the model's device is checked when the trainer is built
    (:func:`check_backends`).
    """

    loss: bool = True
    sampler: bool = True
    backend: str = "auto"
    report: bool = True
    mask_duplicates: bool = False
    self_check: bool = True

    def __post_init__(self) -> None:
        for name in _FLAGS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"st_fast option {name!r} must be True or False, got {value!r}")
        if not isinstance(self.backend, str) or self.backend not in BACKENDS:
            known = ", ".join(repr(name) for name in BACKENDS)
            raise ValueError(f"st_fast option 'backend' must be one of {known}, got {self.backend!r}")
        if self.mask_duplicates and not self.loss:
            raise ValueError("st_fast option 'mask_duplicates' needs the fused losses (loss=True)")

    @classmethod
    def coerce(cls, value: StFastConfig | dict[str, Any] | bool | None) -> StFastConfig:
        if value is None or value is True:
            return cls()
        if value is False:  # the stock trainer exactly: nothing swapped, nothing reported
            return cls(loss=False, sampler=False, report=False)
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = [field.name for field in dataclasses.fields(cls)]
            unknown = set(value) - set(known)
            if unknown:
                raise ValueError(f"st_fast: unknown option(s) {sorted(unknown)}; known: {', '.join(known)}")
            return cls(**value)
        raise TypeError(f"st_fast= takes a dict, a StFastConfig or a bool, got {type(value).__name__}")


# --------------------------------------------------------------------------------------------------------------------
# The swaps


def fuse_loss(trainer: Any, loss: Any, config: StFastConfig) -> Any:
    """``loss`` (an ``nn.Module`` after the stock ``prepare_loss``) through :func:`st_fast.losses.fuse`."""
    if not isinstance(loss, torch.nn.Module):
        return loss
    _ensure_report_callback(trainer)
    if not config.loss:
        return loss
    from st_fast.losses import fuse

    fused = fuse(loss, backend=config.backend)
    if not config.self_check:  # not a change of the numbers: every fused loss of the trainer, the user's too
        for module in _fused_modules(fused):
            module.self_check = False
    if config.mask_duplicates:
        # only the fused views fuse() just built: an st_fast loss the user passed keeps its own setting (the trainer
        # never changes the state of an object the user built; the report says so)
        users = {id(module) for module in _fused_modules(loss)}
        for module in _fused_modules(fused):
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


def _is_stock_no_duplicates(batch_sampler_arg: Any) -> bool:
    if batch_sampler_arg is stock_sampler.NoDuplicatesBatchSampler:
        return True
    return isinstance(batch_sampler_arg, str) and str(getattr(batch_sampler_arg, "value", batch_sampler_arg)) in (
        _NO_DUPLICATES_VALUES
    )


def _choice_name(choice: Any) -> str:
    return getattr(choice, "value", None) or getattr(choice, "__name__", None) or type(choice).__name__


@dataclasses.dataclass(frozen=True)
class _Part:
    """One entry of the swap report: ``text``; ``fast``: st_fast computes this part (the report's first line, else
    its second: left stock); ``tagged``: an st_fast class is in place (the model card's ``st_fast`` tag); ``shown``:
    printed at train start (False for a part left stock where nobody expects st_fast, e.g. the default batch
    sampler; it stays in :func:`swap_report`)."""

    text: str
    fast: bool
    tagged: bool
    shown: bool = True


def _sampler_part(trainer: Any, config: StFastConfig, dataset: Any) -> _Part:
    """What :func:`fast_batch_sampler` does for ``dataset`` (and why)."""
    from datasets import Dataset

    choice = trainer.args.batch_sampler
    if not _is_stock_no_duplicates(choice):
        reason = "st_fast replaces only no_duplicates / no_duplicates_hashed"
        return _Part(f"{_choice_name(choice)} left stock ({reason})", fast=False, tagged=False, shown=False)
    if not config.sampler:
        return _Part("NoDuplicatesBatchSampler left stock (st_fast sampler=False)", fast=False, tagged=False)
    if not isinstance(dataset, Dataset):
        reason = f"the dataset is a {type(dataset).__name__}, not a datasets.Dataset"
        return _Part(f"NoDuplicatesBatchSampler left stock ({reason})", fast=False, tagged=False)
    hashed = ", hashed" if str(getattr(choice, "value", choice)) == "no_duplicates_hashed" else ""
    return _Part(f"st_fast NoDuplicatesBatchSampler (same batches as stock's{hashed})", fast=True, tagged=True)


def _multi_part(trainer: Any) -> _Part:
    name = _choice_name(trainer.args.multi_dataset_batch_sampler)
    return _Part(f"{name}: set_epoch forwarded to the per-dataset samplers under DDP sharding", fast=True, tagged=False)


def _record_sampler(trainer: Any, part: str, entry: _Part) -> None:
    trainer.__dict__.setdefault("_st_fast_samplers", {})[part] = entry
    _ensure_report_callback(trainer)


def fast_batch_sampler(trainer: Any, stock_method: Any, config: StFastConfig, dataset: Any, *args: Any, **kwargs: Any):
    """``stock_method(dataset, *args, **kwargs)`` (the stock ``get_batch_sampler``), except that a stock
    NoDuplicatesBatchSampler becomes st_fast's, built with the same arguments (whatever this version passes)."""
    entry = _sampler_part(trainer, config, dataset)
    _record_sampler(trainer, "batch sampler", entry)
    if not entry.fast:
        return stock_method(dataset, *args, **kwargs)
    from st_fast.sampler import NoDuplicatesBatchSampler

    # Bind against the stock signature so that positional / keyword calls and older versions (6.0.x: no `seed`)
    # give the st_fast sampler exactly what the stock one would have received.
    bound = inspect.signature(stock_method).bind(dataset, *args, **kwargs)
    sampler_kwargs = {name: value for name, value in bound.arguments.items() if name != "dataset"}
    hashed = str(getattr(trainer.args.batch_sampler, "value", trainer.args.batch_sampler)) == "no_duplicates_hashed"
    sampler = NoDuplicatesBatchSampler(
        dataset, precompute_hashes=hashed, self_check=config.self_check, **sampler_kwargs
    )
    # the report reads what the sampler's self-check found (one sampler per dataset of a DatasetDict)
    samplers = trainer.__dict__.setdefault("_st_fast_sampler_objects", [])
    samplers[:] = [s for s in samplers if s.dataset is not dataset] + [sampler]
    return sampler


def fast_multi_dataset_batch_sampler(trainer: Any, stock_method: Any, config: StFastConfig, *args: Any, **kwargs: Any):
    """``stock_method(*args, **kwargs)`` (the stock ``get_multi_dataset_batch_sampler``) with ``set_epoch`` made
    reachable under accelerate's batch-sampler sharding, which otherwise never reaches the round-robin /
    proportional sampler (nor, through it, its per-dataset samplers), so every epoch would repeat epoch 0's batches."""
    multi = stock_method(*args, **kwargs)
    if multi is None or not config.sampler:
        return multi
    from st_fast.sampler import forward_set_epoch

    _record_sampler(trainer, "multi-dataset batch sampler", _multi_part(trainer))
    return forward_set_epoch(multi)


def _stock_fullnames() -> dict[str, str]:
    from st_fast.losses.fuse import FUSED_CLASSES

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
    _ensure_report_callback(trainer)
    card = getattr(getattr(trainer, "model", None), "model_card_data", None)
    if card is None:
        return
    stock_names = _stock_fullnames()
    for datasets in (getattr(card, "train_datasets", None), getattr(card, "eval_datasets", None)):
        for info in datasets or []:
            loss = info.get("loss") if isinstance(info, dict) else None
            if isinstance(loss, dict) and loss.get("fullname") in stock_names:
                loss["fullname"] = stock_names[loss["fullname"]]
    if any(_fused_modules(loss) for _, loss in _trainer_losses(trainer)) and hasattr(card, "add_tags"):
        card.add_tags(["st_fast"])


# --------------------------------------------------------------------------------------------------------------------
# Backends: the one that will run for each fused loss, on the device and dtype the model trains in


def _fused_mixins() -> tuple[type, type]:
    from st_fast.losses.gist_embed import FusedGISTMixin
    from st_fast.losses.multiple_negatives_ranking import FusedMNRLMixin

    return FusedMNRLMixin, FusedGISTMixin


def _trainer_losses(trainer: Any) -> list[tuple[str, torch.nn.Module]]:
    """(report part, loss module) for ``trainer.loss``: ``loss``, or ``loss[<dataset>]`` for a loss dict."""
    loss = getattr(trainer, "loss", None)
    if isinstance(loss, dict):
        return [(f"loss[{key}]", value) for key, value in loss.items() if isinstance(value, torch.nn.Module)]
    return [("loss", loss)] if isinstance(loss, torch.nn.Module) else []


def _fused_modules(loss: torch.nn.Module) -> list[torch.nn.Module]:
    """The st_fast losses in ``loss`` (itself, or a wrapper's inner loss)."""
    fused = _fused_mixins()
    return [module for module in loss.modules() if isinstance(module, fused)]


def _first_floating_dtype(model: Any) -> torch.dtype | None:
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.dtype for p in parameters if p.is_floating_point()), None)


def training_device(trainer: Any) -> torch.device:
    """The device the trainer computes on: ``args.device``, where it places the model (also under DeepSpeed / FSDP,
    which place it at train time), or, for a model it does not place (model parallel), the model's own device."""
    model = getattr(trainer, "model", None)
    if getattr(trainer, "is_model_parallel", False) and isinstance(model, torch.nn.Module):
        device = next((p.device for p in model.parameters()), None)
        if device is not None:
            return device
    return torch.device(trainer.args.device)


def _embedding_dtype(trainer: Any, model: Any) -> torch.dtype:
    """The dtype of ``model``'s embeddings in training: its parameters' (float32 ones under ``bf16`` / ``fp16``
    mixed precision: the autocast dtype; autocast leaves float64 alone)."""
    dtype = _first_floating_dtype(model) or torch.float32
    args = getattr(trainer, "args", None)
    if dtype == torch.float32 and getattr(args, "bf16", False):
        return torch.bfloat16
    if dtype == torch.float32 and getattr(args, "fp16", False):
        return torch.float16
    return dtype


def _model_dtype(trainer: Any, loss: torch.nn.Module) -> torch.dtype:
    """The training dtype of the embeddings ``loss`` gets: its own ``model``'s, else the trainer's model's."""
    model = getattr(loss, "model", None)
    return _embedding_dtype(trainer, model if model is not None else getattr(trainer, "model", None))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_name(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device)  # DDP on CPUs gives cpu:<rank>: one CPU all the same


def _resolve(trainer: Any, module: torch.nn.Module) -> tuple[str, str | None, torch.device, torch.dtype]:
    """(backend that will run, why it is not the one asked for or None, device, dtype) for the fused loss
    ``module``: the losses' own decision (:func:`st_fast.ops.backends.drop_in_backend`, then
    :func:`~st_fast.ops.backends.resolve_backend`) for the training device and the embeddings' dtype. Raises as
    ``resolve_backend`` does for a backend that cannot run there."""
    _, gist_mixin = _fused_mixins()
    op = GIST if isinstance(module, gist_mixin) else MNRL
    device, dtype = training_device(trainer), _model_dtype(trainer, module)
    name, reason = drop_in_backend(module.backend, op)
    mask_dtype = None
    if op is GIST:  # the guide's similarities decide the masks, in the guide's embedding dtype
        guide = getattr(module, "guide", None)
        mask_dtype = _embedding_dtype(trainer, guide) if guide is not None else dtype
    masking = bool(getattr(module, "mask_duplicates", False))
    backend = resolve_backend(name, device, dtype, op, mask_dtype=mask_dtype, mask_duplicates=masking)
    return backend.name, reason, device, dtype


def check_backends(trainer: Any) -> None:
    """Resolve the backend of every fused loss of ``trainer`` for the device and dtype it trains in, so that a
    backend that cannot run there (``triton`` on CPU without ``TRITON_INTERPRET=1``, ``native`` where its extension is
    not built, ``native`` / ``triton`` for float64) fails when the trainer is built, not at the first step.

    Raises:
        RuntimeError, TypeError: as :func:`st_fast.ops.backends.resolve_backend`, with the loss and device named.
    """
    for part, loss in _trainer_losses(trainer):
        for module in _fused_modules(loss):
            try:
                _resolve(trainer, module)
            except (RuntimeError, TypeError, ValueError) as exc:
                kind = type(exc) if type(exc) in (RuntimeError, TypeError, ValueError) else RuntimeError
                device, dtype = training_device(trainer), _model_dtype(trainer, module)
                where = f"{_device_name(device)} with {_dtype_name(dtype)} embeddings"
                raise kind(
                    f"st_fast: the {part} ({type(module).__name__}) cannot run with backend={module.backend!r} on "
                    f"{where}: {exc}"
                ) from exc


# --------------------------------------------------------------------------------------------------------------------
# The report


def _loss_label(loss: torch.nn.Module) -> str:
    """``MatryoshkaLoss(CoSENTLoss)`` for a wrapper, the class name otherwise."""
    from st_fast.losses.fuse import WRAPPER_CLASSES

    inner = getattr(loss, "loss", None)
    if isinstance(loss, WRAPPER_CLASSES) and isinstance(inner, torch.nn.Module):
        return f"{type(loss).__name__}({_loss_label(inner)})"
    return type(loss).__name__


def _why_not_fused(loss: torch.nn.Module) -> str:
    from st_fast.losses.fuse import FUSED_CLASSES, WRAPPER_CLASSES

    inner = getattr(loss, "loss", None)
    if isinstance(loss, WRAPPER_CLASSES) and isinstance(inner, torch.nn.Module):
        return _why_not_fused(inner)
    if type(loss) in FUSED_CLASSES:  # the stock class itself, not fused: the trainer was built before patch()
        return "the trainer was built before st_fast.patch(): losses are fused when a trainer is built"
    stock_bases = [base.__name__ for base in FUSED_CLASSES if isinstance(loss, base)]
    if stock_bases:
        return f"a subclass of {stock_bases[0]}: st_fast cannot know what its overrides change"
    return f"{_loss_label(loss)} has no st_fast equivalent"


def _backend_phrase(trainer: Any, module: torch.nn.Module) -> str:
    """``backend native (auto, cpu, float32)``: the backend that will run, how it was chosen, where."""
    asked = module.backend
    try:
        name, reason, device, dtype = _resolve(trainer, module)
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. the model was moved after construction
        return f"backend {asked!r} cannot run here ({exc})"
    if asked == "auto":
        how = "auto"
    elif asked == name:
        how = "asked"
    else:  # a drop-in loss computes what its Triton kernels cannot decide exactly with torch
        how = f"{asked} asked" + (f": {reason}" if reason else "")
    return f"backend {name} ({how}; {_device_name(device)}, {_dtype_name(dtype)})"


def _loss_part(trainer: Any, loss: torch.nn.Module, config: StFastConfig) -> _Part:
    from st_fast.losses.self_check import last_result

    fused = _fused_modules(loss)
    label = _loss_label(loss)
    if not fused:
        reason = "st_fast loss=False" if not config.loss else _why_not_fused(loss)
        if config.mask_duplicates:
            reason += "; mask_duplicates applies to the MultipleNegativesRankingLoss family only"
        return _Part(f"{label} left stock ({reason})", fast=False, tagged=False)
    phrases, stock_reasons = [], []
    for module in fused:
        # a cached (GradCache) loss: st_fast computes its loss stage; the mini-batch embedding passes are stock's
        stage = "loss stage on " if getattr(module, "_replaced_method", None) == "calculate_loss" else ""
        masking = ""
        if getattr(module, "mask_duplicates", False):
            masking = ", mask_duplicates on"
        elif config.mask_duplicates and getattr(module, "mask_duplicates_applies", False):
            masking = ", mask_duplicates off (an st_fast loss object you built keeps its own mask_duplicates)"
        elif config.mask_duplicates:
            masking = ", mask_duplicates not available for this loss"
        checked = f", {last_result(module)}"
        phrases.append(f"st_fast {type(module).__name__}, {stage}{_backend_phrase(trainer, module)}{masking}{checked}")
        reason = module.fallback_reason()
        if reason is not None:
            stock_reasons.append(f"{type(module).__name__} computes stock: {reason}")
    where = "" if fused[0] is loss else f"{type(loss).__name__} around "
    if len(stock_reasons) == len(fused):  # every fused part computes stock with this configuration
        return _Part(f"{label} left stock ({'; '.join(dict.fromkeys(stock_reasons))})", fast=False, tagged=True)
    text = where + "; ".join(dict.fromkeys(phrases + stock_reasons))
    return _Part(text, fast=True, tagged=True)


def _config_of(trainer: Any) -> StFastConfig:
    config = trainer.__dict__.get("_st_fast_config") or getattr(trainer, "st_fast_config", None)
    if config is None:
        from st_fast import _patching

        config = _patching.current_config()
    return config


def _sampler_parts(trainer: Any) -> dict[str, _Part]:
    """The samplers' entries: as decided when the dataloaders were built, or, before that, as they will be."""
    recorded = trainer.__dict__.get("_st_fast_samplers")
    if recorded:
        parts = dict(recorded)
        entry = parts.get("batch sampler")
        samplers = trainer.__dict__.get("_st_fast_sampler_objects")
        if entry is not None and entry.fast and samplers:
            found = "; ".join(dict.fromkeys(sampler.self_check_result for sampler in samplers))
            parts["batch sampler"] = dataclasses.replace(entry, text=f"{entry.text}, self-check {found}")
        return parts
    dataset = getattr(trainer, "train_dataset", None)
    if dataset is None:
        return {}
    config = _config_of(trainer)
    if not getattr(trainer, "_st_fast_owner", False):  # patch(): the sampler follows the patch state at build time
        from st_fast import _patching

        if not _patching.is_patched():
            return {"batch sampler": _Part("left stock (st_fast.unpatch() was called)", fast=False, tagged=False)}
        config = _patching.current_config()
    if isinstance(dataset, dict):  # DatasetDict: one sampler per dataset, inside the multi-dataset sampler
        parts = {"batch sampler": _sampler_part(trainer, config, next(iter(dataset.values()), None))}
        if config.sampler:
            parts["multi-dataset batch sampler"] = _multi_part(trainer)
        return parts
    return {"batch sampler": _sampler_part(trainer, config, dataset)}


def _report_parts(trainer: Any) -> dict[str, _Part]:
    config = _config_of(trainer)
    parts = {part: _loss_part(trainer, loss, config) for part, loss in _trainer_losses(trainer)}
    parts.update(_sampler_parts(trainer))
    return parts


def swap_report(trainer: Any) -> dict[str, str]:
    """Part (``loss`` or ``loss[<dataset>]``, ``batch sampler``, ``multi-dataset batch sampler``) -> what st_fast does
    with it: the st_fast class and the backend that will run on the training device and dtype, or why it was left
    stock. The samplers' entries are the decisions taken when the dataloaders were built (before that, the
    decisions they will get). ``trainer.st_fast_report`` is this."""
    return {part: entry.text for part, entry in _report_parts(trainer).items()}


def report_lines(trainer: Any) -> list[str]:
    """The report as shown at train start: one line of the parts st_fast computes, one of those left stock where
    st_fast could have been expected (each omitted when empty)."""
    parts = _report_parts(trainer)
    lines = []
    for fast in (True, False):
        entries = [f"{part}: {entry.text}" for part, entry in parts.items() if entry.fast is fast and entry.shown]
        if entries:
            lines.append("[st_fast] " + "; ".join(entries))
    return lines


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record is emitted (as ``logging.lastResort`` does), so that
    redirections made after import (pytest's capture, contextlib.redirect_stderr, notebooks) apply."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # noqa: D102
        return sys.stderr


_STDERR_HANDLER = _StderrHandler()


def _report_enabled_by_logging() -> bool:
    """False when logging was told to drop the report: ``logging.disable(INFO)`` or higher, or a level above INFO
    set on ``st_fast.trainer`` or ``st_fast``. The root logger's level is not consulted (see :func:`emit_report`)."""
    if logger.disabled or logging.root.manager.disable >= logging.INFO:
        return False
    for name in ("st_fast.trainer", "st_fast"):
        level = logging.getLogger(name).level
        if level != logging.NOTSET:
            return level <= logging.INFO
    return True


def _record(message: str) -> logging.LogRecord:
    return logger.makeRecord(logger.name, logging.INFO, __file__, 0, message, None, None, func="emit_report")


def emit_report(trainer: Any) -> bool:
    """Show the report (:func:`report_lines`) once; True when something was handed to a handler.

    The channel is a log record of logger ``st_fast.trainer`` at INFO, handed to a stderr handler of st_fast's only
    when no handler is configured for that logger or its ancestors (the root logger included), the rule
    transformers' own logging follows. Chosen over ``print(..., file=sys.stderr)`` because an application that
    configures logging keeps control of the report like any other line (its format and destination: files, JSON log
    shippers, a training-job console that shows logging only; silenced by a level above INFO on ``st_fast.trainer``),
    and with no configuration at all (a plain script, where Python would drop an INFO record: its last-resort handler
    shows WARNING and above) it still appears on stderr. The handler is not attached to the logger but used for this
    one record, so a ``logging.basicConfig()`` made later never makes the report appear twice (ours and the root's).
    The root logger's level (WARNING by default, also after a bare ``basicConfig()``) is deliberately not consulted:
    the report is meant to be seen by default; ``st_fast={"report": False}`` or a level on ``st_fast.trainer`` /
    ``st_fast`` turns it off.
    """
    lines = report_lines(trainer)
    if not lines or not _report_enabled_by_logging():
        return False
    _emit("\n".join(lines))
    return True


def _emit(message: str) -> None:
    if logger.hasHandlers():
        logger.handle(_record(message))
    else:  # on its own line, also after a progress bar that did not end its line (the model card's widget bar)
        _STDERR_HANDLER.handle(_record("\n" + message))


def self_check_line(trainer: Any) -> str | None:
    """``[st_fast] self-check against sentence-transformers X on the first batch: <part>: <verdict>; ...`` for every
    fused loss and st_fast sampler whose check has run (None when none has)."""
    from st_fast.losses.self_check import installed_version, verdict

    entries = []
    for part, loss in _trainer_losses(trainer):
        for module in _fused_modules(loss):
            result = verdict(module)
            if result is not None:
                entries.append(f"{part}: {type(module).__name__} {result.describe()}")
    for sampler in trainer.__dict__.get("_st_fast_sampler_objects", []):
        if sampler.self_check and sampler.self_check_result != "not run yet":
            entries.append(f"batch sampler: {sampler.self_check_result}")
    if not entries:
        return None
    head = f"[st_fast] self-check against sentence-transformers {installed_version()} on the first batch: "
    return head + "; ".join(dict.fromkeys(entries))


def _ensure_report_callback(trainer: Any) -> None:
    """Add the trainer's :class:`SwapReportCallback` (one per trainer, whoever asks first), first in the callback
    list, so that the report is shown before the progress callback draws its bar (not appended to the bar's line)."""
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None)
    if callbacks is not None and not any(isinstance(cb, SwapReportCallback) for cb in callbacks):
        trainer.add_callback(SwapReportCallback(trainer))
        callbacks.insert(0, callbacks.pop())


class SwapReportCallback(TrainerCallback):
    """At each train begin: tags the model card ``st_fast`` when an st_fast part is in place, and shows the swap report
    (:func:`emit_report`) on the main process (``trainer.is_world_process_zero()``) unless the trainer's options say
    ``report=False``."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.verdicts_shown = True

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        trainer = self.trainer
        self.verdicts_shown = False
        if any(entry.tagged for entry in _report_parts(trainer).values()):
            card = getattr(getattr(trainer, "model", None), "model_card_data", None)
            if card is not None and hasattr(card, "add_tags"):
                card.add_tags(["st_fast"])
        if _config_of(trainer).report and trainer.is_world_process_zero():
            emit_report(trainer)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        """After the first step of each ``train()``: one line with what the self-checks found on that batch."""
        if self.verdicts_shown:
            return
        self.verdicts_shown = True
        trainer = self.trainer
        if _config_of(trainer).report and trainer.is_world_process_zero():
            line = self_check_line(trainer)
            if line and _report_enabled_by_logging():
                _emit(line)
