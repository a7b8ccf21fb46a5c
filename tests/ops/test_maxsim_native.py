"""The native CPU MaxSim kernels (csrc/maxsim.cpp, csrc/include/st_fast/maxsim_cpu.h) before they are bound into
st_fast's extension: built here as a standalone library (``-DST_FAST_MAXSIM_C_API``) and called through ctypes with
their argument objects, against the torch backend (the same sums and arg-max, the same gradients)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from st_fast.ops.maxsim.torch_backend import maxsim_backward, maxsim_forward

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class Shape(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int64) for name in ("queries", "documents", "query_tokens", "document_tokens", "dim")]
    _fields_ += [("dtype", ctypes.c_int32)]


class ForwardArgs(ctypes.Structure):
    _fields_ = [("shape", Shape), ("queries", ctypes.c_void_p), ("documents", ctypes.c_void_p),
                ("query_mask", ctypes.c_void_p), ("document_mask", ctypes.c_void_p), ("fill", ctypes.c_float),
                ("sums", ctypes.c_void_p), ("index", ctypes.c_void_p)]  # fmt: skip


class BackwardArgs(ctypes.Structure):
    _fields_ = [("shape", Shape), ("queries", ctypes.c_void_p), ("documents", ctypes.c_void_p),
                ("query_mask", ctypes.c_void_p), ("index", ctypes.c_void_p), ("grad_sums", ctypes.c_void_p),
                ("grad_queries", ctypes.c_void_p), ("grad_documents", ctypes.c_void_p)]  # fmt: skip


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the standalone MaxSim library")
    target = tmp_path_factory.mktemp("maxsim") / "libmaxsim.so"
    subprocess.run(
        [compiler, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-DST_FAST_MAXSIM_C_API",
         f"-I{ROOT / 'csrc' / 'include'}", str(ROOT / "csrc" / "maxsim.cpp"), "-o", str(target)],
        check=True,
    )  # fmt: skip
    return ctypes.CDLL(str(target))


def shape_of(queries, documents):
    return Shape(queries.shape[0], documents.shape[0], queries.shape[1], documents.shape[1], queries.shape[2],
                 DTYPES[queries.dtype])  # fmt: skip


def native_forward(library, queries, query_mask, documents, document_mask):
    sums = torch.empty(queries.shape[0], documents.shape[0])
    index = torch.empty(queries.shape[0], queries.shape[1], documents.shape[0], dtype=torch.int32)
    masks = query_mask.to(torch.uint8).contiguous(), document_mask.to(torch.uint8).contiguous()
    pointers = [t.data_ptr() for t in (queries, documents, *masks)]
    fill = torch.finfo(queries.dtype).min
    args = ForwardArgs(shape_of(queries, documents), *pointers, fill, sums.data_ptr(), index.data_ptr())
    library.st_fast_maxsim_forward_cpu(ctypes.byref(args))
    return sums, index


def native_backward(library, queries, query_mask, documents, index, grad_sums):
    grad_queries = torch.empty(queries.shape, dtype=torch.float32)
    grad_documents = torch.empty(documents.shape, dtype=torch.float32)
    mask = query_mask.to(torch.uint8).contiguous()
    tensors = (queries, documents, mask, index, grad_sums, grad_queries, grad_documents)
    args = BackwardArgs(shape_of(queries, documents), *[t.data_ptr() for t in tensors])
    library.st_fast_maxsim_backward_cpu(ctypes.byref(args))
    return grad_queries, grad_documents


def batch(dtype, seed, queries=5, documents=7, query_tokens=7, document_tokens=19, dim=24, grid=False):
    g = torch.Generator().manual_seed(seed)
    if grid:  # k/4 values: exact float32 products, common bfloat16 ties
        q = torch.randint(-4, 5, (queries, query_tokens, dim), generator=g) / 4
        d = torch.randint(-4, 5, (documents, document_tokens, dim), generator=g) / 4
    else:
        q = torch.randn(queries, query_tokens, dim, generator=g)
        d = torch.randn(documents, document_tokens, dim, generator=g)
    query_mask = torch.rand(queries, query_tokens, generator=g) > 0.25
    document_mask = torch.rand(documents, document_tokens, generator=g) > 0.3
    document_mask[2] = False  # an empty document
    return q.to(dtype), query_mask, d.to(dtype), document_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "sizes",
    [dict(), dict(query_tokens=4, document_tokens=16, dim=16), dict(query_tokens=1), dict(queries=37, documents=3)],
)
def test_native_kernels_equal_the_torch_backend(library, dtype, sizes):
    queries, query_mask, documents, document_mask = batch(dtype, seed=len(sizes), grid=dtype != torch.float32, **sizes)
    sums, index = native_forward(library, queries, query_mask, documents, document_mask)
    expected_sums, expected_index = maxsim_forward(queries, query_mask, documents, document_mask, True)
    live = document_mask.any(dim=-1)  # the sums of empty documents are replaced by the sentinel
    torch.testing.assert_close(sums[:, live], expected_sums[:, live], rtol=1e-6, atol=1e-5)
    assert torch.equal(index[:, :, live], expected_index[:, :, live])
    grad_sums = torch.randn(sums.shape) * live
    ours = native_backward(library, queries, query_mask, documents, index, grad_sums)
    expected = maxsim_backward(queries, query_mask, documents, expected_index, grad_sums)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    again = native_backward(library, queries, query_mask, documents, index, grad_sums)
    assert all(torch.equal(a, b) for a, b in zip(ours, again, strict=True))  # deterministic


def test_trailing_padding_equals_stock_colbert_scores(library):
    """Documents padded after their last token (the kernel skips those products) score as stock's colbert_scores,
    and their arg-max equals the torch backend's."""
    colbert = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring.colbert")
    queries, query_mask, documents, _ = batch(torch.float32, seed=21, documents=6, document_tokens=37)
    lengths = torch.tensor([37, 1, 16, 17, 33, 5])
    document_mask = torch.arange(37) < lengths.unsqueeze(-1)
    document_mask[2, 3] = False  # a hole before the padding
    sums, index = native_forward(library, queries, query_mask, documents, document_mask)
    stock = colbert.colbert_scores(queries, documents.unsqueeze(1), query_mask, document_mask.unsqueeze(1))
    torch.testing.assert_close(sums, stock, rtol=1e-6, atol=1e-5)
    assert torch.equal(index, maxsim_forward(queries, query_mask, documents, document_mask, True)[1])
