"""The first-use self-check of the fused losses against the installed stock code.

A version number cannot tell that a patch release changed a mask, so each fused loss proves itself the first time
it computes a configuration in a process: it takes a few rows of every column of the call's own embeddings (the
user's data) plus a small seeded random batch of the same widths, computes the loss and its embedding gradients
both ways on them — st_fast's op (the backend the call would use) and the stock class's own method as it is at call
time (:func:`stock_function`, on a shallow copy of the loss: :func:`stock_view`) — and compares them:

    |fused - stock64| <= 8·|stock32 - stock64| + 64·eps32·max(1, |stock64|)

for the loss and, element-wise in the max norm, for the gradients (scaled by max|grad64|), where stock64 / stock32
are stock's results in float64 / float32: the bound is stock's own float32 error plus a floor of a few float32
roundings. The random batch has 4 unit rows and a row whose anchor equals its positive, so a degenerate slice of the
call (one row, a saturated softmax: zero gradients) cannot make the check pass alone: a comparison whose gradients
are all zero on both sides proves nothing (inconclusive: the call is computed by st_fast and the next call checks
again), one whose float64 loss is not finite, or where stock cannot run, is a mismatch.

On a mismatch the loss computes that configuration with the stock method from then on (:func:`failed`), with one
warning naming the loss, the configuration and the installed sentence-transformers version. Results are cached per
loss class, stock method and configuration (:func:`configuration_key`). With ``gather_across_devices`` every rank
checks its own slice without gathering, then the ranks agree with one ``all_reduce`` that every rank makes at the
same (first) call, so no rank computes stock while another computes st_fast.

``loss.self_check = False`` (or ``st_fast={"self_check": False}`` in the trainer / :func:`st_fast.patch`) turns it
off for a loss.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from st_fast.losses.stock_contract import BoolOption

logger = logging.getLogger("st_fast.losses")

SLICE_ROWS = 5  # rows of the call's own batch compared
RANDOM_ROWS = 4  # rows of the seeded random batch compared
_LOSS_FACTOR, _FLOOR_EPS = 8.0, 64.0
_OPTION = "_st_fast_self_check"
_RESULT = "_st_fast_self_check_result"


@dataclass(frozen=True)
class CheckResult:
    """One configuration's verdict: ``passed`` and a short human-readable ``detail`` (the largest errors)."""

    passed: bool
    detail: str
    conclusive: bool = True  # False: equal on rows that prove nothing (zero gradients); never a pass by itself

    def describe(self) -> str:
        if not self.conclusive:
            return "inconclusive so far (st_fast computes; checked again on the next batch): " + self.detail
        return ("passed: " if self.passed else "MISMATCH, computing stock: ") + self.detail


_results: dict[Hashable, CheckResult] = {}


class SelfCheckOption(BoolOption):
    """The ``self_check`` attribute of the fused losses: a bool, True until set (also on instances built without
    ``__init__``, e.g. by :func:`st_fast.losses.fuse`), stored under a private name."""

    def __init__(self) -> None:
        super().__init__("self_check", _OPTION, True)


def stock_function(loss: Any, method: str) -> Callable:
    """The function of the sentence-transformers class that defines ``method`` for ``loss``'s class, as it is now
    (a test or a patch release that replaces it is what the check compares with)."""
    for klass in type(loss).__mro__:
        if klass.__module__.startswith("sentence_transformers.") and method in vars(klass):
            return vars(klass)[method]
    raise TypeError(f"{type(loss).__name__} has no sentence-transformers base class defining {method}")


def stock_view(loss: Any, **overrides: Any) -> Any:
    """A shallow copy of ``loss`` (its own attribute dict and submodule dict) with ``overrides`` set, so that the
    stock method can run on it with, e.g., gathering off or stand-in encoders, leaving ``loss`` untouched."""
    view = copy.copy(loss)
    view.__dict__ = dict(loss.__dict__)
    view._modules = dict(loss._modules)
    for name, value in overrides.items():
        if name in view._modules:
            view._modules[name] = value
        else:
            view.__dict__[name] = value
    return view


def installed_version() -> str:
    import sentence_transformers

    return getattr(sentence_transformers, "__version__", "unknown")


def configuration_key(loss: Any, method: str, config: dict[str, Any]) -> Hashable:
    """The cache key of one configuration: the loss class, the stock method's identity and ``config`` (plain values;
    tensors by dtype, so that a learnable scale is checked once, not at every step)."""

    def plain(value: Any) -> Hashable:
        if isinstance(value, Tensor):
            return ("tensor", value.dtype, tuple(value.shape))
        if isinstance(value, (list, tuple)):
            return tuple(plain(v) for v in value)
        try:
            hash(value)
        except TypeError:
            return repr(value)
        return value

    stock = stock_function(loss, method)
    settings = tuple(sorted((name, plain(value)) for name, value in config.items()))
    return (type(loss).__qualname__, stock, *settings)  # the function itself: an id could be reused


def failed(loss: Any, key: Hashable) -> bool:
    """Whether the configuration ``key`` of ``loss`` was checked and must be computed by stock."""
    result = _results.get(key)
    return result is not None and not result.passed


def verdict(loss: Any) -> CheckResult | None:
    """The verdict of ``loss``'s last checked configuration (None: off, or not run yet)."""
    return loss.__dict__.get(_RESULT) if loss.self_check else None


def last_result(loss: Any) -> str:
    """The report's phrase for ``loss``: what its self-check found (or that it is off / has not run yet)."""
    if not loss.self_check:
        return "self-check off"
    result = loss.__dict__.get(_RESULT)
    return "self-check not run yet (runs on the first batch)" if result is None else "self-check " + result.describe()


def _leaves(tensors: Sequence[Tensor], dtype: torch.dtype, grad: bool) -> list[Tensor]:
    return [t.detach().clone().to(dtype).requires_grad_(grad) for t in tensors]  # clone: no inference tensor


def _evaluate(fn: Callable, columns: Sequence[Tensor], guides: Sequence[Tensor], dtype: torch.dtype):
    """(loss, flat embedding gradient) of ``fn(columns, guides)`` in ``dtype``, float64 results."""
    xs = _leaves(columns, dtype, True)
    gs = _leaves(guides, dtype, False)
    with torch.enable_grad():
        loss = fn(xs, gs)
        grads = torch.autograd.grad(loss, xs, allow_unused=True) if loss.requires_grad else [None] * len(xs)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, xs, strict=True)]
    flat = torch.cat([g.double().flatten() for g in grads])
    return loss.detach().double(), flat


def _compare(fused: Callable, stock: Callable, columns: Sequence[Tensor], guides: Sequence[Tensor]) -> CheckResult:
    try:
        loss64, grad64 = _evaluate(stock, columns, guides, torch.float64)
        loss32, grad32 = _evaluate(stock, columns, guides, torch.float32)
    except Exception as exc:  # noqa: BLE001 (nothing proven: the call is left to stock, which will say what it says)
        return CheckResult(False, f"the stock method could not run on the check's rows ({exc!r})")
    if not torch.isfinite(loss64) or not torch.isfinite(grad64).all():
        return CheckResult(False, f"stock's float64 loss is not finite ({float(loss64)})")
    loss_f, grad_f = _evaluate(fused, columns, guides, torch.float32)
    eps = torch.finfo(torch.float32).eps
    scale = float(grad64.abs().max())
    loss_error, loss_bound = float((loss_f - loss64).abs()), float((loss32 - loss64).abs())
    loss_bound = _LOSS_FACTOR * loss_bound + _FLOOR_EPS * eps * max(1.0, abs(float(loss64)))
    grad_error, grad_bound = float((grad_f - grad64).abs().max()), float((grad32 - grad64).abs().max())
    grad_bound = _LOSS_FACTOR * grad_bound + _FLOOR_EPS * eps * max(scale, float(grad_f.abs().max()))
    detail = f"loss {float(loss_f):.6g} vs stock {float(loss64):.6g} (|diff| {loss_error:.1e}, bound {loss_bound:.1e})"
    detail += f", max |grad diff| {grad_error:.1e} (bound {grad_bound:.1e})"
    agree = loss_error <= loss_bound and grad_error <= grad_bound
    if agree and scale == 0.0 and float(grad_f.abs().max()) == 0.0:
        # equal, but on rows that prove little (one row, a saturated softmax): neither a pass nor a mismatch
        return CheckResult(False, "every embedding gradient is zero on these rows: " + detail, conclusive=False)
    return CheckResult(agree, detail)


def random_columns(columns: Sequence[Tensor], rows: int = RANDOM_ROWS, seed: int = 0) -> list[Tensor]:
    """A seeded random batch of ``rows`` rows with the widths of ``columns``: positives near their anchors, and
    row 0's positive equal to its anchor (the self-negative case)."""
    generator = torch.Generator().manual_seed(seed)
    anchor = torch.randn(rows, columns[0].shape[-1], generator=generator, dtype=torch.float64)
    out = [anchor]
    for index, column in enumerate(columns[1:]):
        noise = torch.randn(rows, column.shape[-1], generator=generator, dtype=torch.float64)
        x = (0.5 * anchor + noise) if (index == 0 and column.shape[-1] == anchor.shape[-1]) else noise
        if index == 0 and column.shape[-1] == anchor.shape[-1]:
            x[0] = anchor[0]
        out.append(x)
    # unit rows: with dot_score at a large scale, rows of norm ~sqrt(D) would saturate the softmax (zero gradients)
    return [F.normalize(x, dim=-1).to(column.device) for x, column in zip(out, columns, strict=True)]


def check(
    loss: Any,
    key: Hashable,
    configuration: str,
    columns: Sequence[Tensor],
    fused: Callable,
    stock: Callable,
    guides: Sequence[Tensor] = (),
    gathered: bool = False,
) -> CheckResult:
    """Run (once per ``key``) the comparison of ``fused`` and ``stock`` (each ``fn(columns, guides) -> loss``) on
    the first :data:`SLICE_ROWS` rows of ``columns`` / ``guides`` and on a random batch of the same widths, record the
    verdict, agree across ranks when ``gathered``, and warn once on a mismatch. Returns the verdict."""
    result = _results.get(key)
    if result is None:
        rows = min(SLICE_ROWS, columns[0].shape[0])
        user = ([c[:rows] for c in columns], [g[:rows] for g in guides])
        synthetic = (random_columns(columns), random_columns(guides, seed=1) if guides else [])
        # (under torch.inference_mode too: evaluation loops may run the loss there)
        with torch.inference_mode(False), torch.autocast(columns[0].device.type, enabled=False):
            verdicts = [_compare(fused, stock, *user), _compare(fused, stock, *synthetic)]
        failing = [v for v in verdicts if v.conclusive and not v.passed]
        passing = [v for v in verdicts if v.passed]
        result = failing[0] if failing else passing[0] if passing else verdicts[0]
        if gathered:
            result = _agree_across_ranks(result, columns[0].device)
        if result.conclusive:  # an inconclusive call is checked again at the next one
            _results[key] = result
        if result.conclusive and not result.passed:
            logger.warning(
                "st_fast self-check: %s with %s does not match the installed sentence-transformers %s (%s); this "
                "configuration is computed by the stock implementation from now on (same result as stock, no "
                "st_fast speed-up). Please report it to st_fast.",
                type(loss).__name__, configuration, installed_version(), result.detail,
            )  # fmt: skip
    loss.__dict__[_RESULT] = result
    return result if result.conclusive else CheckResult(True, result.detail, conclusive=False)


def run(loss: Any, columns: Sequence[Tensor], guides: Sequence[Tensor] = ()) -> CheckResult:
    """:func:`check` for a fused loss with the self-check hooks (``self_check_config``, ``fused_on_embeddings``,
    ``stock_on_embeddings``, ``_replaced_method``): its configuration key and description, gathering from
    ``gather_across_devices``."""
    config = loss.self_check_config(columns)
    key = configuration_key(loss, loss._replaced_method, config)
    described = ", ".join(f"{name}={value!r}" for name, value in config.items())
    return check(
        loss, key, described, columns, loss.fused_on_embeddings, loss.stock_on_embeddings, guides,
        gathered=bool(loss.gather_across_devices),
    )  # fmt: skip


def _agree_across_ranks(result: CheckResult, device: torch.device) -> CheckResult:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return result
    # 2: passed, 1: inconclusive, 0: mismatch; the ranks take the lowest, so that all compute the same way
    code = 2 if result.passed else (1 if not result.conclusive else 0)
    flag = torch.tensor([code], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    agreed = int(flag.item())
    if agreed == code:
        return result
    if agreed == 0:
        return CheckResult(False, "another rank's self-check found a mismatch")
    return CheckResult(False, "another rank's self-check was inconclusive", conclusive=False)
