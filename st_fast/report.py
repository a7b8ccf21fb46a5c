"""The swap report: what st_fast does with each part of a trainer, said at each ``train()`` start.

:func:`swap_report` (``trainer.st_fast_report``): part -> what st_fast did with it, with the backend that runs (the
fused loss's own plan for the training device and the embeddings' dtype, :func:`st_fast.decisions.training_plan`) or
why the part was left stock; :class:`SwapReportCallback` shows it at each ``train()`` start, on the main process (see
:func:`emit_report` for the channel), and after the first step the self-checks' verdicts (:func:`self_check_line`).
It reads the decisions of :mod:`st_fast.decisions` and changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import torch
from transformers import TrainerCallback

from st_fast.config import StFastConfig, patch_config, trainer_config
from st_fast.decisions import Part, multi_part, recorded_samplers, sampler_part, trainer_losses, training_plan
from st_fast.losses.plan import FUSED_CLASSES, LossPlan, fused_modules, is_wrapper
from st_fast.losses.self_check import installed_version, last_result, verdict

logger = logging.getLogger("st_fast.trainer")  # the name users configure: the report is the trainer's


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).removeprefix("torch.")


def place_name(device: torch.device) -> str:
    """``cpu`` for any CPU device, the device otherwise."""
    return "cpu" if device.type == "cpu" else str(device)  # DDP on CPUs gives cpu:<rank>: one CPU all the same


def _loss_label(loss: torch.nn.Module) -> str:
    """``MatryoshkaLoss(CoSENTLoss)`` for a wrapper, the class name otherwise."""
    if is_wrapper(loss):
        return f"{type(loss).__name__}({_loss_label(loss.loss)})"
    return type(loss).__name__


def _why_not_fused(loss: torch.nn.Module) -> str:
    if is_wrapper(loss):
        return _why_not_fused(loss.loss)
    if type(loss) in FUSED_CLASSES:  # the stock class itself, not fused: the trainer was built before patch()
        return "the trainer was built before st_fast.patch(): losses are fused when a trainer is built"
    stock_bases = [base.__name__ for base in FUSED_CLASSES if isinstance(loss, base)]
    if stock_bases:
        return f"a subclass of {stock_bases[0]}: st_fast cannot know what its overrides change"
    return f"{_loss_label(loss)} has no st_fast equivalent"


def _backend_phrase(plan: LossPlan) -> str:
    """``backend native (auto, cpu, float32)``: the backend that will run, how it was chosen, where."""
    asked, name = plan.asked, plan.backend
    if plan.error is not None:  # e.g. the model was moved after construction
        return f"backend {asked!r} cannot run here ({plan.error})"
    if asked == "auto":
        how = "auto"
    elif asked == name:
        how = "asked"
    else:  # a drop-in loss computes what its Triton kernels cannot decide exactly with torch
        how = f"{asked} asked" + (f": {plan.reason}" if plan.reason else "")
    return f"backend {name} ({how}; {place_name(plan.device)}, {dtype_name(plan.dtype)})"


def _loss_part(trainer: Any, loss: torch.nn.Module, config: StFastConfig) -> Part:
    fused = fused_modules(loss)
    label = _loss_label(loss)
    if not fused:
        reason = "st_fast loss=False" if not config.loss else _why_not_fused(loss)
        if config.mask_duplicates:
            reason += "; mask_duplicates applies to the MultipleNegativesRankingLoss family only"
        return Part(f"{label} left stock ({reason})", fast=False, tagged=False)
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
        if config.backend != "auto" and getattr(module, "backend", config.backend) != config.backend:
            masking += (
                f" (option backend={config.backend!r} not applied: an st_fast loss object you built keeps its own)"
            )
        checked = f", {last_result(module)}"
        plan = training_plan(trainer, module)
        phrases.append(f"st_fast {type(module).__name__}, {stage}{_backend_phrase(plan)}{masking}{checked}")
        if not plan.fused:
            stock_reasons.append(f"{type(module).__name__} computes stock: {plan.stock_reason}")
    where = "" if fused[0] is loss else f"{type(loss).__name__} around "
    if len(stock_reasons) == len(fused):  # every fused part computes stock with this configuration
        return Part(f"{label} left stock ({'; '.join(dict.fromkeys(stock_reasons))})", fast=False, tagged=True)
    text = where + "; ".join(dict.fromkeys(phrases + stock_reasons))
    return Part(text, fast=True, tagged=True)


def _sampler_parts(trainer: Any) -> dict[str, Part]:
    """The samplers' entries: as decided when the dataloaders were built, or, before that, as they will be."""
    recorded, samplers = recorded_samplers(trainer)
    if recorded:
        parts = dict(recorded)
        entry = parts.get("batch sampler")
        if entry is not None and entry.fast and samplers:
            found = "; ".join(dict.fromkeys(sampler.self_check_result for sampler in samplers))
            parts["batch sampler"] = dataclasses.replace(entry, text=f"{entry.text}, self-check {found}")
        return parts
    dataset = getattr(trainer, "train_dataset", None)
    if dataset is None:
        return {}
    config = trainer_config(trainer)
    if not getattr(trainer, "_st_fast_owner", False):  # patch(): the sampler follows the patch state at build time
        config = patch_config()
        if config is None:
            return {"batch sampler": Part("left stock (st_fast.unpatch() was called)", fast=False, tagged=False)}
    if isinstance(dataset, dict):  # DatasetDict: one sampler per dataset, inside the multi-dataset sampler
        parts = {"batch sampler": sampler_part(trainer, config, next(iter(dataset.values()), None))}
        if config.sampler:
            parts["multi-dataset batch sampler"] = multi_part(trainer)
        return parts
    return {"batch sampler": sampler_part(trainer, config, dataset)}


def _report_parts(trainer: Any) -> dict[str, Part]:
    config = trainer_config(trainer)
    parts = {part: _loss_part(trainer, loss, config) for part, loss in trainer_losses(trainer)}
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
    entries = []
    for part, loss in trainer_losses(trainer):
        for module in fused_modules(loss):
            result = verdict(module)
            if result is not None:
                entries.append(f"{part}: {type(module).__name__} {result.describe()}")
    for sampler in recorded_samplers(trainer)[1]:
        if sampler.self_check and sampler.self_check_result != "not run yet":
            entries.append(f"batch sampler: {sampler.self_check_result}")
    if not entries:
        return None
    head = f"[st_fast] self-check against sentence-transformers {installed_version()} on the first batch: "
    return head + "; ".join(dict.fromkeys(entries))


def ensure_report_callback(trainer: Any) -> None:
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
        if trainer_config(trainer).report and trainer.is_world_process_zero():
            emit_report(trainer)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        """After the first step of each ``train()``: one line with what the self-checks found on that batch."""
        if self.verdicts_shown:
            return
        self.verdicts_shown = True
        trainer = self.trainer
        if trainer_config(trainer).report and trainer.is_world_process_zero():
            line = self_check_line(trainer)
            if line and _report_enabled_by_logging():
                _emit(line)
