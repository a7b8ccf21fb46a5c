"""The row-kernel contract shared by both ops' chunked drivers and the two row kernels that implement it.

A row kernel turns the fp32 scores of one chunk of rows into per-row losses and, on request, the gradient
coefficients d loss / d scores (:func:`st_fast.ops.row_kernel_torch.torch_row_kernel` is the readable reference,
:func:`st_fast.ops.row_kernel_native.native_row_kernel` the C++/CUDA build of the same math)::

    row_kernel(scores, spec, row_start, width, grad_scale, scales=None, coefficients=None, labels=None)
        -> losses (n,) fp32

``scores[x]`` (n, L_x) fp32 belongs to ``spec.kinds[x]`` (a :class:`st_fast.ops.mnrl.spec.ContrastiveSpec`; see
:mod:`st_fast.ops.layout`), ``row_start`` is the global index of the chunk's first row, ``width`` the block width W,
``grad_scale`` None (loss only) or the factor of the coefficients, written into ``coefficients`` (default: over
``scores``); ``scales`` the optional per-segment :class:`SegmentScales`; ``labels`` the optional
:class:`DuplicateLabels` (``mask_duplicates``: column c of segment x is masked for row g when
``labels.segments[x][c] == labels.segments[x][g]`` and c != g, see :mod:`st_fast.ops.layout`).

The symmetric path (query_to_doc with doc_to_query, :mod:`st_fast.ops.mnrl.chunked`) calls a row kernel in two
passes instead, through :class:`RowKernel`'s ``statistics`` and ``coefficients``::

    statistics(scores, kinds, spec, row_start, width, block, column_max, column_sum, scales=None, labels=None)
        -> (row_lse (n, len(kinds)) fp32, positive (n,) fp32)
    coefficients(scores, kinds, spec, row_start, width, grad_scale, block, row_ref, column_ref, scales=None,
                 coefficients=None, factors=None, labels=None) -> None

``kinds`` are the row segments' kinds (Q2D first; D2Q only as the other ranks' queries, with the local columns
``block`` holding -inf), ``block`` the :class:`PositiveBlock` whose columns of the Q2D segment are the D2Q rows:
``statistics`` returns each row segment's LSE and the positive logit and continues the online max / sum of the
block's columns (``column_max``, ``column_sum``, (count,) fp32, updated in place, rows in order); ``coefficients``
writes one coefficient per entry from the references ``row_ref`` (n, len(kinds)) and ``column_ref`` (count,) (log_z,
or the direction's LSE in per_direction; :func:`combine_partitions`): the row-softmax term, plus the column-softmax
term on the block, minus the positive's one-hot shares on its diagonal. ``factors``: optional (row factors (n,),
column factors (count,)) from :func:`reference_factors`, which a kernel may use (the native one does) to take
an unpenalized entry's column term as row term · row factor · column factor, one exp per entry instead of two.
With ``labels``, a block entry [r, begin + j] (D2Q row begin + j, column row_start + r) leaves the column softmax
(statistics and column term) when ``labels.queries[row_start + r] == labels.queries[begin + j]`` and
row_start + r != begin + j, independently of its row-softmax mask.

A row kernel may also offer the fixed-shift form of the two passes (the native CPU one does; None otherwise), for
tiles whose logits all lie within [-shift, shift] with 2·shift <= :data:`FIXED_SHIFT_LIMIT` and no hardness penalty
or scales (:func:`st_fast.ops.mnrl.chunked.fixed_shift` decides)::

    exp_statistics(scores, kinds, spec, row_start, width, block, column_max, column_sum, shift, labels=None)
        -> (row_lse, positive), as statistics, and each score replaced by e = exp(scale·score - shift) (0 where
           masked)
    exp_coefficients(exps, kinds, spec, row_start, width, grad_scale, block, row_factor, column_factor,
                     coefficients=None, labels=None) -> None, the coefficients of ``coefficients`` from e, with
           row_factor = exp(shift - row_ref) (n, len(kinds)) and column_factor = exp(shift - column_ref) (count,)

One shift serves every row and column, so one exp per entry gives both the row and the column statistics and the
coefficients need none (see csrc/include/st_fast/row_kernel_args.h). Both take ``labels=`` as the general form
(the duplicates keep their e; each sum and coefficient term leaves out the entries its softmax masks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class RowKernel:
    """One row kernel's entry points: calling it is the one-pass kernel (``rows``); ``statistics`` and
    ``coefficients`` are the two passes of the symmetric path (see the module docstring)."""

    rows: Callable[..., torch.Tensor]
    statistics: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    coefficients: Callable[..., None]
    exp_statistics: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    exp_coefficients: Callable[..., None] | None = None

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.rows(*args, **kwargs)


class PositiveBlock(NamedTuple):
    """Columns ``begin .. begin + count`` of the Q2D segment (the local rows' positives, begin = row offset): column
    ``begin + j`` over the tile's rows is the doc_to_query segment of local row j restricted to this rank's
    queries."""

    begin: int
    count: int


def combine_partitions(lses: torch.Tensor, joint: bool) -> torch.Tensor:
    """log Z per row from the segments' LSEs (..., segments): their log-add-exp (joint) or their mean."""
    return torch.logsumexp(lses, dim=-1) if joint else lses.mean(dim=-1)


FACTOR_RANGE = 8.0

# The fixed-shift form needs every e = exp(logit - shift) with logit in [-shift, shift] to be a normal float32 and
# every exp(shift - reference) finite: 2·shift <= 80 keeps e >= e^-80 > FLT_MIN = e^-87.3 and the factors
# <= e^80 < FLT_MAX = e^88.7 (a reference, an LSE, is at least the row's or column's largest logit >= -shift).
FIXED_SHIFT_LIMIT = 80.0


def reference_factors(q2d_ref: torch.Tensor, column_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row factors exp(q2d_ref - K), column factors exp(K - column_ref)) for K the median column reference, each 0
    where it is not within e^±8: the coefficient pass then takes an unpenalized entry's column term as
    row term · row factor · column factor (one exp per entry instead of two; see row_kernel_fixed_shift.h)."""
    shift = column_ref.median()

    def factor(exponent: torch.Tensor) -> torch.Tensor:
        return torch.where(exponent.abs() <= FACTOR_RANGE, torch.exp(exponent), 0.0).contiguous()

    return factor(q2d_ref - shift), factor(shift - column_ref)


def column_lse(column_max: torch.Tensor, column_sum: torch.Tensor) -> torch.Tensor:
    """The LSE of each column from its online statistics (max + log sum; -inf for a column without entries)."""
    return torch.where(column_sum == 0, float("-inf"), column_max + torch.log(column_sum))


class DuplicateLabels(NamedTuple):
    """``mask_duplicates``' text labels as a row kernel takes them (int32, equal iff the texts are equal; the
    chunked driver renumbers the op's int64 labels to 0 .. texts - 1, see :mod:`st_fast.ops.layout`): ``segments[x]``
    (L_x,) the labels of segment x's columns (the doc labels (k·W,) or the query labels (W,)), whose entry g is row
    g's reference text; ``queries`` (W,) the query labels (the symmetric path's column softmax)."""

    segments: tuple[torch.Tensor, ...]
    queries: torch.Tensor


class SegmentScales(NamedTuple):
    """Scales of one segment's raw scores: per row (n,) and per column (L,), fp32 (the cosine similarity's inverse
    norms, applied by the row kernel instead of normalizing the GEMM operands)."""

    rows: torch.Tensor
    columns: torch.Tensor
