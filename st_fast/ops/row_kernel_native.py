"""The row kernel of the ``native`` backend: the C++ build (CPU, OpenMP over rows) or the CUDA build (one warp per
row) of csrc/include/st_fast/row_kernel_*.h. Same contract as :func:`st_fast.ops.row_kernel_torch.torch_row_kernel`.

This module translates the ops' terms (a :class:`~st_fast.ops.mnrl.spec.ContrastiveSpec`, ``SegmentScales``,
``PositiveBlock``, ``DuplicateLabels``) into the plain values that the validated native wrappers of
:mod:`st_fast._native_rows` take; the native layer knows nothing of the ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from st_fast import _native_rows
from st_fast._native import native_row_kernel_available
from st_fast.ops.row_kernel import DuplicateLabels, PositiveBlock, RowKernel, SegmentScales

if TYPE_CHECKING:
    from st_fast.ops.mnrl.spec import ContrastiveSpec


def _logits(spec: ContrastiveSpec) -> dict[str, Any]:
    """The logits' rule of ``spec``: scale, hardness penalty alpha and which entries it takes."""
    return {"scale": spec.scale, "alpha": spec.alpha, "hardness": spec.hardness}


def _scales(scales: Sequence[SegmentScales] | None) -> dict[str, Any]:
    if scales is None:
        return {}
    return {"row_scales": [s.rows for s in scales], "col_scales": [s.columns for s in scales]}


def _labels(labels: DuplicateLabels | None, *, two_pass: bool) -> dict[str, Any]:
    if labels is None:
        return {}
    return {"labels": labels.segments, "query_labels": labels.queries} if two_pass else {"labels": labels.segments}


def _block(block: PositiveBlock) -> dict[str, int]:
    return {"block_begin": block.begin, "block_count": block.count}


def native_row_kernel(
    scores: list[torch.Tensor],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float | torch.Tensor | None,
    scales: Sequence[SegmentScales] | None = None,
    coefficients: list[torch.Tensor] | None = None,
    labels: DuplicateLabels | None = None,
) -> torch.Tensor:
    """Per-row losses (n,) fp32; writes the gradient coefficients into ``coefficients`` (default: over ``scores``)
    when ``grad_scale`` is given (a number, or a one-element fp32 tensor on the scores' device, which the kernel reads
    on the device). ``scales``: one ``SegmentScales`` per segment, or None; ``labels``: mask_duplicates' labels."""
    return _native_rows.contrastive_rows(
        scores, spec.kinds, **_logits(spec), joint=spec.joint, row_start=row_start, width=width,
        grad_scale=grad_scale, coefficients=coefficients, **_scales(scales), **_labels(labels, two_pass=False),
    )  # fmt: skip


def native_row_statistics(
    scores: list[torch.Tensor],
    kinds: Sequence[int],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    block: PositiveBlock,
    column_max: torch.Tensor,
    column_sum: torch.Tensor,
    scales: Sequence[SegmentScales] | None = None,
    labels: DuplicateLabels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric path's statistics pass (contract: st_fast.ops.row_kernel): (row LSEs (n, segments), positive
    logits (n,)) fp32; ``column_max`` / ``column_sum`` ((block.count,) fp32) are continued in place."""
    return _native_rows.contrastive_statistics(
        scores, kinds, **_logits(spec), row_start=row_start, width=width, **_block(block), column_max=column_max,
        column_sum=column_sum, **_scales(scales), **_labels(labels, two_pass=True),
    )  # fmt: skip


def native_row_coefficients(
    scores: list[torch.Tensor],
    kinds: Sequence[int],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float | torch.Tensor,
    block: PositiveBlock,
    row_ref: torch.Tensor,
    column_ref: torch.Tensor,
    scales: Sequence[SegmentScales] | None = None,
    coefficients: list[torch.Tensor] | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: DuplicateLabels | None = None,
) -> None:
    """The symmetric path's coefficient pass (contract: st_fast.ops.row_kernel): writes the coefficients into
    ``coefficients`` (default: over ``scores``) from the references ``row_ref`` (n, segments) and ``column_ref``
    (block.count,), fp32, and the optional ``factors`` (row (n,), column (block.count,)). ``grad_scale``: a number
    or a one-element fp32 tensor on the scores' device (read there)."""
    _native_rows.contrastive_coefficients(
        scores, kinds, **_logits(spec), joint=spec.joint, directions=len(spec.kinds), row_start=row_start,
        width=width, grad_scale=grad_scale, **_block(block), row_ref=row_ref, column_ref=column_ref,
        coefficients=coefficients, factors=factors, **_scales(scales), **_labels(labels, two_pass=True),
    )  # fmt: skip


def native_row_exp_statistics(
    scores: list[torch.Tensor],
    kinds: Sequence[int],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    block: PositiveBlock,
    column_max: torch.Tensor,
    column_sum: torch.Tensor,
    shift: float,
    labels: DuplicateLabels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric path's statistics pass in the fixed-shift form (contract: st_fast.ops.row_kernel; CPU only):
    as :func:`native_row_statistics` without scales or hardness, and every score is replaced by
    e = exp(scale · score - shift) (0 where masked; mask_duplicates' duplicates keep their e), the input of
    :func:`native_row_exp_coefficients`."""
    return _native_rows.contrastive_exp_statistics(
        scores, kinds, scale=spec.scale, shift=shift, row_start=row_start, width=width, **_block(block),
        column_max=column_max, column_sum=column_sum, **_labels(labels, two_pass=True),
    )  # fmt: skip


def native_row_exp_coefficients(
    exps: list[torch.Tensor],
    kinds: Sequence[int],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float,
    block: PositiveBlock,
    row_factor: torch.Tensor,
    column_factor: torch.Tensor,
    coefficients: list[torch.Tensor] | None = None,
    labels: DuplicateLabels | None = None,
) -> None:
    """The symmetric path's coefficient pass in the fixed-shift form (CPU only): from e (the output of
    :func:`native_row_exp_statistics`), ``row_factor`` = exp(shift - row_ref) (n, segments) and ``column_factor`` =
    exp(shift - column_ref) (block.count,), fp32, writes the same coefficients as :func:`native_row_coefficients`
    into ``coefficients`` (default: over ``exps``)."""
    _native_rows.contrastive_exp_coefficients(
        exps, kinds, scale=spec.scale, joint=spec.joint, directions=len(spec.kinds), row_start=row_start,
        width=width, grad_scale=grad_scale, **_block(block), row_factor=row_factor, column_factor=column_factor,
        coefficients=coefficients, **_labels(labels, two_pass=True),
    )  # fmt: skip


NATIVE_ROW_KERNEL = RowKernel(
    native_row_kernel,
    native_row_statistics,
    native_row_coefficients,
    exp_statistics=native_row_exp_statistics,
    exp_coefficients=native_row_exp_coefficients,
)

__all__ = [
    "NATIVE_ROW_KERNEL",
    "native_row_coefficients",
    "native_row_exp_coefficients",
    "native_row_exp_statistics",
    "native_row_kernel",
    "native_row_kernel_available",
    "native_row_statistics",
]
