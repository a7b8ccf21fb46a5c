"""The one dispatch point of the MaxSim op: ``backend=`` name, device and dtype -> a backend object.

Every backend object has ``forward(queries (B, Lq, D), query_mask (B, Lq) bool, documents (M, Ld, D), document_mask
(M, Ld) bool, need_indices) -> (sums (B, M), index (B, Lq, M) int32 or None)`` (index: the first arg-max document
token, or -1 - t where masked token t's fill won the max, which has no gradient) and ``backward(queries, query_mask,
documents, index, grad_sums) -> (d queries, d documents)`` in float32 (float64 for float64 embeddings); see
:mod:`st_fast.ops.maxsim.torch_backend`. The names are the other ops' (:data:`st_fast.ops.backends.BACKENDS`).
"""

from __future__ import annotations

import torch

from st_fast.ops.backends import BACKENDS
from st_fast.ops.maxsim.spec import DEFAULT_TILE_ELEMENTS


def _native_runs(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        from st_fast._native_maxsim import native_maxsim_available
    except ImportError:
        return False
    return native_maxsim_available(device, dtype)


def _triton_reason(device: torch.device) -> str | None:
    from st_fast.ops.triton_lse import triton_unavailable_reason

    return triton_unavailable_reason(device.type)


def resolve_maxsim_backend(name: str, device: torch.device, dtype: torch.dtype, tile_elements: int | None = None):
    """The MaxSim backend object for ``backend=name`` on ``device`` with embeddings of ``dtype``. ``auto``: ``native``
    on the CPU where its kernels run (float32 / bfloat16, st_fast's extension built), else ``torch``, which is also what
    ``auto`` takes on CUDA: the CUDA MaxSim kernels (``native`` on CUDA, float32 / bfloat16, st_fast's CUDA extension
    built) and the Triton kernel are checked on the CPU (the CUDA algorithm through its emulation,
    tests/ops/test_maxsim_emulated.py; Triton under its interpreter) but not yet timed on a GPU, so they are taken
    only when named, until ``bash benchmarks/gpu_check.sh`` has measured them against the torch backend's cuBLAS
    products. ``tile_elements`` bounds the products the torch backend holds at once.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`, or ``tile_elements`` < 1.
        TypeError: ``triton`` or ``native`` for float64 embeddings (use ``torch``).
        RuntimeError: ``triton`` where Triton cannot run (no triton, or CPU tensors without ``TRITON_INTERPRET=1``),
            ``native`` where its kernels do not run (float16, another device than the CPU / CUDA, or the extension for
            the device not built).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    tile_elements = DEFAULT_TILE_ELEMENTS if tile_elements is None else int(tile_elements)
    if tile_elements < 1:
        raise ValueError(f"tile_elements must be at least 1, got {tile_elements}")
    if name == "auto":
        name = "native" if device.type == "cpu" and _native_runs(device, dtype) else "torch"
    if name in ("triton", "native") and dtype == torch.float64:
        takes = "float16/bfloat16/float32" if name == "triton" else "float32/bfloat16"
        raise TypeError(f"the {name} MaxSim backend takes {takes}; use backend='torch' for float64")
    if name == "triton":
        reason = _triton_reason(device)
        if reason is not None:
            raise RuntimeError(reason)
        from st_fast.ops.maxsim.triton_backend import TritonBackend

        return TritonBackend(tile_elements)
    if name == "native":
        if not _native_runs(device, dtype):
            raise RuntimeError(
                f"the native MaxSim kernels take float32 / bfloat16 embeddings on the CPU (st_fast's extension "
                f"st_fast._C) or on CUDA (st_fast._C_cuda), not {device.type} / {dtype}"
                + (" (that extension is not built here)" if dtype in (torch.float32, torch.bfloat16) else "")
                + " (see st_fast.native_info()); use backend='torch' or 'auto'"
            )
        from st_fast.ops.maxsim.native_backend import NativeBackend

        return NativeBackend()
    from st_fast.ops.maxsim.torch_backend import TorchBackend

    return TorchBackend(tile_elements)
