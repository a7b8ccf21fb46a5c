"""The CUDA MaxSim kernels (csrc/cuda/maxsim.cu) as the ``native`` backend on a GPU: against the torch backend (sums,
first arg-max and gradients) and stock's colbert_scores, float32 and bfloat16 (``gpu``-marked: skipped on CPU-only
machines, run by benchmarks/gpu_check.sh). Their algorithm is checked on the CPU by tests/ops/test_maxsim_emulated.py;
the dispatch rules (``backend="native"`` takes them on CUDA where st_fast._C_cuda has them; ``auto`` takes the torch
backend on CUDA until a GPU run has timed them) are checked here without a GPU."""

from __future__ import annotations

import pytest
import torch

from st_fast import _native, _native_maxsim
from st_fast.ops.maxsim import torch_backend
from st_fast.ops.maxsim.dispatch import resolve_maxsim_backend

CUDA = torch.device("cuda")
CUDA_KERNELS = _native.cuda_ext is not None and hasattr(_native.cuda_ext, "maxsim_forward")


def test_native_on_cuda_takes_the_cuda_kernels_where_the_extension_has_them_and_auto_takes_torch():
    for dtype in (torch.float32, torch.bfloat16):
        assert _native_maxsim.native_maxsim_available(CUDA, dtype) is CUDA_KERNELS
        assert resolve_maxsim_backend("auto", CUDA, dtype).name == "torch"  # the CUDA kernels are not timed yet
        if CUDA_KERNELS:
            assert resolve_maxsim_backend("native", CUDA, dtype).name == "native"
        else:
            with pytest.raises(RuntimeError, match="native"):
                resolve_maxsim_backend("native", CUDA, dtype)
    assert resolve_maxsim_backend("auto", CUDA, torch.float16).name == "torch"
    with pytest.raises(RuntimeError, match="float32 / bfloat16 embeddings on the CPU .* or on CUDA"):
        resolve_maxsim_backend("native", CUDA, torch.float16)
    with pytest.raises(TypeError, match="float64"):
        resolve_maxsim_backend("native", CUDA, torch.float64)


def gpu_batch(shape, dtype, seed, grid):
    b, m, lq, ld, dim = shape
    g = torch.Generator().manual_seed(seed)
    if grid:
        q, d = torch.randint(-4, 5, (b, lq, dim), generator=g) / 4, torch.randint(-4, 5, (m, ld, dim), generator=g) / 4
    else:
        q, d = torch.randn(b, lq, dim, generator=g), torch.randn(m, ld, dim, generator=g)
    query_mask = torch.rand(b, lq, generator=g) > 0.25
    query_mask[:, 0] = True
    document_mask = torch.rand(m, ld, generator=g) > 0.3
    document_mask[:, 0] = True
    if m > 1:
        document_mask[1] = False
    if m > 2:
        document_mask[2, ld // 2 :] = False
    return [x.to(CUDA) for x in (q.to(dtype), query_mask, d.to(dtype), document_mask)]


GPU_SHAPES = [(1, 1, 1, 1, 1), (5, 7, 9, 70, 17), (3, 4, 33, 5, 130), (64, 320, 32, 180, 128), (37, 3, 1, 300, 768)]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_KERNELS, reason="st_fast._C_cuda is not built with the MaxSim kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_cuda_kernels_give_the_torch_backends_bits_on_exact_inputs(shape, dtype, monkeypatch):
    # exact float32 sums in the torch backend's bfloat16 GEMM too (no reduced-precision split-K reduction)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    inputs = gpu_batch(shape, dtype, seed=sum(shape), grid=True)
    grad_sums = (torch.randint(-3, 4, shape[:2], generator=torch.Generator().manual_seed(1)) / 2).to(CUDA)
    sums, index = _native_maxsim.maxsim_forward(*inputs, True)
    expected_sums, expected_index = torch_backend.maxsim_forward(*inputs, True)
    live = inputs[3].any(dim=-1)
    assert torch.equal(sums[:, live], expected_sums[:, live]) and torch.equal(index, expected_index)
    ours = _native_maxsim.maxsim_backward(inputs[0], inputs[1], inputs[2], index, grad_sums)
    expected = torch_backend.maxsim_backward(inputs[0], inputs[1], inputs[2], index, grad_sums)
    assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1])
    again = _native_maxsim.maxsim_backward(inputs[0], inputs[1], inputs[2], index, grad_sums)
    assert torch.equal(ours[0], again[0]) and torch.equal(ours[1], again[1])  # no atomics


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_KERNELS, reason="st_fast._C_cuda is not built with the MaxSim kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES[1:], ids=str)
def test_cuda_backend_scores_and_gradients_match_stock_colbert_scores(shape, dtype):
    colbert = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring.colbert")
    from st_fast.ops import maxsim_scores

    queries, query_mask, documents, document_mask = gpu_batch(shape, dtype, seed=3 + sum(shape), grid=False)
    documents, document_mask = documents.unsqueeze(1), document_mask.unsqueeze(1)  # (M, 1, Ld, D): one per group
    live = document_mask.any(dim=-1)[:, 0]
    grads = []
    for fn in (
        lambda q, d: maxsim_scores(q, d, query_mask, document_mask, backend="native"),
        lambda q, d: colbert.colbert_scores(q, d, query_mask, document_mask),
    ):
        q, d = queries.clone().requires_grad_(), documents.clone().requires_grad_()
        scores = fn(q, d)
        weight = torch.linspace(-1, 1, scores.numel(), device=CUDA).view_as(scores) * live
        (scores.float() * weight).sum().backward()
        grads.append((scores.float()[:, live], q.grad.float(), d.grad.float()))
    if dtype == torch.bfloat16:  # a product one bfloat16 ulp off (another D order) may move a near-tie's arg-max
        torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-2, atol=1e-1)
        return
    for what, ours, stock in zip(("scores", "d queries", "d documents"), *grads, strict=True):
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-4, msg=what)
