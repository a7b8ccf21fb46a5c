"""The row-kernel contract shared by both ops' chunked drivers and the two row kernels that implement it.

A row kernel turns the fp32 scores of one chunk of rows into per-row losses and, on request, the gradient
coefficients d loss / d scores (:func:`st_fast.ops.row_kernel_torch.torch_row_kernel` is the readable reference,
:func:`st_fast.ops.row_kernel_native.native_row_kernel` the C++/CUDA build of the same math)::

    row_kernel(scores, spec, row_start, width, grad_scale, scales=None, coefficients=None) -> losses (n,) fp32

``scores[x]`` (n, L_x) fp32 belongs to ``spec.kinds[x]`` (a :class:`st_fast.ops.mnrl.spec.ContrastiveSpec`; see
:mod:`st_fast.ops.layout`), ``row_start`` is the global index of the chunk's first row, ``width`` the block width W,
``grad_scale`` None (loss only) or the factor of the coefficients, written into ``coefficients`` (default: over
``scores``); ``scales`` the optional per-segment :class:`SegmentScales`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

RowKernel = Callable[..., torch.Tensor]


class SegmentScales(NamedTuple):
    """Scales of one segment's raw scores: per row (n,) and per column (L,), fp32 (the cosine similarity's inverse
    norms, applied by the row kernel instead of normalizing the GEMM operands)."""

    rows: torch.Tensor
    columns: torch.Tensor
