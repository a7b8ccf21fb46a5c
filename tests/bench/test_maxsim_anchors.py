"""The public MaxSim kernels of the ``maxsim`` benchmark part (:mod:`benchmarks.maxsim_anchors`) on CPU: each one that
runs here (fast-maxsim; the Triton ones under ``TRITON_INTERPRET=1``) gives stock ``colbert_scores``' scores on
masks with trailing padding, holes, an empty document and an empty query, within its products' rounding; one that
cannot run gives its reason. Passes with and without the anchors' packages installed (CI has none of them)."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import maxsim_anchors as public
from benchmarks.common import rss_peak_mb

pytest.importorskip("sentence_transformers.multi_vector_encoder.scoring")

CPU = torch.device("cpu")


def make_inputs(batch: int = 5, per_group: int = 2, query_tokens: int = 6, document_tokens: int = 20, dim: int = 16):
    """Unit vectors; masks with trailing padding and holes, query holes and padding, one query with no token and one
    document with no token (stock's -1e9 sentinel)."""
    g = torch.Generator().manual_seed(3)
    queries = torch.nn.functional.normalize(torch.randn(batch, query_tokens, dim, generator=g), dim=-1)
    documents = torch.nn.functional.normalize(torch.randn(batch, per_group, document_tokens, dim, generator=g), dim=-1)
    document_mask = torch.rand(batch, per_group, document_tokens, generator=g) > 0.2
    document_mask[..., document_tokens - 5 :] = False
    document_mask[1, 1] = False
    query_mask = torch.ones(batch, query_tokens, dtype=torch.bool)
    query_mask[1, 4:] = False
    query_mask[2, 1] = False
    query_mask[3] = False
    return queries, documents, query_mask, document_mask


def stock_scores(queries, documents, query_mask, document_mask) -> torch.Tensor:
    from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

    return colbert_scores(queries, documents, query_mask, document_mask)


@pytest.mark.parametrize("anchor", public.ANCHORS, ids=public.ANCHOR_NAMES)
def test_anchor_scores_equal_stock_or_say_why(anchor, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = anchor.unavailable(CPU, torch.float32)
    if reason is not None:
        assert "not installed" in reason or "CUDA" in reason or "rayon" in reason, reason
        return
    queries, documents, query_mask, document_mask = make_inputs()
    expected = stock_scores(queries, documents, query_mask, document_mask)
    scores = anchor.scores(queries, query_mask, documents.flatten(0, 1), document_mask.flatten(0, 1))
    assert scores.shape == expected.shape and scores.dtype == torch.float32
    assert (scores[:, 3] == public.EMPTY_DOCUMENT_SCORE).all() and (scores[3, expected[3] > -1] == 0).all()
    torch.testing.assert_close(scores, expected, rtol=0, atol=anchor.tolerance(6, torch.float32))
    assert anchor.version() is not None


def test_reasons_need_no_gpu():
    """Dtypes and devices no anchor takes; no backward for the scores-only kernel; a Triton backward needs CUDA."""
    cuda = torch.device("cuda")  # type only: nothing below touches the device
    for anchor in public.ANCHORS:
        assert anchor.unavailable(CPU, torch.float64) is not None
        assert anchor.gradients_unavailable(CPU, torch.float32) is not None
    fast = public.select(["fast_maxsim"])[0]
    assert fast.unavailable(cuda, torch.float32) is not None
    assert fast.gradients_unavailable(CPU, torch.float32) == "scores only: no backward"
    assert [a.name for a in public.select(None)] == list(public.ANCHOR_NAMES)


def test_part_times_triton_anchors_on_cpu_only_in_smoke(monkeypatch):
    from benchmarks.maxsim import anchor_reason

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for anchor in public.ANCHORS:
        if not anchor.triton or anchor.unavailable(CPU, torch.float32) is not None:
            continue
        assert anchor_reason(argparse.Namespace(smoke=True), anchor, CPU, torch.float32, "scores") is None
        reason = anchor_reason(argparse.Namespace(smoke=False), anchor, CPU, torch.float32, "scores")
        assert "interpreter" in reason


def test_packing_keeps_the_order_and_routes_gradients():
    """The unmasked tokens first, in order, their counts; the gradient of the packed tensor lands on the original
    positions (zero on the masked tokens the kernels ignore)."""
    x = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1).requires_grad_()
    mask = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    out, counts = public.packed(x, mask)
    assert counts.tolist() == [3, 1] and counts.dtype == torch.int32
    assert out[0, :3, 0].tolist() == [1.0, 3.0, 4.0] and out[1, 0, 0].item() == 5.0
    weights = (torch.arange(5) < counts[:, None]).float().unsqueeze(-1)
    (out * weights).sum().backward()
    assert torch.equal(x.grad[..., 0], mask.float())


def test_rss_peak_sees_memory_outside_torch():
    import numpy as np

    peak, how = rss_peak_mb(lambda: np.ones(8 * 2**20).sum())  # 64 MiB
    assert how == "rss (VmHWM growth)" and 48 < peak < 200, peak


def test_default_stages():
    """The scores stage is on by default with --smoke and --gpu; on CPU it is asked for (it adds about 45%)."""
    from benchmarks.maxsim import STAGES, stages_of

    def args(**options):
        return argparse.Namespace(**{"maxsim_stages": None, "smoke": False, "gpu": False, **options})

    assert stages_of(args()) == ["loss", "cached"]
    assert stages_of(args(smoke=True)) == stages_of(args(gpu=True)) == list(STAGES) == ["scores", "loss", "cached"]
    assert stages_of(args(maxsim_stages=["scores"])) == ["scores"]
