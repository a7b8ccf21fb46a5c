"""The row kernel in PyTorch: readable reference of the per-row math that the native C++/CUDA kernel implements.

For a chunk of rows with global indices g = g0 .. g0+n-1, given the raw similarities of each selected segment
(``scores[x]``: (n, L_x) fp32, laid out as in :mod:`st_fast.ops.layout`):

    logits_x = scale · s_x (+ alpha · s_x on Q2D's penalized entries), masked entries = -inf
    lse_x    = logsumexp(logits_x)                       per row
    log_z    = logsumexp_x(lse_x)  (joint)   or   mean_x(lse_x)  (per_direction)
    loss_r   = log_z - scale · s_q2d[r, g]               (the positive is never penalized)

With ``grad_scale`` given, each ``scores[x]`` is overwritten by d(grad_scale · Σ_r loss_r)/d s_x:

    G_x = grad_scale · scale · w_x · exp(logits_x - ref_x),   G_q2d[r, g] -= grad_scale · scale

with ref_x = log_z, w_x = 1 (joint) or ref_x = lse_x, w_x = 1/#segments (per_direction); masked entries get 0.
"""

from __future__ import annotations

import torch

from st_fast.ops.layout import HardnessKind, SegmentKind
from st_fast.ops.spec import ContrastiveSpec


def segment_mask_and_penalty(
    kind: SegmentKind, n_cols: int, rows_global: torch.Tensor, width: int, spec: ContrastiveSpec
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(masked, penalized) boolean (n, L) matrices of one segment, or None where nothing is masked/penalized."""
    cols = torch.arange(n_cols, device=rows_global.device)
    g = rows_global[:, None]
    masked = penalized = None
    if kind == SegmentKind.Q2Q:
        masked = cols[None, :] == g
    elif kind == SegmentKind.D2D:
        masked = (cols % width)[None, :] == g
    elif kind == SegmentKind.Q2D and spec.hardness != HardnessKind.NONE:
        own = (cols % width)[None, :] == g
        if spec.hardness == HardnessKind.IN_BATCH:
            penalized = ~own
        elif spec.hardness == HardnessKind.HARD:
            penalized = own & (cols >= width)[None, :]
        else:  # ALL
            penalized = cols[None, :] != g
    return masked, penalized


def torch_row_kernel(
    scores: list[torch.Tensor],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float | None,
) -> torch.Tensor:
    """Per-row losses (n,) fp32 of a chunk; overwrites ``scores`` with gradient coefficients when ``grad_scale``
    is not None. ``scores[x]`` belongs to ``spec.kinds[x]``."""
    n = scores[0].shape[0]
    rows_global = torch.arange(row_start, row_start + n, device=scores[0].device)
    logits, masks = [], []
    for kind, s in zip(spec.kinds, scores, strict=True):
        masked, penalized = segment_mask_and_penalty(kind, s.shape[1], rows_global, width, spec)
        logit = s * spec.scale
        if penalized is not None:
            logit = logit + spec.alpha * s * penalized
        if masked is not None:
            logit = logit.masked_fill(masked, float("-inf"))
        logits.append(logit)
        masks.append(masked)
    lses = torch.stack([torch.logsumexp(logit, dim=1) for logit in logits])  # (segments, n)
    log_z = torch.logsumexp(lses, dim=0) if spec.joint else lses.mean(dim=0)
    local = torch.arange(n, device=scores[0].device)
    positive = spec.scale * scores[0][local, rows_global]  # kinds[0] is always Q2D
    row_loss = log_z - positive
    if grad_scale is not None:
        for x, (s, logit, masked) in enumerate(zip(scores, logits, masks, strict=True)):
            ref = log_z if spec.joint else lses[x]
            weight = grad_scale * spec.scale * (1.0 if spec.joint else 1.0 / len(scores))
            coefficient = torch.exp(logit - ref[:, None]) * weight
            if masked is not None:
                coefficient = coefficient.masked_fill(masked, 0.0)
            s.copy_(coefficient)
        scores[0][local, rows_global] -= grad_scale * spec.scale
    return row_loss
