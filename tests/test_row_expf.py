"""The CPU row kernels' exp (``row_expf`` in csrc/include/st_fast/portability.h) against float64 exp.

The kernels call it on logit - max, logit - log-partition and scale·s - column LSE: arguments <= 0 up to rounding in
exact math, whose results are summed or multiplied into coefficients. The bound below follows from the construction
over the whole float range it handles, not only that interval, and is checked on ~2M arguments per interval spread
evenly over their bit patterns (every binade): Cody-Waite reduction with n·LN2_HI exact
leaves |r| <= ln2/2 with an error of an ulp of r at most, Cephes' degree-7 minimax form 1 + r + r²·P(r) is accurate
to well under an ulp there, and the two 2^n factors are exact for a normal result, so the float64 error of a normal
result stays below 2 ulp of the float32 result, i.e. a relative error below 2·2^-23 = 2.4e-7 (measured: about
1 ulp, 8e-8). glibc's expf (used before) is accurate to about 0.5 ulp; the kernels' tests against their float64
references hold with the same tolerances as before.

Gradual underflow: results below FLT_MIN (x < -87.34) are subnormal, whose spacing is 2^-149; the second 2^n factor
rounds once into them, so the absolute error there stays below one subnormal spacing. Special values match expf:
exp(-inf) = 0 (and x < -103.98, whose exp is below half the smallest subnormal, gives 0), overflow (x > 88.7228,
+inf included) gives +inf, NaN gives NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

from st_fast import _native

ULP_BOUND = 2.0  # ulps of the float32 result; see the module docstring
FLT_MIN = 2.0**-126
SUBNORMAL_SPACING = 2.0**-149


def _float32_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of float32 at |values| (values float64, rounded to float32 first)."""
    rounded = values.float().abs()
    return (torch.nextafter(rounded, torch.tensor(math.inf)).double() - rounded.double()).clamp_min(SUBNORMAL_SPACING)


def _floats_in(low: float, high: float, count: int = 2_000_000) -> torch.Tensor:
    """About count float32 values of [low, high] (of one sign), evenly spaced in bit pattern: every binade of the
    interval is sampled, the ones near 0 as densely as the others."""
    lo, hi = (torch.tensor([v], dtype=torch.float32).view(torch.int32).item() for v in (low, high))
    lo, hi = min(lo, hi), max(lo, hi)
    return torch.arange(lo, hi + 1, max(1, (hi - lo) // count), dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize(
    "low, high",
    [
        (-0.0, -1.0),  # the bulk of softmax terms, results near 1
        (-1.0, -87.33),  # the rest of the normal results of negative arguments
        (0.0, 88.72),  # positive arguments up to the overflow threshold
    ],
)
def test_row_expf_is_within_two_ulp_of_float64_exp(low, high):
    x = _floats_in(low, high)
    got = _native.row_expf(x).double()
    want = torch.exp(x.double())
    normal = want >= FLT_MIN
    err_ulp = ((got - want).abs() / _float32_ulp(want))[normal]
    assert err_ulp.max().item() < ULP_BOUND, x[normal][err_ulp.argmax()].item()
    rel = ((got - want).abs() / want)[normal]
    assert rel.max().item() < ULP_BOUND * 2.0**-23


def test_row_expf_underflows_gradually():
    x = _floats_in(-87.33, -104.0)
    got = _native.row_expf(x).double()
    want = torch.exp(x.double())
    assert (got - want).abs().max().item() < SUBNORMAL_SPACING
    assert (got >= 0).all()


def test_row_expf_special_values_match_expf():
    x = torch.tensor(
        [-math.inf, -1e30, -3.4e38, -104.0, -103.98, 0.0, -0.0, 88.72, 88.7229, 89.0, 1e4, 3.4e38, math.inf, math.nan]
    )
    got = _native.row_expf(x)
    want = torch.exp(x)  # float32 expf
    assert got[:5].eq(0).all()
    assert got[5].item() == 1.0 and got[6].item() == 1.0
    assert math.isfinite(got[7].item())
    assert got[8:13].eq(math.inf).all()
    assert math.isnan(got[13].item())
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got == 0, want == 0)


def test_row_expf_vector_and_tail_lanes_agree():
    """The vectorized loop body and its scalar remainder compute the same function (no FMA contraction between
    them): a length that is not a multiple of the vector width, shifted by one element."""
    x = torch.linspace(-90.0, 89.0, 1001)
    full = _native.row_expf(x)
    shifted = _native.row_expf(x[1:].clone())
    assert torch.equal(full[1:], shifted)


def test_row_expf_rejects_bad_input():
    with pytest.raises(ValueError):
        _native.row_expf(torch.zeros(3, dtype=torch.float64))
