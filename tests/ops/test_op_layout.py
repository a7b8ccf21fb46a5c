"""The two fused ops have one shape: the same modules with the same entry points, one autograd Function, and one
resolver whose per-op differences are capability data (st_fast.ops.backends)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from st_fast.ops import backends
from st_fast.ops.autograd import FusedLoss
from st_fast.ops.chunked import ChunkedBackend

OPS = ("mnrl", "gist")
ENTRY_POINTS = {"spec": "{Op}Problem", "chunked": "loss_and_grad", "triton_backend": "TritonBackend",
                "functional": "fused_{op}_loss"}  # fmt: skip
PROBLEMS = {"mnrl": "Contrastive", "gist": "Guided"}


def _modules(op: str) -> list[str]:
    package = importlib.import_module(f"st_fast.ops.{op}")
    return sorted(module.name for module in pkgutil.iter_modules(package.__path__))


def test_the_ops_have_the_same_modules():
    assert _modules("mnrl") == _modules("gist") == ["chunked", "functional", "spec", "triton_backend"]


@pytest.mark.parametrize("op", OPS)
def test_each_op_has_the_same_entry_points(op):
    for module, name in ENTRY_POINTS.items():
        name = name.format(op=op, Op=PROBLEMS[op])
        assert hasattr(importlib.import_module(f"st_fast.ops.{op}.{module}"), name), (op, module, name)
    assert importlib.import_module(f"st_fast.ops.{op}.functional").FusedLoss is FusedLoss
    assert backends.MNRL.package == "st_fast.ops.mnrl" and backends.GIST.package == "st_fast.ops.gist"


@pytest.mark.parametrize("name", ["torch", "native"])
@pytest.mark.parametrize("op", OPS)
def test_the_chunked_backends_are_one_class_with_the_op_driver(op, name):
    if name == "native" and not backends.native_available(torch.device("cpu")):
        pytest.skip("the native extension is not built")
    capabilities = getattr(backends, op.upper())
    backend = backends.resolve_backend(name, torch.device("cpu"), torch.float32, capabilities)
    assert isinstance(backend, ChunkedBackend) and backend.name == name
    assert backend.driver is importlib.import_module(f"st_fast.ops.{op}.chunked").loss_and_grad
    assert backend.takes_raw_operands(torch.bfloat16, torch.device("cuda")) == (op == "mnrl")


def test_capabilities_decide_what_differs():
    """auto never picks the guided Triton kernels; a drop-in GIST loss computes triton with torch (their masks are not
    stock's at ties), a drop-in MNRL loss keeps triton."""
    assert backends.MNRL.auto_picks_triton and not backends.GIST.auto_picks_triton
    assert backends.drop_in_backend("triton", backends.MNRL) == ("triton", None)
    backend, reason = backends.drop_in_backend("triton", backends.GIST)
    assert backend == "torch" and "cannot decide masks at their thresholds exactly as stock" in reason
    for name in ("auto", "native", "torch"):
        assert backends.drop_in_backend(name, backends.GIST) == (name, None)


def test_guided_triton_falls_back_to_torch_for_masks_in_another_dtype():
    pytest.importorskip("triton")
    cpu = torch.device("cpu")
    triton = backends.resolve_backend("triton", cpu, torch.float32, backends.GIST, mask_dtype=torch.float32)
    assert triton.name == "triton" and not isinstance(triton, ChunkedBackend)
    fallback = backends.resolve_backend("triton", cpu, torch.float32, backends.GIST, mask_dtype=torch.bfloat16)
    assert isinstance(fallback, ChunkedBackend) and fallback.name == "torch"


@pytest.mark.parametrize("triton_runs", [True, False])
def test_auto_on_cuda_without_the_native_extension(monkeypatch, triton_runs):
    """auto takes triton on CUDA where it can run, else torch (an install without triton must still train)."""
    import st_fast.ops.triton_lse as triton_lse

    monkeypatch.setattr(backends, "native_available", lambda device: False)
    monkeypatch.setattr(triton_lse, "triton_unavailable_reason", lambda device_type: None if triton_runs else "absent")
    cuda = torch.device("cuda")
    backend = backends.resolve_backend("auto", cuda, torch.bfloat16, backends.MNRL)
    assert backend.name == ("triton" if triton_runs else "torch")
    assert backends.resolve_backend("auto", cuda, torch.bfloat16, backends.GIST).name == "torch"
    assert backends.resolve_backend("auto", cuda, torch.float64, backends.MNRL).name == "torch"


@pytest.mark.parametrize("op", OPS)
def test_the_chunked_drivers_run_on_the_shared_operands(monkeypatch, op):
    """Both drivers hold their operands in st_fast.ops.operands.Operands (GIST: the guide's too)."""
    from gist_cases import gist_columns

    from st_fast.ops import fused_gist_loss, fused_mnrl_loss
    from st_fast.ops.operands import Operands

    prepared = []
    prepare = Operands.prepare.__func__

    def spy(cls, operands, *args, **kwargs):
        prepared.append(tuple(operands))
        return prepare(cls, operands, *args, **kwargs)

    monkeypatch.setattr(Operands, "prepare", classmethod(spy))
    model, guide = gist_columns(5, 8, 6, 2, seed=1)
    if op == "mnrl":
        fused_mnrl_loss(model[0], model[1:], backend="torch")
        assert prepared == [("queries", "docs")]
    else:
        fused_gist_loss(model[0], model[1:], guide[0], guide[1:], backend="torch")
        assert prepared == [("anchors", "candidates")] * 2
