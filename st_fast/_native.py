"""Loading of the compiled extensions and validated wrappers over their raw-pointer entry points.

``st_fast._C`` (C++/pybind11) is always built; ``st_fast._C_cuda`` only where nvcc was available at build time.
Both take raw data pointers, so every call goes through a wrapper here that checks shape, dtype, device and
contiguity first.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch


def _try_import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except ImportError as exc:  # not built, or built for another Python
        return None, str(exc)


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
        return False, "triton is not installed"
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
        "torch": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
        "triton": triton_ok,
        "triton_error": triton_why or None,
    }
