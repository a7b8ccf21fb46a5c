"""The compiled extensions build, import and compute what they claim."""

from __future__ import annotations

import shutil
import sys
import types

import pytest
import torch
from native_testing import load_test_extension

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
    """The enums and dtype codes the kernels read are defined once per side: C++ (row_kernel_args.h, half_store.h,
    exported by name through boundary_codes.h) and Python (st_fast._native). They must agree exactly (the test-only
    extension's too)."""
    expected = {enum.__name__: {m.name: int(m) for m in enum} for enum in _native.BOUNDARY_ENUMS}
    assert set(expected) == {"SegmentKind", "HardnessKind", "StoreDtype"}
    for ext in [*_built_extensions(), load_test_extension()]:
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
        lambda codes: codes["SegmentKind"].pop("OWN_GROUP_MASKED"),
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
    fields = {
        "scores": [0] * len(kinds), "lengths": [4] * len(kinds), "kinds": kinds, "rows": 1, "row_start": 0,
        "width": 4, "scale": 1.0, "alpha": 0.0, "hardness": hardness, "joint": True, "grad_scale": -1.0,
    }  # fmt: skip
    with pytest.raises(ValueError):
        _native.require_cpu_ext().contrastive_rows(_native.build_call(_native.require_cpu_ext(), "RowsCall", fields))


ROW_KERNEL_CALLS = ("RowsCall", "StatisticsCall", "CoefficientsCall", "ExpStatisticsCall", "ExpCoefficientsCall")
MAXSIM_CALLS = ("MaxSimForwardCall", "MaxSimBackwardCall")  # maxsim_bindings.h


def _fields(cls) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_each_entry_point_takes_one_argument_object_bound_once_for_every_extension():
    """The row kernel's argument objects (csrc/include/st_fast/row_kernel_calls.h) are bound by one header for the
    CPU, CUDA and test extensions: the same classes with the same fields everywhere; a misspelt field is refused."""
    cpu = _native.require_cpu_ext()
    for ext in [*_built_extensions(), load_test_extension()]:
        for name in ROW_KERNEL_CALLS + MAXSIM_CALLS:
            assert _fields(getattr(ext, name)) == _fields(getattr(cpu, name)), (ext.__name__, name)
    assert {"scores", "kinds", "labels", "row_loss", "grad_scale_factor"} <= _fields(cpu.RowsCall)
    assert "row_loss" not in _fields(cpu.CoefficientsCall) and "shift" in _fields(cpu.ExpStatisticsCall)
    call = _native.build_call(cpu, "RowsCall", {"scores": [1, 2], "kinds": [0, 2], "scale": 20.0})
    assert (call.scores, call.kinds, call.scale) == ([1, 2], [0, 2], 20.0)
    with pytest.raises(AttributeError):
        _native.build_call(cpu, "RowsCall", {"row_lse": 0})


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
    """row_logsumexp and xxh64 only served tests: torch.logsumexp and the xxhash package are their references. The
    emulation of the CUDA build's lanes lives in the test-only extension st_fast._C_test (tests/native_testing.py),
    which setup.py builds only with ST_FAST_TEST_EXTENSIONS=1 (tests/test_packaging.py: no wheel carries it)."""
    cpu = _native.require_cpu_ext()
    assert not {"row_logsumexp_f32", "xxh64"} & set(dir(cpu))
    assert not [name for name in dir(cpu) if "emulated" in name or "lanes" in name]
    assert not {"flat", "offsets"} & set(dir(cpu.NoDupPass))
    assert not {"cell_bytes", "cell_present"} & set(dir(cpu.NoDupSamplerCore))
    if _native.cuda_ext is not None:
        assert "row_logsumexp" not in dir(_native.cuda_ext)
        assert not [name for name in dir(_native.cuda_ext) if "emulated" in name]
    assert {f"emulated_lanes_{n}" for n in (4, 32, 64, 256)} | {"emulated_maxsim"} <= set(dir(load_test_extension()))


def test_the_test_extension_is_built_only_when_asked():
    """setup.py's extensions: st_fast._C_test only with ST_FAST_TEST_EXTENSIONS=1, and never for a wheel."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "setup.py"
    spec = importlib.util.spec_from_file_location("st_fast_setup_py", path)
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ST_FAST_CUDA", "0")
        for value, built in (("1", True), ("0", False), (None, False)):
            if value is None:
                patch.delenv(setup_py.TEST_EXTENSIONS_ENV, raising=False)
            else:
                patch.setenv(setup_py.TEST_EXTENSIONS_ENV, value)
            names = [ext.name for ext in setup_py._extensions()[0]]
            assert ("st_fast._C_test" in names) is built, (value, names)
            assert "st_fast._C" in names
        patch.setenv(setup_py.TEST_EXTENSIONS_ENV, "1")
        patch.setattr(sys, "argv", ["setup.py", "bdist_wheel"])  # a wheel never carries it
        assert "st_fast._C_test" not in [ext.name for ext in setup_py._extensions()[0]]


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
