"""The native CPU MaxSim kernels (csrc/maxsim.cpp, csrc/include/st_fast/maxsim_cpu.h) through their validated
wrappers (st_fast/_native_maxsim.py) against the torch backend (the same sums and arg-max, the same gradients) and
stock's colbert_scores."""

from __future__ import annotations

import pytest
import torch

from st_fast import _native_maxsim
from st_fast.ops.maxsim.torch_backend import maxsim_backward, maxsim_forward

pytestmark = pytest.mark.skipif(
    not _native_maxsim.native_maxsim_available(torch.device("cpu"), torch.float32),
    reason="st_fast's extension is not built with the MaxSim kernels",
)


def native_forward(queries, query_mask, documents, document_mask):
    return _native_maxsim.maxsim_forward(queries, query_mask, documents, document_mask, True)


def native_backward(queries, query_mask, documents, index, grad_sums):
    return _native_maxsim.maxsim_backward(queries, query_mask, documents, index, grad_sums)


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
def test_native_kernels_equal_the_torch_backend(dtype, sizes):
    queries, query_mask, documents, document_mask = batch(dtype, seed=len(sizes), grid=dtype != torch.float32, **sizes)
    sums, index = native_forward(queries, query_mask, documents, document_mask)
    expected_sums, expected_index = maxsim_forward(queries, query_mask, documents, document_mask, True)
    live = document_mask.any(dim=-1)  # the sums of empty documents are replaced by the sentinel
    torch.testing.assert_close(sums[:, live], expected_sums[:, live], rtol=1e-6, atol=1e-5)
    assert torch.equal(index[:, :, live], expected_index[:, :, live])
    grad_sums = torch.randn(sums.shape) * live
    ours = native_backward(queries, query_mask, documents, index, grad_sums)
    expected = maxsim_backward(queries, query_mask, documents, expected_index, grad_sums)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    again = native_backward(queries, query_mask, documents, index, grad_sums)
    assert all(torch.equal(a, b) for a, b in zip(ours, again, strict=True))  # deterministic


def test_trailing_padding_equals_stock_colbert_scores():
    """Documents padded after their last token (the kernel skips those products) score as stock's colbert_scores,
    and their arg-max equals the torch backend's."""
    colbert = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring.colbert")
    queries, query_mask, documents, _ = batch(torch.float32, seed=21, documents=6, document_tokens=37)
    lengths = torch.tensor([37, 1, 16, 17, 33, 5])
    document_mask = torch.arange(37) < lengths.unsqueeze(-1)
    document_mask[2, 3] = False  # a hole before the padding
    sums, index = native_forward(queries, query_mask, documents, document_mask)
    stock = colbert.colbert_scores(queries, documents.unsqueeze(1), query_mask, document_mask.unsqueeze(1))
    torch.testing.assert_close(sums, stock, rtol=1e-6, atol=1e-5)
    assert torch.equal(index, maxsim_forward(queries, query_mask, documents, document_mask, True)[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_tokens_win_where_no_product_is_above_the_fill(dtype):
    """The kernel scores only unmasked tokens; stock's masked_fill(finfo.min) still wins where every product is at or
    below finfo.min (finite embeddings whose products overflow to -inf, or equal finfo.min: a tie goes to the first
    position) and in an empty document. Such a winner is written as -1 - t (no gradient). Sums and arg-max equal
    the torch backend's, which is stock's (tests/ops/test_maxsim.py checks it against stock's gradients)."""
    big = torch.finfo(dtype).max
    dim, tokens = 2, 7
    queries = torch.zeros(2, 3, dim, dtype=dtype)
    queries[0, :, 0] = -big  # query 0: its products with document 1 are exactly -max(dtype) = finfo.min
    queries[1, :, 0] = 1e30  # query 1: its products with document 0 overflow to -inf
    documents = torch.zeros(4, tokens, dim, dtype=dtype)
    documents[0, :, 0] = -1e30
    documents[1, :, 0] = 1.0
    documents[2, :, 1] = torch.arange(tokens, dtype=dtype)  # an ordinary document
    query_mask = torch.ones(2, 3, dtype=torch.bool)
    document_mask = torch.ones(4, tokens, dtype=torch.bool)
    document_mask[0, 4:] = False  # masked only after the last unmasked token
    document_mask[1, [0, 5]] = False  # holes, the first at position 0
    document_mask[3] = False  # empty
    sums, index = native_forward(queries, query_mask, documents, document_mask)
    expected_sums, expected_index = maxsim_forward(queries, query_mask, documents, document_mask, True)
    assert torch.equal(index, expected_index)
    assert index[1, :, 0].tolist() == [-5, -5, -5]  # the fill of the first masked token (4) beats -inf
    assert index[0, :, 1].tolist() == [-1, -1, -1]  # -max == fill everywhere: the first position, masked
    assert index[:, :, 3].eq(-1).all()  # empty document
    assert index[:, :, 2].ge(0).all()
    torch.testing.assert_close(sums, expected_sums, rtol=0, atol=0)
    grad_sums = torch.ones(sums.shape)
    grads = native_backward(queries, query_mask, documents, index, grad_sums)
    expected = maxsim_backward(queries, query_mask, documents, expected_index, grad_sums)
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grads[1][0, 4:].eq(0).all() and grads[1][1, [0, 5]].eq(0).all()  # no gradient into a masked token


def test_a_masked_query_token_with_an_infinite_max_makes_the_sum_nan_as_stock():
    """Stock multiplies each query token's max by its mask: a masked token whose max is -inf (products overflowing,
    no masked document token to fill) adds -inf · 0 = NaN, and the kernel adds the same (a finite max adds 0)."""
    colbert = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring.colbert")
    queries = torch.tensor([[[1.0, 0.0], [1e30, 0.0]], [[1.0, 0.0], [0.5, 0.0]]])  # (2, 2, 2)
    documents = torch.tensor([[[-1e30, 0.0], [-2e30, 0.0]]])  # (1, 2, 2): every product with 1e30 overflows
    query_mask = torch.tensor([[True, False], [True, False]])
    document_mask = torch.ones(1, 2, dtype=torch.bool)
    sums, _ = native_forward(queries, query_mask, documents, document_mask)
    stock = colbert.colbert_scores(queries, documents.unsqueeze(1), query_mask, document_mask.unsqueeze(1))
    assert bool(stock[0, 0].isnan()) and not bool(stock[1, 0].isnan())
    torch.testing.assert_close(sums, stock, equal_nan=True, rtol=0, atol=0)
