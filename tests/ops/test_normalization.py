"""The cosine normalization of the fused ops (st_fast/ops/normalization.py): the normalized operands, the inverse
norms of raw operands and the normalization's gradient term, each against F.normalize and autograd through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from st_fast.ops.normalization import NORMALIZE_EPS, add_normalization_term, inverse_norm, normalized


def _rows(dtype=torch.float64, zero_row: int | None = None) -> torch.Tensor:
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    if zero_row is not None:
        x[zero_row] = 0
    return x.to(dtype)


@pytest.mark.parametrize("eps", [NORMALIZE_EPS, 1e-8])
def test_normalized_is_f_normalize_after_the_cast_and_contiguous(eps):
    x = _rows(torch.bfloat16).T  # a transposed view: normalized along its last dimension, returned contiguous
    out = normalized(x, torch.float32, eps)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, F.normalize(x.float(), p=2, dim=-1, eps=eps))


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_inverse_norm_is_what_f_normalize_divides_by(dtype, expected):
    x = _rows(dtype, zero_row=2)
    r = inverse_norm(x)
    assert r.dtype == expected and r.shape == (6,)
    reference = 1.0 / x.double().norm(dim=1).clamp_min(NORMALIZE_EPS)
    torch.testing.assert_close(r.double(), reference, rtol=1e-6, atol=0)
    assert float(r[2]) == pytest.approx(1 / NORMALIZE_EPS)


def test_the_gradient_term_gives_the_gradient_through_f_normalize():
    """For L = <W, x̂> (any L is linear in x̂ to first order): the gradient at fixed inverse norms r·W plus the term
    is autograd's gradient through F.normalize, the zero row (below the eps: no gradient to its norm) included."""
    x = _rows(zero_row=4).requires_grad_()
    weights = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (expected,) = torch.autograd.grad((F.normalize(x, p=2, dim=-1) * weights).sum(), [x])
    r = inverse_norm(x.detach())
    grad = r[:, None] * weights
    add_normalization_term(grad, x.detach(), r)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=0)
    without = r[:, None] * weights
    assert not torch.allclose(without[:4], expected[:4])  # the term is not zero where the norm is regular
