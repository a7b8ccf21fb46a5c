"""The compiled extensions build, import and compute what they claim."""

from __future__ import annotations

import shutil
import sys
import types

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


def _built_extensions():
    extensions = [_native.require_cpu_ext()]
    if _native.cuda_ext is not None:  # imports without a GPU
        extensions.append(_native.cuda_ext)
    return extensions


def test_every_built_extension_exports_the_boundary_codes_of_the_python_side():
    """The enums and dtype codes the kernels read are defined once per side: C++ (contrastive_row.h, half_store.h,
    exported by name through boundary_codes.h) and Python (st_fast._native). They must agree exactly."""
    expected = {enum.__name__: {m.name: int(m) for m in enum} for enum in _native.BOUNDARY_ENUMS}
    assert set(expected) == {"SegmentKind", "HardnessKind", "StoreDtype"}
    for ext in _built_extensions():
        assert ext.boundary_codes == expected, ext.__name__
        assert _native.boundary_errors(ext) == []


def test_the_ops_use_the_boundary_enums():
    from st_fast.ops import layout

    assert layout.SegmentKind is _native.SegmentKind
    assert layout.HardnessKind is _native.HardnessKind


@pytest.mark.parametrize(
    "change",
    [
        lambda codes: codes["StoreDtype"].update(BF16=2, FP16=1),  # the old CUDA dtype order
        lambda codes: codes["SegmentKind"].pop("D2D"),
        lambda codes: codes["HardnessKind"].update(EXTRA=4),
        lambda codes: codes.pop("HardnessKind"),
        lambda codes: codes.update(NewEnum={"A": 0}),
    ],
)
def test_an_extension_whose_codes_disagree_is_refused_at_import(monkeypatch, change):
    codes = {name: dict(table) for name, table in _native.require_cpu_ext().boundary_codes.items()}
    change(codes)
    fake = types.ModuleType("st_fast._fake_ext")
    fake.boundary_codes = codes
    monkeypatch.setitem(sys.modules, "st_fast._fake_ext", fake)
    assert _native.boundary_errors(fake)
    ext, error = _native._try_import("st_fast._fake_ext")
    assert ext is None and "disagree" in error
    fake.boundary_codes = _native.require_cpu_ext().boundary_codes
    assert _native._try_import("st_fast._fake_ext") == (fake, None)
    del fake.boundary_codes
    assert _native._try_import("st_fast._fake_ext")[0] is None


@pytest.mark.parametrize(
    "kinds, hardness",
    [([0, 4], 0), ([0, -1], 0), ([1], 0), ([0], 4), ([0], -1)],
    ids=["kind4", "kind-1", "q2q-first", "hardness4", "hardness-1"],
)
def test_the_row_kernel_rejects_codes_outside_the_enums(kinds, hardness):
    """The raw entry point checks the codes it is given before it reads any pointer (all null here)."""
    with pytest.raises(ValueError):
        _native.require_cpu_ext().contrastive_rows(
            [0] * len(kinds), [0] * len(kinds), [0] * len(kinds), [0] * len(kinds), 0, [4] * len(kinds), kinds,
            1, 0, 4, 1.0, 0.0, hardness, True, -1.0, 0,
        )  # fmt: skip


def test_coefficient_store_codes_select_the_matching_dtype():
    """A swapped StoreDtype code would store bfloat16 bits into a float16 tensor (or the reverse): these values round
    differently in each dtype, and float16 saturates where bfloat16 does not."""
    values = torch.tensor([1.0 + 2.0**-9, 1.0 + 2.0**-12, 70000.0, -1.0e6, 3.0e-6, 0.0, -2.5])
    for dtype in _native.STORE_DTYPES:
        expected = values.clamp(-65504.0, 65504.0) if dtype == torch.float16 else values
        out = _native.store_coefficients(values, dtype)
        assert out.dtype == dtype
        assert torch.equal(out, expected.to(dtype)), dtype
    assert torch.equal(_native.store_coefficients(values[::2], torch.bfloat16), values[::2].bfloat16())


@pytest.mark.parametrize(
    "values, dtype",
    [(torch.ones(3, dtype=torch.float64), torch.float16), (torch.ones(3), torch.float64), (torch.ones(3), torch.int8)],
)
def test_coefficient_store_rejects_bad_input(values, dtype):
    with pytest.raises(ValueError):
        _native.store_coefficients(values, dtype)


def test_test_only_native_code_is_not_shipped():
    """row_logsumexp and xxh64 only served tests: torch.logsumexp and the xxhash package are their references."""
    cpu = _native.require_cpu_ext()
    assert not {"row_logsumexp_f32", "xxh64"} & set(dir(cpu))
    assert not {"flat", "offsets"} & set(dir(cpu.NoDupPass))
    assert not {"cell_bytes", "cell_present"} & set(dir(cpu.NoDupSamplerCore))
    if _native.cuda_ext is not None:
        assert "row_logsumexp" not in dir(_native.cuda_ext)


def test_an_extension_missing_from_the_install_says_so():
    from st_fast import _native

    ext, why = _native._try_import("st_fast._C_not_built")
    assert ext is None and "not built into this install" in why and "pip install ." in why
    ext, why = _native._try_import("st_fast._C_cuda_not_built")
    assert ext is None and "ST_FAST_CUDA=1 pip install ." in why


def test_the_cuda_row_lanes_switch_takes_a_warp_or_a_block():
    """ST_FAST_CUDA_ROW_LANES (a measuring switch: 32 threads per row by default, 256 for the block kernels) is read
    at import and refused outside its choices."""
    import os
    import subprocess

    code = "from st_fast import _native; print(_native.CUDA_ROW_LANES)"
    for value, expected in (("", "32"), ("256", "256"), ("32", "32")):
        env = {**os.environ, "ST_FAST_CUDA_ROW_LANES": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
    env = {**os.environ, "ST_FAST_CUDA_ROW_LANES": "64"}
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "ST_FAST_CUDA_ROW_LANES must be one of (32, 256)" in failed.stderr
