"""GPU parity of the triton, native and torch backends against stock MNRL (float64 reference). Marked ``gpu``: skipped
on CPU-only machines, run by benchmarks/gpu_check.sh.

Tolerances (norm-wise relative, loss / gradients): native computes fp32 inputs with fp32 cuBLAS GEMMs (TF32 off)
and fp16 / bf16 inputs with 16-bit GEMMs of fp32 output (exact products) and float16 gradient coefficients
(1e-5 / 1e-4 on top of twice the rounding of the exact gradient to the input dtype, as in
tests/ops/test_raw_16bit.py). triton with fp32 inputs uses IEEE fp32 dots (1e-5 / 1e-4). triton with fp16/bf16 inputs
gets unit vectors rounded to the input dtype (relative 2^-11 / 2^-8 per element), so a logit moves by up to
scale·2·2^-11 ≈ 0.02 (fp16) or scale·2·2^-8 ≈ 0.16 (bf16) in the worst case and ~√D times less typically; the
bounds below are those typical sizes with a 4x margin.

No host sync per call (issue 16): one fused loss call, forward and backward, of the ``native`` and ``torch`` backends
(16-bit raw path and fp32, one direction, symmetric, all four directions; one chunk and recomputed chunks) runs under
``torch.cuda.set_sync_debug_mode("error")`` and is captured in a CUDA graph, replayed on other embeddings and
compared with an eager call. The CPU counterparts: tests/ops/test_host_sync.py (no host read in Python) and
tests/ops/test_emulated_lanes.py (the CUDA build's lane algorithm on CPU threads).
"""

from __future__ import annotations

import pytest
import torch
from parity import assert_coefficients_close, relative_error

from st_fast.ops import fused_mnrl_loss

pytestmark = pytest.mark.gpu

TOLERANCES = {  # (backend, dtype) -> (loss rtol, gradient rtol)
    ("native", torch.float32): (1e-5, 1e-4),
    ("native", torch.float16): (1e-5, 1e-4),
    ("native", torch.bfloat16): (1e-5, 1e-4),
    ("torch", torch.float32): (1e-5, 1e-4),
    ("torch", torch.float16): (1e-5, 1e-4),
    ("torch", torch.bfloat16): (1e-5, 1e-4),
    ("triton", torch.float32): (1e-5, 1e-4),
    ("triton", torch.float16): (2e-3, 2e-2),
    ("triton", torch.bfloat16): (1.5e-2, 1e-1),
}
CONFIGS = [
    dict(),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), hardness_mode="all_negatives",
         hardness_strength=5.0),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
         hardness_mode="in_batch_negatives", hardness_strength=9.0),
]  # fmt: skip


def _stock_loss(queries, docs, **config):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss(None, **config).compute_loss_from_embeddings([queries, *docs], None)


@pytest.mark.parametrize("backend", ["triton", "native", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, dim", [(1000, 384), (1000, 1024), (8192, 384)])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_gpu_backend_matches_stock(backend, dtype, batch, dim, config):
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(batch + dim + config)
    anchor = torch.randn(batch, dim, device="cuda", generator=generator)
    columns = [anchor] + [0.6 * anchor + torch.randn(batch, dim, device="cuda", generator=generator) for _ in range(2)]
    inputs = [c.to(dtype).requires_grad_() for c in columns]
    reference = [c.detach().to(dtype).double().requires_grad_() for c in columns]  # same rounded values, float64
    ref_loss = _stock_loss(reference[0], reference[1:], **CONFIGS[config])
    ref_grads = torch.autograd.grad(ref_loss, reference)
    loss = fused_mnrl_loss(inputs[0], inputs[1:], backend=backend, **CONFIGS[config])
    grads = torch.autograd.grad(loss, inputs)
    loss_rtol, grad_rtol = TOLERANCES[(backend, dtype)]
    assert torch.isfinite(loss) and relative_error(loss, ref_loss) < loss_rtol
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        # gradients are returned in the input dtype (as stock's are): allow the rounding of the exact gradient to
        # that dtype (fp16 gradients of ~1e-5 are subnormal there, 2^-11 relative is not reachable) on top
        rounding = float((ref_grad.to(dtype).double() - ref_grad).norm())
        error = float((grad.double() - ref_grad).norm())
        assert error <= grad_rtol * float(ref_grad.norm()) + 2 * rounding, (error, rounding, float(ref_grad.norm()))


@pytest.fixture(params=[32, 256], ids=lambda lanes: f"lanes{lanes}")
def cuda_row_lanes(request, monkeypatch):
    """The CUDA row kernels with a warp per row (the default) and a block of 256 threads per row."""
    from st_fast import _native

    monkeypatch.setattr(_native, "CUDA_ROW_LANES", request.param)
    return request.param


@pytest.mark.usefixtures("cuda_row_lanes")
@pytest.mark.parametrize("rows, width", [(1, 1), (37, 37), (300, 4096)])
@pytest.mark.parametrize("coefficient_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cuda_row_kernel_matches_the_torch_row_kernel(rows, width, coefficient_dtype):
    from st_fast.ops.mnrl.spec import ContrastiveSpec
    from st_fast.ops.row_kernel import SegmentScales
    from st_fast.ops.row_kernel_native import native_row_kernel
    from st_fast.ops.row_kernel_torch import torch_row_kernel

    spec = ContrastiveSpec.from_loss_config(
        scale=20.0, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="hard_negatives", hardness_strength=5.0,
    )  # fmt: skip
    lengths = [2 * width, width, width, 2 * width]
    scores = [torch.rand(rows, n, device="cuda") * 2 - 1 for n in lengths]
    scales = [SegmentScales(torch.rand(rows, device="cuda") + 0.5, torch.rand(n, device="cuda") + 0.5) for n in lengths]
    expected_out = [torch.empty(s.shape, dtype=torch.float64, device="cuda") for s in scores]
    expected = torch_row_kernel(
        [s.double() for s in scores], spec, width - rows, width, 1.0 / rows,
        [SegmentScales(s.rows.double(), s.columns.double()) for s in scales], expected_out,
    )  # fmt: skip
    actual_out = [torch.full(s.shape, float("nan"), device="cuda").to(coefficient_dtype) for s in scores]
    actual = native_row_kernel(scores, spec, width - rows, width, 1.0 / rows, scales, actual_out)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    assert_coefficients_close(actual_out, expected_out, scales, 1.0 / rows, spec.scale, coefficient_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_block_per_row_kernels_match_stock(monkeypatch, dtype, config):
    """The block-per-row kernels (ST_FAST_CUDA_ROW_LANES=256) end to end, and their symmetric two passes."""
    import row_kernel_cases

    from st_fast import _native

    monkeypatch.setattr(_native, "CUDA_ROW_LANES", 256)
    test_gpu_backend_matches_stock("native", dtype, 1000, 1024, config)
    directions = CONFIGS[config].get("directions", row_kernel_cases.SYMMETRIC)
    partition = CONFIGS[config].get("partition_mode", "joint")
    row_kernel_cases.two_passes_match_the_torch_reference(
        "cuda", directions, partition, CONFIGS[config].get("hardness_mode"), True
    )


def test_cuda_has_the_16bit_matmul_with_fp32_output():
    """The fast path of the native backend: without torch.mm(out_dtype=float32) on CUDA it falls back to upcasting
    (same numbers, fp32 matmul rate), which the benchmarks would show as a lost speed-up."""
    from st_fast.ops.mixed_matmul import _supports_out_dtype

    assert _supports_out_dtype(torch.device("cuda"), torch.bfloat16)
    assert _supports_out_dtype(torch.device("cuda"), torch.float16)


GRAPH_CONFIGS = {
    "one-direction": dict(),
    "symmetric": dict(directions=("query_to_doc", "doc_to_query")),
    "all-four": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
                     partition_mode="joint", hardness_mode="all_negatives", hardness_strength=5.0),
}  # fmt: skip


def _columns(batch, dim, dtype, seed, magnitude=1.0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    anchor = torch.randn(batch, dim, device="cuda", generator=generator)
    columns = [anchor] + [0.6 * anchor + torch.randn(batch, dim, device="cuda", generator=generator) for _ in range(2)]
    return [(c * magnitude).to(dtype).requires_grad_() for c in columns]


def _call(inputs, backend, config):
    loss = fused_mnrl_loss(inputs[0], inputs[1:], backend=backend, **config)
    return loss, torch.autograd.grad(loss, inputs)


@pytest.fixture(params=["kept", "chunked"])
def chunking(request, monkeypatch):
    """The default budgets (one chunk, the symmetric path's kept tile), or chunks of a few hundred rows (the
    symmetric path's recomputed coefficient pass)."""
    if request.param == "chunked":
        from st_fast.ops import chunked

        monkeypatch.setitem(chunked.DEFAULT_CHUNK_BYTES, "cuda", 4 * 2**20)
        monkeypatch.setitem(chunked.DEFAULT_KEEP_BYTES, "cuda", 4 * 2**20)
    return request.param


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("config", GRAPH_CONFIGS)
def test_a_fused_loss_call_makes_no_host_sync(backend, dtype, config, chunking):
    """Issue 16: forward and backward of one call under torch's sync debug mode ("error": any synchronizing CUDA
    call raises), after a warm-up call (the one-time probe of the 16-bit matmul). tests/ops/test_host_sync.py checks
    the same on the CPU for every host read in Python."""
    inputs = _columns(1000, 384, dtype, seed=1)
    _call(inputs, backend, GRAPH_CONFIGS[config])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, grads = _call(inputs, backend, GRAPH_CONFIGS[config])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", GRAPH_CONFIGS)
def test_a_fused_loss_call_is_captured_in_a_cuda_graph(backend, dtype, config, chunking):
    """Issue 16: one call (forward and backward) captured in a CUDA graph (a host sync would break the capture) and
    replayed on new embeddings 2^5 times larger (other σ and γ: a scale read once at capture would be wrong), against
    an eager call on the same embeddings."""
    config = GRAPH_CONFIGS[config]
    static = _columns(1000, 384, dtype, seed=2)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph's documentation asks
        for _ in range(2):
            _call(static, backend, config)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grads = _call(static, backend, config)
    fresh = _columns(1000, 384, dtype, seed=3, magnitude=32.0)
    with torch.no_grad():
        for x, new in zip(static, fresh, strict=True):
            x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    loss, grads = _call(fresh, backend, config)
    # the same computation (at most another GEMM algorithm inside the capture): the loss to fp32 accumulation order,
    # the gradients to one rounding of their 16-bit dtype (a σ or γ baked in at capture is off by a power of two)
    assert relative_error(static_loss, loss) <= 1e-5
    for captured, eager in zip(static_grads, grads, strict=True):
        assert relative_error(captured, eager) <= torch.finfo(dtype).eps
