"""The row kernel of the ``native`` backend: the C++ build (CPU, OpenMP over rows) or the CUDA build (one warp per
row) of csrc/include/st_fast/contrastive_row.h. Same contract as :func:`st_fast.ops.row_kernel_torch.torch_row_kernel`.
"""

from __future__ import annotations

import torch

from st_fast import _native
from st_fast.ops.spec import ContrastiveSpec


def native_row_kernel_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return _native.cpu_ext is not None and hasattr(_native.cpu_ext, "contrastive_rows")
    if device.type == "cuda":
        return _native.cuda_ext is not None and hasattr(_native.cuda_ext, "contrastive_rows")
    return False


def native_row_kernel(
    scores: list[torch.Tensor], spec: ContrastiveSpec, row_start: int, width: int, grad_scale: float | None
) -> torch.Tensor:
    """Per-row losses (n,) fp32; overwrites the fp32 ``scores`` segments with gradient coefficients when
    ``grad_scale`` is given (else with scratch values)."""
    first = scores[0]
    for segment in scores:
        if segment.dtype != torch.float32 or segment.device != first.device or not segment.is_contiguous():
            raise ValueError("native row kernel: score segments must be contiguous float32 tensors on one device")
        if segment.shape[0] != first.shape[0]:
            raise ValueError("native row kernel: every score segment must have the same number of rows")
    row_loss = torch.empty(first.shape[0], dtype=torch.float32, device=first.device)
    args = (
        [s.data_ptr() for s in scores], [s.shape[1] for s in scores], [int(k) for k in spec.kinds], first.shape[0],
        row_start, width, spec.scale, spec.alpha, int(spec.hardness), spec.joint,
        -1.0 if grad_scale is None else float(grad_scale), row_loss.data_ptr(),
    )  # fmt: skip
    if first.device.type == "cuda":
        with torch.cuda.device(first.device):
            _native.require_cuda_ext().contrastive_rows(*args, torch.cuda.current_stream().cuda_stream)
    else:
        _native.require_cpu_ext().contrastive_rows(*args)
    return row_loss
