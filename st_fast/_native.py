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

_CUDA_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


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


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (rows, cols), got shape {tuple(scores.shape)}")
    if scores.stride(1) != 1:
        raise ValueError("scores must have unit stride along the columns")


def row_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    """``logsumexp(scores, dim=1)`` in fp32 by the native row kernel. scores: (rows, cols) -> (rows,) fp32.

    CPU: fp32 input. CUDA: fp32/fp16/bf16 input, on the current stream.
    """
    _check_scores(scores)
    out = torch.empty(scores.shape[0], dtype=torch.float32, device=scores.device)
    if scores.device.type == "cpu":
        if scores.dtype != torch.float32:
            raise TypeError(f"the CPU row kernel takes float32 scores, got {scores.dtype}")
        require_cpu_ext().row_logsumexp_f32(
            scores.data_ptr(), scores.shape[0], scores.shape[1], scores.stride(0), out.data_ptr()
        )
    elif scores.device.type == "cuda":
        if scores.dtype not in _CUDA_DTYPE_CODES:
            raise TypeError(f"the CUDA row kernel takes float32/float16/bfloat16 scores, got {scores.dtype}")
        with torch.cuda.device(scores.device):
            require_cuda_ext().row_logsumexp(
                _CUDA_DTYPE_CODES[scores.dtype], scores.data_ptr(), scores.shape[0], scores.shape[1],
                scores.stride(0), out.data_ptr(), torch.cuda.current_stream().cuda_stream,
            )  # fmt: skip
    else:
        raise RuntimeError(f"no native row kernel for device {scores.device}")
    return out


def xxh64(data: bytes | str, seed: int = 0) -> int:
    """XXH64 of bytes (or of a str's UTF-8 encoding) as an unsigned 64-bit int; equals ``xxhash.xxh64_intdigest``."""
    return require_cpu_ext().xxh64(data, seed)
