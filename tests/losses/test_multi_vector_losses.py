"""The drop-in multi-vector (late interaction) losses against the stock objects built as users build them: the
offline all-MiniLM-L6-v2 turned into a 128-d MultiVectorEncoder, loss and gradients (model parameters, cached token
embeddings, a learnable scale), live attributes, fallbacks, gathering (simulated ranks)."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from conftest import make_tiny_multi_vector_model

stock_losses = pytest.importorskip("sentence_transformers.multi_vector_encoder.losses")
scoring = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring")

from st_fast.losses import stock_contract  # noqa: E402
from st_fast.losses.cached_multi_vector_multiple_negatives_ranking import (  # noqa: E402
    CachedMultiVectorMultipleNegativesRankingLoss,
)
from st_fast.losses.multi_vector_multiple_negatives_ranking import (  # noqa: E402
    MultiVectorMultipleNegativesRankingLoss,
)
from st_fast.ops.backends import MAXSIM, resolve_backend  # noqa: E402

TEXTS = [
    ["what is a cat?", "who won the 1998 world cup", "red apples, green pears!", "how tall is it"],
    ["a cat is a small furry animal", "France won the 1998 world cup", "fruit: apples and pears", "two metres"],
    ["dogs bark at night", "Brazil lost the final", "vegetables", "the tower is tall and old"],
]
# the backend backend="auto" runs here (native where its MaxSim kernels are built), as the losses' plan() says
AUTO = resolve_backend("auto", torch.device("cpu"), torch.float32, MAXSIM).name
SIMILARITIES = {
    "model": None,
    "colbert_scores": scoring.colbert_scores,
    "mean_colbert_scores": scoring.mean_colbert_scores,
    "partial_normalized": functools.partial(scoring.colbert_scores, length_normalize=True),
}


@pytest.fixture(scope="module")
def model(minilm_path):
    """A tiny random MultiVectorEncoder with MiniLM's tokenizer and skiplist (conftest.make_tiny_multi_vector_model)."""
    return make_tiny_multi_vector_model(minilm_path)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(stock_contract, "_warned", set())


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused op's calls from the drop-in losses (so a silent stock fallback cannot pass a parity test):
    the scorer's, and the cached loss stage's with gradients (one backend for all its mini-batches); not those of
    the first-use self-check (tests/losses/test_multi_vector_self_check.py)."""
    from st_fast.losses import cached_multi_vector_multiple_negatives_ranking as cached_module
    from st_fast.losses import multi_vector_multiple_negatives_ranking as module
    from st_fast.losses import self_check

    calls, checking = [], []
    original, original_check = module.maxsim_scores, self_check.check
    original_resolve = cached_module.resolve_backend

    def counting(*args, **kwargs):
        if not checking:
            calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    def resolving(*args, **kwargs):
        backend = original_resolve(*args, **kwargs)
        calls.append(backend.name)
        return backend

    def check(*args, **kwargs):
        checking.append(True)
        try:
            return original_check(*args, **kwargs)
        finally:
            checking.pop()

    monkeypatch.setattr(module, "maxsim_scores", counting)
    monkeypatch.setattr(cached_module, "resolve_backend", resolving)
    monkeypatch.setattr(self_check, "check", check)
    return calls


def features(model, columns):
    out = []
    for texts in columns:
        feature = dict(model.preprocess(texts))
        feature.pop("token_type_ids", None)
        out.append(feature)
    return out


def loss_and_parameter_grads(loss, model, columns):
    model.zero_grad(set_to_none=True)
    value = loss(features(model, columns), None)
    value.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def assert_same(ours, stock, rtol=2e-5):
    (loss_a, grads_a), (loss_b, grads_b) = ours, stock
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_b
    flat_a = torch.cat([grads_a[name].flatten() for name in grads_b])
    flat_b = torch.cat([grads_b[name].flatten() for name in grads_b])
    error, scale = float((flat_a - flat_b).abs().max()), float(flat_b.abs().max())
    assert scale > 0 and error <= rtol * scale, f"max |grad diff| {error:.3g} vs max |grad| {scale:.3g}"


@pytest.mark.parametrize("similarity", list(SIMILARITIES))
def test_loss_and_model_gradients_equal_stock(model, similarity, fused_calls):
    kwargs = dict(scale=2.0, score_mini_batch_size=3)
    if SIMILARITIES[similarity] is not None:
        kwargs["similarity_fct"] = SIMILARITIES[similarity]
    stock = stock_losses.MultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    fused = MultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    assert fused.get_config_dict() == stock.get_config_dict()
    assert_same(loss_and_parameter_grads(fused, model, TEXTS), loss_and_parameter_grads(stock, model, TEXTS))
    assert fused_calls == [AUTO, AUTO]  # two query chunks of score_mini_batch_size=3


def test_cached_forward_and_backward_hook_equal_stock(model, fused_calls):
    kwargs = dict(mini_batch_size=3, score_mini_batch_size=2, similarity_fct=scoring.mean_colbert_scores, scale=4.0)
    stock = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    assert fused.get_config_dict() == stock.get_config_dict()
    assert_same(loss_and_parameter_grads(fused, model, TEXTS), loss_and_parameter_grads(stock, model, TEXTS))
    assert fused_calls == [AUTO]  # one fused pass for the whole loss stage


def random_cache(columns: int, dtype: torch.dtype, seed: int):
    """Cached token embeddings of 3 mini-batches (2 + 2 + 1 rows) per column, each mini-batch at its own width,
    unit rows, masks with holes, one empty document (with 3 or more columns)."""
    g = torch.Generator().manual_seed(seed)
    reps, masks = [], []
    for column in range(columns):
        column_reps, column_masks = [], []
        for rows, width in ((2, 5 + column), (2, 7), (1, 3 + 2 * column)):
            x = torch.nn.functional.normalize(torch.randn(rows, width, 16, generator=g, dtype=torch.float64), dim=-1)
            mask = torch.rand(rows, width, generator=g) > 0.3
            mask[:, 0] = True
            column_reps.append(x.to(dtype))
            column_masks.append(mask)
        reps.append(column_reps)
        masks.append(column_masks)
    if columns > 2:  # a hard negative without a scoreable token (an empty positive: a loss of about 1e9 · scale)
        masks[-1][1][0] = False
    return reps, masks


def cached_stage(loss, reps, masks):
    leaves = [[r.detach().clone().requires_grad_() for r in column] for column in reps]
    value = loss.calculate_loss(leaves, masks, with_backward=True)
    assert not value.requires_grad
    return value, [[r.grad for r in column] for column in leaves]


@pytest.mark.parametrize("columns", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("similarity", ["model", "colbert_scores", "mean_colbert_scores"])
def test_cached_loss_stage_writes_stocks_gradients(model, columns, dtype, similarity, fused_calls):
    kwargs = dict(mini_batch_size=2, score_mini_batch_size=2, scale=3.0)
    if SIMILARITIES[similarity] is not None:
        kwargs["similarity_fct"] = SIMILARITIES[similarity]
    stock = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    reps, masks = random_cache(columns, dtype, seed=columns)
    (loss_a, grads_a), (loss_b, grads_b) = cached_stage(fused, reps, masks), cached_stage(stock, reps, masks)
    assert len(fused_calls) == 1
    # the same products (one GEMM rounding to dtype) and maxima: the loss differs by float32 summation order only
    torch.testing.assert_close(loss_a.float(), loss_b.float(), rtol=1e-5, atol=1e-6)
    tolerance = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for column_a, column_b in zip(grads_a, grads_b, strict=True):
        for a, b in zip(column_a, column_b, strict=True):
            assert a.dtype == b.dtype == dtype and a.shape == b.shape
            scale = max(float(b.abs().max()), 1e-3)
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=tolerance * scale)


def test_learnable_scale_gets_stocks_gradient(model):
    reps, masks = random_cache(2, torch.float32, seed=9)
    results = []
    for cls in (
        stock_losses.CachedMultiVectorMultipleNegativesRankingLoss,
        CachedMultiVectorMultipleNegativesRankingLoss,
    ):
        scale = torch.nn.Parameter(torch.tensor(2.5))
        loss = cls(model, mini_batch_size=2, score_mini_batch_size=2)
        loss.scale = scale
        value, _ = cached_stage(loss, reps, masks)
        results.append((value, scale.grad))
    assert results[0][1] is not None and results[1][1] is not None
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


def test_attributes_are_read_at_call_time(model):
    reps, masks = random_cache(2, torch.float32, seed=4)
    stock = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=2)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=2)
    for loss in (stock, fused):
        loss.scale = 7.0
        loss.similarity_fct = scoring.mean_colbert_scores
    torch.testing.assert_close(cached_stage(fused, reps, masks)[0], cached_stage(stock, reps, masks)[0])
    before = cached_stage(fused, reps, masks)[0]
    fused.scale = 1.0
    assert not torch.equal(cached_stage(fused, reps, masks)[0], before)


def test_other_scorings_are_computed_by_stock_with_one_warning(model, caplog, fused_calls):
    xtr = scoring.XTRScores(top_k=4)
    reps, masks = random_cache(2, torch.float32, seed=5)
    stock = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, similarity_fct=xtr, mini_batch_size=2)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, similarity_fct=xtr, mini_batch_size=2)
    with caplog.at_level(logging.WARNING, logger="st_fast.losses"):
        first, second = cached_stage(fused, reps, masks), cached_stage(fused, reps, masks)
    expected = cached_stage(stock, reps, masks)
    assert torch.equal(first[0], expected[0]) and torch.equal(second[0], expected[0])
    warnings = [r for r in caplog.records if "XTRScores" in r.getMessage() and "stock" in r.getMessage()]
    assert len(warnings) == 1 and fused_calls == []


def test_evaluation_leaves_modes_and_computes_stocks_loss(model):
    stock = stock_losses.MultiVectorMultipleNegativesRankingLoss(model)
    fused = MultiVectorMultipleNegativesRankingLoss(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ours, theirs = fused(features(model, TEXTS), None), stock(features(model, TEXTS), None)
        assert not model.training and not any(module.training for module in model.modules())
    finally:
        model.train(was_training)
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)


def simulated_gather(monkeypatch, module):
    """Two simulated ranks in ``module`` (a stock loss module): this one is rank 1, and all_gather_padded puts a
    fixed other rank's documents (2 tokens wider: the padding to the cross-rank width) in front of its own, as the
    real one does; the fused losses read stock's helpers, so the same patch reaches both."""
    other = {}

    def all_gather_padded(tensor, mask, with_grad=False):
        if tensor.shape[0] not in other:
            g = torch.Generator().manual_seed(tensor.shape[0])
            width = tensor.shape[1] + 2
            x = torch.nn.functional.normalize(torch.randn(tensor.shape[0], width, tensor.shape[2], generator=g), dim=-1)
            other[tensor.shape[0]] = (x.to(tensor.dtype), torch.rand(tensor.shape[0], width, generator=g) > 0.2)
        x, m = other[tensor.shape[0]]
        pad = x.shape[1] - tensor.shape[1]
        tensor = torch.nn.functional.pad(tensor, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
        return torch.cat([x, tensor]), torch.cat([m, mask])

    monkeypatch.setattr(module, "all_gather_padded", all_gather_padded)
    monkeypatch.setattr(module, "get_rank", lambda: 1)


def test_gathered_documents_and_label_offsets_equal_stock(model, monkeypatch, fused_calls):
    from sentence_transformers.multi_vector_encoder.losses import cached_multiple_negatives_ranking as module

    simulated_gather(monkeypatch, module)
    reps, masks = random_cache(3, torch.float32, seed=6)
    kwargs = dict(mini_batch_size=2, gather_across_devices=True)
    stock = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    (loss_a, grads_a), (loss_b, grads_b) = cached_stage(fused, reps, masks), cached_stage(stock, reps, masks)
    assert len(fused_calls) == 1
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for column_a, column_b in zip(grads_a, grads_b, strict=True):
        for a, b in zip(column_a, column_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_gathered_documents_in_the_loss_forward_equal_stock(model, monkeypatch, fused_calls):
    from sentence_transformers.multi_vector_encoder.losses import multiple_negatives_ranking as module

    simulated_gather(monkeypatch, module)
    stock = stock_losses.MultiVectorMultipleNegativesRankingLoss(model, gather_across_devices=True)
    fused = MultiVectorMultipleNegativesRankingLoss(model, gather_across_devices=True)
    assert_same(loss_and_parameter_grads(fused, model, TEXTS), loss_and_parameter_grads(stock, model, TEXTS))
    assert fused_calls == [AUTO]


@pytest.mark.parametrize("cached", [False, True])
def test_inside_multi_vector_matryoshka_loss(model, cached, fused_calls):
    """sentence-transformers >= 6.3: MultiVectorMatryoshkaLoss around each drop-in (the cached one through its
    CachedLossDecorator on calculate_loss) gives stock's loss and model gradients."""
    wrapper = getattr(stock_losses, "MultiVectorMatryoshkaLoss", None)
    if wrapper is None:
        pytest.skip("this sentence-transformers has no MultiVectorMatryoshkaLoss (added in 6.3)")
    stock_class = (
        stock_losses.CachedMultiVectorMultipleNegativesRankingLoss
        if cached
        else stock_losses.MultiVectorMultipleNegativesRankingLoss
    )
    fused_class = CachedMultiVectorMultipleNegativesRankingLoss if cached else MultiVectorMultipleNegativesRankingLoss
    kwargs = dict(mini_batch_size=3) if cached else {}
    stock = wrapper(model, stock_class(model, **kwargs), [16, 8])
    fused = wrapper(model, fused_class(model, **kwargs), [16, 8])
    texts = [column[:3] for column in TEXTS]  # one mini-batch per column: the embedding passes are stock's cost
    assert_same(loss_and_parameter_grads(fused, model, texts), loss_and_parameter_grads(stock, model, texts))
    assert len(fused_calls) == 2  # one per Matryoshka dimension


@pytest.mark.parametrize("backend", ["torch", "triton", "native"])
def test_backends_through_the_cached_loss_stage(model, backend, fused_calls):
    from st_fast._native_maxsim import native_maxsim_available
    from st_fast.ops.triton_lse import triton_unavailable_reason

    if backend == "triton" and triton_unavailable_reason("cpu") is not None:
        pytest.skip(triton_unavailable_reason("cpu"))
    if backend == "native" and not native_maxsim_available(torch.device("cpu"), torch.float32):
        pytest.skip("the native MaxSim kernels are not built")
    reps, masks = random_cache(3, torch.float32, seed=12)
    stock = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=2)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=2, backend=backend)
    (loss_a, grads_a), (loss_b, grads_b) = cached_stage(fused, reps, masks), cached_stage(stock, reps, masks)
    assert fused_calls == [backend]
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    for column_a, column_b in zip(grads_a, grads_b, strict=True):
        for a, b in zip(column_a, column_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


def test_under_autocast_the_products_take_the_autocast_dtype_as_stocks(model, fused_calls):
    """CPU bf16 autocast: stock's einsum computes the float32 embeddings' products in bfloat16 (its masked_fill and
    max too); the fused scorer casts them as autocast would, so loss and gradients are stock's to bf16 rounding."""
    reps, masks = random_cache(2, torch.float32, seed=13)
    stock = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=2)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (loss_a, grads_a), (loss_b, grads_b) = cached_stage(fused, reps, masks), cached_stage(stock, reps, masks)
    with torch.autocast("cpu", enabled=False):
        loss_float32 = cached_stage(fused, reps, masks)[0]
    assert len(fused_calls) == 2
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    tolerance = 2 * torch.finfo(torch.bfloat16).eps
    assert abs(float(loss_a) - float(loss_float32)) > 1e-6  # autocast did change stock's (and st_fast's) products
    for column_a, column_b in zip(grads_a, grads_b, strict=True):
        for a, b in zip(column_a, column_b, strict=True):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=tolerance * float(b.abs().max()))


@pytest.mark.parametrize("cached", [False, True])
def test_constructor_takes_stocks_arguments_and_checks(model, cached):
    stock_class = (
        stock_losses.CachedMultiVectorMultipleNegativesRankingLoss
        if cached
        else stock_losses.MultiVectorMultipleNegativesRankingLoss
    )
    fused_class = CachedMultiVectorMultipleNegativesRankingLoss if cached else MultiVectorMultipleNegativesRankingLoss
    kwargs = dict(scale=5.0, similarity_fct=scoring.colbert_scores, score_mini_batch_size=7, mini_batch_size=3)
    fused, stock = fused_class(model, backend="torch", **kwargs), stock_class(model, **kwargs)
    assert isinstance(fused, stock_class) and fused.backend == "torch"
    assert fused.get_config_dict() == stock.get_config_dict() and fused.citation == stock.citation
    with pytest.raises(ValueError, match="Scale must be a positive value"):
        fused_class(model, scale=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_class(model, backend="fast")


def test_registered_family_fuse_and_plan(model, fused_calls):
    """Registered at import (st_fast.losses.plan), fuse() turns the stock objects (also inside
    MultiVectorMatryoshkaLoss, 6.3) into the drop-ins with the same state; plan() answers through the MaxSim
    dispatch."""
    from st_fast.losses.fuse import fuse

    stock = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=2, scale=3.0)
    fused = fuse(stock, backend="torch")
    assert type(fused) is CachedMultiVectorMultipleNegativesRankingLoss and fused.__dict__ is stock.__dict__
    assert type(stock) is stock_losses.CachedMultiVectorMultipleNegativesRankingLoss and fused.backend == "torch"
    reps, masks = random_cache(3, torch.float32, seed=15)
    (loss_a, _), (loss_b, _) = cached_stage(fused, reps, masks), cached_stage(stock, reps, masks)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert fused_calls == ["torch"]
    cpu = torch.device("cpu")
    fused.backend = "auto"
    assert fused.plan(cpu, torch.float32).runs() == AUTO and fused.plan(cpu, torch.float64).runs() == "torch"
    assert fused.plan(cpu, torch.float32).fused
    fused.similarity_fct = scoring.XTRScores(top_k=4)
    assert not fused.plan(cpu, torch.float32).fused  # stock computes XTR
    wrapper = getattr(stock_losses, "MultiVectorMatryoshkaLoss", None)
    if wrapper is not None:
        wrapped = fuse(wrapper(model, stock_losses.MultiVectorMultipleNegativesRankingLoss(model), [16, 8]))
        assert type(wrapped.loss) is MultiVectorMultipleNegativesRankingLoss


class SimilarityOnlyModel(torch.nn.Module):
    """A multi-vector model with only what stock's ``similarity_fct=None`` reads: a forward that returns the given
    token embeddings and mask, and ``similarity`` (no ``similarity_fn_name``, no ``_similarity``)."""

    def __init__(self, similarity):
        super().__init__()
        self.similarity = similarity

    def forward(self, features, task=None):
        return features


def token_features(widths, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for width in widths:
        embeddings = torch.nn.functional.normalize(torch.randn(4, width, 8, generator=g), dim=-1)
        mask = torch.rand(4, width, generator=g) > 0.25
        mask[:, 0] = True
        out.append({"token_embeddings": embeddings.requires_grad_(), "attention_mask": mask})
    return out


def loss_and_token_grads(loss, widths, seed):
    columns = token_features(widths, seed)
    value = loss(columns, None)
    value.backward()
    return value.detach(), {str(i): c["token_embeddings"].grad for i, c in enumerate(columns)}


@pytest.mark.parametrize("cached", [False, True], ids=["mnrl", "cached"])
@pytest.mark.parametrize("function", ["maxsim", "mean_maxsim", "other"])
def test_a_model_with_only_a_similarity_is_scored_as_stock_scores_it(cached, function, fused_calls, caplog):
    """similarity_fct=None reads only ``model.similarity`` in stock: st_fast fuses it where it is maxsim / mean_maxsim
    and computes any other function with stock (one warning), on any model object, not only a MultiVectorEncoder."""
    from sentence_transformers.util import similarity as util_similarity

    chosen = {
        "maxsim": util_similarity.maxsim,
        "mean_maxsim": util_similarity.mean_maxsim,
        "other": lambda a, b, **kw: 3.0 * util_similarity.maxsim(a, b, **kw),
    }[function]
    model = SimilarityOnlyModel(chosen)
    names = ("CachedMultiVectorMultipleNegativesRankingLoss", "MultiVectorMultipleNegativesRankingLoss")
    name = names[0] if cached else names[1]
    kwargs = dict(mini_batch_size=2, show_progress_bar=False) if cached else {}
    fused_class = CachedMultiVectorMultipleNegativesRankingLoss if cached else MultiVectorMultipleNegativesRankingLoss
    stock = getattr(stock_losses, name)(model, **kwargs)
    fused = fused_class(model, **kwargs)
    fused.self_check = False  # the fallback itself must be right, not caught by the self-check
    with caplog.at_level(logging.WARNING):
        ours = loss_and_token_grads(fused, (6, 10, 14), seed=3)
    theirs = loss_and_token_grads(stock, (6, 10, 14), seed=3)
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=1e-6)
    for key in theirs[1]:
        torch.testing.assert_close(ours[1][key], theirs[1][key], rtol=2e-5, atol=1e-6)
    # what the installed stock scores with by default: 6.3 the model's similarity (None), 6.2 colbert_scores
    if function == "other" and stock.similarity_fct is None:
        assert fused_calls == [] and "no fused kernel" in caplog.text
    else:
        assert fused_calls and "no fused kernel" not in caplog.text


def test_an_instance_similarity_override_is_what_stock_scores_with(model, fused_calls, caplog):
    """``model.similarity = fn`` on a MultiVectorEncoder: stock scores with fn, so st_fast does (stock, one warning),
    not with the class's maxsim behind it."""
    import copy

    from sentence_transformers.util.similarity import maxsim

    encoder = copy.deepcopy(model)
    encoder.similarity = lambda a, b, **kw: 3.0 * maxsim(a, b, **kw)
    fused = MultiVectorMultipleNegativesRankingLoss(encoder)
    fused.self_check = False
    stock = stock_losses.MultiVectorMultipleNegativesRankingLoss(encoder)
    with caplog.at_level(logging.WARNING):
        ours = loss_and_parameter_grads(fused, encoder, TEXTS)
    assert_same(ours, loss_and_parameter_grads(stock, encoder, TEXTS))
    if stock.similarity_fct is None:  # stock >= 6.3 scores with the model's similarity: the override
        assert fused_calls == [] and "no fused kernel" in caplog.text
    else:  # 6.2: colbert_scores whatever the model's similarity, which st_fast fuses
        assert fused_calls and "no fused kernel" not in caplog.text


def test_the_self_checks_random_masks_keep_a_token_per_row_and_real_masks_are_unchanged():
    """The self-check's random batch (Gaussian guides) must not hand stock an empty document the data did not have
    (stock warns once per process for it); a real 0/1 mask, an empty row included, is taken as it is."""
    from st_fast.losses.multi_vector_multiple_negatives_ranking import token_columns

    guides = torch.tensor([[-0.5, -0.2, -0.9], [0.3, -0.1, 0.2], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    _, (mask,) = token_columns([torch.zeros(4, 3 * 2)], [guides])
    assert mask.tolist() == [[False, True, False], [True, False, True], [True, False, True], [False, False, False]]
