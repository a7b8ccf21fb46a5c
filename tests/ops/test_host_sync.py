"""No host sync per fused-loss call on the CUDA path (issue 16): the chunked backends' CUDA code (the raw 16-bit path
that ``native`` and ``torch`` take for fp16 / bf16 embeddings on CUDA, and the fp32 path) never reads a tensor value
on the host, so that a call is launch-bound and can be captured in a CUDA graph (tests/ops/test_gpu_parity.py
captures one on the GPU).

Run here on the CPU, where the same Python code runs (tests/ops/test_raw_16bit.py's way of selecting the 16-bit
path), under :func:`host_reads_forbidden`: every way Python can read a tensor's value (``item``, ``float(t)``,
``int(t)``, ``bool(t)`` and so ``if t:``, ``t.__index__``, ``tolist``, ``numpy``, ``cpu``, ``to("cpu")``) and the ops
whose output shape depends on the values (``nonzero``, ``argwhere``, ``masked_select``, ``unique``, boolean-mask
indexing; on CUDA they copy a count to the host) raise :class:`HostSync`, from any caller, also inside autograd's
backward. A host read inside a C++ operator is outside its reach (none of the ops above is one on CUDA but those
listed).

Allowed, and documented where they are: configuration given as Python numbers (stock's ``scale`` attribute); a
learnable scale given as a tensor (``fused_mnrl_loss``'s ``scale``: read once as a float for the row kernel); the
GIST op's exact-mask recompute (:meth:`st_fast.ops.gist.spec.StockGuide.false_negatives`: ``nonzero`` over the few
guide similarities within rounding of their threshold, one host sync per mask, which this file pins down).
"""

from __future__ import annotations

import contextlib
import math
import os
import traceback

import pytest
import torch
from parity import random_columns

import st_fast
from st_fast.ops import chunked, fused_gist_loss, fused_mnrl_loss
from st_fast.ops.backends import ChunkedBackend
from st_fast.ops.mnrl import chunked as mnrl_chunked

HALF_DTYPES = (torch.float16, torch.bfloat16)
FIXED_SHIFT = mnrl_chunked.fixed_shift  # the CPU-only decision that the autouse fixture below switches off
# Tensor methods that read a value on the host (on CUDA: a device-to-host copy that waits for the stream)
HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__", "__complex__",
              "__array__")  # fmt: skip
# Ops whose output shape depends on the values (on CUDA they sync to size the output)
VALUE_SHAPED = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")


class HostSync(AssertionError):
    """A host read of a tensor value (or a value-shaped op) inside :func:`host_reads_forbidden`."""


# The st_fast package's own folder (not a substring of the path: a checkout may itself live in a folder named st_fast)
ST_FAST_DIR = os.path.dirname(os.path.realpath(st_fast.__file__))


def _caller() -> str:
    """The innermost st_fast frame of the current stack, as 'function (path in the package:line)'."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = os.path.realpath(frame.filename)
        if os.path.commonpath([path, ST_FAST_DIR]) == ST_FAST_DIR:
            relative = os.path.relpath(path, ST_FAST_DIR).replace(os.sep, "/")
            return f"{frame.name} ({relative}:{frame.lineno})"
    return "outside st_fast"


def _is_host_device(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


def _bool_index(index) -> bool:
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@contextlib.contextmanager
def host_reads_forbidden(events: list[str] | None = None):
    """Within the block, a host read of a tensor value raises :class:`HostSync` (``events`` None), or is appended to
    ``events`` as 'what in caller'."""
    patches = []

    def report(what: str) -> None:
        event = f"{what} in {_caller()}"
        if events is None:
            raise HostSync(event)
        events.append(event)

    def guarded(owner, name, check=None):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if check is None or check(*args, **kwargs):
                report(f"{owner.__name__}.{name}")
            return original(*args, **kwargs)

        patches.append((owner, name, original))
        setattr(owner, name, wrapper)

    for name in HOST_READS:
        guarded(torch.Tensor, name)
    for name in VALUE_SHAPED:
        guarded(torch.Tensor, name)
        guarded(torch, name)
    guarded(torch.Tensor, "to", lambda self, *args, **kw: any(_is_host_device(a) for a in (*args, *kw.values())))
    guarded(torch.Tensor, "__getitem__", lambda self, index: _bool_index(index))
    guarded(torch.Tensor, "__setitem__", lambda self, index, value: _bool_index(index))
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


@pytest.fixture(autouse=True)
def cuda_path_on_cpu(monkeypatch):
    """The chunked driver's CUDA path: not the CPU build's fixed-shift form of the symmetric passes
    (st_fast.ops.mnrl.chunked.fixed_shift, which reads two norms on the host, free on the CPU, and returns None on
    CUDA before reading anything)."""
    monkeypatch.setattr(mnrl_chunked, "fixed_shift", lambda ops, problem, row_kernel: None)


@pytest.fixture
def raw_16bit_on_cpu(monkeypatch):
    """Select the 16-bit path for CPU tensors too (it is the CUDA default; as tests/ops/test_raw_16bit.py)."""
    monkeypatch.setattr(ChunkedBackend, "takes_raw_operands", lambda self, dtype, device: dtype in HALF_DTYPES)


def _mnrl_call(embeddings, **config):
    """One fused loss call, forward and backward."""
    loss = fused_mnrl_loss(embeddings[0], embeddings[1:], **config)
    return loss, torch.autograd.grad(loss, embeddings)


MNRL_CONFIGS = {
    "one-direction": dict(),
    "hardness": dict(hardness_mode="all_negatives", hardness_strength=5.0),
    "symmetric": dict(directions=("query_to_doc", "doc_to_query")),
    "symmetric-per-direction": dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"),
    "all-four": dict(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")),
    "gathered-symmetric": dict(directions=("query_to_doc", "doc_to_query"), row_offset=4, batch_size=7),
}


def test_the_guard_catches_every_host_read():
    x = torch.arange(6.0).reshape(2, 3)
    reads = [
        lambda: x.sum().item(), lambda: float(x.sum()), lambda: int(x[0, 0]), lambda: bool(x.sum() > 0),
        lambda: [0, 1][x[0, 1].long()], lambda: x.tolist(), lambda: x.numpy(), lambda: x.cpu(),
        lambda: x.to("cpu"), lambda: x.to(device=torch.device("cpu")), lambda: x.nonzero(), lambda: torch.nonzero(x),
        lambda: x[x > 2], lambda: x.masked_select(x > 2), lambda: torch.unique(x), lambda: math.isfinite(x[0, 0]),
    ]  # fmt: skip
    for read in reads:
        with host_reads_forbidden(), pytest.raises(HostSync):
            read()
    with host_reads_forbidden():  # device-side work passes
        torch.where(x > 2, x, 0).max().mul_(2)
        x[:, 1:].to(torch.float16)
        x[torch.tensor([1, 0])] += 1
    assert float(x.sum()) == 21.0  # and everything is restored afterwards


def _old_coefficient_scale(operand_dtype, spec, scales):
    """coefficient_scale before issue 16: γ as a Python float (one host sync)."""
    if operand_dtype != torch.float16:
        return 1.0
    regular = [torch.where(s < 0.5 / mnrl_chunked.NORMALIZE_EPS, s, 0).max() for s in scales if s.numel()]
    r_max = float(torch.stack(regular).max()) if regular else 1.0
    r_max = r_max if r_max > 0 else 1.0
    bound = spec.scale * r_max * r_max
    if not math.isfinite(bound) or bound <= 0:
        return 1.0
    return 2.0 ** (14 - math.ceil(math.log2(bound)))


def _old_as_float16_operand(x):
    """as_float16_operand before issue 16: σ as a Python float (one host sync per operand)."""
    if x.dtype == torch.float16:
        return x, 1.0
    largest = float(x.abs().max()) if x.numel() else 0.0
    if not math.isfinite(largest) or largest == 0.0:
        return x.to(torch.float16), 1.0
    sigma = 2.0 ** (14 - math.ceil(math.log2(largest)))
    return (x * sigma).to(torch.float16), sigma


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("old", ["gamma", "sigma"])
def test_the_guard_catches_the_host_syncs_of_the_old_scales(monkeypatch, old):
    """The guard can fail: with γ (float16 coefficients) or σ (bf16 operands) read on the host as before, the same
    call raises, and the results are the same as with the device-side scales."""
    embeddings = random_columns(9, 16, 3, dtype=torch.bfloat16, seed=2)
    expected = _mnrl_call(embeddings, backend="native")
    if old == "gamma":
        monkeypatch.setattr(mnrl_chunked, "coefficient_scale", _old_coefficient_scale)
    else:
        monkeypatch.setattr(mnrl_chunked, "as_float16_operand", _old_as_float16_operand)
    with host_reads_forbidden(), pytest.raises(HostSync, match="__float__ in "):
        _mnrl_call(embeddings, backend="native")
    events = []
    with host_reads_forbidden(events):
        loss, grads = _mnrl_call(embeddings, backend="native")
    assert all(e.startswith("Tensor.__float__ in ") and "(ops/mnrl/chunked.py:" in e for e in events), events
    assert len(events) == (1 if old == "gamma" else 2)  # γ once, σ once per operand
    assert torch.equal(loss, expected[0])
    for grad, reference in zip(grads, expected[1], strict=True):
        assert torch.equal(grad, reference)


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("config", MNRL_CONFIGS)
def test_the_16bit_path_reads_nothing_on_the_host(backend, dtype, similarity, config):
    embeddings = random_columns(11, 24, 3, dtype=dtype, seed=len(config))
    with host_reads_forbidden():
        loss, grads = _mnrl_call(embeddings, backend=backend, similarity=similarity, **MNRL_CONFIGS[config])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.usefixtures("raw_16bit_on_cpu")
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_recomputed_chunks_read_nothing_on_the_host(monkeypatch, backend):
    """Several row chunks: the one-pass loop and the symmetric path's recomputed coefficient pass."""
    monkeypatch.setitem(chunked.DEFAULT_CHUNK_BYTES, "cpu", 6 * 8 * 69)
    monkeypatch.setitem(chunked.DEFAULT_KEEP_BYTES, "cpu", 6 * 8 * 69)
    embeddings = random_columns(23, 32, 3, dtype=torch.bfloat16, seed=3)
    for config in (dict(), MNRL_CONFIGS["gathered-symmetric"]):
        with host_reads_forbidden():
            _mnrl_call(embeddings, backend=backend, **config)


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("config", ["one-direction", "symmetric", "all-four"])
def test_the_fp32_path_reads_nothing_on_the_host(backend, config):
    embeddings = random_columns(11, 24, 3, seed=5)
    with host_reads_forbidden():
        _mnrl_call(embeddings, backend=backend, **MNRL_CONFIGS[config])


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_a_learnable_scale_is_the_documented_exception(backend):
    """A scale given as a tensor is read once on the host (as configuration: the row kernel takes it as a number)."""
    embeddings = random_columns(7, 16, 2, seed=6)
    scale = torch.tensor(20.0, requires_grad=True)
    events = []
    with host_reads_forbidden(events):
        loss = fused_mnrl_loss(embeddings[0], embeddings[1:], scale=scale, backend=backend)
        torch.autograd.grad(loss, [*embeddings, scale])
    assert events and all("(ops/learnable_scale.py:" in e or "(ops/mnrl/spec.py:" in e for e in events), events


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("contrast", [(True, True), (False, False)])
def test_gist_syncs_only_for_its_exact_masks(backend, contrast):
    """The GIST op's only host reads: one ``nonzero`` per guide mask (the near-threshold recompute of
    StockGuide.false_negatives), three per chunk with both contrast blocks, one without."""
    from gist_cases import gist_columns

    model, guide = gist_columns(9, 16, 12, 3, seed=7)
    events = []
    with host_reads_forbidden(events):
        loss = fused_gist_loss(model[0], model[1:], guide[0], guide[1:], contrast_anchors=contrast[0],
                               contrast_positives=contrast[1], backend=backend)  # fmt: skip
        torch.autograd.grad(loss, model)
    assert len(events) == 1 + sum(contrast), events
    assert all(e.startswith("Tensor.nonzero in false_negatives (ops/gist/spec.py:") for e in events), events


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_device_side_scales_equal_the_host_formulas(dtype):
    """γ and σ computed on the device are the powers of two the host formulas gave, over magnitudes from subnormal
    to huge, zero-norm rows, exact powers of two and non-finite values."""
    generator = torch.Generator().manual_seed(8)
    spec = mnrl_chunked.ContrastiveSpec.from_loss_config(scale=20.0)
    exponents = list(range(-40, 41, 3))
    for e in exponents:
        x = (torch.randn(5, 7, generator=generator) * 2.0**e).to(dtype)
        x16, sigma = mnrl_chunked.as_float16_operand(x)
        old16, old_sigma = _old_as_float16_operand(x)
        assert float(sigma) == old_sigma and torch.equal(x16, old16)
        scales = [torch.rand(6, generator=generator) * 2.0**e, torch.rand(4, generator=generator) * 2.0**-e]
        assert float(mnrl_chunked.coefficient_scale(torch.float16, spec, scales)) == _old_coefficient_scale(
            torch.float16, spec, scales
        )
    for x in (torch.zeros(3, 2), torch.tensor([[2.0**-3, -1.0]]), torch.tensor([[float("inf"), 1.0]])):
        x = x.to(dtype)
        assert float(mnrl_chunked.as_float16_operand(x)[1]) == _old_as_float16_operand(x)[1]
    for scales in ([torch.tensor([0.25, 1e13])], [torch.tensor([0.0, 0.0])], [torch.tensor([float("nan")])]):
        new = mnrl_chunked.coefficient_scale(torch.float16, spec, scales)
        assert float(new) == _old_coefficient_scale(torch.float16, spec, scales)


@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_a_grad_scale_tensor_gives_the_coefficients_of_the_number(kernel):
    """The row kernels take γ as a device tensor (the native one through ContrastiveRowArgs::grad_scale_factor):
    the coefficients are those of the same γ given as a number, to the bit, in both kernels' entry points."""
    from st_fast.ops.layout import SegmentKind
    from st_fast.ops.row_kernel import PositiveBlock, SegmentScales
    from st_fast.ops.row_kernel_native import NATIVE_ROW_KERNEL
    from st_fast.ops.row_kernel_torch import TORCH_ROW_KERNEL

    row_kernel = NATIVE_ROW_KERNEL if kernel == "native" else TORCH_ROW_KERNEL
    spec = mnrl_chunked.ContrastiveSpec.from_loss_config(
        scale=20.0, directions=("query_to_doc", "query_to_query", "doc_to_query"), partition_mode="per_direction"
    )
    generator = torch.Generator().manual_seed(9)
    rows, width = 5, 9
    scores = [torch.rand(rows, width, generator=generator) * 2 - 1 for _ in spec.kinds]
    scales = [SegmentScales(torch.rand(rows, generator=generator) + 0.5, torch.rand(width, generator=generator) + 0.5)
              for _ in spec.kinds]  # fmt: skip
    gamma = 2.0**-3
    outputs = []
    for grad_scale in (gamma, torch.tensor(gamma)):
        out = [torch.empty(rows, width, dtype=torch.float16) for _ in spec.kinds]
        loss = row_kernel(scores, spec, 2, width, grad_scale, scales, out)
        kinds = (SegmentKind.OWN_POSITIVE, SegmentKind.OWN_MASKED)
        references = torch.rand(rows, 2, generator=torch.Generator().manual_seed(1)) + 2
        column_ref = torch.rand(rows, generator=torch.Generator().manual_seed(2)) + 2
        pass_out = [torch.empty(rows, width, dtype=torch.float16) for _ in kinds]
        row_kernel.coefficients(scores[:2], kinds, spec, 2, width, grad_scale, PositiveBlock(2, rows), references,
                                column_ref, scales[:2], pass_out)  # fmt: skip
        outputs.append((loss, out + pass_out))
    (loss, out), (tensor_loss, tensor_out) = outputs
    assert torch.equal(loss, tensor_loss)
    for number, tensor in zip(out, tensor_out, strict=True):
        assert torch.equal(number.view(torch.int16), tensor.view(torch.int16))


def test_the_cpu_only_fixed_shift_form_reads_nothing_off_the_cpu():
    """What cuda_path_on_cpu switches off is CPU-only: for operands on another device (meta here, as CUDA) the
    fixed-shift decision returns None before it reads a norm."""
    from types import SimpleNamespace

    from st_fast.ops.row_kernel_native import NATIVE_ROW_KERNEL

    spec = mnrl_chunked.ContrastiveSpec.from_loss_config(scale=20.0, directions=("query_to_doc", "doc_to_query"))
    problem = mnrl_chunked.ContrastiveProblem(spec, 0, 8)
    operands = {name: torch.empty(8, 16, device="meta") for name in ("queries", "docs")}
    ops = SimpleNamespace(scores=operands, math_dtype=torch.float32, coefficient_dtype=torch.float32)
    with host_reads_forbidden():
        assert FIXED_SHIFT(ops, problem, NATIVE_ROW_KERNEL) is None
