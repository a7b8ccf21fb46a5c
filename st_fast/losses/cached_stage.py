"""Shared steps of the cached (GradCache) loss stages: joining the cached mini-batches of a column, the single
backward that writes every cached embedding's ``.grad``, and the fused ``calculate_loss`` under per-instance
decorations (MatryoshkaLoss's CachedLossDecorator)."""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def concatenate_mini_batches(mini_batches: list[Tensor]) -> Tensor:
    """One column's cached embeddings (each (mb, D)) as one (B, D) tensor, differentiable back to each piece."""
    return mini_batches[0] if len(mini_batches) == 1 else torch.cat(mini_batches)


def finish_loss_stage(loss: Tensor, with_backward: bool) -> Tensor:
    """With ``with_backward``: back-propagate the fused loss once into the cached embeddings (and a learnable
    scale / temperature) and return it detached (the GradCache contract of ``calculate_loss``); otherwise return
    it as it is."""
    if not with_backward:
        return loss
    loss.backward()
    return loss.detach()


class fused_loss_stage:  # noqa: N801 (used as a method decorator)
    """Decorates a fused ``calculate_loss`` so that a per-instance decoration of ``calculate_loss`` (MatryoshkaLoss
    stores a ``CachedLossDecorator`` wrapping the bound method in the loss's ``__dict__``) wraps the fused method.

    A fused loss made by :func:`st_fast.losses.fuse` shares its ``__dict__`` with the stock object, whose
    decoration wraps the stock method; as a data descriptor this takes precedence over that entry and returns a
    copy of the decoration around the fused method (the stock object keeps its own). Decorations may be nested, each
    wrapping the next through its ``fn`` (sentence-transformers >= 6.3 decorates the cached loss inside a wrapper:
    ``MatryoshkaLoss(MatryoshkaLoss(CachedMultipleNegativesRankingLoss(...)))`` puts one decoration around the
    other): every layer is copied, the innermost around the fused method. Assignments store into the ``__dict__``
    as for a plain method."""

    _MAX_LAYERS = 64  # a cycle of decorations (not made by any stock code) is left as it is

    def __init__(self, function: Callable) -> None:
        self.function = function
        self.name = function.__name__
        functools.update_wrapper(self, function)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self.function
        bound = types.MethodType(self.function, obj)
        decoration = obj.__dict__.get(self.name)
        if decoration is None:
            return bound
        layers = [decoration]  # outermost first; each layer's `fn` is the next one, the last one's a bound method
        inner = getattr(decoration, "fn", None)
        while inner is not None and not isinstance(inner, types.MethodType) and hasattr(inner, "fn"):
            if len(layers) >= self._MAX_LAYERS:
                return decoration
            layers.append(inner)
            inner = inner.fn
        owner = getattr(inner, "__self__", None)
        if getattr(owner, "__dict__", None) is not obj.__dict__ or getattr(inner, "__func__", None) is self.function:
            return decoration  # around this fused method already, or around something else: as it is
        rebound: Any = bound
        for layer in reversed(layers):
            layer = copy.copy(layer)
            layer.fn = rebound
            rebound = layer
        return rebound

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = value
