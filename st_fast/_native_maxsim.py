"""The validated wrappers of the MaxSim kernels' native entry points: the ``native`` backend of the MaxSim op, on the
CPU (st_fast._C: csrc/maxsim.cpp, csrc/include/st_fast/maxsim_cpu.h, OpenMP) and on CUDA (st_fast._C_cuda:
csrc/cuda/maxsim.cu, csrc/include/st_fast/maxsim_lanes.h, on the current stream of the tensors' device).

Each wrapper checks shape, dtype, device and contiguity of every tensor, then fills its entry point's argument object
by field name (csrc/include/st_fast/maxsim_calls.h) through :func:`st_fast._native.build_call`. Embeddings are
float32 or bfloat16 (the kernels read bf16 bits and round each product to bf16, as stock's einsum); masks are bool.
"""

from __future__ import annotations

import torch

from st_fast import _native

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # MaxSimDtype (csrc/include/st_fast/maxsim_args.h)
_ENTRY_POINTS = ("maxsim_forward", "maxsim_backward")


def _extension(device: torch.device):
    """The loaded extension whose MaxSim kernels run on ``device``'s type (st_fast._C on the CPU, st_fast._C_cuda on
    CUDA), or None."""
    return {"cpu": _native.cpu_ext, "cuda": _native.cuda_ext}.get(device.type)


def native_maxsim_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the native MaxSim kernels run on ``device`` for embeddings of ``dtype``: float32 / bfloat16 on the CPU
    (st_fast._C) or on CUDA (st_fast._C_cuda built with the MaxSim kernels)."""
    ext = _extension(torch.device(device))
    return dtype in DTYPE_CODES and ext is not None and all(hasattr(ext, name) for name in _ENTRY_POINTS)


def _run(entry: str, call_class: str, device: torch.device, fields: dict) -> None:
    """Runs ``entry`` of the extension for ``device`` on its argument object built from ``fields`` (CUDA: on the
    current stream of ``device``). Raw addresses: the caller has validated every tensor."""
    if device.type == "cuda":
        ext = _native.require_cuda_ext()
        with torch.cuda.device(device):
            getattr(ext, entry)(_native.build_call(ext, call_class, fields), torch.cuda.current_stream().cuda_stream)
    else:
        ext = _native.require_cpu_ext()
        getattr(ext, entry)(_native.build_call(ext, call_class, fields))


def _check(queries: torch.Tensor, documents: torch.Tensor, query_mask: torch.Tensor) -> None:
    if not native_maxsim_available(queries.device, queries.dtype):
        raise RuntimeError(
            f"the native MaxSim kernels take float32 / bfloat16 embeddings on the CPU (st_fast._C) or on CUDA "
            f"(st_fast._C_cuda), not {queries.device} / {queries.dtype} (see st_fast.native_info())"
        )
    if documents.dtype != queries.dtype or documents.device != queries.device:
        raise ValueError("native MaxSim: queries and documents must share dtype and device")
    if query_mask.device != queries.device:
        raise ValueError("native MaxSim: the masks must be on the embeddings' device")
    for tensor in (queries, documents, query_mask):
        if not tensor.is_contiguous():
            raise ValueError("native MaxSim: tensors must be contiguous")
    if queries.dim() != 3 or documents.dim() != 3 or documents.shape[-1] != queries.shape[-1]:
        raise ValueError("native MaxSim: queries (B, Lq, D) and documents (M, Ld, D)")
    if query_mask.dtype != torch.bool or query_mask.shape != queries.shape[:2]:
        raise ValueError("native MaxSim: query_mask must be bool (B, Lq)")


def _shape_fields(queries: torch.Tensor, documents: torch.Tensor) -> dict:
    return dict(
        queries=queries.shape[0], documents=documents.shape[0], query_tokens=queries.shape[1],
        document_tokens=documents.shape[1], dim=queries.shape[2], dtype=DTYPE_CODES[queries.dtype],
    )  # fmt: skip


def maxsim_forward(queries, query_mask, documents, document_mask, need_indices):
    """MaxSim sums (B, M) float32 and, with ``need_indices``, the first arg-max (B, Lq, M) int32 (see
    :func:`st_fast.ops.maxsim.torch_backend.maxsim_forward`)."""
    _check(queries, documents, query_mask)
    if (
        document_mask.dtype != torch.bool
        or document_mask.shape != documents.shape[:2]
        or not document_mask.is_contiguous()
        or document_mask.device != queries.device
    ):
        raise ValueError("native MaxSim: document_mask must be contiguous bool (M, Ld) on the embeddings' device")
    num_queries, query_tokens = queries.shape[:2]
    device = queries.device
    empty = documents.shape[-1] == 0 or 0 in (num_queries, documents.shape[0])
    new = torch.zeros if empty else torch.empty  # the kernels (CPU and CUDA) write every element
    sums = new(num_queries, documents.shape[0], dtype=torch.float32, device=device)
    index = None
    if need_indices:
        index = new(num_queries, query_tokens, documents.shape[0], dtype=torch.int32, device=device)
    if empty:
        return sums, index
    fields = _shape_fields(queries, documents)
    fields.update(
        queries_ptr=queries.data_ptr(), documents_ptr=documents.data_ptr(), query_mask_ptr=query_mask.data_ptr(),
        document_mask_ptr=document_mask.data_ptr(), fill=float(torch.finfo(queries.dtype).min),
        sums_ptr=sums.data_ptr(), index_ptr=0 if index is None else index.data_ptr(),
    )  # fmt: skip
    _run("maxsim_forward", "MaxSimForwardCall", device, fields)
    return sums, index


def maxsim_backward(queries, query_mask, documents, index, grad_sums):
    """(dL/dqueries (B, Lq, D), dL/ddocuments (M, Ld, D)) float32 through the forward's arg-max ``index``."""
    _check(queries, documents, query_mask)
    expected = (queries.shape[0], queries.shape[1], documents.shape[0])
    if index.dtype != torch.int32 or tuple(index.shape) != expected or not index.is_contiguous():
        raise ValueError(f"native MaxSim: index must be contiguous int32 {expected}")
    if index.device != queries.device:
        raise ValueError("native MaxSim: index must be on the embeddings' device")
    device = queries.device
    grad_sums = grad_sums.to(device=device, dtype=torch.float32).contiguous()
    empty = 0 in (*queries.shape, *documents.shape)
    new = torch.zeros if empty else torch.empty  # the kernels (CPU and CUDA) write every element
    grad_queries = new(queries.shape, dtype=torch.float32, device=device)
    grad_documents = new(documents.shape, dtype=torch.float32, device=device)
    if empty:
        return grad_queries, grad_documents
    fields = _shape_fields(queries, documents)
    fields.update(
        queries_ptr=queries.data_ptr(), documents_ptr=documents.data_ptr(), query_mask_ptr=query_mask.data_ptr(),
        index_ptr=index.data_ptr(), grad_sums_ptr=grad_sums.data_ptr(), grad_queries_ptr=grad_queries.data_ptr(),
        grad_documents_ptr=grad_documents.data_ptr(),
    )  # fmt: skip
    _run("maxsim_backward", "MaxSimBackwardCall", device, fields)
    return grad_queries, grad_documents
