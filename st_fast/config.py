"""st_fast's options, in one place: :class:`StFastConfig` (``st_fast=`` of :class:`st_fast.SentenceTransformerTrainer`,
the argument of :func:`st_fast.patch`), the options of the ``patch()`` in effect, and :func:`trainer_config`, the
options that apply to one trainer."""

from __future__ import annotations

import dataclasses
from typing import Any

from st_fast.ops.backends import BACKENDS

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
    (:func:`st_fast.swaps.check_backends`).
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


_patch_config: StFastConfig | None = None  # the options of the patch() in effect; None: not patched


def patch_config() -> StFastConfig | None:
    """The options of the :func:`st_fast.patch` in effect, None when not patched."""
    return _patch_config


def set_patch_config(config: StFastConfig | None) -> None:
    """Record the options of :func:`st_fast.patch` (None: :func:`st_fast.unpatch`)."""
    global _patch_config
    _patch_config = config


def trainer_config(trainer: Any) -> StFastConfig:
    """The options that apply to ``trainer``: those it was built with (``st_fast=`` of the st_fast trainer, or the
    ``patch()`` options in effect when a patched stock trainer was built), else those of ``patch()`` now (the
    defaults when not patched)."""
    config = trainer.__dict__.get("_st_fast_config") or getattr(trainer, "st_fast_config", None)
    return config or _patch_config or StFastConfig()
