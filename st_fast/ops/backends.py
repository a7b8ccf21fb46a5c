"""The backends of the fused contrastive op and the one dispatch point that picks them.

A backend turns (queries (W, D), docs (k·W, D), spec, row offset, local batch size) into the mean loss over the
local rows, and later into the gradients of both operands:

* ``torch``:  row-chunked GEMMs + the PyTorch row kernel; gradients computed during the forward (any device).
* ``native``: row-chunked GEMMs + the C++ row kernel (CPU) or the CUDA row kernel (GPU); same driver.
  On CUDA both take 16-bit embeddings raw: 16-bit tensor-core GEMMs with fp32 accumulation and output, the cosine
  normalization applied as row / column scales (see :mod:`st_fast.ops.chunked`); on the CPU (no fast 16-bit
  GEMMs) they upcast and normalize first, as stock does.
* ``triton``: fused Triton kernels that never store a score tile: LSE statistics in the forward, recomputed
  scores in the backward (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
* ``auto``:   native when its extension is built for the device (CPU or CUDA), else triton on CUDA, else torch;
  float64 inputs always take torch (the only backend that computes in float64, as stock does for float64).
  Native is the fastest backend on CUDA (benchmarks/fused_loss.py --gpu; see README, Performance).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from st_fast.ops.chunked import LossAndGrad, RowKernel, chunked_loss_and_grad
from st_fast.ops.row_kernel_torch import torch_row_kernel
from st_fast.ops.spec import ContrastiveSpec, compute_dtype

BACKENDS = ("auto", "triton", "native", "torch")


class Backend(Protocol):
    name: str

    def takes_raw_operands(self, dtype: torch.dtype, device: torch.device) -> bool:
        """True: the backend takes the embeddings as they are and applies the cosine normalization itself
        (``forward(..., normalize=True)``); False: it takes them normalized, in :meth:`operand_dtype`."""
        ...

    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype: ...

    def forward(
        self, queries: torch.Tensor, docs: torch.Tensor, spec: ContrastiveSpec, row_offset: int, batch_size: int,
        need_grad: bool, normalize: bool = False,
    ) -> tuple[torch.Tensor, Any]: ...  # fmt: skip

    def backward(self, state: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class ChunkedBackend:
    """Gradients are computed in the forward pass (3 GEMMs per chunk) and scaled by the incoming gradient later.
    fp16 / bf16 embeddings are taken raw (16-bit GEMMs, see :mod:`st_fast.ops.chunked`) on CUDA only, where 16-bit
    GEMMs are fast (tests/ops/test_raw_16bit.py patches :meth:`takes_raw_operands` to run that path on the CPU)."""

    def __init__(self, name: str, row_kernel: RowKernel, chunk_bytes: int | None = None) -> None:
        self.name = name
        self.row_kernel = row_kernel
        self.chunk_bytes = chunk_bytes

    def takes_raw_operands(self, dtype: torch.dtype, device: torch.device) -> bool:
        return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)

    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return compute_dtype(dtype)

    def forward(self, queries, docs, spec, row_offset, batch_size, need_grad, normalize=False):
        result = chunked_loss_and_grad(
            queries, docs, spec, row_offset, batch_size, self.row_kernel, need_grad=need_grad,
            chunk_bytes=self.chunk_bytes, normalize=normalize,
        )  # fmt: skip
        return result.loss, result

    def backward(self, state: LossAndGrad, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return state.grad_queries * grad_loss, state.grad_docs * grad_loss


def _native_backend() -> ChunkedBackend:
    from st_fast.ops.row_kernel_native import native_row_kernel

    return ChunkedBackend("native", native_row_kernel)


def _triton_backend() -> Backend:
    from st_fast.ops.triton_backend import TritonBackend

    return TritonBackend()


def native_available(device: torch.device) -> bool:
    try:
        from st_fast.ops.row_kernel_native import native_row_kernel_available
    except ImportError:
        return False
    return native_row_kernel_available(device)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend object for ``name`` on ``device``; raises a clear error for one that cannot run there."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if dtype == torch.float64:
            name = "torch"
        elif native_available(device):
            name = "native"
        else:
            name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return ChunkedBackend("torch", torch_row_kernel)
    if name == "native":
        if dtype == torch.float64:
            raise TypeError("the native backend computes in float32; use backend='torch' for float64 embeddings")
        if not native_available(device):
            raise RuntimeError(f"the native backend is not available on {device} (see st_fast.native_info())")
        return _native_backend()
    if dtype == torch.float64:
        raise TypeError("the triton backend takes float32/float16/bfloat16; use backend='torch' for float64")
    return _triton_backend()
