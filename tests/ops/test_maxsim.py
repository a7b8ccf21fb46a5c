"""The MaxSim op (st_fast.ops.maxsim) against a float64 reference written here and against the installed stock
``colbert_scores`` + cross-entropy: scores, loss and token-embedding gradients, every backend that runs here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

colbert = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring.colbert")
stock_similarity = pytest.importorskip("sentence_transformers.util.similarity")

from st_fast._native_maxsim import native_maxsim_available  # noqa: E402
from st_fast.ops.maxsim import fused_maxsim_loss, maxsim_scores  # noqa: E402
from st_fast.ops.maxsim.spec import EMPTY_DOCUMENT_SCORE  # noqa: E402
from st_fast.ops.triton_lse import triton_unavailable_reason  # noqa: E402

# Under the Triton interpreter (numpy), an empty document's query-token sum overflows to -inf before the sentinel
# replaces it, as stock's float32 sum of finfo.min maxima does: numpy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in reduce:RuntimeWarning")

NATIVE_BUILT = native_maxsim_available(torch.device("cpu"), torch.float32)
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(triton_unavailable_reason("cpu") is not None, reason="no triton")),
    pytest.param("native", marks=pytest.mark.skipif(not NATIVE_BUILT, reason="the native MaxSim kernels not built")),
]
SIZES = dict(batch=3, query_tokens=5, document_tokens=7, dim=12)  # small and odd


def make_batch(per_group: int, dtype: torch.dtype, seed: int, grid: bool = False, **sizes):
    """Queries (B, Lq, D), stacked documents (B, N, Ld, D), masks with holes, one empty document (with N > 1) and
    one query without tokens. ``grid``: values k/4, |k| <= 4, so that 16-bit products are exact in float32 and
    ties are common."""
    sizes = {**SIZES, **sizes}
    g = torch.Generator().manual_seed(seed)
    b, lq, ld, d = sizes["batch"], sizes["query_tokens"], sizes["document_tokens"], sizes["dim"]

    def draw(*shape):
        if grid:
            return torch.randint(-4, 5, shape, generator=g).double() / 4
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    queries, documents = draw(b, lq, d), draw(b, per_group, ld, d)
    query_mask = torch.rand(b, lq, generator=g) > 0.25
    query_mask[:, 0] = True
    document_mask = torch.rand(b, per_group, ld, generator=g) > 0.3  # holes anywhere (skiplist words)
    document_mask[..., 0] = True
    if per_group > 1:  # an empty hard negative (an empty positive would make the loss about 1e9 · scale)
        document_mask[min(1, b - 1), per_group - 1] = False
    if b > 2:
        query_mask[2] = False  # a query whose every token is masked
    return queries.to(dtype), documents.to(dtype), query_mask, document_mask


def reference_scores(queries, documents, query_mask, document_mask, length_normalize):
    """Float64 MaxSim, written from the definition: products rounded once to the embeddings' dtype (as stock's
    einsum), masked tokens at that dtype's minimum, first arg-max, query-token sum, sentinel, MeanMaxSim."""
    dtype = queries.dtype
    b, n, ld, d = documents.shape
    products = torch.einsum("ash,bth->abst", queries.double(), documents.double().reshape(b * n, ld, d))
    if dtype != torch.float64:
        products = products.to(dtype).double()  # its backward rounds the gradient to dtype, as stock's does
    flat_mask = document_mask.reshape(b * n, ld)
    products = products.masked_fill(~flat_mask[None, :, None, :], torch.finfo(dtype).min)
    scores = (products.max(dim=-1).values * query_mask[:, None, :]).sum(dim=-1)
    scores = scores.masked_fill(~flat_mask.any(dim=-1), EMPTY_DOCUMENT_SCORE)
    if length_normalize:
        scores = scores / query_mask.sum(dim=-1).clamp(min=1).unsqueeze(1)
    return scores


def cross_entropy(scores, scale, per_group):
    return F.cross_entropy(scores * scale, torch.arange(scores.shape[0]) * per_group)


def loss_and_grads(fn, queries, documents, scale=1.0):
    leaves = [queries.detach().clone().requires_grad_(), documents.detach().clone().requires_grad_()]
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().clone().requires_grad_()
        leaves.append(scale)
    loss = fn(leaves[0], leaves[1], scale)
    return (loss.detach(), *torch.autograd.grad(loss, leaves))


def assert_close(actual, expected, dtype, what):
    """float32: a few float32 roundings of the magnitude; 16-bit: one rounding of the 16-bit result."""
    actual, expected = actual.double(), expected.double()
    magnitude = max(1.0, float(expected.abs().max()))
    tolerance = 64 * torch.finfo(torch.float32).eps if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    error = float((actual - expected).abs().max())
    assert error <= tolerance * magnitude, f"{what}: max error {error:.3g} > {tolerance * magnitude:.3g}"


def test_empty_document_score_is_stocks():
    assert EMPTY_DOCUMENT_SCORE == stock_similarity._EMPTY_DOCUMENT_SCORE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_group", [1, 2, 3])
@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradients_match_reference_and_stock(backend, per_group, length_normalize, dtype):
    queries, documents, query_mask, document_mask = make_batch(
        per_group, dtype, seed=per_group + 10 * length_normalize, grid=dtype != torch.float32
    )
    scale = 1.7 if length_normalize else 0.6

    def fused(q, d, s):
        return fused_maxsim_loss(q, d, query_mask, document_mask, scale=s, length_normalize=length_normalize,
                                 backend=backend)  # fmt: skip

    def reference(q, d, s):
        return cross_entropy(reference_scores(q, d, query_mask, document_mask, length_normalize), s, per_group)

    def stock(q, d, s):
        scores = colbert.colbert_scores(q, d, query_mask, document_mask, length_normalize=length_normalize)
        return cross_entropy(scores, s, per_group)

    ours = loss_and_grads(fused, queries, documents, scale)
    expected = loss_and_grads(reference, queries, documents, scale)
    stocks = loss_and_grads(stock, queries, documents, scale)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    assert float(ours[1].abs().max()) > 0 and float(ours[2].abs().max()) > 0
    for what, a, e, s in zip(("loss", "d queries", "d documents"), ours, expected, stocks, strict=True):
        # the loss: the same products and maxima (exact on the 16-bit grid), float32 sums; gradients in dtype
        tolerance_dtype = torch.float32 if what == "loss" else dtype
        assert_close(a, e, tolerance_dtype, f"{what} vs float64 reference")
        assert_close(a, s, tolerance_dtype, f"{what} vs stock")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scores_equal_stock_colbert_scores(backend, dtype):
    if backend == "native" and dtype == torch.float16:
        pytest.skip("no float16 native kernel: auto computes float16 with torch, backend='native' raises")
    queries, documents, query_mask, document_mask = make_batch(2, dtype, seed=3, batch=4, document_tokens=19)
    ours = maxsim_scores(queries, documents, query_mask, document_mask, backend=backend)
    stock = colbert.colbert_scores(queries, documents, query_mask, document_mask)
    assert ours.dtype == torch.float32 and ours.shape == stock.shape == (4, 8)
    assert_close(ours, stock, torch.float32, "scores")
    assert (ours[1, 3] == EMPTY_DOCUMENT_SCORE).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_in_bfloat16_take_the_first_token_as_stock(backend):
    """Every query token against documents with repeated (tied) rows: the gradient must reach the first of the tied
    tokens, as torch.max (stock) sends it; a last-index tie would move whole rows of the document gradient."""
    queries, documents, query_mask, document_mask = make_batch(2, torch.bfloat16, seed=5, grid=True)
    documents = torch.cat([documents, documents], dim=2)  # every token tied with a later twin
    document_mask = torch.cat([document_mask, torch.ones_like(document_mask)], dim=2)

    def fused(q, d, s):
        return fused_maxsim_loss(q, d, query_mask, document_mask, backend=backend)

    def stock(q, d, s):
        return cross_entropy(colbert.colbert_scores(q, d, query_mask, document_mask), 1.0, 2)

    ours, stocks = loss_and_grads(fused, queries, documents), loss_and_grads(stock, queries, documents)
    twin = documents.shape[2] // 2
    assert float(stocks[2][:, :, twin:][:, :, :].abs().sum()) < float(stocks[2].abs().sum())
    for what, a, s in zip(("loss", "d queries", "d documents"), ours, stocks, strict=True):
        assert_close(a, s, torch.bfloat16, what)
    assert torch.equal(ours[2][..., :twin, :].ne(0), stocks[2][..., :twin, :].ne(0))


def test_learnable_scale_gets_stocks_gradient():
    queries, documents, query_mask, document_mask = make_batch(2, torch.float32, seed=7)
    scale = torch.tensor(0.8)

    def fused(q, d, s):
        return fused_maxsim_loss(q, d, query_mask, document_mask, scale=s, backend="torch")

    def stock(q, d, s):
        return cross_entropy(colbert.colbert_scores(q, d, query_mask, document_mask), s, 2)

    ours, stocks = loss_and_grads(fused, queries, documents, scale), loss_and_grads(stock, queries, documents, scale)
    assert_close(ours[3], stocks[3], torch.float32, "d scale")


SCALES = {
    "zero": 0.0, "negative": -3.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
    "int": 2, "bool": True, "tensor": torch.tensor(0.7), "one-element": torch.tensor([0.7]),
    "float64-tensor": torch.tensor([[0.7]], dtype=torch.float64), "nan-tensor": torch.tensor(float("nan")),
    "numpy-scalar": np.float32(0.5),
}  # fmt: skip


@pytest.mark.parametrize("name", SCALES)
def test_any_real_scale_is_multiplied_as_the_stock_loss_multiplies_it(name):
    """The stock loss classes multiply the scores by whatever ``scale`` holds (their constructors refuse a
    non-positive one, a scale set later is used as it is): so does the op, NaN / infinite results included, with
    stock's loss dtype (a one-element float64 tensor promotes it), gradients and scale gradient."""
    scale = SCALES[name]
    queries, documents, query_mask, document_mask = make_batch(2, torch.float32, seed=21)

    def fused(q, d, s):
        return fused_maxsim_loss(q, d, query_mask, document_mask, scale=s, backend="torch")

    def stock(q, d, s):
        return cross_entropy(colbert.colbert_scores(q, d, query_mask, document_mask), s, 2)

    learnable = isinstance(scale, torch.Tensor)  # (loss_and_grads gives a tensor scale its gradient)
    ours = loss_and_grads(fused, queries, documents, scale)
    stocks = loss_and_grads(stock, queries, documents, scale)
    assert ours[0].dtype == stocks[0].dtype and len(ours) == len(stocks) == (4 if learnable else 3)
    for what, a, s in zip(("loss", "d queries", "d documents", "d scale"), ours, stocks, strict=False):
        assert torch.equal(a.isnan(), s.isnan()) and torch.equal(a.isinf(), s.isinf()), (what, a, s)
        finite = a.isfinite()
        if bool(finite.any()):
            assert_close(a[finite], s[finite], torch.float32, what)


def test_float64_reference_backend():
    queries, documents, query_mask, document_mask = make_batch(2, torch.float64, seed=8)

    def fused(q, d, s):
        return fused_maxsim_loss(q, d, query_mask, document_mask, length_normalize=True, backend="auto")

    def reference(q, d, s):
        return cross_entropy(reference_scores(q, d, query_mask, document_mask, True), 1.0, 2)

    ours, expected = loss_and_grads(fused, queries, documents), loss_and_grads(reference, queries, documents)
    assert ours[0].dtype == torch.float64
    for a, e in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_tiles_bound_memory_and_change_nothing():
    """A tile budget of a few elements (one query x one document per tile) gives the one-tile result; the backward
    is deterministic (the same bits twice)."""
    queries, documents, query_mask, document_mask = make_batch(3, torch.float32, seed=9, batch=5)

    def run(tile_elements):
        return loss_and_grads(
            lambda q, d, s: fused_maxsim_loss(q, d, query_mask, document_mask, backend="torch",
                                              tile_elements=tile_elements),  # fmt: skip
            queries, documents,
        )  # fmt: skip

    small, large, again = run(1), run(1 << 24), run(1)
    for a, b in zip(small, large, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(small, again, strict=True):
        assert torch.equal(a, b)


def test_default_masks_are_stocks_zero_rows():
    queries, documents, _, _ = make_batch(2, torch.float32, seed=11)
    queries[0, 3] = 0.0
    documents[1, 0, 2:] = 0.0
    documents[2, 1] = 0.0  # an all-zero (empty) document
    ours = maxsim_scores(queries, documents, length_normalize=True, backend="torch")
    stock = colbert.colbert_scores(queries, documents, length_normalize=True)
    assert_close(ours, stock, torch.float32, "scores")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, d, qm, dm: maxsim_scores(q[0], d, qm, dm), ValueError, "3-D"),
        (lambda q, d, qm, dm: maxsim_scores(q, d[..., :-1], qm, dm), ValueError, "dim"),
        (lambda q, d, qm, dm: maxsim_scores(q, d.double(), qm, dm), TypeError, "dtype"),
        (lambda q, d, qm, dm: maxsim_scores(q, d, qm.float(), dm), TypeError, "boolean"),
        (lambda q, d, qm, dm: maxsim_scores(q, d, qm[:, :-1], dm), ValueError, "query_mask"),
        (lambda q, d, qm, dm: maxsim_scores(q, d, qm, dm, backend="fast"), ValueError, "backend"),
        (lambda q, d, qm, dm: maxsim_scores(q.half(), d.half(), qm, dm, backend="native"), RuntimeError, "native"),
        (lambda q, d, qm, dm: maxsim_scores(q.double(), d.double(), qm, dm, backend="triton"), TypeError, "float64"),
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d[:2], qm, dm[:2]), ValueError, "outside"),
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d[:, 0], qm, dm[:, 0]), ValueError, "stacked"),
        (lambda q, d, qm, dm: maxsim_scores(q, d, qm.long() * 2, dm), ValueError, "0/1"),
        (lambda q, d, qm, dm: maxsim_scores(q.double(), d.double(), qm, dm, backend="native"), TypeError, "float32/bf"),
        # a scale the loss classes' `scores * scale` would broadcast (another loss) or refuse less clearly
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, scale=torch.ones(2)), ValueError, "one-element"),
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, scale=torch.ones(2, 1)), ValueError, "one-element"),
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, scale=None), TypeError, "real number"),
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, scale="20"), TypeError, "real number"),
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, scale=[20.0]), TypeError, "real number"),
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, scale=torch.tensor(1j)), TypeError, "real"),
        # a numpy array: stock's `scores * scale` goes through numpy, which fails on scores that require grad
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, scale=np.array(2.0)), TypeError, "float\\(scale\\)"),
        (lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, row_offset=0.5), TypeError, "row_offset must be an int"),
        (
            lambda q, d, qm, dm: fused_maxsim_loss(q, d, qm, dm, scale=torch.tensor(2.0, device="meta")),
            ValueError,
            "scale is on meta",
        ),
        (
            lambda q, d, qm, dm: fused_maxsim_loss(
                q, d, qm, dm, scale=torch.tensor(2.0, device="meta", requires_grad=True)
            ),
            ValueError,
            "scale is on meta",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    queries, documents, query_mask, document_mask = make_batch(2, torch.float32, seed=12)
    with pytest.raises(error, match=match):
        call(queries, documents, query_mask, document_mask)


@pytest.mark.parametrize("tile_elements", [1, None])
def test_trailing_padding_of_any_length_equals_stock(tile_elements):
    """Documents padded to the batch's longest (the torch backend skips the products of a tile's trailing masked
    tokens): loss and gradients equal stock's, per-document tiles (1) or shared ones."""
    queries, documents, query_mask, _ = make_batch(2, torch.float32, seed=14, batch=5, document_tokens=23)
    lengths = torch.tensor([[23, 4], [1, 17], [9, 23], [12, 2], [6, 20]])
    document_mask = torch.arange(23) < lengths.unsqueeze(-1)
    document_mask[3, 0, 5] = True  # a token after a hole

    def fused(q, d, s):
        return fused_maxsim_loss(q, d, query_mask, document_mask, backend="torch", tile_elements=tile_elements)

    def stock(q, d, s):
        return cross_entropy(colbert.colbert_scores(q, d, query_mask, document_mask), 1.0, 2)

    ours, stocks = loss_and_grads(fused, queries, documents), loss_and_grads(stock, queries, documents)
    for what, a, s in zip(("loss", "d queries", "d documents"), ours, stocks, strict=True):
        assert_close(a, s, torch.float32, what)


def test_the_one_dispatch_point_reaches_the_maxsim_rules():
    """st_fast.ops.backends.resolve_backend is the dispatch point of every op: for MAXSIM it applies the op's own
    rules (st_fast.ops.maxsim.dispatch), and refuses the contrastive ops' inputs it has no use for."""
    from st_fast.ops.backends import MAXSIM, resolve_backend
    from st_fast.ops.maxsim.dispatch import resolve_maxsim_backend

    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        chosen = resolve_backend("auto", cpu, dtype, MAXSIM, tile_elements=7)
        assert type(chosen) is type(resolve_maxsim_backend("auto", cpu, dtype, 7))
    assert resolve_backend("torch", cpu, torch.float32, MAXSIM).name == "torch"
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("native", cpu, torch.float64, MAXSIM)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", cpu, torch.float32, MAXSIM)
    with pytest.raises(ValueError, match="duplicate labels"):
        resolve_backend("auto", cpu, torch.float32, MAXSIM, mask_duplicates=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_embedding_gives_stocks_non_finite_scores(backend, bad):
    """A NaN (or an inf, whose product with 0 is NaN) in a real token reaches the scores as in stock's max: a
    diverging run must not get a finite loss back from any backend (the native kernels leave such calls to torch)."""
    queries, documents, query_mask, document_mask = make_batch(2, torch.float32, seed=21)
    documents[0, 1, 0, 3] = bad
    ours = maxsim_scores(queries, documents, query_mask, document_mask, backend=backend)
    stock = colbert.colbert_scores(queries, documents, query_mask, document_mask)
    assert torch.equal(ours.isnan(), stock.isnan()) and bool(stock.isnan().any())
    finite = stock.isfinite()
    torch.testing.assert_close(ours[finite], stock[finite])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["query_tokens", "document_tokens"])
def test_an_empty_token_axis_gives_stocks_scores_and_zero_gradients(backend, axis):
    g = torch.Generator().manual_seed(22)
    lq, ld = (0, 7) if axis == "query_tokens" else (5, 0)
    queries, documents = torch.randn(3, lq, 12, generator=g), torch.randn(3, 2, ld, 12, generator=g)
    query_mask, document_mask = torch.ones(3, lq, dtype=torch.bool), torch.ones(3, 2, ld, dtype=torch.bool)
    stock = colbert.colbert_scores(queries, documents, query_mask, document_mask)
    queries.requires_grad_(), documents.requires_grad_()
    ours = maxsim_scores(queries, documents, query_mask, document_mask, backend=backend)
    torch.testing.assert_close(ours, stock)
    ours.sum().backward()
    assert not queries.grad.any() and not documents.grad.any()


OVERFLOW = {torch.float32: 1e30, torch.bfloat16: 1e30, torch.float16: 300.0}  # |q · d| past the dtype's max


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's numpy
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_masked_tokens_fill_that_wins_the_max_scores_and_gets_no_gradient_as_stock(backend, dtype):
    """Query 0's products with its positive overflow to -inf, so stock's masked_fill(finfo.min) of the first padding
    token wins the max: the score is that fill (not -inf), and the fill is a constant, so neither the padding token
    nor the query gets a gradient from it (padding with values that a wrong gradient would show)."""
    if backend == "native" and dtype == torch.float16:
        pytest.skip("no float16 native kernel")
    big = OVERFLOW[dtype]
    queries = torch.tensor([[[big, 0.0]], [[0.0, 1.0]]])  # (B 2, Lq 1, D 2)
    documents = torch.tensor([
        [[[-big, 0.0], [0.0, 7.0], [0.0, 7.0]]],  # positive of query 0: one real token, then padding
        [[[0.0, 0.5], [0.0, 2.0], [0.0, 7.0]]],  # positive of query 1
    ])  # fmt: skip
    query_mask = torch.ones(2, 1, dtype=torch.bool)
    document_mask = torch.tensor([[[True, False, False]], [[True, True, False]]])
    queries, documents = queries.to(dtype), documents.to(dtype)

    def fused(q, d, s):
        return fused_maxsim_loss(q, d, query_mask, document_mask, backend=backend)

    def stock(q, d, s):
        return cross_entropy(colbert.colbert_scores(q, d, query_mask, document_mask), 1.0, 1)

    scores = maxsim_scores(queries, documents, query_mask, document_mask, backend=backend)
    expected_scores = colbert.colbert_scores(queries, documents, query_mask, document_mask)
    assert float(expected_scores[0, 0]) == torch.finfo(dtype).min  # the fill won, as this test means
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=0)
    ours, stocks = loss_and_grads(fused, queries, documents), loss_and_grads(stock, queries, documents)
    assert bool(stocks[0].isfinite()) and bool(stocks[2][0, 0, 1:].eq(0).all())
    for what, a, s in zip(("loss", "d queries", "d documents"), ours, stocks, strict=True):
        assert_close(a, s, torch.float32 if dtype == torch.float32 else dtype, what)
    assert bool(ours[2][0, 0, 1:].eq(0).all())  # no gradient into the padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_under_autocast_computes_in_the_autocast_dtype_as_stock(backend):
    """float32 embeddings under autocast(cpu, bfloat16): stock's einsum computes the products in bfloat16, and so
    does the op (its scores, loss and float32 gradients equal stock's, not the float32 computation's)."""
    queries, documents, query_mask, document_mask = make_batch(2, torch.float32, seed=31)

    def fused(q, d, s):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_maxsim_loss(q, d, query_mask, document_mask, backend=backend)

    def stock(q, d, s):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cross_entropy(colbert.colbert_scores(q, d, query_mask, document_mask), 1.0, 2)

    def plain(q, d, s):
        return fused_maxsim_loss(q, d, query_mask, document_mask, backend=backend)

    ours, stocks = loss_and_grads(fused, queries, documents), loss_and_grads(stock, queries, documents)
    assert float((stocks[0] - loss_and_grads(plain, queries, documents)[0]).abs()) > 1e-4  # autocast matters here
    assert_close(ours[0], stocks[0], torch.float32, "loss")  # the same bfloat16 products: float32 rounding only
    for what, a, s in zip(("d queries", "d documents"), ours[1:], stocks[1:], strict=True):
        assert a.dtype == s.dtype, what
        assert_close(a, s, torch.bfloat16, what)
