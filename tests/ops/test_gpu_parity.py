"""GPU parity of the triton, native and torch backends against stock MNRL (float64 reference). Marked ``gpu``: skipped
on CPU-only machines, run by benchmarks/gpu_check.sh.

Tolerances (norm-wise relative, loss / gradients): native computes fp32 inputs with fp32 cuBLAS GEMMs (TF32 off)
and fp16 / bf16 inputs with 16-bit GEMMs of fp32 output (exact products) and float16 gradient coefficients
(1e-5 / 1e-4 on top of twice the rounding of the exact gradient to the input dtype, as in
tests/ops/test_raw_16bit.py). triton with fp32 inputs uses IEEE fp32 dots (1e-5 / 1e-4). triton with fp16/bf16 inputs
gets unit vectors rounded to the input dtype (relative 2^-11 / 2^-8 per element), so a logit moves by up to
scale·2·2^-11 ≈ 0.02 (fp16) or scale·2·2^-8 ≈ 0.16 (bf16) in the worst case and ~√D times less typically; the
bounds below are those typical sizes with a 4x margin.
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


def test_cuda_has_the_16bit_matmul_with_fp32_output():
    """The fast path of the native backend: without torch.mm(out_dtype=float32) on CUDA it falls back to upcasting
    (same numbers, fp32 matmul rate), which the benchmarks would show as a lost speed-up."""
    from st_fast.ops.mixed_matmul import _supports_out_dtype

    assert _supports_out_dtype(torch.device("cuda"), torch.bfloat16)
    assert _supports_out_dtype(torch.device("cuda"), torch.float16)
