"""The validated wrappers of the contrastive row kernel's native entry points (csrc/include/st_fast/row_kernel_*.h):
the row kernel of the ``native`` backend, C++ (CPU, OpenMP over rows) or CUDA (one warp per row).

Each wrapper takes plain values (tensors, ints, floats, :class:`~st_fast._native.SegmentKind` /
:class:`~st_fast._native.HardnessKind` codes), checks shape, dtype, device and contiguity of every tensor, then fills
its entry point's argument object by field name (csrc/include/st_fast/row_kernel_calls.h) and runs it through
:func:`st_fast._native.run_row_entry`. The translation from the ops' specs to these values is the caller's
(st_fast/ops/row_kernel_native.py).

Common arguments: ``scores``, one contiguous fp32 (rows, length) tensor per segment on one device; ``kinds``, one
SegmentKind per segment (the first OWN_POSITIVE); ``row_start``, the global row of local row 0; ``width``, the column
block width W; ``scale``, the logits' scale; ``row_scales`` / ``col_scales``, None or one fp32 (rows,) / (length,)
tensor per segment (s = v · row_scale · col_scale); ``labels``, None or one int32 (length,) tensor per segment
(mask_duplicates), with ``query_labels`` the int32 labels of the positive block's column softmax (two-pass entry
points); ``block_begin`` / ``block_count``, the positive block's columns of segment 0 (two-pass entry points).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from st_fast import _native
from st_fast._native import STORE_DTYPES, HardnessKind, SegmentKind


def _check_segments(scores: Sequence[torch.Tensor], coefficients: Sequence[torch.Tensor] | None) -> torch.dtype | None:
    """Checks the score segments (contiguous fp32, one device, one row count) and the coefficient outputs (one
    dtype, shaped as the scores); returns the coefficients' dtype (None without them)."""
    first = scores[0]
    for segment in scores:
        if segment.dtype != torch.float32 or segment.device != first.device or not segment.is_contiguous():
            raise ValueError("native row kernel: score segments must be contiguous float32 tensors on one device")
        if segment.shape[0] != first.shape[0]:
            raise ValueError("native row kernel: every score segment must have the same number of rows")
    if coefficients is None:
        return None
    out_dtype = coefficients[0].dtype
    if out_dtype not in STORE_DTYPES:
        raise ValueError(f"native row kernel: coefficients must be float32, bfloat16 or float16, got {out_dtype}")
    for out, segment in zip(coefficients, scores, strict=True):
        same_layout = out.shape == segment.shape and out.device == first.device and out.is_contiguous()
        if out.dtype != out_dtype or not same_layout:
            raise ValueError("native row kernel: coefficients must be contiguous, one dtype, shaped as the scores")
    return out_dtype


def _pointer(tensor: torch.Tensor, what: str, shape: tuple[int, ...], device: torch.device) -> int:
    """The data pointer of a contiguous float32 tensor of ``shape`` on ``device`` (clear errors otherwise)."""
    if tensor.dtype != torch.float32 or tensor.device != device or tuple(tensor.shape) != shape:
        raise ValueError(f"native row kernel: {what} must be a float32 {shape} tensor on {device}")
    if not tensor.is_contiguous():
        raise ValueError(f"native row kernel: {what} must be contiguous")
    return tensor.data_ptr()


def _label_pointer(tensor: torch.Tensor, what: str, length: int | None, device: torch.device) -> int:
    if tensor.dtype != torch.int32 or tensor.device != device or tensor.dim() != 1:
        raise ValueError(f"native row kernel: {what} must be a 1-D int32 tensor on {device}")
    if (length is not None and tensor.shape[0] != length) or not tensor.is_contiguous():
        raise ValueError(f"native row kernel: {what} must be contiguous, of the segment's length {length}")
    return tensor.data_ptr()


def _segment_fields(
    scores: Sequence[torch.Tensor],
    kinds: Sequence[int],
    row_start: int,
    width: int,
    scale: float,
    labels: Sequence[torch.Tensor] | None,
) -> dict[str, Any]:
    """The fields every entry point shares (``SegmentsCall``): the segments, their kinds and labels, the rows."""
    device = scores[0].device
    label_ptrs: list[int] = []
    if labels is not None:
        if len(labels) != len(scores):
            raise ValueError("native row kernel: one label tensor per score segment")
        label_ptrs = [
            _label_pointer(t, "segment labels", x.shape[1], device) for t, x in zip(labels, scores, strict=True)
        ]
    return {
        "scores": [s.data_ptr() for s in scores],
        "lengths": [s.shape[1] for s in scores],
        "kinds": [int(SegmentKind(k)) for k in kinds],
        "labels": label_ptrs,
        "rows": scores[0].shape[0],
        "row_start": row_start,
        "width": width,
        "scale": float(scale),
    }


def _scaled_fields(
    scores: Sequence[torch.Tensor],
    alpha: float,
    hardness: int,
    row_scales: Sequence[torch.Tensor] | None,
    col_scales: Sequence[torch.Tensor] | None,
) -> dict[str, Any]:
    """The general passes' scales and hardness penalty (``ScaledCall``)."""
    first = scores[0]
    rows = (first.shape[0],)
    row_ptrs = [] if row_scales is None else [_pointer(t, "a row scale", rows, first.device) for t in row_scales]
    col_ptrs = [] if col_scales is None else [
        _pointer(t, "a column scale", (x.shape[1],), first.device) for t, x in zip(col_scales, scores, strict=True)
    ]  # fmt: skip
    hardness = int(HardnessKind(hardness))
    return {"row_scales": row_ptrs, "col_scales": col_ptrs, "alpha": float(alpha), "hardness": hardness}


def _block_fields(
    scores: Sequence[torch.Tensor], block_begin: int, block_count: int, query_labels: torch.Tensor | None
) -> dict[str, Any]:
    """The two-pass entry points' positive block (``BlockCall``)."""
    device = scores[0].device
    query_ptr = 0 if query_labels is None else _label_pointer(query_labels, "query labels", None, device)
    return {"block_begin": block_begin, "block_count": block_count, "query_labels": query_ptr}


def _store_fields(
    scores: Sequence[torch.Tensor], coefficients: Sequence[torch.Tensor] | None, joint: bool, grad_scale: float
) -> dict[str, Any]:
    """The coefficients' outputs (``StoreCall``); none (loss only) without ``coefficients``."""
    out_dtype = _check_segments(scores, coefficients)
    return {
        "coefficients": [] if coefficients is None else [c.data_ptr() for c in coefficients],
        "coefficient_dtype": int(STORE_DTYPES[out_dtype if out_dtype is not None else torch.float32]),
        "joint": bool(joint),
        "grad_scale": float(grad_scale),
    }


def _grad_scale_fields(grad_scale: float | torch.Tensor, device: torch.device) -> tuple[float, int]:
    """(host grad_scale, address of its device-side factor or 0) for a grad_scale given as a number or as a
    one-element float32 tensor on the scores' device (read by the kernel there: no host sync)."""
    if isinstance(grad_scale, torch.Tensor):
        return 1.0, _pointer(grad_scale.reshape(1), "a grad_scale tensor", (1,), device)
    return float(grad_scale), 0


def _statistics_outputs(
    scores: Sequence[torch.Tensor], block_count: int, column_max: torch.Tensor, column_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The statistics passes' outputs (both forms): (row LSEs (rows, segments), positive logits (rows,), their
    fields with the column max / sum's (``StatisticsOutCall``))."""
    first = scores[0]
    rows, device = first.shape[0], first.device
    _check_segments(scores, None)
    row_lse = torch.empty(rows, len(scores), dtype=torch.float32, device=device)
    positive = torch.empty(rows, dtype=torch.float32, device=device)
    fields = {
        "row_lse": row_lse.data_ptr(),
        "row_positive": positive.data_ptr(),
        "col_max": _pointer(column_max, "a column statistic", (block_count,), device),
        "col_sum": _pointer(column_sum, "a column statistic", (block_count,), device),
    }
    return row_lse, positive, fields


def _cpu_only(scores: Sequence[torch.Tensor], what: str) -> None:
    if scores[0].device.type != "cpu":
        raise ValueError(f"native row kernel: the fixed-shift {what} run on the CPU only, got {scores[0].device}")


def contrastive_rows(
    scores: Sequence[torch.Tensor],
    kinds: Sequence[int],
    *,
    scale: float,
    alpha: float,
    hardness: int,
    joint: bool,
    row_start: int,
    width: int,
    grad_scale: float | torch.Tensor | None,
    row_scales: Sequence[torch.Tensor] | None = None,
    col_scales: Sequence[torch.Tensor] | None = None,
    coefficients: Sequence[torch.Tensor] | None = None,
    labels: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The one-pass kernel (``contrastive_rows``): per-row losses (rows,) fp32; writes the gradient coefficients
    into ``coefficients`` (default: over ``scores``) when ``grad_scale`` is given (a number, or a one-element fp32
    tensor on the scores' device, which the kernel reads on the device)."""
    first = scores[0]
    store = _store_fields(scores, scores if coefficients is None else coefficients, joint, -1.0)
    factor = 0
    if grad_scale is not None:  # else the loss only: no coefficient pointers
        store["grad_scale"], factor = _grad_scale_fields(grad_scale, first.device)
    else:
        store["coefficients"] = []
    row_loss = torch.empty(first.shape[0], dtype=torch.float32, device=first.device)
    fields = {
        **_segment_fields(scores, kinds, row_start, width, scale, labels),
        **_scaled_fields(scores, alpha, hardness, row_scales, col_scales),
        **store,
        "row_loss": row_loss.data_ptr(),
        "grad_scale_factor": factor,
    }
    _native.run_row_entry("contrastive_rows", "RowsCall", first.device, fields)
    return row_loss


def contrastive_statistics(
    scores: Sequence[torch.Tensor],
    kinds: Sequence[int],
    *,
    scale: float,
    alpha: float,
    hardness: int,
    row_start: int,
    width: int,
    block_begin: int,
    block_count: int,
    column_max: torch.Tensor,
    column_sum: torch.Tensor,
    row_scales: Sequence[torch.Tensor] | None = None,
    col_scales: Sequence[torch.Tensor] | None = None,
    labels: Sequence[torch.Tensor] | None = None,
    query_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric path's statistics pass (``contrastive_statistics``): (row LSEs (rows, segments), positive
    logits (rows,)) fp32; ``column_max`` / ``column_sum`` ((block_count,) fp32) are continued in place."""
    row_lse, positive, outputs = _statistics_outputs(scores, block_count, column_max, column_sum)
    fields = {
        **_segment_fields(scores, kinds, row_start, width, scale, labels),
        **_scaled_fields(scores, alpha, hardness, row_scales, col_scales),
        **_block_fields(scores, block_begin, block_count, query_labels),
        **outputs,
    }
    _native.run_row_entry("contrastive_statistics", "StatisticsCall", scores[0].device, fields)
    return row_lse, positive


def contrastive_coefficients(
    scores: Sequence[torch.Tensor],
    kinds: Sequence[int],
    *,
    scale: float,
    alpha: float,
    hardness: int,
    joint: bool,
    directions: int,
    row_start: int,
    width: int,
    grad_scale: float | torch.Tensor,
    block_begin: int,
    block_count: int,
    row_ref: torch.Tensor,
    column_ref: torch.Tensor,
    row_scales: Sequence[torch.Tensor] | None = None,
    col_scales: Sequence[torch.Tensor] | None = None,
    coefficients: Sequence[torch.Tensor] | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: Sequence[torch.Tensor] | None = None,
    query_labels: torch.Tensor | None = None,
) -> None:
    """The symmetric path's coefficient pass (``contrastive_coefficients``): writes the coefficients into
    ``coefficients`` (default: over ``scores``) from the references ``row_ref`` (rows, segments) and ``column_ref``
    (block_count,), fp32, and the optional ``factors`` (row (rows,), column (block_count,)). ``directions``: the
    loss's number of directions; ``grad_scale``: a number or a one-element fp32 tensor on the scores' device."""
    first = scores[0]
    rows, device = first.shape[0], first.device
    host_grad_scale, factor = _grad_scale_fields(grad_scale, device)
    row_factor = col_factor = 0  # 0: no factors
    if factors is not None:
        row_factor = _pointer(factors[0], "the row factors", (rows,), device)
        col_factor = _pointer(factors[1], "the column factors", (block_count,), device)
    fields = {
        **_segment_fields(scores, kinds, row_start, width, scale, labels),
        **_scaled_fields(scores, alpha, hardness, row_scales, col_scales),
        **_block_fields(scores, block_begin, block_count, query_labels),
        **_store_fields(scores, scores if coefficients is None else coefficients, joint, host_grad_scale),
        "grad_scale_factor": factor,
        "directions": directions,
        "row_ref": _pointer(row_ref, "the row references", (rows, len(scores)), device),
        "col_ref": _pointer(column_ref, "the column references", (block_count,), device),
        "row_factor": row_factor,
        "col_factor": col_factor,
    }
    _native.run_row_entry("contrastive_coefficients", "CoefficientsCall", device, fields)


def contrastive_exp_statistics(
    scores: Sequence[torch.Tensor],
    kinds: Sequence[int],
    *,
    scale: float,
    shift: float,
    row_start: int,
    width: int,
    block_begin: int,
    block_count: int,
    column_max: torch.Tensor,
    column_sum: torch.Tensor,
    labels: Sequence[torch.Tensor] | None = None,
    query_labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric path's statistics pass in the fixed-shift form (``contrastive_exp_statistics``; CPU only): as
    :func:`contrastive_statistics` without scales or hardness, and every score is replaced by
    e = exp(scale · score - shift) (0 where masked; mask_duplicates' duplicates keep their e), the input of
    :func:`contrastive_exp_coefficients`."""
    _cpu_only(scores, "statistics")
    row_lse, positive, outputs = _statistics_outputs(scores, block_count, column_max, column_sum)
    fields = {
        **_segment_fields(scores, kinds, row_start, width, scale, labels),
        **_block_fields(scores, block_begin, block_count, query_labels),
        **outputs,
        "shift": float(shift),
    }
    _native.run_row_entry("contrastive_exp_statistics", "ExpStatisticsCall", scores[0].device, fields)
    return row_lse, positive


def contrastive_exp_coefficients(
    exps: Sequence[torch.Tensor],
    kinds: Sequence[int],
    *,
    scale: float,
    joint: bool,
    directions: int,
    row_start: int,
    width: int,
    grad_scale: float,
    block_begin: int,
    block_count: int,
    row_factor: torch.Tensor,
    column_factor: torch.Tensor,
    coefficients: Sequence[torch.Tensor] | None = None,
    labels: Sequence[torch.Tensor] | None = None,
    query_labels: torch.Tensor | None = None,
) -> None:
    """The symmetric path's coefficient pass in the fixed-shift form (``contrastive_exp_coefficients``; CPU only):
    from e (the output of :func:`contrastive_exp_statistics`), ``row_factor`` = exp(shift - row_ref) (rows, segments)
    and ``column_factor`` = exp(shift - column_ref) (block_count,), fp32, writes the same coefficients as
    :func:`contrastive_coefficients` into ``coefficients`` (default: over ``exps``)."""
    _cpu_only(exps, "coefficients")
    first = exps[0]
    rows, device = first.shape[0], first.device
    fields = {
        **_segment_fields(exps, kinds, row_start, width, scale, labels),
        **_block_fields(exps, block_begin, block_count, query_labels),
        **_store_fields(exps, exps if coefficients is None else coefficients, joint, float(grad_scale)),
        "directions": directions,
        "row_factor": _pointer(row_factor, "the row factors", (rows, len(exps)), device),
        "col_factor": _pointer(column_factor, "the column factors", (block_count,), device),
    }
    _native.run_row_entry("contrastive_exp_coefficients", "ExpCoefficientsCall", device, fields)
