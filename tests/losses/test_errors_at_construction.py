"""Errors where the mistake is made: a fused loss asked for the Triton backend where triton is not importable fails
when it is built (constructor, ``fuse()``, or a later ``loss.backend = "triton"``), not at its first call."""

from __future__ import annotations

import pytest
from parity import EmbeddingsOnlyModel as _Model
from sentence_transformers.sentence_transformer import losses as stock_losses

from st_fast import losses as fast_losses
from st_fast.ops import triton_lse


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(triton_lse, "_TRITON_IMPORT_ERROR", "No module named 'triton'")


@pytest.mark.parametrize(
    "cls", [fast_losses.MultipleNegativesRankingLoss, fast_losses.CachedMultipleNegativesRankingLoss]
)
def test_triton_backend_without_triton_fails_at_construction(no_triton, cls):
    with pytest.raises(RuntimeError, match=r"needs triton.*not importable.*st-fast\[triton\]"):
        cls(_Model(), backend="triton")
    loss = cls(_Model())
    with pytest.raises(RuntimeError, match="needs triton"):
        loss.backend = "triton"
    assert loss.backend == "auto"


def test_fuse_with_triton_without_triton_fails_there(no_triton):
    with pytest.raises(RuntimeError, match="needs triton"):
        fast_losses.fuse(stock_losses.MultipleNegativesRankingLoss(_Model()), backend="triton")


def test_with_triton_importable_construction_succeeds():
    pytest.importorskip("triton")
    assert fast_losses.MultipleNegativesRankingLoss(_Model(), backend="triton").backend == "triton"
