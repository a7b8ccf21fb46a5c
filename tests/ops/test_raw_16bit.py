"""The 16-bit path of the chunked backends (the default on CUDA): raw fp16 / bf16 GEMMs with fp32 output, cosine
norms applied as row / column scales, float16 gradient coefficients. Run here on the CPU, where the same driver and
the same row kernels (C++ build of the CUDA source) run with the 16-bit GEMMs emulated exactly (operands upcast:
products of 16-bit numbers are exact in fp32).

Tolerance (16-bit inputs, float64 stock reference on the same rounded values): the loss is computed in fp32 from
exact scores, so it gets the fp32 bound of the other parity tests (1e-5 relative, or 2x stock's own fp32 residue).
The gradients are returned in the input dtype, as stock returns them, so their error is at least the rounding of the
exact gradient to that dtype (bf16: ~2^-9 relative); the bound is twice that rounding plus 1e-4 relative for the
float16 coefficients (measured: 1.0x the rounding for bf16, up to 1.5x for fp16; stock itself: 1.0-2.2x), or twice
stock's own error where that is larger (B = 1, whose exact gradient is 0), plus the most that float16 coefficients
flushed to zero can take away (_flush_bound; it only matters where the exact gradient is ~0).
"""

from __future__ import annotations

import math

import pytest
import torch
from parity import assert_close_to_reference, assert_coefficients_close, direction_partition_grid, random_columns

from st_fast import _native
from st_fast.ops import fused_mnrl_loss
from st_fast.ops.backends import ChunkedBackend, resolve_backend
from st_fast.ops.mixed_matmul import matmul_fp32
from st_fast.ops.mnrl.spec import ContrastiveSpec
from st_fast.ops.raw_16bit import as_float16_operand
from st_fast.ops.row_kernel import SegmentScales
from st_fast.ops.row_kernel_torch import torch_row_kernel

HALF_DTYPES = [torch.bfloat16, torch.float16]
CONFIGS = [
    dict(),
    dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), hardness_mode="all_negatives",
         hardness_strength=5.0),
    dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
         hardness_mode="in_batch_negatives", hardness_strength=9.0),
]  # fmt: skip


@pytest.fixture
def raw_16bit_on_cpu(monkeypatch):
    """Select the 16-bit path for CPU tensors too (it is the CUDA default)."""
    monkeypatch.setattr(ChunkedBackend, "takes_raw_operands", lambda self, dtype, device: dtype in HALF_DTYPES)


def _stock(embeddings, similarity, **config):
    from sentence_transformers import util
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    similarity_fct = util.cos_sim if similarity == "cos" else util.dot_score
    stock = MultipleNegativesRankingLoss(None, similarity_fct=similarity_fct, **config)
    loss = stock.compute_loss_from_embeddings(embeddings, None)
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, embeddings)]


def _flush_bound(embeddings, similarity: str, scale: float = 20.0) -> float:
    """Norm of the most a gradient can lose to float16 coefficients flushed to zero: entries of d(B·loss)/dS below
    τ = 2^-37 · scale · r_max² (γ keeps the largest possible coefficient at 2^14 or less, float16's smallest
    subnormal is 2^-24; r: inverse norms, 1 for dot), each times a column of norm <= max ||x||, over at most 4·N
    columns, divided by B, over every row. Only reached where the exact gradient is ~0 anyway (a saturated
    softmax leaves a column a gradient of ~1e-33 that stock keeps in fp32 and float16 cannot hold)."""
    norms = torch.cat([x.detach().double().norm(dim=1) for x in embeddings])
    r_max = float((1.0 / norms).max()) if similarity == "cos" else 1.0
    tau = 2.0**-37 * scale * r_max * r_max
    batch, rows = embeddings[0].shape[0], norms.numel()
    return tau * 4 * rows / batch * float(norms.max()) * math.sqrt(rows)


def _assert_16bit_parity(loss, grads, reference, baseline, dtype, flush: float):
    """Loss as in the fp32 parity tests; gradients within 1e-4 relative plus twice the larger of the rounding of the
    exact gradient to ``dtype`` and stock's own error (the latter decides where the exact gradient is ~0, B = 1),
    plus ``flush`` (see _flush_bound)."""
    (ref_loss, ref_grads), (base_loss, base_grads) = reference, baseline
    assert torch.isfinite(loss)
    assert_close_to_reference(loss, ref_loss, base_loss, rtol=1e-5, what="loss")
    for column, (grad, ref_grad, base_grad) in enumerate(zip(grads, ref_grads, base_grads, strict=True)):
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        rounding = float((ref_grad.to(dtype).double() - ref_grad).norm())
        stock_error = float((base_grad.double() - ref_grad).norm())
        error = float((grad.double() - ref_grad).norm())
        allowed = 1e-4 * float(ref_grad.norm()) + 2 * max(rounding, stock_error) + flush
        assert error <= allowed, f"gradient of column {column}: error {error:.3g} > {allowed:.3g}"


def test_the_16bit_path_is_the_cuda_default_only():
    backend = resolve_backend("torch", torch.device("cpu"), torch.bfloat16)
    assert not backend.takes_raw_operands(torch.bfloat16, torch.device("cpu"))
    assert backend.takes_raw_operands(torch.bfloat16, torch.device("cuda"))
    assert backend.takes_raw_operands(torch.float16, torch.device("cuda"))
    assert not backend.takes_raw_operands(torch.float32, torch.device("cuda"))


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("batch, dim, columns", [(1, 16, 2), (7, 48, 4), (33, 16, 3)])
def test_16bit_path_matches_stock(backend, dtype, similarity, config, batch, dim, columns):
    embeddings = random_columns(batch, dim, columns, dtype=dtype, seed=batch * 7 + config)
    reference = _stock([x.detach().double().requires_grad_() for x in embeddings], similarity, **CONFIGS[config])
    baseline = _stock(embeddings, similarity, **CONFIGS[config])
    loss = fused_mnrl_loss(embeddings[0], embeddings[1:], similarity=similarity, backend=backend, **CONFIGS[config])
    grads = torch.autograd.grad(loss, embeddings)
    _assert_16bit_parity(loss.detach(), grads, reference, baseline, dtype, _flush_bound(embeddings, similarity))


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("directions, partition_mode", direction_partition_grid())
def test_16bit_path_covers_every_direction_and_partition(directions, partition_mode):
    config = dict(directions=directions, partition_mode=partition_mode, hardness_mode="all_negatives",
                  hardness_strength=3.0)  # fmt: skip
    embeddings = random_columns(9, 24, 3, dtype=torch.bfloat16, seed=len(directions))
    reference = _stock([x.detach().double().requires_grad_() for x in embeddings], "cos", **config)
    baseline = _stock(embeddings, "cos", **config)
    loss = fused_mnrl_loss(embeddings[0], embeddings[1:], backend="native", **config)
    grads = torch.autograd.grad(loss, embeddings)
    _assert_16bit_parity(loss.detach(), grads, reference, baseline, torch.bfloat16, _flush_bound(embeddings, "cos"))


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("chunk_bytes", [None, 6 * 8 * 69])
def test_16bit_path_in_chunks_with_a_row_offset(monkeypatch, chunk_bytes):
    """Local rows 5 .. 16 of 23 (the gathered layout), in one chunk (the symmetric path's kept tile) or in chunks of
    8 rows (recomputed in its coefficient pass), against the float64 torch backend on the same rounded values."""
    from st_fast.ops import chunked

    monkeypatch.setitem(chunked.DEFAULT_CHUNK_BYTES, "cpu", chunk_bytes or chunked.DEFAULT_CHUNK_BYTES["cpu"])
    monkeypatch.setitem(chunked.DEFAULT_KEEP_BYTES, "cpu", chunk_bytes or chunked.DEFAULT_KEEP_BYTES["cpu"])
    config = dict(directions=("query_to_doc", "doc_to_query"), offset=5, batch=11)
    embeddings = random_columns(23, 32, 3, dtype=torch.bfloat16, seed=3)
    reference = [x.detach().double().requires_grad_() for x in embeddings]
    losses, grads = [], []
    for inputs in (embeddings, reference):
        backend = "native" if inputs is embeddings else "torch"
        loss = fused_mnrl_loss(inputs[0], inputs[1:], directions=config["directions"], row_offset=config["offset"],
                               batch_size=config["batch"], backend=backend)  # fmt: skip
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, inputs))
    torch.testing.assert_close(losses[0].double(), losses[1], rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(*grads, strict=True):
        rounding = float((ref_grad.to(torch.bfloat16).double() - ref_grad).norm())
        assert float((grad.double() - ref_grad).norm()) <= 1e-4 * float(ref_grad.norm()) + 2 * rounding


@pytest.mark.usefixtures("raw_16bit_on_cpu")
def test_float16_zero_embedding_keeps_the_other_rows_finite_and_right():
    """A zero vector has inverse norm 1/eps: its coefficients saturate instead of forcing every other coefficient to
    underflow (γ ignores it) or making inf · 0 = NaN in the gradient GEMMs."""
    embeddings = random_columns(6, 16, 2, dtype=torch.float16, seed=4)
    with torch.no_grad():
        embeddings[1][2] = 0
    reference = _stock([x.detach().double().requires_grad_() for x in embeddings], "cos")
    loss = fused_mnrl_loss(embeddings[0], embeddings[1:], backend="native")
    grads = torch.autograd.grad(loss, embeddings)
    torch.testing.assert_close(loss.double(), reference[0], rtol=1e-5, atol=1e-6)
    keep = torch.arange(6) != 2
    for grad, ref_grad in zip(grads, reference[1], strict=True):
        assert not torch.isnan(grad).any()
        error = float((grad[keep].double() - ref_grad[keep]).norm())
        assert error <= 1e-2 * float(ref_grad[keep].norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_coefficient_stores_round_to_nearest_even_like_torch(dtype):
    generator = torch.Generator().manual_seed(int(_native.STORE_DTYPES[dtype]))
    finfo = torch.finfo(torch.float16)
    values = torch.cat([
        torch.randn(20000, generator=generator) * 10.0 ** torch.randint(-9, 6, (20000,), generator=generator),
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.0, -1.0, 65504.0, 65519.0, finfo.tiny, 2.0**-24,
                      2.0**-25, 3 * 2.0**-26, 2.0**-25 + 2.0**-40, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8,
                      1.0 + 3 * 2.0**-8, 3.0e38]),
    ]).float()  # fmt: skip
    out = _native.store_coefficients(values, dtype)
    expected = values.to(dtype)
    if dtype == torch.float16:  # the coefficient store saturates instead of overflowing
        expected = values.clamp(-finfo.max, finfo.max).to(dtype)
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))  # fmt: skip
    nan = torch.tensor([float("nan")])
    assert torch.isnan(_native.store_coefficients(nan, dtype)).all()


ROW_KERNEL_LAYOUTS = {  # directions, partition, segment lengths in units of the width
    "joint-4": (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", [2, 1, 1, 2]),
    "per_direction-2": (("query_to_doc", "doc_to_query"), "per_direction", [2, 1]),
}


@pytest.mark.parametrize("coefficient_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("hardness", ["hard_negatives", "in_batch_negatives"])
@pytest.mark.parametrize("rows, width", [(1, 1), (13, 29)])
@pytest.mark.parametrize("layout", ROW_KERNEL_LAYOUTS)
def test_native_row_kernel_with_scales_matches_the_torch_row_kernel(coefficient_dtype, hardness, rows, width, layout):
    directions, partition, blocks = ROW_KERNEL_LAYOUTS[layout]
    spec = ContrastiveSpec.from_loss_config(
        scale=20.0, directions=directions, partition_mode=partition, hardness_mode=hardness, hardness_strength=5.0,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(11)
    lengths = [block * width for block in blocks]
    scores = [torch.rand(rows, n, generator=generator) * 4 - 2 for n in lengths]
    scales = [SegmentScales(torch.rand(rows, generator=generator) + 0.3, torch.rand(n, generator=generator) + 0.3)
              for n in lengths]  # fmt: skip
    expected_out = [torch.empty(s.shape, dtype=torch.float64) for s in scores]
    expected = torch_row_kernel(
        [s.double() for s in scores], spec, width - rows, width, 1.0 / rows,
        [SegmentScales(s.rows.double(), s.columns.double()) for s in scales], expected_out,
    )  # fmt: skip
    from st_fast.ops.row_kernel_native import native_row_kernel

    actual_out = [torch.full(s.shape, float("nan")).to(coefficient_dtype) for s in scores]
    actual = native_row_kernel(scores, spec, width - rows, width, 1.0 / rows, scales, actual_out)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5)
    assert_coefficients_close(actual_out, expected_out, scales, 1.0 / rows, spec.scale, coefficient_dtype)


@pytest.mark.parametrize("kernel", ["torch", "native"])
@pytest.mark.parametrize("coefficient_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_scales", [False, True], ids=["unit", "scaled"])
@pytest.mark.parametrize("directions", [("query_to_doc",), ("query_to_doc", "doc_to_query")], ids=len)
def test_single_column_per_direction_coefficients_are_exactly_zero(kernel, coefficient_dtype, with_scales, directions):
    """B = 1 without negatives: every direction's softmax has one column, the loss is LSE([s]) - s = 0 for any
    embeddings and every coefficient is 0 exactly (as stock's float32 gradient is), not -w/2 in Q2D and +w/2 in D2Q
    whose products with the embeddings would leave a rounding residue in the gradient GEMMs."""
    spec = ContrastiveSpec.from_loss_config(scale=20.0, directions=directions, partition_mode="per_direction")
    value = 0.7316  # the same pair's score in Q2D and D2Q
    scores = [torch.full((1, 1), value) for _ in directions]
    scales = [SegmentScales(torch.tensor([1.37]), torch.tensor([0.61])) for _ in directions] if with_scales else None
    out = [torch.full((1, 1), float("nan")).to(coefficient_dtype) for _ in directions]
    if kernel == "native":
        from st_fast.ops.row_kernel_native import native_row_kernel as row_kernel
    else:
        row_kernel = torch_row_kernel
    loss = row_kernel(scores, spec, 0, 1, 1.0, scales, out)
    assert float(loss) == 0.0
    for coefficient in out:
        assert torch.equal(coefficient.float(), torch.zeros(1, 1)), coefficient


def test_matmul_fp32_and_float16_operands_are_exact():
    generator = torch.Generator().manual_seed(5)
    a = torch.randn(7, 33, generator=generator).bfloat16()
    b = torch.randn(33, 5, generator=generator).bfloat16()
    product = matmul_fp32(a, b)
    assert product.dtype == torch.float32
    torch.testing.assert_close(product.double(), a.double() @ b.double(), rtol=1e-6, atol=1e-6)
    for x in (a * 1e-20, a * 1e20, a):
        converted, sigma = as_float16_operand(x)
        assert converted.dtype == torch.float16 and torch.isfinite(converted).all()
        assert torch.equal(converted.double() / sigma, x.double())


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_16bit_path_non_finite_embeddings_give_a_non_finite_loss_as_stock(bad, similarity):
    embeddings = random_columns(5, 16, 3, dtype=torch.bfloat16, seed=9)
    with torch.no_grad():
        embeddings[2][3, 4] = bad
    stock_loss, _ = _stock(embeddings, similarity)
    loss = fused_mnrl_loss(embeddings[0], embeddings[1:], similarity=similarity, backend="native")
    assert not torch.isfinite(stock_loss)
    assert not torch.isfinite(loss)
