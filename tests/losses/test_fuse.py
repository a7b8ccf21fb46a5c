"""st_fast.losses.fuse: stock losses (and wrappers around them) -> st_fast equivalents with identical behaviour."""

from __future__ import annotations

import warnings

import pytest
from conftest import make_splade_model
from parity import relative_error, train_step
from sentence_transformers import util
from sentence_transformers.sentence_transformer import losses as stock_losses
from sentence_transformers.sparse_encoder import losses as stock_sparse_losses

from st_fast import losses as fast_losses
from st_fast.losses import fuse
from st_fast.losses.plan import is_wrapper

TEXTS = [
    ["a cat sat on the mat", "dogs bark at night", "rain is expected today", "tea is hot"],
    ["a kitten sits", "a dog is barking", "it will rain", "a hot drink"],
    ["stock markets fell", "a recipe for bread", "the train is late", "a cold winter"],
]


def _assert_same_behaviour(model, stock, fused, features):
    ref_loss, ref_grads = train_step(model, stock, features)
    loss, grads = train_step(model, fused, features)
    assert relative_error(loss, ref_loss) < 1e-5
    assert relative_error(grads, ref_grads) < 1e-5


def _innermost(loss):
    """The loss inside the wrappers (cached losses keep their own inner MNRL as ``.loss``: not a wrapper)."""
    while is_wrapper(loss):
        loss = loss.loss
    return loss


def _config(loss) -> dict:
    """get_config_dict() with loss values (a wrapper's inner loss) replaced by their class name and config (other
    values, e.g. GIST's guide model, compared as they are)."""
    return {
        key: (type(value).__name__, _config(value)) if hasattr(value, "get_config_dict") else value
        for key, value in loss.get_config_dict().items()
    }


def _quiet(factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory()


STOCK_FACTORIES = {
    "mnrl": lambda m: stock_losses.MultipleNegativesRankingLoss(m, scale=15.0),
    "mnrl-all-directions-hardness": lambda m: stock_losses.MultipleNegativesRankingLoss(
        m,
        directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness_mode="all_negatives",
        hardness_strength=5.0,
    ),  # fmt: skip
    "mnrl-dot": lambda m: stock_losses.MultipleNegativesRankingLoss(m, scale=1.0, similarity_fct=util.dot_score),
    "mnsrl": lambda m: stock_losses.MultipleNegativesSymmetricRankingLoss(m),
    "cmnrl": lambda m: stock_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=2),
    "cmnsrl": lambda m: stock_losses.CachedMultipleNegativesSymmetricRankingLoss(m, mini_batch_size=3),
    "matryoshka-mnrl": lambda m: stock_losses.MatryoshkaLoss(m, stock_losses.MultipleNegativesRankingLoss(m), [32, 8]),
    "matryoshka-cmnrl": lambda m: stock_losses.MatryoshkaLoss(
        m, stock_losses.CachedMultipleNegativesRankingLoss(m, mini_batch_size=2), [32, 16, 8]
    ),
    "matryoshka2d-mnrl": lambda m: stock_losses.Matryoshka2dLoss(
        m, stock_losses.MultipleNegativesRankingLoss(m), [32, 8], n_layers_per_step=-1
    ),
    "adaptive-layer-mnrl": lambda m: stock_losses.AdaptiveLayerLoss(
        m, stock_losses.MultipleNegativesRankingLoss(m), n_layers_per_step=-1
    ),
    # GIST with the model as its own guide; temperature 0.05 (at 0.01 the float32 cosines' rounding alone, x100,
    # separates stock float32 from float64 by more than the 1e-5 of these comparisons)
    "gist": lambda m: stock_losses.GISTEmbedLoss(m, m, temperature=0.05, margin_strategy="relative", margin=0.05),
    "cached-gist": lambda m: stock_losses.CachedGISTEmbedLoss(m, m, temperature=0.05, mini_batch_size=2, margin=0.02),
    "matryoshka-gist": lambda m: stock_losses.MatryoshkaLoss(
        m, stock_losses.GISTEmbedLoss(m, m, temperature=0.05), [32, 8]
    ),
    "matryoshka-cached-gist": lambda m: stock_losses.MatryoshkaLoss(
        m, stock_losses.CachedGISTEmbedLoss(m, m, temperature=0.05, mini_batch_size=3), [32, 16]
    ),
}


@pytest.mark.parametrize("name", STOCK_FACTORIES)
def test_fuse_gives_the_same_configuration_loss_and_gradients(tiny_model, name):
    tiny_model.eval()  # both runs must see identical embeddings
    features = [tiny_model.preprocess(column) for column in TEXTS]
    stock = _quiet(lambda: STOCK_FACTORIES[name](tiny_model))
    fused = fuse(stock)
    assert fused is not stock
    assert type(fused) is type(stock) or type(fused).__module__.startswith("st_fast")
    assert type(_innermost(fused)).__module__.startswith("st_fast.losses")
    assert _innermost(fused).model is tiny_model and fused.model is tiny_model
    assert _config(fused) == _config(stock)
    assert _innermost(stock).__class__.__module__.startswith("sentence_transformers")  # the stock object is intact
    _assert_same_behaviour(tiny_model, stock, fused, features)


def test_fuse_gist_keeps_the_guide_object(tiny_model, minilm_path):
    from conftest import make_tiny_model

    guide = make_tiny_model(minilm_path, seed=1)
    for stock in (
        stock_losses.GISTEmbedLoss(tiny_model, guide, margin=0.1, contrast_anchors=False),
        stock_losses.CachedGISTEmbedLoss(tiny_model, guide, mini_batch_size=5, contrast_positives=False),
    ):
        fused = fuse(stock, backend="torch")
        assert isinstance(fused, type(stock)) and type(fused).__module__.startswith("st_fast.losses")
        assert fused.model is tiny_model and fused.guide is guide and fused.backend == "torch"
        assert fused.get_config_dict() == stock.get_config_dict()


def test_fuse_leaves_other_losses_and_user_subclasses_unchanged(tiny_model):
    class MyLoss(stock_losses.MultipleNegativesRankingLoss):
        pass

    for loss in (stock_losses.CoSENTLoss(tiny_model), MyLoss(tiny_model), stock_losses.TripletLoss(tiny_model)):
        assert fuse(loss) is loss
    already = fast_losses.MultipleNegativesRankingLoss(tiny_model)
    assert fuse(already) is already


def test_fuse_passes_the_backend(tiny_model):
    fused = fuse(stock_losses.CachedMultipleNegativesRankingLoss(tiny_model), backend="torch")
    assert fused.backend == "torch"
    with pytest.raises(ValueError, match="backend"):
        fuse(stock_losses.MultipleNegativesRankingLoss(tiny_model), backend="gpu")


@pytest.fixture(scope="module")
def splade_model(minilm_path):
    return make_splade_model(minilm_path)


@pytest.mark.parametrize("cached", [False, True], ids=["splade", "cached-splade"])
def test_fuse_inside_splade_losses(splade_model, cached):
    # train mode: stock SpladePooling's eval path applies log1p_ in place, which autograd cannot differentiate;
    # train_step seeds both runs alike, so stock and fused see the same dropout masks
    splade_model.train()
    features = [splade_model.preprocess(column) for column in TEXTS[:2]]
    inner = stock_sparse_losses.SparseMultipleNegativesRankingLoss(splade_model)
    if cached:
        stock = stock_sparse_losses.CachedSpladeLoss(
            splade_model, inner, document_regularizer_weight=3e-5, query_regularizer_weight=5e-5, mini_batch_size=2
        )
    else:
        stock = stock_sparse_losses.SpladeLoss(
            splade_model, inner, document_regularizer_weight=3e-5, query_regularizer_weight=5e-5
        )
    fused = fuse(stock)
    assert isinstance(fused.loss, fast_losses.SparseMultipleNegativesRankingLoss) and fused.loss.model is splade_model
    assert stock.loss is inner and type(inner) is stock_sparse_losses.SparseMultipleNegativesRankingLoss
    assert _config(fused) == _config(stock)
    _assert_same_behaviour(splade_model, stock, fused, features)
