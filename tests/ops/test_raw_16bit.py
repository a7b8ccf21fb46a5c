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

import pytest
import row_kernel_cases as shared
import torch
from parity import direction_partition_grid, random_columns
from row_kernel_cases import cases

from st_fast import _native
from st_fast.ops import fused_mnrl_loss
from st_fast.ops.backends import ChunkedBackend, resolve_backend
from st_fast.ops.mixed_matmul import matmul_fp32
from st_fast.ops.raw_16bit import as_float16_operand

HALF_DTYPES = shared.HALF_DTYPES


@pytest.fixture
def raw_16bit_on_cpu(monkeypatch):
    """Select the 16-bit path for CPU tensors too (it is the CUDA default)."""
    monkeypatch.setattr(ChunkedBackend, "takes_raw_operands", lambda self, dtype, device: dtype in HALF_DTYPES)


def test_the_16bit_path_is_the_cuda_default_only():
    backend = resolve_backend("torch", torch.device("cpu"), torch.bfloat16)
    assert not backend.takes_raw_operands(torch.bfloat16, torch.device("cpu"))
    assert backend.takes_raw_operands(torch.bfloat16, torch.device("cuda"))
    assert backend.takes_raw_operands(torch.float16, torch.device("cuda"))
    assert not backend.takes_raw_operands(torch.float32, torch.device("cuda"))


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("backend", ["torch", "native"])
@cases(shared.STOCK_16BIT_GRID)
def test_16bit_path_matches_stock(backend, dtype, similarity, config, batch, dim, columns):
    shared.sixteen_bit_path_matches_stock(backend, dtype, similarity, config, batch, dim, columns)


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("directions, partition_mode", direction_partition_grid())
def test_16bit_path_covers_every_direction_and_partition(directions, partition_mode):
    config = dict(directions=directions, partition_mode=partition_mode, hardness_mode="all_negatives",
                  hardness_strength=3.0)  # fmt: skip
    embeddings = random_columns(9, 24, 3, dtype=torch.bfloat16, seed=len(directions))
    reference = shared.stock_mnrl([x.detach().double().requires_grad_() for x in embeddings], "cos", **config)
    baseline = shared.stock_mnrl(embeddings, "cos", **config)
    loss = fused_mnrl_loss(embeddings[0], embeddings[1:], backend="native", **config)
    grads = torch.autograd.grad(loss, embeddings)
    shared.assert_16bit_parity(
        loss.detach(), grads, reference, baseline, torch.bfloat16, shared.flush_bound(embeddings, "cos")
    )


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
    reference = shared.stock_mnrl([x.detach().double().requires_grad_() for x in embeddings], "cos")
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


@cases(shared.ONE_PASS_GRID)
def test_native_row_kernel_with_scales_matches_the_torch_row_kernel(coefficient_dtype, hardness, rows, width, layout):
    shared.one_pass_kernel_matches_the_torch_row_kernel(coefficient_dtype, hardness, rows, width, layout)


@pytest.mark.parametrize("kernel", ["torch", "native"])
@cases(shared.SINGLE_COLUMN_GRID)
def test_single_column_per_direction_coefficients_are_exactly_zero(kernel, coefficient_dtype, with_scales, directions):
    shared.single_column_coefficients_are_exactly_zero(kernel, coefficient_dtype, with_scales, directions)


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
    stock_loss, _ = shared.stock_mnrl(embeddings, similarity)
    loss = fused_mnrl_loss(embeddings[0], embeddings[1:], similarity=similarity, backend="native")
    assert not torch.isfinite(stock_loss)
    assert not torch.isfinite(loss)
