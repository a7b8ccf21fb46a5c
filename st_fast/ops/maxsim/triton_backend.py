"""The ``triton`` backend of the MaxSim op: one tile kernel with the max epilogue, and the shared sparse backward.

Program (i, m) computes query i against document m (:func:`_maxsim_forward_kernel`)::

    for each document-token tile t0 .. t0 + BLOCK_T:
        p[s, t]   = Σ_k q[i, s, k] · d[m, t0 + t, k]          tl.dot, fp32 accumulation
        p[s, t]   = dtype(p[s, t])                             one rounding to the embeddings' dtype, as stock's einsum
        p[s, t]   = finfo(dtype).min where token t is masked;  -inf past the document's last token
        running max m_s and its first arg-max a_s (strictly greater replaces: an earlier tile keeps a tie)
    sums[i, m]      = Σ_s mask_q[i, s] · m_s                  fp32
    index[i, s, m]  = a_s, or -1 - a_s where a_s is a masked token (its fill won: no gradient)

The (Lq, Ld) products never leave the program. The backward is :func:`st_fast.ops.maxsim.torch_backend.
maxsim_backward` (a gather and a deterministic scatter-add through ``index``). CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` (where bf16 operands are upcast to fp32 after the load: the interpreter computes bf16 dots
wrongly without an error; the products are still rounded to bf16 as above).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from st_fast.ops.maxsim.spec import DEFAULT_TILE_ELEMENTS
from st_fast.ops.maxsim.torch_backend import TorchBackend, maxsim_backward, torch_computes

_ROUND_TO = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _round_to(x, ROUND_TO: tl.constexpr):
    """fp32 ``x`` rounded to the ROUND_TO dtype (to nearest, ties to even, as torch), kept in fp32. bf16 is
    rounded on the bits: the interpreter's fp32 -> bf16 cast truncates."""
    if ROUND_TO == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(ROUND_TO).to(tl.float32)


@triton.jit
def _maxsim_forward_kernel(
    q_ptr, qmask_ptr, d_ptr, dmask_ptr, sums_ptr, index_ptr,
    M, LQ, LD, D,
    stride_qb, stride_qs, stride_db, stride_dt,
    fill,
    ROUND_TO: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, NEED_INDEX: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    i = tl.program_id(0)
    m = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    s_in = offs_s < LQ
    d_in = offs_d < D
    q = tl.load(
        q_ptr + i.to(tl.int64) * stride_qb + offs_s[:, None] * stride_qs + offs_d[None, :],
        mask=s_in[:, None] & d_in[None, :], other=0.0,
    )  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
    best = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    best_at = tl.zeros((BLOCK_S,), tl.int32)
    d_base = d_ptr + m.to(tl.int64) * stride_db
    for t0 in range(0, LD, BLOCK_T):
        t = t0 + offs_t
        t_in = t < LD
        d = tl.load(d_base + t[None, :] * stride_dt + offs_d[:, None], mask=d_in[:, None] & t_in[None, :], other=0.0)
        if UPCAST:
            d = d.to(tl.float32)
        products = _round_to(tl.dot(q, d, input_precision=INPUT_PRECISION), ROUND_TO)  # (BLOCK_S, BLOCK_T) fp32
        valid = tl.load(dmask_ptr + m.to(tl.int64) * LD + t, mask=t_in, other=0) != 0
        products = tl.where(valid[None, :], products, fill)
        products = tl.where(t_in[None, :], products, float("-inf"))
        tile_best = tl.max(products, axis=1)
        tile_at = tl.argmax(products, axis=1, tie_break_left=True).to(tl.int32) + t0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_at = tl.where(better, tile_at, best_at)
    query_valid = tl.load(qmask_ptr + i.to(tl.int64) * LQ + offs_s, mask=s_in, other=0) != 0
    total = tl.sum(tl.where(query_valid, best, best * 0.0), axis=0)  # a masked query token: stock's max · 0
    tl.store(sums_ptr + i.to(tl.int64) * M + m, total)
    if NEED_INDEX:
        # a masked token's fill that won is written as -1 - t (no gradient: the backward skips it)
        won_by_fill = tl.load(dmask_ptr + m.to(tl.int64) * LD + best_at, mask=s_in, other=1) == 0
        best_at = tl.where(won_by_fill, -1 - best_at, best_at)
        tl.store(index_ptr + (i.to(tl.int64) * LQ + offs_s) * M + m, best_at, mask=s_in)


def _input_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 at the "highest" matmul precision (as stock's einsum then computes), else 'tf32'."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def maxsim_forward(queries, query_mask, documents, document_mask, need_indices):
    """As :func:`st_fast.ops.maxsim.torch_backend.maxsim_forward` (float32 sums (B, M), int32 index (B, Lq, M))."""
    from st_fast.ops.triton_lse import triton_available_for

    triton_available_for(queries)
    num_queries, query_tokens, dim = queries.shape
    num_documents, document_tokens = documents.shape[:2]
    sums = torch.zeros(num_queries, num_documents, dtype=torch.float32, device=queries.device)
    index = torch.zeros(
        num_queries, query_tokens, num_documents if need_indices else 0, dtype=torch.int32, device=queries.device
    )
    if 0 in (num_queries, query_tokens, num_documents, document_tokens):
        return sums, index if need_indices else None
    queries = queries if queries.stride(-1) == 1 else queries.contiguous()
    documents = documents if documents.stride(-1) == 1 else documents.contiguous()
    interpret = os.environ.get("TRITON_INTERPRET") == "1" and queries.device.type == "cpu"
    _maxsim_forward_kernel[(num_queries, num_documents)](
        queries, query_mask.to(torch.int8).contiguous(), documents, document_mask.to(torch.int8).contiguous(),
        sums, index,
        num_documents, query_tokens, document_tokens, dim,
        queries.stride(0), queries.stride(1), documents.stride(0), documents.stride(1),
        float(torch.finfo(queries.dtype).min),
        ROUND_TO=_ROUND_TO[queries.dtype], UPCAST=interpret and queries.dtype == torch.bfloat16,
        INPUT_PRECISION=_input_precision(queries.dtype), NEED_INDEX=need_indices,
        BLOCK_S=max(16, triton.next_power_of_2(query_tokens)),
        BLOCK_T=max(16, min(64, triton.next_power_of_2(document_tokens))),
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )  # fmt: skip
    return sums, index if need_indices else None


class TritonBackend:
    """The triton backend object (see :mod:`st_fast.ops.maxsim.dispatch`): float16 / bfloat16 / float32."""

    name = "triton"

    def __init__(self, tile_elements: int = DEFAULT_TILE_ELEMENTS) -> None:
        self.tile_elements = tile_elements

    def forward(self, queries, query_mask, documents, document_mask, need_indices):
        if torch_computes(queries, documents):  # one host read of two booleans (see torch_computes)
            return TorchBackend(self.tile_elements).forward(queries, query_mask, documents, document_mask, need_indices)
        return maxsim_forward(queries, query_mask, documents, document_mask, need_indices)

    def backward(self, queries, query_mask, documents, index, grad_sums):
        return maxsim_backward(queries, query_mask, documents, index, grad_sums, self.tile_elements)
