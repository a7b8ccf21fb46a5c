"""The row kernel of the ``native`` backend: the C++ build (CPU, OpenMP over rows) or the CUDA build (one warp per
row) of csrc/include/st_fast/contrastive_row.h. Same contract as :func:`st_fast.ops.row_kernel_torch.torch_row_kernel`.
"""

from __future__ import annotations

import torch

from st_fast import _native
from st_fast.ops.mnrl.spec import ContrastiveSpec
from st_fast.ops.row_kernel import SegmentScales

# Codes of the coefficient dtypes (StoreDtype in csrc/include/st_fast/half_store.h).
COEFFICIENT_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def native_row_kernel_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return _native.cpu_ext is not None and hasattr(_native.cpu_ext, "contrastive_rows")
    if device.type == "cuda":
        return _native.cuda_ext is not None and hasattr(_native.cuda_ext, "contrastive_rows")
    return False


def _pointer(tensor: torch.Tensor, what: str, length: int, device: torch.device) -> int:
    if tensor.dtype != torch.float32 or tensor.device != device or tensor.shape != (length,):
        raise ValueError(f"native row kernel: {what} must be a float32 ({length},) tensor on {device}")
    if not tensor.is_contiguous():
        raise ValueError(f"native row kernel: {what} must be contiguous")
    return tensor.data_ptr()


def native_row_kernel(
    scores: list[torch.Tensor],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float | None,
    scales: list[SegmentScales] | None = None,
    coefficients: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Per-row losses (n,) fp32; writes the gradient coefficients into ``coefficients`` (default: over ``scores``)
    when ``grad_scale`` is given."""
    first = scores[0]
    rows = first.shape[0]
    for segment in scores:
        if segment.dtype != torch.float32 or segment.device != first.device or not segment.is_contiguous():
            raise ValueError("native row kernel: score segments must be contiguous float32 tensors on one device")
        if segment.shape[0] != rows:
            raise ValueError("native row kernel: every score segment must have the same number of rows")
    if coefficients is None:
        coefficients = scores
    out_dtype = coefficients[0].dtype
    if out_dtype not in COEFFICIENT_DTYPE_CODES:
        raise ValueError(f"native row kernel: coefficients must be float32, bfloat16 or float16, got {out_dtype}")
    for out, segment in zip(coefficients, scores, strict=True):
        same_layout = out.shape == segment.shape and out.device == first.device and out.is_contiguous()
        if out.dtype != out_dtype or not same_layout:
            raise ValueError("native row kernel: coefficients must be contiguous, one dtype, shaped as the scores")
    row_scale_ptrs = col_scale_ptrs = [0] * len(scores)  # 0: no scale
    if scales is not None:
        row_scale_ptrs = [_pointer(s.rows, "a row scale", rows, first.device) for s in scales]
        col_scale_ptrs = [
            _pointer(s.columns, "a column scale", x.shape[1], first.device) for s, x in zip(scales, scores, strict=True)
        ]
    row_loss = torch.empty(rows, dtype=torch.float32, device=first.device)
    args = (
        [s.data_ptr() for s in scores], row_scale_ptrs, col_scale_ptrs,
        [c.data_ptr() for c in coefficients] if grad_scale is not None else [0] * len(scores),
        COEFFICIENT_DTYPE_CODES[out_dtype], [s.shape[1] for s in scores], [int(k) for k in spec.kinds], rows,
        row_start, width, spec.scale, spec.alpha, int(spec.hardness), spec.joint,
        -1.0 if grad_scale is None else float(grad_scale), row_loss.data_ptr(),
    )  # fmt: skip
    if first.device.type == "cuda":
        with torch.cuda.device(first.device):
            _native.require_cuda_ext().contrastive_rows(*args, torch.cuda.current_stream().cuda_stream)
    else:
        _native.require_cpu_ext().contrastive_rows(*args)
    return row_loss
