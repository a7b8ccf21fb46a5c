"""One matrix product with fp32 output for any floating operands: the GEMM primitive of the chunked backends.

16-bit operands are multiplied with fp32 accumulation and an fp32 result (``torch.mm(..., out_dtype=float32)``,
cuBLAS on CUDA): products of two bf16 / fp16 numbers are exact in fp32, so raw 16-bit embeddings give scores as
accurate as stock's fp32 GEMM on the upcast embeddings, at the 16-bit tensor-core rate. Where that overload is
missing (CPU, older torch) the operands are upcast first: the same numbers, at the fp32 rate. The float16 copies
of bf16 operands and the power-of-two scales of the raw 16-bit path are in :mod:`st_fast.ops.raw_16bit`.
"""

from __future__ import annotations

import warnings

import torch

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_out_dtype_support: dict[tuple[str, torch.dtype], bool] = {}


def _supports_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32, out=...)`` runs for ``dtype`` operands on ``device`` (probed once
    on 1 x 1 tensors; a one-time warning when a CUDA device lacks it, because the fallback is several times slower)."""
    key = (device.type, dtype)
    if key not in _out_dtype_support:
        try:
            one = torch.ones(1, 1, dtype=dtype, device=device)
            torch.mm(one, one, out_dtype=torch.float32, out=torch.empty(1, 1, device=device))
            _out_dtype_support[key] = True
        except (TypeError, RuntimeError, NotImplementedError):
            _out_dtype_support[key] = False
            if device.type == "cuda":
                warnings.warn(
                    f"st_fast: this torch has no {dtype} x {dtype} -> float32 matmul on CUDA (torch.mm out_dtype); "
                    "the fused loss upcasts its operands instead (same numbers, fp32 matmul rate)",
                    stacklevel=3,
                )
    return _out_dtype_support[key]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fused ops compute in, as stock does: cos_sim / dot_score upcast floating dtypes narrower than
    32 bits to float32 and keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_fp32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` (n, d) and ``b`` (d, m) of one dtype: fp32 result for fp32 and 16-bit operands
    (fp32 accumulation), fp64 for fp64. ``out`` (n, m) of the result dtype, when given, receives it."""
    if a.dtype not in _HALF_DTYPES:
        return torch.mm(a, b, out=out)
    if _supports_out_dtype(a.device, a.dtype):
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def accumulate_product(
    target: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, exact_scale: float | torch.Tensor = 1.0
) -> None:
    """``target += alpha · exact_scale · (a @ b)`` in place, ``target`` fp32 / fp64 (``a``, ``b`` as for
    :func:`matmul_fp32`). ``exact_scale``: a power of two, a number or a one-element tensor on the device (then
    multiplied into the product on the device, O(rows·columns) next to the GEMM's O(rows·columns·depth), without a
    host sync; exact, so that the sum is the one an ``alpha · exact_scale`` given as a number would give)."""
    if isinstance(exact_scale, torch.Tensor):
        target.add_(matmul_fp32(a, b).mul_(exact_scale), alpha=alpha)
    elif a.dtype == target.dtype:
        target.addmm_(a, b, alpha=alpha * exact_scale)
    else:
        target.add_(matmul_fp32(a, b), alpha=alpha * exact_scale)
