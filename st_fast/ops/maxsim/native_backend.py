"""The ``native`` backend of the MaxSim op, float32 and bfloat16: the C++ kernels on the CPU
(csrc/include/st_fast/maxsim_cpu.h: the forward as register tiles with the max epilogue, no products tensor at all;
the backward OpenMP-parallel over queries (dQ) and documents (dD)) and the CUDA kernels on a GPU
(csrc/include/st_fast/maxsim_lanes.h: the forward as one block per (document, queries) over shared-memory slices with
the running max in registers; the backward one thread per gradient column). No atomics: the same bits every run."""

from __future__ import annotations

from st_fast import _native_maxsim
from st_fast.ops.maxsim.torch_backend import TorchBackend, torch_computes


class NativeBackend:
    """The native backend object (see :mod:`st_fast.ops.maxsim.dispatch`); the calls of
    :func:`~st_fast.ops.maxsim.torch_backend.torch_computes` are the torch backend's (same index layout, so the
    backward follows the forward either way)."""

    name = "native"

    def forward(self, queries, query_mask, documents, document_mask, need_indices):
        if torch_computes(queries, documents):
            return TorchBackend().forward(queries, query_mask, documents, document_mask, need_indices)
        return _native_maxsim.maxsim_forward(
            queries.contiguous(), query_mask.contiguous(), documents.contiguous(), document_mask.contiguous(),
            need_indices,
        )  # fmt: skip

    def backward(self, queries, query_mask, documents, index, grad_sums):
        if 0 in (queries.shape[1], documents.shape[1]):
            return TorchBackend().backward(queries, query_mask, documents, index, grad_sums)
        return _native_maxsim.maxsim_backward(
            queries.contiguous(), query_mask.contiguous(), documents.contiguous(), index.contiguous(), grad_sums
        )
