"""The first-use self-check of the multi-vector (MaxSim) drop-ins (st_fast.losses.self_check): the first call of a
configuration compares the fused loss and token-embedding gradients with the installed stock method; where the
stock math changed (here: monkeypatched inside the test: stock's per-chunk MaxSim scores scaled, stock's loss stage
scaled) st_fast returns stock's changed numbers, with one warning; turned off, stock is never asked."""

from __future__ import annotations

import logging

import pytest
import torch

stock_losses = pytest.importorskip("sentence_transformers.multi_vector_encoder.losses")
scoring = pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring")

from sentence_transformers.util import similarity as stock_similarity  # noqa: E402

from st_fast.losses import self_check  # noqa: E402
from st_fast.losses.cached_multi_vector_multiple_negatives_ranking import (  # noqa: E402
    CachedMultiVectorMultipleNegativesRankingLoss,
)
from st_fast.losses.multi_vector_multiple_negatives_ranking import (  # noqa: E402
    MultiVectorMultipleNegativesRankingLoss,
)

MVMNRL = stock_losses.MultiVectorMultipleNegativesRankingLoss
CMVMNRL = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss


class TokenColumns(torch.nn.Module):
    """A multi-vector model that returns fixed token embeddings: ``model({"column": i}, task=...)`` gives column i's
    (B, T, D) ``token_embeddings`` (leaves, so their gradients can be compared) and its boolean mask."""

    def __init__(self, embeddings: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
        super().__init__()
        self.embeddings = [e.detach().clone().requires_grad_() for e in embeddings]
        self.masks = masks

    def forward(self, features, task=None):
        index = features["column"]
        return {"token_embeddings": self.embeddings[index], "attention_mask": self.masks[index]}

    def features(self):
        return [{"column": index} for index in range(len(self.embeddings))]


def token_batch(rows=7, widths=(6, 11, 9), dim=8, seed=0):
    """Random unit token vectors per column with masks that have holes (every row keeps its first token)."""
    generator = torch.Generator().manual_seed(seed)
    embeddings, masks = [], []
    for width in widths:
        x = torch.randn(rows, width, dim, generator=generator)
        embeddings.append(torch.nn.functional.normalize(x, dim=-1))
        mask = torch.rand(rows, width, generator=generator) > 0.3
        mask[:, 0] = True
        masks.append(mask)
    return embeddings, masks


def loss_and_token_grads(loss, model):
    for e in model.embeddings:
        e.grad = None
    value = loss(model.features(), None)
    value.backward()
    return float(value.detach()), [e.grad.clone() for e in model.embeddings]


def self_check_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]


def scaled_documents_scores(monkeypatch, factor=1.1):
    """Stock's per-chunk MaxSim (``_maxsim_score_documents``, behind colbert_scores) changed: scores x factor."""
    original = stock_similarity._maxsim_score_documents
    calls = []

    def changed(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs) * factor

    monkeypatch.setattr(stock_similarity, "_maxsim_score_documents", changed)
    return calls


def test_passes_on_the_installed_stock_and_computes_fused(caplog, monkeypatch):
    embeddings, masks = token_batch()
    model = TokenColumns(embeddings, masks)
    fused = MultiVectorMultipleNegativesRankingLoss(model, scale=3.0, similarity_fct=scoring.colbert_scores)
    stock = MVMNRL(model, scale=3.0, similarity_fct=scoring.colbert_scores)
    calls = scaled_documents_scores(monkeypatch, factor=1.0)  # unchanged: counts stock's calls
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        first = loss_and_token_grads(fused, model)
        checked = len(calls)
        second = loss_and_token_grads(fused, model)
    assert checked == 4 * 2  # stock in float64 and float32, on the call's rows and the random batch; 2 doc columns
    assert len(calls) == checked  # once per configuration: the second call computes fused only
    assert first[0] == second[0] and not self_check_warnings(caplog)
    assert self_check.last_result(fused).startswith("self-check passed")
    expected = loss_and_token_grads(stock, model)
    assert first[0] == pytest.approx(expected[0], rel=1e-5)
    for ours, theirs in zip(first[1], expected[1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("similarity_fct", [None, scoring.colbert_scores, scoring.mean_colbert_scores])
def test_follows_changed_stock_scores_and_warns_once(model_similarity, similarity_fct, caplog, monkeypatch):
    embeddings, masks = token_batch(seed=1)
    model = TokenColumns(embeddings, masks)
    model.similarity, model.similarity_fn_name, model._similarity = model_similarity
    scaled_documents_scores(monkeypatch)
    kwargs = dict(scale=2.0, similarity_fct=similarity_fct, score_mini_batch_size=4)
    expected = loss_and_token_grads(MVMNRL(model, **kwargs), model)
    fused = MultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        results = [loss_and_token_grads(fused, model) for _ in range(2)]
    for value, grads in results:
        assert value == pytest.approx(expected[0], rel=1e-5)
        for ours, theirs in zip(grads, expected[1], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    warnings = self_check_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "MultiVectorMultipleNegativesRankingLoss" in warnings[0] and "scale=2.0" in warnings[0]
    assert self_check.last_result(fused).startswith("self-check MISMATCH")


@pytest.fixture
def model_similarity():
    """(similarity, similarity_fn_name, _similarity) of a model scoring with MaxSim (the default): stock's
    ``similarity_fct=None`` calls ``model.similarity``, here maxsim itself (the model is no MultiVectorEncoder, so
    st_fast reads ``similarity``, as stock does)."""
    return stock_similarity.maxsim, "maxsim", stock_similarity.maxsim


def cached_reps(embeddings, masks, mini_batch=3):
    """GradCache's cached mini-batches of each column: leaves of ``mini_batch`` rows each."""
    reps = [[e[i : i + mini_batch].detach().clone().requires_grad_() for i in range(0, len(e), mini_batch)]
            for e in embeddings]  # fmt: skip
    chunks = [[m[i : i + mini_batch] for i in range(0, len(m), mini_batch)] for m in masks]
    return reps, chunks


def loss_stage(loss, embeddings, masks):
    reps, chunks = cached_reps(embeddings, masks)
    value = loss.calculate_loss(reps, chunks, with_backward=True)
    return float(value), [torch.cat([rep.grad for rep in column]) for column in reps]


def test_cached_loss_stage_follows_a_changed_stock_loss_stage(caplog, monkeypatch):
    embeddings, masks = token_batch(rows=8, seed=2)
    model = TokenColumns(embeddings, masks)
    scaled_documents_scores(monkeypatch, factor=0.9)
    kwargs = dict(scale=2.0, similarity_fct=scoring.colbert_scores, mini_batch_size=3, score_mini_batch_size=3)
    expected = loss_stage(CMVMNRL(model, **kwargs), embeddings, masks)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        results = [loss_stage(fused, embeddings, masks) for _ in range(2)]
    for value, grads in results:
        assert value == pytest.approx(expected[0], rel=1e-5)
        for ours, theirs in zip(grads, expected[1], strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    warnings = self_check_warnings(caplog)
    assert len(warnings) == 1 and "CachedMultiVectorMultipleNegativesRankingLoss" in warnings[0], warnings


def test_cached_loss_stage_passes_on_the_installed_stock(caplog, monkeypatch):
    embeddings, masks = token_batch(rows=8, seed=3)
    model = TokenColumns(embeddings, masks)
    calls = []
    original = CMVMNRL.calculate_loss
    monkeypatch.setattr(CMVMNRL, "calculate_loss", lambda *a, **k: calls.append(1) or original(*a, **k))
    kwargs = dict(scale=2.0, similarity_fct=scoring.mean_colbert_scores, mini_batch_size=3, score_mini_batch_size=3)
    fused = CachedMultiVectorMultipleNegativesRankingLoss(model, **kwargs)
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        first = loss_stage(fused, embeddings, masks)
        checked = len(calls)
        second = loss_stage(fused, embeddings, masks)
    assert checked == 4 and len(calls) == checked and first[0] == second[0]
    assert not self_check_warnings(caplog)
    assert self_check.last_result(fused).startswith("self-check passed")
    monkeypatch.setattr(CMVMNRL, "calculate_loss", original)
    expected = loss_stage(CMVMNRL(model, **kwargs), embeddings, masks)
    assert first[0] == pytest.approx(expected[0], rel=1e-5)
    for ours, theirs in zip(first[1], expected[1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cached", [False, True])
def test_off_computes_fused_without_asking_stock(cached, monkeypatch, caplog):
    embeddings, masks = token_batch(rows=6, seed=4)
    model = TokenColumns(embeddings, masks)
    calls = scaled_documents_scores(monkeypatch)
    kwargs = dict(scale=2.0, similarity_fct=scoring.colbert_scores)
    if cached:
        fused = CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3, **kwargs)
        fused.self_check = False
        value = loss_stage(fused, embeddings, masks)[0]
        monkeypatch.undo()
        unchanged = loss_stage(CMVMNRL(model, mini_batch_size=3, **kwargs), embeddings, masks)[0]
    else:
        fused = MultiVectorMultipleNegativesRankingLoss(model, **kwargs)
        fused.self_check = False
        value = loss_and_token_grads(fused, model)[0]
        monkeypatch.undo()
        unchanged = loss_and_token_grads(MVMNRL(model, **kwargs), model)[0]
    assert not calls and not self_check_warnings(caplog)
    assert self_check.last_result(fused) == "self-check off"
    assert value == pytest.approx(unchanged, rel=1e-5)  # the fused loss, not the changed stock's
