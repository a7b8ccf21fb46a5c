"""st_fast.losses.plan: each fused loss answers "what will you run on this device and dtype, and why" once (its plan),
the loss computes with the backend of that plan, the trainer's report says it, and a new op family registers itself
by data (its ``family`` and :func:`replaces`)."""

from __future__ import annotations

import types

import pytest
import torch
from sentence_transformers.sentence_transformer import losses as stock_losses
from torch import nn

from st_fast import losses as fast_losses
from st_fast import report
from st_fast.losses import plan as plan_module
from st_fast.losses.plan import FUSED_CLASSES, LossFamily, StFastLoss, fused_modules, replaces, wraps_a_loss
from st_fast.ops.backends import MNRL, OpCapabilities, native_available

CPU = torch.device("cpu")
NATIVE_OR_TORCH = "native" if native_available(CPU) else "torch"


def _embeddings(rows: int = 4, dim: int = 8, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(rows, dim, generator=generator, dtype=dtype, requires_grad=True) for _ in range(2)]


def test_every_drop_in_class_is_registered_with_its_family():
    assert FUSED_CLASSES[stock_losses.MultipleNegativesRankingLoss] is fast_losses.MultipleNegativesRankingLoss
    assert FUSED_CLASSES[stock_losses.CachedGISTEmbedLoss] is fast_losses.CachedGISTEmbedLoss
    exported = [getattr(fast_losses, name) for name in fast_losses.__all__]
    assert set(FUSED_CLASSES.values()) == {
        obj for obj in exported if isinstance(obj, type) and issubclass(obj, nn.Module)
    }
    labels = {fast.__name__: fast.family.label for fast in FUSED_CLASSES.values()}
    assert labels["GISTEmbedLoss"] == labels["CachedGISTEmbedLoss"] == "GIST"
    assert labels["SparseMultipleNegativesRankingLoss"] == labels["CachedMultipleNegativesRankingLoss"] == "MNRL"


@pytest.mark.parametrize(
    ("asked", "dtype", "backend", "error"),
    [
        ("auto", torch.float32, NATIVE_OR_TORCH, None),
        ("auto", torch.float64, "torch", None),
        ("torch", torch.float32, "torch", None),
        ("native", torch.float64, None, TypeError),
    ],
)
def test_a_plan_says_what_runs_or_why_it_cannot(tiny_model, asked, dtype, backend, error):
    loss = fast_losses.MultipleNegativesRankingLoss(tiny_model, backend=asked)
    plan = loss.plan(CPU, dtype)
    assert (plan.family.label, plan.family.op, plan.asked, plan.backend) == ("MNRL", MNRL, asked, backend)
    assert (plan.device, plan.dtype, plan.reason, plan.fused) == (CPU, dtype, None, True)
    if error is None:
        assert plan.error is None and plan.runs() == backend
    else:
        assert isinstance(plan.error, error)
        with pytest.raises(error, match="float64"):
            plan.runs()


def test_a_plan_says_when_stock_computes(tiny_model):
    loss = fast_losses.MultipleNegativesRankingLoss(tiny_model, similarity_fct=lambda a, b: a @ b.T)
    plan = loss.plan(CPU, torch.float32)
    assert not plan.fused and "has no fused kernel" in plan.stock_reason


@pytest.mark.parametrize("asked", ["auto", "torch", "triton"])
def test_the_loss_computes_with_the_backend_of_its_plan(tiny_model, minilm_path, monkeypatch, asked):
    """Every call asks the plan (the one function the report asks too) and hands the op the backend it names."""
    from conftest import make_tiny_model

    guide = make_tiny_model(minilm_path, seed=1)
    cases = [
        (fast_losses.MultipleNegativesRankingLoss(tiny_model, backend=asked), "fused_mnrl_loss"),
        (fast_losses.GISTEmbedLoss(tiny_model, guide, backend=asked), "fused_gist_loss"),
    ]
    plans, seen = [], []
    original = StFastLoss.plan

    def spy(self, *args, **kwargs):
        plans.append(original(self, *args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(StFastLoss, "plan", spy)
    for loss, op_name in cases:
        module = __import__(type(loss).__module__, fromlist=[op_name])
        op = getattr(module, op_name)
        monkeypatch.setattr(module, op_name, lambda *a, _op=op, **k: seen.append(k["backend"]) or _op(*a, **k))
        loss.self_check = False
        plans.clear()
        embeddings = _embeddings()
        if loss.family.label == "GIST":
            loss.loss_from_embeddings(embeddings, [e.detach() for e in embeddings])
        else:
            loss.compute_loss_from_embeddings(embeddings, None)
        (plan,) = plans
        assert seen[-1] == plan.backend == plan.runs() and (plan.device, plan.dtype) == (CPU, torch.float32)
        if asked == "triton" and loss.family.label == "GIST":
            assert plan.backend == "torch" and "computing with backend='torch'" in plan.reason


# --------------------------------------------------------------------------------------------------------------------
# A third op family, registered by data only

TOY = LossFamily(
    "TOY",
    OpCapabilities("st_fast.ops.mnrl", auto_picks_triton=False, raw_16bit_operands=False, triton_inexact="toy kernels"),
)


class _StockToyLoss(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class _ToyMixin(StFastLoss):
    family = TOY
    backend = "triton"
    self_check = False

    def fallback_reason(self) -> str | None:
        return None


class _StockToyWrapper(nn.Module):
    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss


def test_a_new_family_registers_by_data_and_is_checked_and_reported_with_its_own_capabilities(tiny_model):
    toy_class = replaces(_StockToyLoss)(type("ToyLoss", (_ToyMixin, _StockToyLoss), {}))
    wraps_a_loss(_StockToyWrapper)
    try:
        assert FUSED_CLASSES[_StockToyLoss] is toy_class
        wrapped = fast_losses.fuse(_StockToyWrapper(_StockToyLoss(tiny_model)), backend="triton")
        fused = wrapped.loss
        assert type(wrapped) is _StockToyWrapper and type(fused) is toy_class and fused_modules(wrapped) == [fused]
        plan = fused.plan(CPU, torch.float32)
        # MNRL's capabilities would run "triton" here (TRITON_INTERPRET=1); the toy family's say its kernels are
        # inexact, so its drop-in loss computes with torch, and the trainer's report says so
        assert (plan.family, plan.backend) == (TOY, "torch") and plan.reason.startswith("toy kernels")
        trainer = types.SimpleNamespace(args=types.SimpleNamespace(device="cpu"), loss=wrapped, model=tiny_model)
        assert report.swap_report(trainer)["loss"].startswith(
            "_StockToyWrapper around st_fast ToyLoss, backend torch (triton asked: toy kernels; computing with "
            "backend='torch'; cpu, float32), self-check off"
        )
        trainer.loss = _StockToyWrapper(nn.Identity())
        assert (
            report.swap_report(trainer)["loss"]
            == "_StockToyWrapper(Identity) left stock (Identity has no st_fast equivalent)"
        )
    finally:
        del FUSED_CLASSES[_StockToyLoss]
        plan_module._WRAPPERS.remove(_StockToyWrapper)


def test_replaces_refuses_a_class_that_cannot_plan_and_a_second_drop_in():
    with pytest.raises(TypeError, match="is not an st_fast StFastLoss"):
        replaces(_StockToyLoss)(_StockToyLoss)
    with pytest.raises(TypeError, match="already replaced by MultipleNegativesRankingLoss"):
        replaces(stock_losses.MultipleNegativesRankingLoss)(type("Other", (_ToyMixin, nn.Module), {}))
    assert _StockToyLoss not in FUSED_CLASSES
    assert FUSED_CLASSES[stock_losses.MultipleNegativesRankingLoss] is fast_losses.MultipleNegativesRankingLoss


class _OwnDispatch(LossFamily):
    """A family whose op has its own dispatch point (as the MaxSim op): no OpCapabilities."""

    def choose_backend(self, asked, device, dtype, **inputs):
        if asked == "native":
            return "torch", "no native kernels yet; computing with backend='torch'"
        if dtype == torch.float64 and asked != "auto":
            raise TypeError(f"the {asked} backend takes float32")
        return ("torch" if asked == "auto" else asked), None


def test_a_family_with_its_own_dispatch_point_plans_through_it():
    with pytest.raises(TypeError, match="needs OpCapabilities"):
        LossFamily("NONE")
    own = type("OwnLoss", (StFastLoss,), {"family": _OwnDispatch("OWN"), "fallback_reason": lambda self: None})
    loss = own()
    for asked, dtype, expected, reason, error in [
        ("auto", torch.float32, "torch", None, None),
        ("native", torch.float32, "torch", "no native kernels yet; computing with backend='torch'", None),
        ("triton", torch.float64, None, None, TypeError),
    ]:
        loss.backend = asked
        plan = loss.plan(CPU, dtype)
        assert (plan.family.label, plan.backend, plan.reason, type(plan.error) if error else None) == (
            "OWN",
            expected,
            reason,
            error,
        )
