"""GPU parity of the triton and native backends against stock MNRL (float64 reference). Marked ``gpu``: skipped
on CPU-only machines, run by benchmarks/gpu_check.sh.

Tolerances (norm-wise relative, loss / gradients): native computes in fp32 from any input dtype (1e-5 / 1e-4,
cuBLAS fp32 with TF32 off). triton with fp32 inputs uses IEEE fp32 dots (1e-5 / 1e-4). triton with fp16/bf16 inputs
gets unit vectors rounded to the input dtype (relative 2^-11 / 2^-8 per element), so a logit moves by up to
scale·2·2^-11 ≈ 0.02 (fp16) or scale·2·2^-8 ≈ 0.16 (bf16) in the worst case and ~√D times less typically; the
bounds below are those typical sizes with a 4x margin.
"""

from __future__ import annotations

import pytest
import torch
from parity import relative_error

from st_fast.ops import fused_mnrl_loss

pytestmark = pytest.mark.gpu

TOLERANCES = {  # (backend, dtype) -> (loss rtol, gradient rtol)
    ("native", torch.float32): (1e-5, 1e-4),
    ("native", torch.float16): (1e-5, 1e-4),
    ("native", torch.bfloat16): (1e-5, 1e-4),
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


@pytest.mark.parametrize("backend", ["triton", "native"])
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
def test_cuda_row_kernel_matches_the_torch_row_kernel(rows, width):
    from st_fast.ops.row_kernel_native import native_row_kernel
    from st_fast.ops.row_kernel_torch import torch_row_kernel
    from st_fast.ops.spec import ContrastiveSpec

    spec = ContrastiveSpec.from_loss_config(
        scale=20.0, directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="hard_negatives", hardness_strength=5.0,
    )  # fmt: skip
    lengths = [2 * width, width, width, 2 * width]
    scores = [torch.rand(rows, n, device="cuda") * 2 - 1 for n in lengths]
    expected_scores = [s.double() for s in scores]
    expected = torch_row_kernel(expected_scores, spec, width - rows, width, 1.0 / rows)
    actual = native_row_kernel(scores, spec, width - rows, width, 1.0 / rows)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(scores, expected_scores, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
