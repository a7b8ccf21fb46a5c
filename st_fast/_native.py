"""The Python/C++ boundary: loading of the compiled extensions, the integer codes they share with Python, and the
one dispatch point through which every row-kernel entry point is called.

``st_fast._C`` (C++/pybind11) is always built; ``st_fast._C_cuda`` only where nvcc was available at build time.
(``st_fast._C_test``, test-only native code, is built only for the test environment and loaded by the tests.)

* Codes: :class:`SegmentKind`, :class:`HardnessKind` and :class:`StoreDtype` are defined here, once, for Python
  (``st_fast.ops.layout`` re-exports the first two). Their C++ counterparts (csrc/include/st_fast/row_kernel_args.h,
  half_store.h) are exported by each extension as ``boundary_codes`` ({enum name: {member name: code}}); an extension
  whose codes differ from these is refused at import, like one built for another Python (see :func:`boundary_errors`).
* Calls: :func:`run_row_entry` builds an entry point's argument object (a class of the extension it runs on,
  csrc/include/st_fast/row_kernel_calls.h) by field name and runs it on the CPU or CUDA extension. The validated
  wrappers that fill those fields live by job: :mod:`st_fast._native_rows` (the row kernels) and
  :mod:`st_fast._native_sampler` (``add_arrow_chunks``); :func:`store_coefficients` and :func:`row_expf` (test hooks
  of the kernels' coefficient stores and exp) are here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from enum import IntEnum
from types import ModuleType
from typing import Any

import torch


class SegmentKind(IntEnum):
    """The kind of a score segment of the contrastive row kernels, named by its rule for the row's own column(s) g
    (row g's global index, W the column block width; see st_fast/ops/layout.py)."""

    OWN_POSITIVE = 0  # column g holds the row's positive (the target); the hardness penalty applies here only
    OWN_MASKED = 1  # column g is the row vector itself: masked (-inf)
    PLAIN = 2  # nothing masked; holds the positive at column g only under per-direction partitions
    OWN_GROUP_MASKED = 3  # every column c with c % W == g masked (the row's own positive and hard negatives)


class HardnessKind(IntEnum):
    """Which OWN_POSITIVE entries the hardness penalty applies to (see st_fast/ops/layout.py)."""

    NONE = 0
    IN_BATCH = 1
    HARD = 2
    ALL = 3


class StoreDtype(IntEnum):
    """The dtype in which the row kernels store gradient coefficients."""

    FP32 = 0
    BF16 = 1
    FP16 = 2


STORE_DTYPES = {torch.float32: StoreDtype.FP32, torch.bfloat16: StoreDtype.BF16, torch.float16: StoreDtype.FP16}

BOUNDARY_ENUMS: tuple[type[IntEnum], ...] = (SegmentKind, HardnessKind, StoreDtype)


def boundary_errors(ext: ModuleType) -> list[str]:
    """How ``ext.boundary_codes`` differs from the enums above (empty when they agree)."""
    exported = getattr(ext, "boundary_codes", None)
    if not isinstance(exported, dict):
        return ["it exports no boundary_codes"]
    errors = []
    for enum in BOUNDARY_ENUMS:
        expected = {member.name: int(member) for member in enum}
        actual = exported.get(enum.__name__)
        if actual != expected:
            errors.append(f"{enum.__name__}: the extension has {actual}, st_fast/_native.py has {expected}")
    unknown = sorted(set(exported) - {enum.__name__ for enum in BOUNDARY_ENUMS})
    if unknown:
        errors.append(f"codes unknown to st_fast/_native.py: {unknown}")
    return errors


def _try_import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        ext = importlib.import_module(name)
    except ModuleNotFoundError as exc:  # not built into this install
        if exc.name != name:
            return None, str(exc)
        how = "ST_FAST_CUDA=1 pip install ." if "_cuda" in name.rsplit(".", 1)[-1] else "pip install ."
        return None, f"not built into this install (e.g. a CPU-only wheel or build); build it with `{how}`"
    except ImportError as exc:  # built for another Python, or a missing shared library
        return None, str(exc)
    errors = boundary_errors(ext)
    if errors:  # built from other sources than this Python code: its kernels would misread the codes
        return None, f"{name} was built from sources that disagree with st_fast/_native.py ({'; '.join(errors)})"
    return ext, None


cpu_ext, cpu_ext_error = _try_import("st_fast._C")
cuda_ext, cuda_ext_error = _try_import("st_fast._C_cuda")


def require_cpu_ext() -> ModuleType:
    if cpu_ext is None:
        raise RuntimeError(
            f"st_fast's C++ extension is not available ({cpu_ext_error}). Reinstall st_fast with `pip install .` "
            "so that it is compiled."
        )
    return cpu_ext


def require_cuda_ext() -> ModuleType:
    if cuda_ext is None:
        raise RuntimeError(
            f"st_fast's CUDA extension is not available ({cuda_ext_error}). Build it with "
            "`ST_FAST_CUDA=1 pip install --no-build-isolation .` on a machine with nvcc."
        )
    return cuda_ext


def triton_status() -> tuple[bool, str]:
    """(importable, why not) for Triton, without importing it when it is absent."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'st-fast[triton]', or a CUDA build of torch, brings it)"
    return True, ""


def native_info() -> dict[str, Any]:
    """What compiled and optional parts this installation has, for logs and bug reports."""
    triton_ok, triton_why = triton_status()
    return {
        "cpu_extension": cpu_ext is not None,
        "cpu_extension_error": cpu_ext_error,
        "openmp": bool(cpu_ext is not None and cpu_ext.openmp),
        "openmp_threads": cpu_ext.openmp_max_threads() if cpu_ext is not None else 0,
        "cuda_extension": cuda_ext is not None,
        "cuda_extension_error": cuda_ext_error,
        "cuda_devices_seen_by_extension": cuda_ext.device_count() if cuda_ext is not None else 0,
        # the CUDA release and gencode targets the extension was compiled for, e.g. "13.0", ["sm_80", "sm_90",
        # "compute_90"] (PTX of the newest target, which newer GPUs JIT-compile)
        "cuda_version": getattr(cuda_ext, "cuda_version", None),
        "cuda_archs": getattr(cuda_ext, "cuda_archs", "").split() if cuda_ext is not None else [],
        "cuda_row_lanes": CUDA_ROW_LANES,  # threads per row of the CUDA row kernels (ST_FAST_CUDA_ROW_LANES)
        "torch": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
        "triton": triton_ok,
        "triton_error": triton_why or None,
    }


# --------------------------------------------------------------------------------------------------------------------
# The dispatch point of the row-kernel entry points (their wrappers: st_fast/_native_rows.py).

# Threads per row of the CUDA row kernels: 32 (one warp per row, the default) or 256 (one block per row, BlockLanes in
# csrc/cuda/block_lanes.cuh): a switch for measuring the block kernels on a GPU (ST_FAST_CUDA_ROW_LANES=256 python -m
# benchmarks fused_loss --gpu), not yet a choice made from measurements.
CUDA_ROW_LANES_CHOICES = (32, 256)
CUDA_ROW_LANES = int(os.environ.get("ST_FAST_CUDA_ROW_LANES") or 32)
if CUDA_ROW_LANES not in CUDA_ROW_LANES_CHOICES:
    raise ValueError(f"ST_FAST_CUDA_ROW_LANES must be one of {CUDA_ROW_LANES_CHOICES}, got {CUDA_ROW_LANES}")


def build_call(ext: ModuleType, call_class: str, fields: Mapping[str, Any]) -> Any:
    """``ext``'s argument object ``call_class`` (e.g. ``"RowsCall"``) with ``fields`` set by name (an unknown name
    raises AttributeError: the C++ struct and its binding, csrc/include/st_fast/row_kernel_bindings.h, define them)."""
    call = getattr(ext, call_class)()
    for name, value in fields.items():
        setattr(call, name, value)
    return call


def run_row_entry(entry: str, call_class: str, device: torch.device, fields: Mapping[str, Any]) -> None:
    """Runs the row-kernel entry point ``entry`` of the extension for ``device`` (CPU, or CUDA on the current stream
    of ``device`` with :data:`CUDA_ROW_LANES` threads per row) on its argument object ``call_class`` built from
    ``fields``. Raw addresses: the caller has validated every tensor."""
    if device.type == "cuda":
        ext = require_cuda_ext()
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream().cuda_stream
            getattr(ext, entry)(build_call(ext, call_class, fields), stream, lanes_per_row=CUDA_ROW_LANES)
    else:
        ext = require_cpu_ext()
        getattr(ext, entry)(build_call(ext, call_class, fields))


_ROW_KERNEL_ENTRY_POINTS = ("contrastive_rows", "contrastive_statistics", "contrastive_coefficients")


def native_row_kernel_available(device: torch.device) -> bool:
    """Whether the extension for ``device`` has the row kernels' entry points."""
    ext = {"cpu": cpu_ext, "cuda": cuda_ext}.get(device.type)
    return ext is not None and all(hasattr(ext, name) for name in _ROW_KERNEL_ENTRY_POINTS)


def store_coefficients(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (fp32, CPU) stored as ``dtype`` element by element exactly as the row kernels store coefficients
    (round to nearest even; float16 saturates at +-65504). A test hook of csrc/include/st_fast/half_store.h."""
    if values.dtype != torch.float32 or values.device.type != "cpu":
        raise ValueError(
            f"store_coefficients: values must be a float32 CPU tensor, got {values.dtype} on {values.device}"
        )
    if dtype not in STORE_DTYPES:
        raise ValueError(f"store_coefficients: dtype must be float32, bfloat16 or float16, got {dtype}")
    values = values.contiguous()
    out = torch.empty(values.shape, dtype=dtype)
    require_cpu_ext().store_f32_as(values.data_ptr(), out.data_ptr(), values.numel(), int(STORE_DTYPES[dtype]))
    return out


def row_expf(values: torch.Tensor) -> torch.Tensor:
    """exp of ``values`` (fp32, CPU) by the CPU row kernels' own exp (``row_expf`` in
    csrc/include/st_fast/portability.h: a vectorizable polynomial; the CUDA build uses expf). A test hook."""
    if values.dtype != torch.float32 or values.device.type != "cpu":
        raise ValueError(f"row_expf: values must be a float32 CPU tensor, got {values.dtype} on {values.device}")
    values = values.contiguous()
    out = torch.empty_like(values)
    require_cpu_ext().row_expf(values.data_ptr(), out.data_ptr(), values.numel())
    return out
