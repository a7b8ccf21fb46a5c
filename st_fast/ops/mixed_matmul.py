"""One matrix product with fp32 output for any floating operands: the GEMM primitive of the chunked backends.

16-bit operands are multiplied with fp32 accumulation and an fp32 result (``torch.mm(..., out_dtype=float32)``,
cuBLAS on CUDA): products of two bf16 / fp16 numbers are exact in fp32, so raw 16-bit embeddings give scores as
accurate as stock's fp32 GEMM on the upcast embeddings, at the 16-bit tensor-core rate. Where that overload is
missing (CPU, older torch) the operands are upcast first: the same numbers, at the fp32 rate.
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


def power_of_two_scale(value: torch.Tensor, top: int) -> torch.Tensor:
    """2^(top - ceil(log2(value))), a float32 tensor on ``value``'s device (no host sync): the power of two that puts
    ``value`` (> 0, finite; any floating 0-dim tensor) in (2^(top-1), 2^top]; 1 where ``value`` is not finite or not
    positive. ceil(log2(v)) is exact from the binary exponent (v = m·2^e, m in [0.5, 1): e, or e - 1 for m = 0.5), and
    the power is built from its bits, with the exponent clamped to float32's normal range [-126, 127]."""
    mantissa, exponent = torch.frexp(value)
    ceil_log2 = exponent - (mantissa == 0.5).to(exponent.dtype)
    power = (top - ceil_log2).clamp(-126, 127).to(torch.int32)
    scale = torch.bitwise_left_shift(power + 127, 23).view(torch.float32)
    usable = torch.isfinite(value) & (value > 0)
    return torch.where(usable, scale, torch.ones((), dtype=torch.float32, device=value.device))


def as_float16_operand(x: torch.Tensor) -> tuple[torch.Tensor, float | torch.Tensor]:
    """(x · σ as float16, σ) with σ a power of two that puts max |x| at 2^14: a bf16 operand becomes a float16 one
    without rounding (bf16's 8 significant bits fit float16's 11) down to entries 2^-28 below the largest, so that it
    can meet float16 gradient coefficients (2^-11 rounding instead of bf16's 2^-8) in one 16-bit GEMM. float16 input
    is returned as it is (σ = 1). σ is a 0-dim float32 tensor on x's device for bf16 input (1 for zero or non-finite
    entries; :func:`power_of_two_scale`): computed and applied there, no host sync."""
    if x.dtype == torch.float16:
        return x, 1.0
    if not x.numel():
        return x.to(torch.float16), 1.0
    sigma = power_of_two_scale(x.abs().max().float(), 14)
    return (x * sigma).to(torch.float16), sigma
