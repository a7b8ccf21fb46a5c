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


def test_test_only_native_code_is_not_shipped():
    """row_logsumexp and xxh64 only served tests: torch.logsumexp and the xxhash package are their references."""
    cpu = _native.require_cpu_ext()
    assert not {"row_logsumexp_f32", "xxh64"} & set(dir(cpu))
    if _native.cuda_ext is not None:
        assert "row_logsumexp" not in dir(_native.cuda_ext)
