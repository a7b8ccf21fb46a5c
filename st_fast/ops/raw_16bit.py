"""The raw 16-bit path of the chunked drivers: fp16 / bf16 embeddings taken as they are (the CUDA default of an op
whose capabilities allow it, :meth:`st_fast.ops.chunked.ChunkedBackend.takes_raw_operands`).

* Scores: 16-bit GEMMs with fp32 accumulation and output (:func:`st_fast.ops.mixed_matmul.matmul_fp32`: products of
  16-bit numbers are exact in fp32), the cosine normalization applied as row / column scales by the row kernel
  (:mod:`st_fast.ops.normalization`).
* Gradient GEMMs: the coefficients d loss / d S are stored in float16 (:func:`stores_float16_coefficients`; float16
  rounds them 8x finer than bf16 would), times a power of two γ (:func:`coefficient_scale`) that keeps them within
  float16's range, and multiplied with float16 copies of the operands (:func:`as_float16_operand`: exact for bf16 up
  to a power of two σ). The GEMMs divide γ·σ out again (``unscale`` of :class:`st_fast.ops.operands.Operands`).

γ and σ are computed on the device where the operands are (0-dim float32 tensors, :func:`power_of_two_scale`):
the path reads no tensor value on the host (tests/ops/test_host_sync.py).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from st_fast.ops.mixed_matmul import compute_dtype
from st_fast.ops.normalization import NORMALIZE_EPS

if TYPE_CHECKING:
    from st_fast.ops.mnrl.spec import ContrastiveSpec


def stores_float16_coefficients(dtype: torch.dtype, need_grad: bool) -> bool:
    """Whether a call with operands of ``dtype`` stores its gradient coefficients in float16 for float16 gradient
    GEMMs: raw 16-bit operands (a dtype the ops do not compute in, :func:`compute_dtype`) whose gradient is asked
    for."""
    return need_grad and dtype != compute_dtype(dtype)


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


def coefficient_scale(
    coefficient_dtype: torch.dtype, spec: ContrastiveSpec, scales: list[torch.Tensor]
) -> float | torch.Tensor:
    """The factor γ the coefficients are stored with before the gradient GEMMs divide it out again.

    ``spec``: the row kernel's spec (its ``scale``: the logit scale, 1/T for GIST's row spec); ``scales``: the
    inverse norms r of the raw operands (:func:`st_fast.ops.normalization.inverse_norm`), empty without.
    |coefficient| <= scale · r_max² (softmax weights are <= 1; r: the inverse norms, 1 without; twice that on the
    symmetric path's positive block, a row-softmax plus a column-softmax term), so float16 coefficients are stored
    with γ = 2^(14 - ceil(log2(scale · r_max²))), a power of two (exact) that keeps them within 2^14 (2^15 on the
    positive block; float16 overflows past 65504) and leaves 38 binades below the largest before subnormals; every
    other ``coefficient_dtype`` stores them with γ = 1.
    Zero-norm rows (r = 1/eps) are left out of r_max: their coefficients saturate at the float16 maximum and multiply
    the zero vector, instead of flushing every other row's coefficients to zero.
    With scales, γ is a 0-dim float32 tensor on their device, computed there (no host sync: the row kernel and the
    gradient GEMMs consume it on the device; :func:`power_of_two_scale`, 1 where the bound is not finite); without,
    a number (r_max = 1).
    """
    if coefficient_dtype != torch.float16:
        return 1.0
    regular = [torch.where(s < 0.5 / NORMALIZE_EPS, s, 0).max() for s in scales if s.numel()]
    if not regular:
        bound = spec.scale
        return 2.0 ** (14 - math.ceil(math.log2(bound))) if math.isfinite(bound) and bound > 0 else 1.0
    r_max = torch.stack(regular).max()
    r_max = torch.where(r_max > 0, r_max, 1.0).double()  # NaN too: the loss is non-finite anyway
    return power_of_two_scale(spec.scale * r_max * r_max, 14)
