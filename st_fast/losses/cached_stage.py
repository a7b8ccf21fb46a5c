"""Shared steps of the cached (GradCache) loss stages: joining the cached mini-batches of a column, and the single
backward that writes every cached embedding's ``.grad``."""

from __future__ import annotations

import torch
from torch import Tensor


def concatenate_mini_batches(mini_batches: list[Tensor]) -> Tensor:
    """One column's cached embeddings (each (mb, D)) as one (B, D) tensor, differentiable back to each piece."""
    return mini_batches[0] if len(mini_batches) == 1 else torch.cat(mini_batches)


def finish_loss_stage(loss: Tensor, with_backward: bool) -> Tensor:
    """With ``with_backward``: back-propagate the fused loss once into the cached embeddings and return it detached
    (the GradCache contract of ``calculate_loss``); otherwise return it as it is."""
    if not with_backward:
        return loss
    loss.backward()
    return loss.detach()
