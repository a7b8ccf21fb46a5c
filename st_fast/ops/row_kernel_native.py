"""The row kernel of the ``native`` backend: the C++ build (CPU, OpenMP over rows) or the CUDA build (one warp per
row) of csrc/include/st_fast/contrastive_row.h. Same contract as :func:`st_fast.ops.row_kernel_torch.torch_row_kernel`.

The validated wrapper lives in :mod:`st_fast._native`, with every other raw call into the extensions; this module
keeps the names the ops import.
"""

from __future__ import annotations

from st_fast._native import (
    native_row_coefficients,
    native_row_exp_coefficients,
    native_row_exp_statistics,
    native_row_kernel,
    native_row_kernel_available,
    native_row_statistics,
)
from st_fast.ops.row_kernel import RowKernel

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
