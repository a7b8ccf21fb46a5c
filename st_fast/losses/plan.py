"""What a fused loss runs, and the registry that makes an op family known to ``fuse()``, the swaps and the report.

Every st_fast loss class derives from :class:`StFastLoss` through its family's mixin, which names its op family as
data (:class:`LossFamily`: a label and the op's :class:`~st_fast.ops.backends.OpCapabilities`). One method answers
"what will you run on this device and dtype, and why": :meth:`StFastLoss.plan`, a :class:`LossPlan`. The loss takes
the backend it computes with from it at every call, and the trainer's backend check and swap report read the same
plan for the training device and dtype (:meth:`StFastLoss.training_plan`), so the two cannot disagree.

Each drop-in class registers the stock class it replaces with :func:`replaces` (a class decorator);
:data:`FUSED_CLASSES` (stock class -> st_fast class) is what :func:`st_fast.losses.fuse` swaps, what the model card
renames and what the report explains; stock wrappers of a loss (``MatryoshkaLoss``-like) register with
:func:`wraps_a_loss`. A new family needs nothing else: its mixin derives from :class:`StFastLoss` with a ``family``,
its classes are decorated with :func:`replaces`, and ``st_fast/losses/__init__.py`` imports them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from st_fast.ops.backends import OpCapabilities, drop_in_backend, resolve_backend

# stock class -> st_fast class (the same state; st_fast's classes replace one method and add ``backend``), filled by
# :func:`replaces` when the loss modules are imported (``st_fast.losses`` imports them all)
FUSED_CLASSES: dict[type, type] = {}


_WRAPPERS: list[type] = []  # stock wrapper classes whose inner ``loss`` fuse() fuses (see :func:`wraps_a_loss`)


def wraps_a_loss(*stock_wrappers: type) -> None:
    """Register stock wrapper classes (``MatryoshkaLoss``-like: the wrapped loss is their ``loss`` attribute):
    :func:`st_fast.losses.fuse` fuses the inner loss of a wrapper and the report names it ``Wrapper(Inner)``."""
    _WRAPPERS.extend(wrapper for wrapper in stock_wrappers if wrapper not in _WRAPPERS)


def is_wrapper(loss: Any) -> bool:
    """Whether ``loss`` is a registered wrapper around an inner loss module (:func:`wraps_a_loss`)."""
    return isinstance(loss, tuple(_WRAPPERS)) and isinstance(getattr(loss, "loss", None), torch.nn.Module)


def replaces(stock_class: type) -> Callable[[type], type]:
    """Class decorator: the decorated st_fast class is the drop-in for ``stock_class`` (exact class) in
    :data:`FUSED_CLASSES`. Raises TypeError for a class that is not a :class:`StFastLoss` or a stock class that
    already has a drop-in."""

    def register(fused_class: type) -> type:
        if not issubclass(fused_class, StFastLoss):
            raise TypeError(f"{fused_class.__name__} is not an st_fast StFastLoss")
        known = FUSED_CLASSES.get(stock_class)
        if known is not None and known is not fused_class:
            raise TypeError(f"{stock_class.__name__} is already replaced by {known.__name__}")
        FUSED_CLASSES[stock_class] = fused_class
        return fused_class

    return register


@dataclasses.dataclass(frozen=True)
class LossFamily:
    """An op family of fused losses: ``label`` (e.g. ``"MNRL"``) and the capabilities of its op's backends
    (:class:`~st_fast.ops.backends.OpCapabilities`), which decide the backend through the contrastive ops' dispatch
    point. A family whose op has its own dispatch point gives ``op=None`` and overrides :meth:`choose_backend`.
    """

    label: str
    op: OpCapabilities | None = None

    def __post_init__(self) -> None:
        if self.op is None and type(self).choose_backend is LossFamily.choose_backend:
            raise TypeError(f"the {self.label} family needs OpCapabilities (op=) or its own choose_backend")

    def choose_backend(
        self, asked: str, device: torch.device, dtype: torch.dtype, **inputs: Any
    ) -> tuple[str, str | None]:
        """(the backend that runs for ``backend=asked`` on ``device`` with embeddings of ``dtype``, why it is not
        the one asked for or None); ``inputs``: the dispatch's other inputs (``mask_dtype``, ``mask_duplicates``).
        A drop-in loss takes every decision as stock: :func:`~st_fast.ops.backends.drop_in_backend`, then
        :func:`~st_fast.ops.backends.resolve_backend`, which raises (RuntimeError, TypeError, ValueError) for a
        backend that cannot run there."""
        assert self.op is not None
        name, reason = drop_in_backend(asked, self.op)
        return resolve_backend(name, device, dtype, self.op, **inputs).name, reason


@dataclasses.dataclass(frozen=True)
class LossPlan:
    """What a fused loss will run on ``device`` with embeddings of ``dtype``, and why.

    asked: the loss's ``backend`` option. backend: the backend that runs (``"native"``, ``"triton"``, ``"torch"``),
        None where ``asked`` cannot run here (``error``). reason: why that is not the backend asked for (a drop-in
        loss computes with ``torch`` what its family's Triton kernels cannot decide as stock), else None.
    error: the exception :func:`~st_fast.ops.backends.resolve_backend` raised for ``asked`` here (RuntimeError,
        TypeError or ValueError), else None. stock_reason: why the stock method computes this configuration instead
        of the fused op (the loss's ``fallback_reason()``), None where the fused op computes it.
    """

    family: LossFamily
    asked: str
    device: torch.device
    dtype: torch.dtype
    backend: str | None
    reason: str | None = None
    error: Exception | None = None
    stock_reason: str | None = None

    @property
    def fused(self) -> bool:
        """True where the fused op computes (not the stock method)."""
        return self.stock_reason is None

    def runs(self) -> str:
        """The backend that runs. Raises ``error`` where ``asked`` cannot run here."""
        if self.error is not None:
            raise self.error
        assert self.backend is not None
        return self.backend


class StFastLoss:
    """Base of every st_fast loss: its family (class data) and its plan. A family's mixin sets ``family``,
    ``backend`` (a :class:`~st_fast.losses.stock_contract.BackendOption`) and ``self_check`` (a
    :class:`~st_fast.losses.self_check.SelfCheckOption`, or False) and defines ``fallback_reason()``; the trainer's
    swaps and report also read ``mask_duplicates`` / ``mask_duplicates_applies`` (MNRL) and ``_replaced_method``
    (``"calculate_loss"``: a cached loss whose loss stage st_fast computes) where a family has them."""

    family: ClassVar[LossFamily]
    backend: str
    self_check: bool

    def fallback_reason(self) -> str | None:
        """Why this configuration must be computed by the stock method (None: the fused op computes it)."""
        raise NotImplementedError

    def plan(self, device: torch.device, dtype: torch.dtype, **inputs: Any) -> LossPlan:
        """What this loss runs on ``device`` for embeddings of ``dtype``, and why; ``inputs``: the family's other
        dispatch inputs (:meth:`LossFamily.choose_backend`; the contrastive families: ``mask_dtype``, the dtype a
        family with guide masks decides them in, and ``mask_duplicates``, the call has text labels). Never raises
        for a backend that cannot run there: the plan carries the error (:meth:`LossPlan.runs` raises it)."""
        backend, reason, error = None, None, None
        try:
            backend, reason = self.family.choose_backend(self.backend, device, dtype, **inputs)
        except (RuntimeError, TypeError, ValueError) as exc:
            error = exc
        return LossPlan(
            self.family, self.backend, device, dtype, backend, reason, error, stock_reason=self.fallback_reason()
        )

    def training_plan(
        self, device: torch.device, embedding_dtype: Callable[[torch.nn.Module | None], torch.dtype]
    ) -> LossPlan:
        """The plan for training on ``device``: ``embedding_dtype(model)`` is the dtype a model's embeddings have in
        training (``None``: the trainer's model). The embeddings are this loss's ``model``'s."""
        dtype = embedding_dtype(getattr(self, "model", None))
        return self.plan(device, dtype, mask_duplicates=bool(getattr(self, "mask_duplicates", False)))


def fused_modules(loss: Any) -> list[torch.nn.Module]:
    """The st_fast losses in ``loss`` (itself, or a wrapper's inner loss); [] for anything but an ``nn.Module``."""
    if not isinstance(loss, torch.nn.Module):
        return []
    return [module for module in loss.modules() if isinstance(module, StFastLoss)]
