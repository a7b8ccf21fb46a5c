"""The chunked drivers' CPU scratch memory (st_fast/ops/workspace.py): reused between calls, never shared by two
calls at once, never behind a result."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch
from parity import random_columns

from st_fast.ops import workspace
from st_fast.ops.mnrl.spec import ContrastiveProblem, ContrastiveSpec
from st_fast.ops.row_kernel_torch import TORCH_ROW_KERNEL

mnrl_chunked = importlib.import_module("st_fast.ops.mnrl.chunked")


@pytest.fixture(autouse=True)
def _fresh_workspace():
    workspace.release()
    yield
    workspace.release()


def test_a_call_reuses_the_buffer_the_previous_one_kept():
    with workspace.scratch(torch.device("cpu")) as arena:
        arena.take((3, 5), torch.float32)
        arena.take((7,), torch.float16)
        assert arena.buffer is None  # nothing kept yet: plain allocations
    assert workspace.kept_bytes() == 128  # two 64-byte aligned pieces
    with workspace.scratch(torch.device("cpu")) as arena:
        a = arena.take((3, 5), torch.float32)
        b = arena.take((7,), torch.float16)
        assert a.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()
        assert b.data_ptr() % 64 == 0 and a.data_ptr() % 64 == 0
        assert b.data_ptr() == a.data_ptr() + 64  # consecutive, not overlapping
        assert a.dtype == torch.float32 and a.shape == (3, 5) and b.dtype == torch.float16 and b.shape == (7,)
        c = arena.take((1,), torch.float32)  # beyond what was kept: a plain allocation
        assert not (arena.buffer.data_ptr() <= c.data_ptr() < arena.buffer.data_ptr() + arena.buffer.numel())
    assert workspace.kept_bytes() == 192  # the next call keeps enough for all three
    workspace.release()
    assert workspace.kept_bytes() == 0


def test_a_call_that_finds_the_arena_in_use_allocates_its_own():
    with workspace.scratch(torch.device("cpu")) as outer:
        outer.take((4, 4), torch.float32)
    with workspace.scratch(torch.device("cpu")) as outer:
        held = outer.take((4, 4), torch.float32)
        with workspace.scratch(torch.device("cpu")) as inner:  # nested (or another thread): no shared memory
            assert inner.buffer is None
            other = inner.take((4, 4), torch.float32)
        assert other.data_ptr() != held.data_ptr()


def test_the_arena_is_released_after_an_exception_and_on_other_devices_is_plain():
    with pytest.raises(RuntimeError), workspace.scratch(torch.device("cpu")):
        raise RuntimeError("boom")
    assert workspace._lock.acquire(blocking=False)  # released
    workspace._lock.release()
    with workspace.scratch(torch.device("meta")) as arena:
        assert arena.buffer is None and arena.take((2, 3), torch.float32).device.type == "meta"


def test_more_than_the_cap_is_not_kept(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_KEPT_BYTES", 1024)
    with workspace.scratch(torch.device("cpu")) as arena:
        arena.take((1024,), torch.float32)
    assert workspace.kept_bytes() == 0


@pytest.mark.parametrize("directions", [("query_to_doc",), ("query_to_doc", "doc_to_query")])
def test_driver_results_do_not_alias_the_kept_buffer(directions):
    """A second call (other inputs, same shapes: the same scratch memory) leaves the first call's results as they
    were, and calls from two threads at once give each its own results."""
    spec = ContrastiveSpec.from_loss_config(scale=20.0, directions=directions)
    problem = ContrastiveProblem(spec, 0, 9)
    inputs = [
        [torch.nn.functional.normalize(x.detach(), dim=1) for x in random_columns(9, 16, 2, seed=seed)]
        for seed in (1, 2)
    ]

    def call(columns):
        return mnrl_chunked.loss_and_grad(columns[0], torch.cat(columns[1:]), problem, TORCH_ROW_KERNEL, need_grad=True)

    call(inputs[1])  # keeps the scratch buffer: the next two calls use it
    first = call(inputs[0])
    snapshot = [first.loss.clone(), first.grad_anchors.clone(), first.grad_candidates.clone()]
    assert workspace.kept_bytes() > 0
    call(inputs[1])
    for got, want in zip((first.loss, first.grad_anchors, first.grad_candidates), snapshot, strict=True):
        assert torch.equal(got, want)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, call(inputs[i]))) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        expected = call(inputs[i])
        assert torch.equal(results[i].loss, expected.loss)
        assert torch.equal(results[i].grad_anchors, expected.grad_anchors)


def _gist_call(seed: int):
    """The GIST driver on normalized columns of gist_cases (all three blocks)."""
    from gist_cases import gist_columns

    from st_fast.ops.gist import chunked as gist_chunked
    from st_fast.ops.gist.spec import GuidedProblem, GuidedSpec

    model, guide = gist_columns(9, 16, 12, 3, seed=seed)
    unit, guide_unit = ([torch.nn.functional.normalize(x.detach(), dim=1) for x in xs] for xs in (model, guide))
    spec = GuidedSpec(0.05, "absolute", 0.0, contrast_anchors=True, contrast_positives=True)
    problem = GuidedProblem(spec, 0, 9, guide_unit[0], torch.cat(guide_unit[1:]), guide[0].detach(),
                            tuple(g.detach() for g in guide[1:]))  # fmt: skip
    return gist_chunked.loss_and_grad(unit[0], torch.cat(unit[1:]), problem, TORCH_ROW_KERNEL, need_grad=True)


def test_the_gist_driver_takes_the_arena_and_its_results_do_not_alias_it():
    first = _gist_call(1)
    assert workspace.kept_bytes() > 0
    snapshot = [first.loss.clone(), first.grad_anchors.clone(), first.grad_candidates.clone()]
    _gist_call(2)  # the same scratch memory, other inputs
    for got, want in zip((first.loss, first.grad_anchors, first.grad_candidates), snapshot, strict=True):
        assert torch.equal(got, want)
