"""Cosine normalization of the fused ops' operands, written once: before the op (normalized operands) or inside the
chunked driver (raw operands, the raw 16-bit path of :mod:`st_fast.ops.raw_16bit`).

Stock's similarities normalize each row, x̂ = x / max(||x||, eps) (``F.normalize``; eps 1e-12 in
``util.cos_sim``, :data:`NORMALIZE_EPS`; 1e-8 in ``nn.CosineSimilarity``, GIST's ``COSINE_EPS``). Two forms:

* :func:`normalized`: x̂ itself, before the op; autograd takes the gradient back through ``F.normalize``.
* raw operands: the scores are computed from x and its inverse norm r = 1 / max(||x||, eps) (:func:`inverse_norm`,
  applied as row / column scales by the row kernel). Every score of a row x is linear in r, so with g the gradient
  at fixed r, dL/dr = <g, x> / r, and dr/dx = -r³·x (0 below the eps, where the clamp passes no gradient), giving
  dL/dx = g - r²·<g, x>·x: :func:`add_normalization_term`, in fp32 (fp64 for fp64 operands).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from st_fast.ops.mixed_matmul import compute_dtype

NORMALIZE_EPS = 1e-12  # F.normalize's default, used by stock cos_sim


def normalized(x: torch.Tensor, dtype: torch.dtype, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """x / max(||x||, ``eps``) per row of ``x`` (..., D), contiguous, in ``dtype`` (x cast first, as stock upcasts
    before it normalizes): ``F.normalize(x.to(dtype), p=2, dim=-1, eps=eps)``. Differentiable."""
    return F.normalize(x.to(dtype), p=2, dim=-1, eps=eps).contiguous()


def inverse_norm(x: torch.Tensor) -> torch.Tensor:
    """r = 1 / max(||x_i||, 1e-12) per row of ``x`` (n, D), shape (n,), fp32 (fp64 for fp64): the scale
    F.normalize divides by."""
    return torch.linalg.vector_norm(x, dim=1, dtype=compute_dtype(x.dtype)).clamp_min(NORMALIZE_EPS).reciprocal()


def add_normalization_term(grad: torch.Tensor, operand: torch.Tensor, scale: torch.Tensor) -> None:
    """grad -= r²·<grad, x>·x per row, in place (see the module docstring): ``grad`` (n, D) fp32 / fp64, the
    gradient at fixed inverse norms; ``operand`` x (n, D), any floating dtype (cast to grad's); ``scale`` r (n,)
    from :func:`inverse_norm`. Rows whose norm is below the eps keep their gradient (F.normalize's clamp passes no
    gradient to the norm)."""
    x = operand.to(grad.dtype)
    coefficient = scale * scale * (grad * x).sum(dim=1)
    coefficient = coefficient.masked_fill(torch.linalg.vector_norm(x, dim=1) < NORMALIZE_EPS, 0.0)
    grad.sub_(coefficient[:, None] * x)
