"""The compiled extensions build, import and compute what they claim."""

from __future__ import annotations

import shutil

import pytest
import torch

import st_fast
from st_fast import _native


def test_native_info_reports_the_cpu_extension():
    info = st_fast.native_info()
    assert info["cpu_extension"], info["cpu_extension_error"]
    assert set(info) >= {"cuda_extension", "triton", "openmp", "torch"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: the CUDA extension is not built")
def test_cuda_extension_is_built_and_imports_without_a_gpu():
    info = st_fast.native_info()
    assert info["cuda_extension"], info["cuda_extension_error"]
    assert info["cuda_devices_seen_by_extension"] == torch.cuda.device_count()


@pytest.mark.parametrize("text", ["", "a", "abc", "hello world!", "x" * 31, "y" * 32, "z" * 33, "ünïcödé " * 17])
@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5])
def test_xxh64_matches_the_reference_implementation(text, seed):
    xxhash = pytest.importorskip("xxhash")
    assert _native.xxh64(text, seed) == xxhash.xxh64_intdigest(text.encode("utf-8"), seed)
    assert _native.xxh64(text.encode("utf-8"), seed) == xxhash.xxh64_intdigest(text.encode("utf-8"), seed)


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (5, 1000)])
def test_row_logsumexp_matches_torch(shape):
    scores = torch.randn(shape) * 30
    scores[0, 0] = float("-inf")
    expected = torch.logsumexp(scores.double(), dim=1).float()
    torch.testing.assert_close(_native.row_logsumexp(scores), expected, rtol=1e-6, atol=1e-5)


def test_row_logsumexp_all_masked_row_is_minus_inf_not_nan():
    scores = torch.full((3, 9), float("-inf"))
    scores[1, 4] = 2.0
    out = _native.row_logsumexp(scores)
    assert out[0] == float("-inf") and out[2] == float("-inf")
    assert out[1] == pytest.approx(2.0)


def test_row_logsumexp_strided_rows():
    base = torch.randn(6, 40)
    view = base[:, 5:30]
    torch.testing.assert_close(_native.row_logsumexp(view), torch.logsumexp(view, dim=1), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "scores, error",
    [
        (torch.randn(3), ValueError),
        (torch.randn(4, 3).t(), ValueError),
        (torch.randn(3, 4, dtype=torch.float64), TypeError),
    ],
)
def test_row_logsumexp_rejects_bad_input(scores, error):
    with pytest.raises(error):
        _native.row_logsumexp(scores)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_row_logsumexp_matches_torch(dtype):
    scores = (torch.randn(37, 1001, device="cuda") * 20).to(dtype)
    expected = torch.logsumexp(scores.double(), dim=1).float()
    torch.testing.assert_close(_native.row_logsumexp(scores), expected, rtol=1e-5, atol=1e-4)
