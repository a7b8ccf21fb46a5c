"""The CUDA MaxSim kernels' algorithm (csrc/include/st_fast/maxsim_lanes.h) run on the CPU by its emulation in the
test-only st_fast._C_test (csrc/testing/emulated_maxsim.cpp: each block's phases run by its threads in turn, shared
memory filled with NaN bits first), through the validated wrappers of st_fast/_native_maxsim.py: the only CPU
coverage of the code that csrc/cuda/maxsim.cu compiles for the GPU.

Exactness: with values k/4 (|k| <= 4) and gradients k/2 every product and every sum is exact in float32, so the sums,
the first arg-max and both gradients equal the torch backend's and the native CPU kernels' bit for bit (ties
included: the first index wins). With normal values the products' float32 accumulation over D (fmaf in k order here,
register tiles on the CPU) differs by rounding: the sums and gradients are compared with the float64 reference, and
the chosen token's product with the float64 maximum. Shapes cover more than one row tile (Lq > 32), more than one
document chunk (Ld > 32) and D slice (D = 130), partial blocks, an all-masked document and masked query tokens.
"""

from __future__ import annotations

import types

import pytest
import torch
from native_testing import TEST_EXTENSION

from st_fast import _native, _native_maxsim
from st_fast.ops.maxsim import torch_backend

_TEST_EXT, _TEST_EXT_ERROR = _native._try_import(TEST_EXTENSION)
pytestmark = pytest.mark.skipif(
    _TEST_EXT is None or not hasattr(_TEST_EXT, "emulated_maxsim"),
    reason=f"{TEST_EXTENSION} is not built with the MaxSim emulation ({_TEST_EXT_ERROR})",
)

SHAPES = [  # (B, M, Lq, Ld, D)
    (1, 1, 1, 1, 1),
    (2, 3, 9, 70, 17),
    (5, 7, 4, 33, 3),
    (3, 2, 33, 5, 130),
    (4, 5, 7, 40, 130),
    (5, 2, 1, 64, 3),
]


def batch(shape, dtype, seed, grid):
    b, m, lq, ld, dim = shape
    g = torch.Generator().manual_seed(seed)
    if grid:
        q = torch.randint(-4, 5, (b, lq, dim), generator=g) / 4
        d = torch.randint(-4, 5, (m, ld, dim), generator=g) / 4
    else:
        q, d = torch.randn(b, lq, dim, generator=g), torch.randn(m, ld, dim, generator=g)
    query_mask = torch.rand(b, lq, generator=g) > 0.25
    query_mask[:, 0] = True
    if b > 1 and lq > 1:
        query_mask[1, -1] = False
    document_mask = torch.rand(m, ld, generator=g) > 0.3  # holes
    document_mask[:, 0] = True
    if m > 1:
        document_mask[1] = False  # an empty document
    if m > 2:
        document_mask[2, ld // 2 :] = False  # trailing padding (not scored)
    return q.to(dtype).contiguous(), query_mask, d.to(dtype).contiguous(), document_mask


def emulation(reversed_order=False):
    ext = _TEST_EXT.emulated_maxsim
    return types.SimpleNamespace(
        MaxSimForwardCall=ext.MaxSimForwardCall,
        MaxSimBackwardCall=ext.MaxSimBackwardCall,
        maxsim_forward=lambda call: ext.maxsim_forward(call, reversed_order),
        maxsim_backward=lambda call: ext.maxsim_backward(call, reversed_order),
    )


def run(inputs, grad_sums, ext=None):
    """(sums, index, dQ, dD) through st_fast/_native_maxsim.py's CPU path: run by ``ext`` (an emulation), or by the
    native CPU kernels of st_fast._C with ``ext=None``."""
    queries, query_mask, documents, document_mask = inputs
    with pytest.MonkeyPatch.context() as patch:
        if ext is not None:
            patch.setattr(_native, "require_cpu_ext", lambda: ext)
        sums, index = _native_maxsim.maxsim_forward(queries, query_mask, documents, document_mask, True)
        grads = _native_maxsim.maxsim_backward(queries, query_mask, documents, index, grad_sums)
    return sums, index, *grads


def grid_gradients(shape, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.randint(-3, 4, (shape[0], shape[1]), generator=g) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_exact_inputs_give_the_torch_backends_and_the_cpu_kernels_bits(shape, dtype):
    inputs = batch(shape, dtype, seed=sum(shape), grid=True)
    grad_sums = grid_gradients(shape, sum(shape))
    ours = run(inputs, grad_sums, emulation())
    sums, index = torch_backend.maxsim_forward(*inputs, True)
    live = inputs[3].any(dim=-1)  # an empty document's sum is the caller's sentinel
    assert torch.equal(ours[0][:, live], sums[:, live])
    assert torch.equal(ours[1], index)
    expected = torch_backend.maxsim_backward(inputs[0], inputs[1], inputs[2], index, grad_sums)
    assert torch.equal(ours[2], expected[0]) and torch.equal(ours[3], expected[1])
    cpu = run(inputs, grad_sums)  # the native CPU kernels: the same bits everywhere, empty documents included
    for what, a, b in zip(("sums", "index", "dQ", "dD"), ours, cpu, strict=True):
        assert torch.equal(a, b), what


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_inputs_match_the_float64_reference(shape):
    inputs = batch(shape, torch.float32, seed=7 + sum(shape), grid=False)
    queries, query_mask, documents, document_mask = inputs
    grad_sums = torch.randn(shape[0], shape[1], generator=torch.Generator().manual_seed(3))
    sums, index, d_queries, d_documents = run(inputs, grad_sums, emulation())
    products = torch.einsum("isk,mtk->ismt", queries.double(), documents.double())
    products = products.masked_fill(~document_mask.view(1, 1, *document_mask.shape), torch.finfo(torch.float32).min)
    best = products.max(dim=-1).values
    position = torch.where(index < 0, -1 - index, index).long()  # -1 - t: masked token t's fill won
    chosen = products.gather(-1, position.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chosen, best, rtol=0, atol=1e-4 * max(1.0, shape[4] ** 0.5))  # a near-tie may differ
    live = document_mask.any(dim=-1)
    expected = (chosen * query_mask.double().unsqueeze(-1)).sum(dim=1)
    torch.testing.assert_close(sums[:, live].double(), expected[:, live], rtol=1e-5, atol=1e-4)
    reference = torch_backend.maxsim_backward(queries.double(), query_mask, documents.double(), index, grad_sums)
    torch.testing.assert_close(d_queries.double(), reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_documents.double(), reference[1], rtol=1e-5, atol=1e-5)
    cpu = run(inputs, grad_sums)  # the CPU kernels: the same up to the products' accumulation order
    torch.testing.assert_close(sums[:, live], cpu[0][:, live], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ties_go_to_the_first_token_across_threads_and_chunks(dtype):
    """Copies of one token at positions that fall to other threads of the row (column groups), to the same thread,
    and to later document chunks (Ld > 32): the first one is the arg-max, as torch.max."""
    queries, query_mask, documents, document_mask = batch((3, 2, 5, 70, 17), dtype, seed=5, grid=True)
    document_mask[:] = True
    for m, first in ((0, 3), (1, 40)):
        for later in (first + 1, first + 16, first + 29, first + 30 if first + 30 < 70 else 69, 69):
            documents[m, later] = documents[m, first]
        documents[m, first] = documents[m, first].abs() + 1  # the largest product for queries of positive values
    queries = queries.abs()
    sums, index, *_ = run((queries, query_mask, documents, document_mask), torch.ones(3, 2), emulation())
    expected_sums, expected_index = torch_backend.maxsim_forward(queries, query_mask, documents, document_mask, True)
    assert torch.equal(index, expected_index) and torch.equal(sums, expected_sums)
    assert bool((index[:, :, 0] == 3).all()) and bool((index[:, :, 1] == 40).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_runs_are_bit_equal_and_no_thread_reads_another_threads_writes_of_the_same_phase(dtype):
    """Two runs give the same bits (no atomics), and so does the reversed thread order within each phase: a phase of
    the forward that read what another of its threads writes (a missing barrier on the GPU) would differ."""
    shape = (4, 3, 11, 45, 37)
    inputs = batch(shape, dtype, seed=11, grid=False)
    grad_sums = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    first, again = run(inputs, grad_sums, emulation()), run(inputs, grad_sums, emulation())
    backwards = run(inputs, grad_sums, emulation(reversed_order=True))
    for what, a, b, c in zip(("sums", "index", "dQ", "dD"), first, again, backwards, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), what
    assert bool(torch.isfinite(first[0][:, inputs[3].any(dim=-1)]).all())  # no NaN-filled shared slot was read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masked_tokens_win_where_no_product_is_above_the_fill(dtype):
    """Stock's masked_fill(finfo.min) wins where every product is at or below finfo.min (products overflowing to
    -inf: the first masked token, also after the last unmasked one, which the kernel does not score; products equal
    to finfo.min: a tie, the first position) and in an empty document, as the torch backend: such a winner t is
    written as -1 - t, and gets no gradient."""
    big = torch.finfo(dtype).max
    queries = torch.zeros(2, 3, 2, dtype=dtype)
    queries[0, :, 0] = -big  # with document 1: products exactly -max = finfo.min
    queries[1, :, 0] = 1e30  # with document 0: products overflow to -inf
    documents = torch.zeros(4, 7, 2, dtype=dtype)
    documents[0, :, 0] = -1e30
    documents[1, :, 0] = 1.0
    documents[2, :, 1] = torch.arange(7, dtype=dtype)
    query_mask = torch.ones(2, 3, dtype=torch.bool)
    document_mask = torch.ones(4, 7, dtype=torch.bool)
    document_mask[0, 4:] = False  # masked only after the last unmasked token
    document_mask[1, [0, 5]] = False  # holes, the first at position 0
    document_mask[3] = False  # empty
    inputs = (queries, query_mask, documents, document_mask)
    sums, index, d_queries, d_documents = run(inputs, torch.ones(2, 4), emulation())
    expected_sums, expected_index = torch_backend.maxsim_forward(*inputs, True)
    assert torch.equal(index, expected_index) and torch.equal(sums, expected_sums)
    assert index[1, :, 0].tolist() == [-5, -5, -5] and index[0, :, 1].tolist() == [-1, -1, -1]
    expected = torch_backend.maxsim_backward(queries, query_mask, documents, expected_index, torch.ones(2, 4))
    assert torch.equal(d_queries, expected[0]) and torch.equal(d_documents, expected[1])
    assert bool(d_documents[0, 4:].eq(0).all()) and bool(d_documents[1, [0, 5]].eq(0).all())
