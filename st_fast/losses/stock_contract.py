"""The drop-in contract of the fused losses, read from the live stock object at call time.

A fused loss is the stock object under a subclass that replaces one method (``compute_loss_from_embeddings``,
``calculate_loss`` or ``forward``). Everything that method's result depends on is read when it is called, from the
stock attributes and the stock modules, never from a copy taken earlier:

* :func:`stock_helper`: module-level helpers (``all_gather_with_grad``, ``get_rank``, ``batch_to_device``) are looked
  up in the module of the stock class whose method is replaced, so code that replaces them there (as tests and
  distributed wrappers do) reaches the fused loss too;
* :func:`scalar_problem`: a configuration scalar (scale, temperature, margin, hardness strength) may be a number or a
  one-element tensor; the fused ops give a learnable scale / temperature its gradient;
* :func:`stock_dtype`: the dtype stock returns (it depends on the embeddings' dtype, autocast and the scalars'
  types) is found by running stock's own dtype-deciding operations on one-element slices, cached per configuration;
* :func:`warn_stock_fallback_once`: a case the fused op cannot compute exactly is computed by the stock method, with
  one warning per loss class and reason.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

logger = logging.getLogger("st_fast.losses")

_warned: set[tuple[str, str]] = set()
_dtype_cache: dict[Hashable, torch.dtype] = {}


def stock_helper(loss: Any, method: str, name: str) -> Callable:
    """The function ``name`` as the stock implementation of ``loss.<method>`` sees it now: looked up in the module
    of the sentence-transformers class that defines ``method``, falling back to ``sentence_transformers.util``."""
    for klass in type(loss).__mro__:
        if klass.__module__.startswith("sentence_transformers.") and method in vars(klass):
            helper = getattr(sys.modules[klass.__module__], name, None)
            if helper is not None:
                return helper
            break
    from sentence_transformers import util

    return getattr(util, name)


def scalar_problem(name: str, value: Any, *, differentiable: bool) -> str | None:
    """Why the configuration scalar ``name`` cannot be fused (None when it can): the fused ops take a real number
    or a one-element tensor, and give a gradient only to the scalars whose ``differentiable`` is True."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return f"{name} is a tensor of shape {tuple(value.shape)}, not a scalar"
        if value.requires_grad and not differentiable and torch.is_grad_enabled():
            return f"{name} is a tensor that requires grad"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} is a {type(value).__name__}, not a number"
    return None


def positive_problem(name: str, value: Any) -> str | None:
    """Why ``value`` (a number or a one-element tensor) cannot be the fused ops' ``scale`` / ``temperature`` (None
    when it can): they take positive values only; stock computes any (0: a uniform softmax, negative: an inverted
    one, NaN: a NaN loss). For a CUDA tensor this reads its value (one host sync, as the op's own check does)."""
    positive = bool((value.detach() > 0).all()) if isinstance(value, torch.Tensor) else value > 0
    return None if positive else f"{name}={float(value)} is not positive"


def stock_only_layout(embeddings: Sequence[Any]) -> str | None:
    """Why the embedding columns are a layout only stock computes (None for the fused layout: every column 2-D with
    the anchors' rows, at least one row): an empty batch (stock: a NaN loss) or candidate columns with other row
    counts than the anchors (stock scores every candidate row; row i's positive is row i). Malformed inputs (1-D,
    mixed dtypes or devices) are left to the fused op's clear errors."""
    if len(embeddings) < 2 or not all(isinstance(e, torch.Tensor) and e.dim() == 2 for e in embeddings):
        return None
    rows = embeddings[0].shape[0]
    if rows == 0:
        return "an empty batch (0 anchor rows)"
    if any(e.shape[0] != rows for e in embeddings[1:]):
        shapes = ", ".join(str(tuple(e.shape)) for e in embeddings)
        return f"candidate columns with other row counts than the anchors ({shapes})"
    return None


@contextlib.contextmanager
def subclassing_deprecated_stock() -> Iterator[None]:
    """Define st_fast's subclasses of a stock class marked ``@typing_extensions.deprecated`` (the symmetric aliases)
    inside this block: the decorator warns at subclass creation, i.e. at ``import st_fast.losses``, where a user who
    never touches those classes (and runs with ``-W error::DeprecationWarning``) would get stock's warning. Only that
    warning is ignored; the subclasses warn when instantiated, as stock's do (:func:`warn_deprecated_like_stock`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The \w+ is deprecated and will be removed", category=DeprecationWarning
        )
        yield


def warn_deprecated_like_stock(stock_class: type) -> None:
    """Give the DeprecationWarning that instantiating ``stock_class`` gives (its ``@deprecated`` message), from the
    ``__init__`` of an st_fast subclass: the decorator warns only for the decorated class itself."""
    message = getattr(stock_class, "__deprecated__", None)
    if message:
        warnings.warn(message, DeprecationWarning, stacklevel=3)


def warn_once(loss: Any, message: str) -> None:
    """Log ``message`` about ``loss`` once per loss class and message."""
    key = (type(loss).__name__, message)
    if key not in _warned:
        _warned.add(key)
        logger.warning("st_fast %s: %s", *key)


def warn_stock_fallback_once(loss: Any, reason: str) -> None:
    """Log (once per loss class and reason) that ``loss`` computes this call with the stock implementation."""
    warn_once(
        loss,
        f"{reason}; computing this loss with the stock sentence-transformers implementation (same result, no "
        "st_fast speed-up).",
    )


def scalar_kind(value: Any) -> Hashable:
    """What of a scalar decides the dtypes it promotes to: its tensor dtype, or its Python type."""
    return value.dtype if isinstance(value, torch.Tensor) else type(value)


def autocast_state(device_type: str) -> tuple[bool, torch.dtype | None]:
    if not torch.is_autocast_enabled(device_type):
        return (False, None)
    return (True, torch.get_autocast_dtype(device_type))


def stock_dtype(key: Hashable, probe: Callable[[], torch.dtype]) -> torch.dtype:
    """``probe()`` (stock's dtype-deciding operations on one-element inputs, run without grad), cached by ``key``,
    which must name everything the result depends on (the probe's callables, dtypes, device type, autocast)."""
    dtype = _dtype_cache.get(key)
    if dtype is None:
        with torch.no_grad():
            dtype = _dtype_cache[key] = probe()
    return dtype


class BoolOption:
    """A bool attribute of the fused losses: validated on assignment (TypeError for anything but a bool),
    ``default`` until set (also on instances built without ``__init__``, e.g. by :func:`st_fast.losses.fuse`),
    stored in the instance's ``__dict__`` under ``key``."""

    def __init__(self, name: str, key: str, default: bool) -> None:
        self.name, self.key, self.default = name, key, default

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.key, self.default)

    def __set__(self, obj: Any, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{self.name} must be a bool, got {type(value).__name__}")
        obj.__dict__[self.key] = value


class BackendOption:
    """The ``backend`` attribute of the fused losses: validated on assignment, ``"auto"`` until set (also on
    instances built without ``__init__``, e.g. ``cls.__new__(cls)``), stored under a private name.

    With ``triton_kernels`` (the loss computes ``"triton"`` with the Triton kernels), ``"triton"`` where triton is
    not importable raises RuntimeError at the assignment (the constructor, :func:`st_fast.losses.fuse`), not at the
    first call; whether the kernels run on the embeddings' device is only known then."""

    def __init__(self, choices: tuple[str, ...], *, triton_kernels: bool = True) -> None:
        self.choices = choices
        self.triton_kernels = triton_kernels

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get("_st_fast_backend", "auto")

    def __set__(self, obj: Any, value: str) -> None:
        if value not in self.choices:
            raise ValueError(f"backend must be one of {self.choices}, got {value!r}")
        if value == "triton" and self.triton_kernels:
            from st_fast.ops import triton_lse

            if triton_lse._TRITON_IMPORT_ERROR is not None:
                raise RuntimeError(triton_lse.triton_unavailable_reason("cuda") + ' (pip install "st-fast[triton]")')
        obj.__dict__["_st_fast_backend"] = value
