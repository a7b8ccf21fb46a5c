"""The row kernel in PyTorch: readable reference of the per-row math that the native C++/CUDA kernel implements.

For a chunk of rows with global indices g = g0 .. g0+n-1, given the raw scores of each selected segment
(``scores[x]``: (n, L_x) fp32, laid out as in :mod:`st_fast.ops.layout`) and optional scales (the inverse norms of
cosine similarity, applied here instead of normalizing the GEMM operands):

    s_x      = scores_x · (row_scale_x[:, None] · col_scale_x[None, :])     (a missing scale is 1)
    logits_x = scale · s_x (+ alpha · s_x on Q2D's penalized entries), masked entries = -inf
    lse_x    = logsumexp(logits_x)                       per row
    log_z    = logsumexp_x(lse_x)  (joint)   or   mean_x(lse_x)  (per_direction)
    loss_r   = log_z - scale · s_q2d[r, g]               (the positive is never penalized)

With ``grad_scale`` given, ``coefficients[x]`` (default: ``scores[x]`` itself) receives
d(grad_scale · Σ_r loss_r)/d scores_x:

    C_x = grad_scale · scale · (w_x · exp(logits_x - ref_x) - p_x · onehot_x) · row_scale_x[:, None] · col_scale_x[None]

with ref_x = log_z, w_x = 1 (joint) or ref_x = lse_x, w_x = 1/#segments (per_direction), onehot_x = 1 at [r, g] and 0
elsewhere; masked entries get 0. float16 coefficients saturate at ±65504. The positive's one-hot term is spread evenly,
p_x = 1/#holders, over the segments whose column g holds the positive pair's score: Q2D, and in per_direction also
D2Q (s_d2q[r, g] = s(d_g, q_g), the same function of the embeddings, so the split is exact). Stock's per_direction has
every direction hold the positive, so there p_x = w_x: each direction's coefficients are its own softmax minus one-hot,
and a coefficient that is 0 in exact math (B = 1: a single-column softmax) comes out as w·1 - w = 0 instead of -w/2 in
Q2D and +w/2 in D2Q, which leave a rounding residue once the gradient GEMMs add up their products with the embeddings.

The two passes of the symmetric path (:func:`torch_row_statistics`, :func:`torch_row_coefficients`; contract in
:mod:`st_fast.ops.row_kernel`) use the same logits; the D2Q logits of the positive block's column j are
scale · s_q2d[:, begin + j] (no penalty, nothing masked), and the coefficient of a block entry [r, begin + j] adds
w · exp(scale · s - column_ref_j), with the D2Q share of the one-hot term (per_direction) on the diagonal.
"""

from __future__ import annotations

import torch

from st_fast.ops.layout import HardnessKind, SegmentKind
from st_fast.ops.mnrl.spec import ContrastiveSpec
from st_fast.ops.row_kernel import DuplicateLabels, PositiveBlock, RowKernel, SegmentScales, combine_partitions

FLOAT16_MAX = 65504.0


def _apply_scales(s: torch.Tensor, scales: SegmentScales | None) -> torch.Tensor:
    """s · (row_scale ⊗ col_scale): the scale product commutes, so a score and its transpose (Q2D vs D2Q) agree."""
    return s if scales is None else s * (scales.rows[:, None] * scales.columns[None, :])


def segment_mask_and_penalty(
    kind: SegmentKind,
    n_cols: int,
    rows_global: torch.Tensor,
    width: int,
    spec: ContrastiveSpec,
    column_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(masked, penalized) boolean (n, L) matrices of one segment, or None where nothing is masked/penalized;
    ``column_labels`` (L,): mask_duplicates' labels of the segment's columns (see :mod:`st_fast.ops.layout`)."""
    cols = torch.arange(n_cols, device=rows_global.device)
    g = rows_global[:, None]
    masked = penalized = None
    if kind == SegmentKind.OWN_MASKED:
        masked = cols[None, :] == g
    elif kind == SegmentKind.OWN_GROUP_MASKED:
        masked = (cols % width)[None, :] == g
    elif kind == SegmentKind.OWN_POSITIVE and spec.hardness != HardnessKind.NONE:
        own = (cols % width)[None, :] == g
        if spec.hardness == HardnessKind.IN_BATCH:
            penalized = ~own
        elif spec.hardness == HardnessKind.HARD:
            penalized = own & (cols >= width)[None, :]
        else:  # ALL
            penalized = cols[None, :] != g
    if column_labels is not None:
        duplicate = (column_labels[None, :] == column_labels[rows_global][:, None]) & (cols[None, :] != g)
        masked = duplicate if masked is None else masked | duplicate
    return masked, penalized


def _block_duplicates(
    labels: DuplicateLabels | None, rows_global: torch.Tensor, block: PositiveBlock
) -> torch.Tensor | None:
    """(n, block.count) True where the block entry leaves the D2Q (column) softmax, None without labels."""
    if labels is None:
        return None
    columns = torch.arange(block.begin, block.begin + block.count, device=rows_global.device)
    query_labels = labels.queries
    same = query_labels[rows_global][:, None] == query_labels[columns][None, :]
    return same & (rows_global[:, None] != columns[None, :])


def _segment_labels(labels: DuplicateLabels | None, count: int) -> list[torch.Tensor | None]:
    return [None] * count if labels is None else list(labels.segments)


def holds_positive(kind: SegmentKind, spec: ContrastiveSpec) -> bool:
    """Whether column g of the segment's row r holds the positive pair's score and so takes a share of the one-hot
    term: Q2D always, D2Q in per_direction (in joint it is one more entry of the single softmax)."""
    return kind == SegmentKind.OWN_POSITIVE or (not spec.joint and kind == SegmentKind.PLAIN)


def _segment_logits(
    scores: list[torch.Tensor],
    kinds: tuple[SegmentKind, ...],
    spec: ContrastiveSpec,
    rows_global: torch.Tensor,
    width: int,
    scales: list[SegmentScales | None],
    labels: DuplicateLabels | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """(similarities, logits, masks) of each segment: s with its scales, scale·s (+ the penalty, -inf where masked)."""
    similarities, logits, masks = [], [], []
    segment_labels = _segment_labels(labels, len(scores))
    for kind, raw, segment_scales, column_labels in zip(kinds, scores, scales, segment_labels, strict=True):
        s = _apply_scales(raw, segment_scales)
        masked, penalized = segment_mask_and_penalty(kind, s.shape[1], rows_global, width, spec, column_labels)
        logit = s * spec.scale
        if penalized is not None:
            logit = logit + spec.alpha * s * penalized
        if masked is not None:
            logit = logit.masked_fill(masked, float("-inf"))
        similarities.append(s)
        logits.append(logit)
        masks.append(masked)
    return similarities, logits, masks


def _grad_weight(
    grad_scale: float | torch.Tensor, scale: float, multiplier: float = 1.0, divisor: float = 1.0
) -> float | torch.Tensor:
    """grad_scale · scale · multiplier / divisor: in float64, left to right, for a number; for a tensor (the
    power-of-two γ on the device, :func:`st_fast.ops.raw_16bit.coefficient_scale`) γ times the host part
    scale · multiplier / divisor, which rounds to the same float32 value (scaling by a power of two commutes with
    rounding)."""
    if isinstance(grad_scale, torch.Tensor):
        return grad_scale * (scale * multiplier / divisor)
    return grad_scale * scale * multiplier / divisor


def torch_row_kernel(
    scores: list[torch.Tensor],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float | torch.Tensor | None,
    scales: list[SegmentScales] | None = None,
    coefficients: list[torch.Tensor] | None = None,
    labels: DuplicateLabels | None = None,
) -> torch.Tensor:
    """Per-row losses (n,) fp32 of a chunk; writes the gradient coefficients into ``coefficients`` (default: over
    ``scores``) when ``grad_scale`` (a number, or a one-element tensor on the scores' device) is not None.
    ``scores[x]`` belongs to ``spec.kinds[x]``; ``labels``: duplicate masking
    (:class:`st_fast.ops.row_kernel.DuplicateLabels`)."""
    n = scores[0].shape[0]
    scales = scales or [None] * len(scores)
    rows_global = torch.arange(row_start, row_start + n, device=scores[0].device)
    similarities, logits, masks = _segment_logits(scores, spec.kinds, spec, rows_global, width, scales, labels)
    lses = torch.stack([torch.logsumexp(logit, dim=1) for logit in logits])  # (segments, n)
    log_z = combine_partitions(lses.T, spec.joint)
    local = torch.arange(n, device=scores[0].device)
    positive = spec.scale * similarities[0][local, rows_global]  # kinds[0] is always Q2D
    row_loss = log_z - positive
    if grad_scale is not None:
        outputs = scores if coefficients is None else coefficients
        holders = [holds_positive(kind, spec) for kind in spec.kinds]
        # with every segment a holder (per_direction) the same expression as the weight: weight·1 - share is exactly 0
        positive_share = _grad_weight(grad_scale, spec.scale, 1.0 / sum(holders))
        for x, (out, logit, masked) in enumerate(zip(outputs, logits, masks, strict=True)):
            ref = log_z if spec.joint else lses[x]
            weight = _grad_weight(grad_scale, spec.scale, 1.0 if spec.joint else 1.0 / len(scores))
            coefficient = torch.exp(logit - ref[:, None]) * weight
            if holders[x]:
                coefficient[local, rows_global] -= positive_share
            coefficient = _apply_scales(coefficient, scales[x])
            if masked is not None:
                coefficient = coefficient.masked_fill(masked, 0.0)
            if out.dtype == torch.float16:  # saturate as the native kernel does (inf · 0 would be NaN in a GEMM)
                coefficient = coefficient.clamp(-FLOAT16_MAX, FLOAT16_MAX)
            out.copy_(coefficient)
    return row_loss


def torch_row_statistics(
    scores: list[torch.Tensor],
    kinds: tuple[SegmentKind, ...],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    block: PositiveBlock,
    column_max: torch.Tensor,
    column_sum: torch.Tensor,
    scales: list[SegmentScales] | None = None,
    labels: DuplicateLabels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric path's statistics pass (:mod:`st_fast.ops.row_kernel`): (row LSEs (n, segments), positive
    logits (n,)), and the block's column statistics continued over this chunk's rows."""
    n = scores[0].shape[0]
    scales = scales or [None] * len(scores)
    rows_global = torch.arange(row_start, row_start + n, device=scores[0].device)
    similarities, logits, _ = _segment_logits(scores, kinds, spec, rows_global, width, scales, labels)
    row_lse = torch.stack([torch.logsumexp(logit, dim=1) for logit in logits], dim=1)
    positive = spec.scale * similarities[0][torch.arange(n, device=rows_global.device), rows_global]
    block_logits = spec.scale * similarities[0][:, block.begin : block.begin + block.count]
    column_masked = _block_duplicates(labels, rows_global, block)
    if column_masked is not None:
        block_logits = block_logits.masked_fill(column_masked, float("-inf"))
    top = torch.maximum(column_max, block_logits.max(dim=0).values)
    shift = torch.where(top == float("-inf"), 0.0, top)  # no entries yet: keep exp(-inf - shift) = 0
    column_sum.mul_(torch.exp(column_max - shift)).add_(torch.exp(block_logits - shift).sum(dim=0))
    column_max.copy_(top)
    return row_lse, positive


def torch_row_coefficients(
    scores: list[torch.Tensor],
    kinds: tuple[SegmentKind, ...],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float | torch.Tensor,
    block: PositiveBlock,
    row_ref: torch.Tensor,
    column_ref: torch.Tensor,
    scales: list[SegmentScales] | None = None,
    coefficients: list[torch.Tensor] | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: DuplicateLabels | None = None,
) -> None:
    """The symmetric path's coefficient pass (:mod:`st_fast.ops.row_kernel`): writes into ``coefficients``
    (default: over ``scores``) the row-softmax term, plus the column-softmax term on the positive block, minus the
    positive's one-hot shares (Q2D's, and D2Q's in per_direction) on the diagonal. ``factors`` (the native
    kernel's one-exp form of the column term, :func:`st_fast.ops.row_kernel.reference_factors`) are accepted and
    not used: the reference computes every column term with its own exp."""
    n = scores[0].shape[0]
    scales = scales or [None] * len(scores)
    rows_global = torch.arange(row_start, row_start + n, device=scores[0].device)
    local = torch.arange(n, device=rows_global.device)
    similarities, logits, masks = _segment_logits(scores, kinds, spec, rows_global, width, scales, labels)
    column_masked = _block_duplicates(labels, rows_global, block)
    weight = _grad_weight(grad_scale, spec.scale, divisor=1.0 if spec.joint else len(spec.kinds))
    share = _grad_weight(grad_scale, spec.scale, divisor=1.0 if spec.joint else 2.0)  # Q2D's, D2Q's one-hot shares
    outputs = scores if coefficients is None else coefficients
    for x, (kind, out, s, logit, masked) in enumerate(zip(kinds, outputs, similarities, logits, masks, strict=True)):
        coefficient = torch.exp(logit - row_ref[:, x, None]) * weight
        if masked is not None:  # the row term only: a block entry may be masked in one softmax and not the other
            coefficient = coefficient.masked_fill(masked, 0.0)
        if kind == SegmentKind.OWN_POSITIVE:
            columns = slice(block.begin, block.begin + block.count)
            column_term = torch.exp(spec.scale * s[:, columns] - column_ref[None, :]) * weight
            if column_masked is not None:
                column_term = column_term.masked_fill(column_masked, 0.0)
            coefficient[:, columns] += column_term
            coefficient[local, rows_global] -= share
            if not spec.joint:
                coefficient[local, rows_global] -= share
            if masked is not None:  # zero where both softmaxes leave the entry out (as the masked rows below)
                both = masked.clone()
                both[:, columns] &= column_masked if column_masked is not None else False
                masked = both
        coefficient = _apply_scales(coefficient, scales[x])
        if masked is not None:
            coefficient = coefficient.masked_fill(masked, 0.0)
        if out.dtype == torch.float16:
            coefficient = coefficient.clamp(-FLOAT16_MAX, FLOAT16_MAX)
        out.copy_(coefficient)


TORCH_ROW_KERNEL = RowKernel(torch_row_kernel, torch_row_statistics, torch_row_coefficients)
