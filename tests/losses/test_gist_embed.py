"""st_fast.losses.GISTEmbedLoss against the stock class (sentence-transformers' gist_embed.py).

Embedding-level parity: model and guide are fakes returning precomputed embeddings (as upstream's tests); stock on
float64 copies is the reference, stock on the same float32 inputs the baseline (``parity.assert_parity``). The
embeddings are crafted so that the guide masks some entries and keeps others and some thresholds are negative, with
no guide similarity within 1e-5 of a threshold (so float32 and float64 take the same masking decisions).
Then a real tiny model: guide = model, and a guide with a different tokenizer (the re-tokenization path).
"""

from __future__ import annotations

import copy

import pytest
import torch
from gist_cases import (
    CONTRASTS,
    MARGINS,
    FakeGather,
    PrecomputedEncoder,
    column_features,
    gist_columns,
    guide_statistics,
    permuted_vocab_model,
    simulate_rank1,
)
from parity import assert_parity, float64_copies, loss_and_grads, relative_error, train_step
from sentence_transformers.sentence_transformer import losses as stock_losses

from st_fast import losses as fast_losses
from st_fast.ops import fused_gist_loss
from st_fast.ops.backends import native_available

FP32_RTOL = 1e-5
BACKENDS = ["torch"] + (["native"] if native_available(torch.device("cpu")) else [])
BATCH, DIM, GUIDE_DIM = 7, 16, 12


def _losses(tokenizer, backend, **config):
    model, guide = PrecomputedEncoder(tokenizer), PrecomputedEncoder(tokenizer)
    stock = stock_losses.GISTEmbedLoss(model, guide, temperature=0.05, **config)
    fast = fast_losses.GISTEmbedLoss(model, guide, temperature=0.05, backend=backend, **config)
    assert not stock.must_retokenize and not fast.must_retokenize
    return stock, fast


def _run(loss, columns, guide_columns):
    loss.model.columns, loss.guide.columns = columns, guide_columns
    features = column_features(len(columns))
    return loss_and_grads(lambda _: loss(features, None), columns)


def _check(stock, fast, columns, guide_columns):
    guide64 = [x.double() for x in guide_columns]
    expected = _run(stock, float64_copies(columns), guide64)
    baseline = _run(stock, columns, guide_columns)
    actual = _run(fast, columns, guide_columns)
    assert_parity(actual, expected, baseline, rtol=FP32_RTOL)
    return actual, expected


@pytest.mark.parametrize("contrast", CONTRASTS)
@pytest.mark.parametrize("margin_strategy, margin", MARGINS)
@pytest.mark.parametrize("num_columns", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_stock(tokenizer, backend, num_columns, margin_strategy, margin, contrast):
    config = dict(margin_strategy=margin_strategy, margin=margin, contrast_anchors=contrast[0],
                  contrast_positives=contrast[1])  # fmt: skip
    stock, fast = _losses(tokenizer, backend, **config)
    columns, guide_columns = gist_columns(BATCH, DIM, GUIDE_DIM, num_columns, seed=num_columns)
    gap, _, _ = guide_statistics(guide_columns, 0, margin_strategy, margin, contrast)
    assert gap > 1e-5
    _check(stock, fast, columns, guide_columns)


@pytest.mark.parametrize("margin_strategy, margin", MARGINS)
def test_crafted_embeddings_exercise_the_guide(margin_strategy, margin):
    """Not vacuous: some entries masked, some kept, some thresholds negative (where the guide decides)."""
    for num_columns in (2, 3, 5):
        _, columns = gist_columns(BATCH, DIM, GUIDE_DIM, num_columns, seed=num_columns)
        _, masked, lowest = guide_statistics(columns, 0, margin_strategy, margin)
        assert 0.1 < masked < 0.9 and lowest < 0


@pytest.mark.parametrize("contrast", [(True, True), (False, False)])
@pytest.mark.parametrize("margin_strategy, margin", [("absolute", 0.1), ("relative", 0.1)])
@pytest.mark.parametrize("num_columns", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_simulated_rank1_matches_stock(monkeypatch, tokenizer, backend, num_columns, margin_strategy, margin, contrast):
    """Rank 1 of 2: candidates gathered as [rank 0's fixed block, local]; row i's target at column B + i is
    protected from the guide mask (the rank > 0 positive protection of stock #3817)."""
    config = dict(margin_strategy=margin_strategy, margin=margin, contrast_anchors=contrast[0],
                  contrast_positives=contrast[1], gather_across_devices=True)  # fmt: skip
    stock, fast = _losses(tokenizer, backend, **config)
    columns, guide_columns = gist_columns(BATCH, DIM, GUIDE_DIM, num_columns, seed=10 + num_columns)
    others, guide_others = gist_columns(BATCH, DIM, GUIDE_DIM, num_columns, seed=20 + num_columns)
    pairs = list(zip(columns[1:] + guide_columns[1:], others[1:] + guide_others[1:], strict=True))
    gather = FakeGather(pairs)
    simulate_rank1(monkeypatch, gather)
    gathered_guide = [guide_columns[0]] + [
        torch.cat([o, x]) for o, x in zip(guide_others[1:], guide_columns[1:], strict=True)
    ]
    gap, masked, _ = guide_statistics(gathered_guide, BATCH, margin_strategy, margin, contrast)
    assert gap > 1e-5 and 0.05 < masked < 0.95
    (loss, _), _ = _check(stock, fast, columns, guide_columns)
    assert gather.calls == 3 * 2 * (num_columns - 1)  # model + guide candidates, in 3 runs
    # not vacuous: rank 0's block changes the loss
    monkeypatch.undo()
    local_stock, _ = _losses(tokenizer, backend, **{**config, "gather_across_devices": False})
    assert relative_error(loss, _run(local_stock, columns, guide_columns)[0]) > 1e-3


@pytest.mark.parametrize("num_columns, gather", [(3, False), (3, True)])
def test_triton_backend_matches_stock(monkeypatch, tokenizer, num_columns, gather):
    """The guided Triton kernels (in the interpreter on CPU), plain and as rank 1 of 2."""
    config = dict(margin_strategy="relative", margin=0.1, gather_across_devices=gather)
    stock, fast = _losses(tokenizer, "triton", **config)
    columns, guide_columns = gist_columns(BATCH, DIM, GUIDE_DIM, num_columns, seed=10 + num_columns)
    if gather:
        others, guide_others = gist_columns(BATCH, DIM, GUIDE_DIM, num_columns, seed=20 + num_columns)
        pairs = list(zip(columns[1:] + guide_columns[1:], others[1:] + guide_others[1:], strict=True))
        simulate_rank1(monkeypatch, FakeGather(pairs))
    _check(stock, fast, columns, guide_columns)


def test_float64_embeddings_match_stock_to_float64_precision(tokenizer):
    stock, fast = _losses(tokenizer, "auto", margin=0.1)
    columns, guide_columns = gist_columns(BATCH, DIM, GUIDE_DIM, 3, seed=3)
    columns, guide64 = float64_copies(columns), [x.double() for x in guide_columns]
    loss, grads = _run(fast, columns, guide64)
    ref_loss, ref_grads = _run(stock, columns, guide64)
    assert loss.dtype == torch.float64 and relative_error(loss, ref_loss) < 1e-12
    assert max(relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True)) < 1e-12


def test_config_dict_citation_and_errors(tokenizer):
    stock, fast = _losses(tokenizer, "torch", margin=0.1)
    assert isinstance(fast, stock_losses.GISTEmbedLoss)
    assert fast.get_config_dict() == stock.get_config_dict() and fast.citation == stock.citation
    with pytest.raises(ValueError, match="backend must be one of"):
        fast_losses.GISTEmbedLoss(fast.model, fast.guide, backend="cuda")
    with pytest.raises(ValueError, match="margin_strategy"):
        fast_losses.GISTEmbedLoss(fast.model, fast.guide, margin_strategy="nope")
    columns, guide_columns = gist_columns(BATCH, DIM, GUIDE_DIM, 5, seed=1)
    with pytest.raises(ValueError, match="Expected 2 or 3 embeddings"):
        _run(fast, columns, guide_columns)


def test_no_batch_by_candidates_by_dim_tensor(tokenizer, monkeypatch):
    """The fused path never builds the stock (B, N, D) broadcast: nn.CosineSimilarity's function is called only on
    lists of (row, column) pairs (the thresholds' B diagonal pairs and the entries near a threshold), far fewer than
    the B x N entries of one block, and on single vectors (the stock dtype probe)."""
    stock, fast = _losses(tokenizer, "auto")
    fast.self_check = False  # the first-use self-check runs stock's broadcast on a few rows, by design
    fast.stock_masks_self_negatives()  # and so does the once-per-process probe of stock's rule (3 rows)
    columns, guide_columns = gist_columns(BATCH, DIM, GUIDE_DIM, 3, seed=3)
    cosine_similarity, pairs = torch.nn.functional.cosine_similarity, []

    def pairwise_only(x1, x2, *args, **kwargs):
        single = x1.numel() == x1.shape[-1] and x2.numel() == x2.shape[-1]
        assert single or (x1.dim() == 2 and x1.shape == x2.shape), (x1.shape, x2.shape)
        pairs.append(0 if single else x1.shape[0])
        return cosine_similarity(x1, x2, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cosine_similarity", pairwise_only)
    loss, _ = _run(fast, columns, guide_columns)
    assert torch.isfinite(loss)
    assert pairs and sum(pairs) < BATCH * BATCH * 3, pairs


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_chunks_with_an_offset_equal_one_chunk(backend):
    """The op's row chunks (tiny memory budget: 2 rows per chunk, the threshold and target of chunk row r at column
    offset + begin + r) give the one-chunk result, on a rank-1-like layout with 3 candidate columns."""
    columns, guide_columns = gist_columns(2 * BATCH, DIM, GUIDE_DIM, 4, seed=5)
    anchors, candidates = columns[0][BATCH:], columns[1:]
    config = dict(row_offset=BATCH, temperature=0.02, margin_strategy="relative", margin=0.1, backend=backend)
    results = []
    for chunk_bytes in (None, 2 * 4 * 2 * (3 * 2 * BATCH + 2 * 2 * BATCH)):
        loss = fused_gist_loss(anchors, candidates, guide_columns[0][BATCH:], guide_columns[1:],
                               chunk_bytes=chunk_bytes, **config)  # fmt: skip
        results.append((loss.detach(), torch.autograd.grad(loss, columns)))
    (loss, grads), (chunked_loss, chunked_grads) = results
    assert relative_error(chunked_loss, loss) < 1e-5  # float32 rounding: other summation orders
    for grad, chunked in zip(grads, chunked_grads, strict=True):
        assert relative_error(chunked, grad) < 1e-5


def test_bf16_autocast_and_evaluation(tokenizer):
    stock, fast = _losses(tokenizer, "auto", margin=0.1)
    columns, guide_columns = gist_columns(BATCH, DIM, GUIDE_DIM, 3, seed=3)
    bf16 = [x.detach().bfloat16().requires_grad_() for x in columns]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _run(fast, bf16, [x.bfloat16() for x in guide_columns])
    assert loss.dtype == torch.float32 and all(torch.isfinite(g).all() and g.dtype == torch.bfloat16 for g in grads)
    fast.model.columns, fast.guide.columns = columns, guide_columns
    with torch.no_grad():
        value = fast(column_features(3), None)
    assert relative_error(value, _run(stock, columns, guide_columns)[0]) < FP32_RTOL


TEXTS = [
    ["a cat sat on the mat", "dogs bark at night", "rain is expected today", "tea is hot", "the sun rises"],
    ["a kitten sits", "a dog is barking", "it will rain", "a hot drink", "sunrise in the east"],
    ["stock markets fell", "a recipe for bread", "the train is late", "a cold winter", "quantum physics"],
]


@pytest.fixture(scope="module")
def small_model(minilm_path):
    """A tiny random model shared by this module's real-model tests (each sets eval mode and zeroes gradients)."""
    from conftest import make_tiny_model

    return make_tiny_model(minilm_path)


@pytest.fixture(scope="module")
def other_tokenizer_guide(minilm_path, tmp_path_factory):
    return permuted_vocab_model(minilm_path, tmp_path_factory.mktemp("permuted_vocab"))


@pytest.mark.parametrize("guide_kind, num_columns", [("model-as-guide", 2), ("other-tokenizer", 3)])
def test_real_model_parameter_gradients_match_stock(small_model, other_tokenizer_guide, guide_kind, num_columns):
    """Loss and parameter gradients of a small real model: stock on a float64 copy of model and guide is the
    reference, stock in float32 the baseline (at temperature 0.01 the float32 cosines' rounding is amplified 100x,
    and a random tiny model's embeddings are all close)."""
    tiny_model = small_model
    tiny_model.eval()  # no dropout: every forward sees identical embeddings
    guide = tiny_model if guide_kind == "model-as-guide" else other_tokenizer_guide
    guide.eval()
    model64 = copy.deepcopy(tiny_model).double()
    guide64 = model64 if guide is tiny_model else copy.deepcopy(guide).double()
    config = dict(margin_strategy="relative", margin=0.05)
    fast = fast_losses.GISTEmbedLoss(tiny_model, guide, backend="auto", **config)
    assert fast.must_retokenize == (guide_kind == "other-tokenizer")
    features = [tiny_model.preprocess(column) for column in TEXTS[:num_columns]]
    expected = train_step(model64, stock_losses.GISTEmbedLoss(model64, guide64, **config), features, seed=3)
    baseline = train_step(tiny_model, stock_losses.GISTEmbedLoss(tiny_model, guide, **config), features, seed=3)
    actual = train_step(tiny_model, fast, features, seed=3)
    assert expected[1].numel() > 0
    assert_parity((actual[0], [actual[1]]), (expected[0], [expected[1]]), (baseline[0], [baseline[1]]), rtol=FP32_RTOL)
