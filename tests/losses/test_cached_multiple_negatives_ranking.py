"""st_fast.losses.CachedMultipleNegativesRankingLoss (+ symmetric alias) against the stock cached and non-cached
classes: the loss stage on random cached embeddings, and end to end with a small real model (dropout on)."""

from __future__ import annotations

import warnings

import pytest
import torch
from parity import assert_parity, relative_error, train_step
from sentence_transformers.sentence_transformer import losses as stock_losses

from st_fast import losses as fast_losses

# the configurations of upstream's test_gradcache.py
CONFIGS = {
    "default": {},
    "symmetric-scale50": dict(scale=50.0, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "all-directions": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
    "in-batch-9": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "all-negatives-5": dict(hardness_mode="all_negatives", hardness_strength=5.0),
}
BACKENDS = ["torch", "native"]


def _cached_reps(batch: int, dim: int, columns: int, mini_batch_size: int, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    full = [anchor] + [
        0.6 * anchor + torch.randn(batch, dim, generator=generator, dtype=torch.float64) for _ in range(columns - 1)
    ]
    return [[x.to(dtype).requires_grad_() for x in column.split(mini_batch_size)] for column in full]


def _stage(loss, reps):
    """calculate_loss(with_backward=True) -> (loss, gradient of each column, concatenated)."""
    value = loss.calculate_loss(reps, None, with_backward=True)
    return value.detach(), [torch.cat([rep.grad for rep in column]) for column in reps]


def _copies(reps, dtype):
    return [[rep.detach().to(dtype).requires_grad_() for rep in column] for column in reps]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mini_batch_size", [1, 3, 50])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("columns", [2, 4])
def test_loss_stage_matches_stock(tiny_model, config, mini_batch_size, backend, columns):
    stock = stock_losses.CachedMultipleNegativesRankingLoss(
        tiny_model, mini_batch_size=mini_batch_size, **CONFIGS[config]
    )
    fast = fast_losses.CachedMultipleNegativesRankingLoss(
        tiny_model, mini_batch_size=mini_batch_size, backend=backend, **CONFIGS[config]
    )
    reps = _cached_reps(11, 24, columns, mini_batch_size)
    expected = _stage(stock, _copies(reps, torch.float64))
    baseline = _stage(stock, _copies(reps, torch.float32))
    actual = _stage(fast, reps)
    assert_parity(actual, expected, baseline, rtol=1e-5)


def test_evaluation_returns_the_loss_only(tiny_model):
    stock = stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=4)
    fast = fast_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=4, backend="native")
    reps = _cached_reps(9, 16, 3, 4)
    with torch.no_grad():
        value = fast.calculate_loss(reps, None)
        reference = stock.calculate_loss(_copies(reps, torch.float64), None)
    assert relative_error(value, reference) < 1e-5
    assert all(rep.grad is None for column in reps for rep in column)


def test_config_and_class_relationship(tiny_model):
    kwargs = dict(mini_batch_size=7, **CONFIGS["symmetric-scale50"])
    stock = stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, **kwargs)
    fast = fast_losses.CachedMultipleNegativesRankingLoss(tiny_model, backend="torch", **kwargs)
    assert isinstance(fast, stock_losses.CachedMultipleNegativesRankingLoss)
    assert fast.get_config_dict() == stock.get_config_dict()
    assert fast.citation == stock.citation and fast.uses_gradient_cache
    fast.scale = 5.0  # stock redirects hyperparameter assignment to the inner MNRL
    assert fast.loss.scale == 5.0 and fast.backend == "torch"


TEXTS = [
    ["a cat sat on the mat", "dogs bark at night", "rain is expected today", "tea is hot", "the sun rises"],
    ["a kitten sits", "a dog is barking", "it will rain", "a hot drink", "sunrise in the east"],
    ["stock markets fell", "a recipe for bread", "the train is late", "a cold winter", "quantum physics"],
]


@pytest.mark.parametrize(
    "cached_kwargs",
    [
        {"mini_batch_size": 1},
        {"mini_batch_size": 3},
        {"mini_batch_size": 50},
        {"mini_batch_size": 2, "mini_batch_num_tokens": 16},
    ],
    ids=["mbs1", "mbs3", "mbs50", "token-budget"],
)
def test_real_model_matches_stock_cached_and_non_cached_with_dropout(tiny_model, cached_kwargs):
    tiny_model.train()  # dropout on: the stock RandContext replay must reproduce it
    features = [tiny_model.preprocess(column) for column in TEXTS]
    stock = stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, **cached_kwargs)
    fast = fast_losses.CachedMultipleNegativesRankingLoss(tiny_model, backend="native", **cached_kwargs)
    ref_loss, ref_grads = train_step(tiny_model, stock, features, seed=7)
    loss, grads = train_step(tiny_model, fast, features, seed=7)
    assert relative_error(loss, ref_loss) < 1e-5
    assert relative_error(grads, ref_grads) < 1e-5
    tiny_model.eval()  # non-cached MNRL embeds columns differently (merged forward): compare without dropout
    mnrl_loss, mnrl_grads = train_step(
        tiny_model, stock_losses.MultipleNegativesRankingLoss(tiny_model), features, seed=7
    )
    loss, grads = train_step(tiny_model, fast, features, seed=7)
    assert relative_error(loss, mnrl_loss) < 1e-5
    assert relative_error(grads, mnrl_grads) < 1e-4  # merged vs per-column padding changes the float32 encoder sums


def test_gradient_scaling_and_two_forwards_then_one_backward(tiny_model):
    tiny_model.eval()
    features = [tiny_model.preprocess(column) for column in TEXTS[:2]]
    stock = stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2)
    fast = fast_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2, backend="native")
    _, ref_grads = train_step(tiny_model, stock, features, seed=1, grad_scale=0.25)
    _, grads = train_step(tiny_model, fast, features, seed=1, grad_scale=0.25)
    assert relative_error(grads, ref_grads) < 1e-5
    tiny_model.zero_grad()
    first, second = fast(features, None), fast(features[::-1], None)
    (first + second).backward()
    both = torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])
    tiny_model.zero_grad()
    (stock(features, None) + stock(features[::-1], None)).backward()
    ref_both = torch.cat([p.grad.flatten() for p in tiny_model.parameters() if p.grad is not None])
    assert relative_error(both, ref_both) < 1e-5


def test_matryoshka_wrapper_matches_stock(tiny_model):
    tiny_model.eval()
    features = [tiny_model.preprocess(column) for column in TEXTS[:2]]
    dims = [32, 16, 8]
    stock = stock_losses.MatryoshkaLoss(
        tiny_model, stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, 2), dims
    )
    fast = stock_losses.MatryoshkaLoss(
        tiny_model, fast_losses.CachedMultipleNegativesRankingLoss(tiny_model, 2, backend="native"), dims
    )
    ref_loss, ref_grads = train_step(tiny_model, stock, features, seed=3)
    loss, grads = train_step(tiny_model, fast, features, seed=3)
    assert relative_error(loss, ref_loss) < 1e-5
    assert relative_error(grads, ref_grads) < 1e-5


def test_bf16_cpu_autocast_gives_finite_gradients(tiny_model):
    features = [tiny_model.preprocess(column) for column in TEXTS[:2]]
    fast = fast_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2, backend="native")
    stock = stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        stock_value = stock(features, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = fast(features, None)
    value.backward()
    assert value.dtype == stock_value.dtype == torch.bfloat16  # stock's dtype (computed in float32, then rounded)
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_symmetric_alias_matches_stock(tiny_model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        stock = stock_losses.CachedMultipleNegativesSymmetricRankingLoss(tiny_model, mini_batch_size=3)
        fast = fast_losses.CachedMultipleNegativesSymmetricRankingLoss(tiny_model, mini_batch_size=3, backend="native")
    assert fast.get_config_dict() == stock.get_config_dict()
    reps = _cached_reps(10, 16, 2, 3)
    assert_parity(
        _stage(fast, reps), _stage(stock, _copies(reps, torch.float64)), _stage(stock, _copies(reps, torch.float32)),
        rtol=1e-5,
    )  # fmt: skip
