"""GIST / CachedGIST on batches where stock versions differ: rows whose anchor equals its positive, repeated
positives, hard negatives (sentence-transformers 6.3 always masks each row's own anchor-anchor and positive-positive
entry; 6.0-6.2 only through the guide's threshold). Compared with the installed stock class, whichever version that
is, for every margin strategy and contrast switch, loss and gradients against stock's float64 result."""

from __future__ import annotations

import pytest
import torch
from gist_cases import CONTRASTS, MARGINS, PrecomputedEncoder, column_features
from parity import assert_parity, float64_copies, loss_and_grads
from sentence_transformers.sentence_transformer import losses as stock_losses

from st_fast import losses as fast_losses
from st_fast.ops import fused_gist_loss
from st_fast.ops.backends import native_available

FP32_RTOL = 1e-5
BACKENDS = ["torch"] + (["native"] if native_available(torch.device("cpu")) else [])
BATCH, DIM, GUIDE_DIM = 7, 16, 12


def duplicate_columns(num_columns: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(model columns, guide columns), float32: rows 0 and 4 have anchor == positive, rows 2 and 5 share a
    positive, row 6's negative repeats row 1's positive; the guide is a fixed linear map of the model's embeddings,
    so equal texts have equal guide embeddings too."""
    generator = torch.Generator().manual_seed(seed)
    anchor = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    positive = 0.6 * anchor + torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    positive[0], positive[4], positive[5] = anchor[0], anchor[4], positive[2]
    columns = [anchor, positive]
    for _ in range(num_columns - 2):
        negative = 0.3 * anchor + torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
        negative[6] = positive[1]
        columns.append(negative)
    projection = torch.randn(DIM, GUIDE_DIM, generator=generator, dtype=torch.float64)
    guides = [(x @ projection).float() for x in columns]
    return [x.float().requires_grad_() for x in columns], guides


def _config(margin_strategy, margin, contrast):
    """The loss configuration, at temperature 0.3: an unsaturated softmax, so that relative errors mean something."""
    return dict(margin_strategy=margin_strategy, margin=margin, contrast_anchors=contrast[0],
                contrast_positives=contrast[1], temperature=0.3)  # fmt: skip


def _forward(loss, columns, guides):
    loss.model.columns, loss.guide.columns = columns, guides
    features = column_features(len(columns))
    return loss_and_grads(lambda _: loss(features, None), columns)


@pytest.mark.parametrize("contrast", CONTRASTS)
@pytest.mark.parametrize("margin_strategy, margin", MARGINS)
@pytest.mark.parametrize("num_columns", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("built", ["constructor", "fuse"])
def test_gist_matches_installed_stock_on_duplicate_rows(
    tokenizer, built, backend, num_columns, margin_strategy, margin, contrast
):
    config = _config(margin_strategy, margin, contrast)
    model, guide = PrecomputedEncoder(tokenizer), PrecomputedEncoder(tokenizer)
    stock = stock_losses.GISTEmbedLoss(model, guide, **config)
    if built == "constructor":
        fast = fast_losses.GISTEmbedLoss(model, guide, backend=backend, **config)
    else:
        fast = fast_losses.fuse(stock_losses.GISTEmbedLoss(model, guide, **config), backend=backend)
    columns, guides = duplicate_columns(num_columns, seed=num_columns)
    expected = _forward(stock, float64_copies(columns), [g.double() for g in guides])
    baseline = _forward(stock, columns, guides)
    actual = _forward(fast, columns, guides)
    assert_parity(actual, expected, baseline, rtol=FP32_RTOL)


def _cached_stage(loss, columns, guides):
    """The loss stage of a cached loss on mini-batches of 3 rows: (loss, embedding gradients)."""

    def stage(xs):
        reps = [[x[:3], x[3:]] for x in xs]
        reps_guided = [[g[:3], g[3:]] for g in guides]
        return loss.calculate_loss(reps, reps_guided)

    return loss_and_grads(stage, columns)


@pytest.mark.parametrize("contrast", CONTRASTS)
@pytest.mark.parametrize("margin_strategy, margin", MARGINS)
@pytest.mark.parametrize("num_columns", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_gist_matches_installed_stock_on_duplicate_rows(
    tokenizer, backend, num_columns, margin_strategy, margin, contrast
):
    config = _config(margin_strategy, margin, contrast)
    model, guide = PrecomputedEncoder(tokenizer), PrecomputedEncoder(tokenizer)
    stock = stock_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=3, **config)
    fast = fast_losses.fuse(stock, backend=backend)
    columns, guides = duplicate_columns(num_columns, seed=10 + num_columns)
    expected = _cached_stage(stock, float64_copies(columns), [g.double() for g in guides])
    baseline = _cached_stage(stock, columns, guides)
    actual = _cached_stage(fast, columns, guides)
    assert_parity(actual, expected, baseline, rtol=FP32_RTOL)


def test_duplicate_rows_are_where_versions_differ(tokenizer):
    """Not vacuous: on these batches the self-negative entries change the loss (6.3 vs 6.2 rule), so a fused loss
    that took the other version's rule would fail the tests above."""
    columns, guides = duplicate_columns(3, seed=3)
    columns = [c.detach() for c in columns]
    values = [
        float(fused_gist_loss(columns[0], columns[1:], guides[0], guides[1:], temperature=0.05,
                              mask_self_negatives=masked, backend="torch"))
        for masked in (True, False)
    ]  # fmt: skip
    assert abs(values[0] - values[1]) > 1e-2 * abs(values[0]), values


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("offset", [0, 4])
def test_triton_backend_masks_self_negatives_like_torch(masked, offset):
    """The Triton kernels (interpreter) take the same rule: Q2Q self blocks, the PP diagonal at the row offset."""
    pytest.importorskip("triton")
    columns, guides = duplicate_columns(3, seed=5)
    width = BATCH
    anchors = columns[0][:3].detach() if offset == 0 else columns[0][offset : offset + 3].detach()
    kwargs = dict(row_offset=offset, temperature=0.05, mask_self_negatives=masked)
    results = []
    for backend in ("torch", "triton"):
        a = anchors.clone().requires_grad_()
        cands = [c.detach().clone().requires_grad_() for c in columns[1:]]
        guide_anchors = guides[0][offset : offset + 3]
        loss = fused_gist_loss(a, cands, guide_anchors, guides[1:], backend=backend, **kwargs)
        loss.backward()
        results.append((loss.detach(), a.grad, [c.grad for c in cands]))
    (loss_t, ga_t, gc_t), (loss_x, ga_x, gc_x) = results
    assert anchors.shape[0] + offset <= width
    torch.testing.assert_close(loss_x, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga_x, ga_t, rtol=1e-4, atol=1e-5)
    for x, t in zip(gc_x, gc_t, strict=True):
        torch.testing.assert_close(x, t, rtol=1e-4, atol=1e-5)
