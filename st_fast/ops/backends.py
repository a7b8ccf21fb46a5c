"""The backends of the fused ops and the one dispatch point that picks them, for every op.

A backend turns the two trainable operands (anchors / queries (W or B, D), candidate columns (k·W, D)) and the op's
problem (spec, local rows, constants) into the mean loss over the local rows, and later into the gradients of both
operands (:class:`Backend`). Every op has the same three:

* ``torch``:  row-chunked GEMMs + the PyTorch row kernel; gradients computed during the forward (any device).
* ``native``: row-chunked GEMMs + the C++ row kernel (CPU) or the CUDA row kernel (GPU); same driver.
  On CUDA the MNRL op takes 16-bit embeddings raw: 16-bit tensor-core GEMMs with fp32 accumulation and output, the
  cosine normalization applied as row / column scales (see :mod:`st_fast.ops.mnrl.chunked`); on the CPU (no fast
  16-bit GEMMs) it upcasts and normalizes first, as stock does.
* ``triton``: the fused Triton kernel family (:mod:`st_fast.ops.triton_kernels`) that never stores a score tile: LSE
  statistics in the forward, recomputed scores in the backward (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``).
* ``auto``:   native when its extension is built for the device (CPU or CUDA), else triton on CUDA where the op's
  capabilities allow it, else torch; float64 inputs always take torch (the only backend that computes in float64,
  as stock does for float64). Native is the fastest backend on CUDA (benchmarks/fused_loss.py --gpu; see README,
  Performance).

What differs between the ops is data (:class:`OpCapabilities`, :data:`MNRL`, :data:`GIST`, :data:`MAXSIM`), read by
:func:`resolve_backend` and :func:`drop_in_backend`; the contrastive ops' packages hold the same modules (``spec``,
``chunked``, ``triton_backend``, ``functional``), which is where the resolver finds their backends; an op with other
backends (MaxSim) names its own rules (``OpCapabilities.resolver``), still reached through :func:`resolve_backend`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from st_fast.ops.chunked import ChunkedBackend
from st_fast.ops.row_kernel_torch import TORCH_ROW_KERNEL

BACKENDS = ("auto", "triton", "native", "torch")


class Backend(Protocol):
    name: str

    def takes_raw_operands(self, dtype: torch.dtype, device: torch.device) -> bool:
        """True: the backend takes the embeddings as they are and applies the cosine normalization itself
        (the problem's ``normalize``); False: it takes them normalized, in :meth:`operand_dtype`."""
        ...

    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the backend takes normalized operands (model or guide embeddings) of ``dtype`` in."""
        ...

    def forward(
        self, anchors: torch.Tensor, candidates: torch.Tensor, problem: Any, need_grad: bool
    ) -> tuple[torch.Tensor, Any]:
        """(0-dim mean loss over the local rows, state for :meth:`backward` or None without ``need_grad``)."""
        ...

    def backward(self, state: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d loss / d anchors, d loss / d candidates) times ``grad_loss``, fp32 (fp64 for fp64 operands)."""
        ...


@dataclass(frozen=True)
class OpCapabilities:
    """What one op's backends can do: the data :func:`resolve_backend` and :func:`drop_in_backend` decide by.

    package: the op's package; its ``chunked.loss_and_grad`` is the chunked driver and its
        ``triton_backend.TritonBackend`` the Triton backend.
    auto_picks_triton: ``auto`` may take Triton on CUDA when native is not built (only once it has been measured
        and checked on a GPU for that op).
    raw_16bit_operands: the chunked driver takes raw fp16 / bf16 embeddings on CUDA (see :class:`ChunkedBackend`).
    triton_mask_dtypes: the dtypes the Triton kernels decide the op's masks in (float32 tiles); with another mask
        dtype ``triton`` computes with ``torch``, which decides them as stock does. None: the op has no such masks.
    triton_inexact: why the Triton kernels' results may differ from stock's decisions (None: they do not); a
        drop-in loss then computes ``triton`` with ``torch`` (:func:`drop_in_backend`).
    triton_masks_duplicates: the Triton kernels take ``mask_duplicates``' text labels (see
        :mod:`st_fast.ops.layout`); without, ``auto`` picks another backend for a call with labels and ``triton``
        is an error.
    resolver: ``"module:function"`` for an op whose backends are not the chunked driver + Triton pair above (MaxSim:
        token embeddings, masks and arg-max indices): :func:`resolve_backend` checks the name and hands the choice
        to ``function(name, device, dtype, **op_inputs)``, the op's own rules (None: the rules below).
    """

    package: str
    auto_picks_triton: bool
    raw_16bit_operands: bool
    triton_mask_dtypes: tuple[torch.dtype, ...] | None = None
    triton_inexact: str | None = None
    triton_masks_duplicates: bool = False
    resolver: str | None = None


MNRL = OpCapabilities("st_fast.ops.mnrl", auto_picks_triton=True, raw_16bit_operands=True, triton_masks_duplicates=True)
GIST = OpCapabilities(
    "st_fast.ops.gist",
    auto_picks_triton=False,  # not measured nor checked on a GPU yet: auto takes native (or torch) on every device
    raw_16bit_operands=False,
    triton_mask_dtypes=(torch.float32,),
    triton_inexact="the guided Triton kernels cannot decide masks at their thresholds exactly as stock",
)
MAXSIM = OpCapabilities(
    "st_fast.ops.maxsim",
    auto_picks_triton=False,  # the tile kernel has run under the interpreter only: auto takes native or torch
    raw_16bit_operands=False,
    resolver="st_fast.ops.maxsim.dispatch:resolve_maxsim_backend",
)


def native_available(device: torch.device) -> bool:
    try:
        from st_fast.ops.row_kernel_native import native_row_kernel_available
    except ImportError:
        return False
    return native_row_kernel_available(device)


def _chunked_backend(name: str, op: OpCapabilities) -> ChunkedBackend:
    if name == "native":
        from st_fast.ops.row_kernel_native import NATIVE_ROW_KERNEL as row_kernel
    else:
        row_kernel = TORCH_ROW_KERNEL
    driver = importlib.import_module(f"{op.package}.chunked").loss_and_grad
    return ChunkedBackend(name, row_kernel, driver, raw_16bit=op.raw_16bit_operands)


def _triton_backend(op: OpCapabilities) -> Backend:
    return importlib.import_module(f"{op.package}.triton_backend").TritonBackend()


def resolve_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    op: OpCapabilities = MNRL,
    *,
    mask_dtype: torch.dtype | None = None,
    mask_duplicates: bool = False,
    **op_inputs: Any,
) -> Any:
    """The backend object of ``op`` for ``backend=name`` on ``device`` with embeddings of ``dtype`` (and, for an op
    with guide masks, masks decided in ``mask_dtype``; ``mask_duplicates``: the call has text labels; ``op_inputs``:
    the other inputs of an op with its own ``resolver``, e.g. MaxSim's ``tile_elements``). ``auto``:
    ``torch`` for float64, else ``native`` where its extension is built for ``device``, else ``triton`` on CUDA where
    Triton is importable (and ``op`` lets auto pick it, and takes the labels), else ``torch``.

    Raises:
        ValueError: ``name`` is not one of :data:`BACKENDS`; ``triton`` with ``mask_duplicates`` for an op whose
            Triton kernels do not take text labels.
        TypeError: ``native`` or ``triton`` for float64 embeddings (use ``torch``).
        RuntimeError: ``native`` where its extension is not built, ``triton`` where Triton cannot run (no triton, or
            CPU tensors without ``TRITON_INTERPRET=1``).
    """
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if op.resolver is not None:
        if mask_duplicates or mask_dtype is not None:
            raise ValueError(f"{op.package} takes no guide masks or duplicate labels")
        module, function = op.resolver.split(":")
        return getattr(importlib.import_module(module), function)(name, device, dtype, **op_inputs)
    if op_inputs:
        raise TypeError(f"unexpected inputs for {op.package}: {sorted(op_inputs)}")
    if name == "auto":
        if dtype == torch.float64:
            name = "torch"
        elif native_available(device):
            name = "native"
        elif (
            device.type == "cuda"
            and op.auto_picks_triton
            and (op.triton_masks_duplicates or not mask_duplicates)
            and _triton_runs_on(device)
        ):
            name = "triton"
        else:
            name = "torch"
    if name == "triton":
        if mask_duplicates and not op.triton_masks_duplicates:
            raise ValueError(
                "the triton backend does not implement mask_duplicates; use backend='native' or 'torch' (or 'auto')"
            )
        if dtype == torch.float64:
            raise TypeError("the triton backend takes float32/float16/bfloat16; use backend='torch' for float64")
        from st_fast.ops.triton_lse import triton_unavailable_reason

        reason = triton_unavailable_reason(device.type)
        if reason is not None:
            raise RuntimeError(reason)
        if op.triton_mask_dtypes is None or mask_dtype in op.triton_mask_dtypes:
            return _triton_backend(op)
        name = "torch"  # the Triton kernels decide masks in float32 only
    if name == "native":
        if dtype == torch.float64:
            raise TypeError("the native backend computes in float32; use backend='torch' for float64 embeddings")
        if not native_available(device):
            raise RuntimeError(f"the native backend is not available on {device} (see st_fast.native_info())")
    return _chunked_backend(name, op)


def _triton_runs_on(device: torch.device) -> bool:
    from st_fast.ops.triton_lse import triton_unavailable_reason

    return triton_unavailable_reason(device.type) is None


def drop_in_backend(name: str, op: OpCapabilities) -> tuple[str, str | None]:
    """(backend name, reason) for a drop-in loss of ``op`` asked for ``backend=name``: a drop-in loss takes every
    decision as stock takes it, so where the op's Triton kernels cannot (``op.triton_inexact``) it computes with
    ``torch`` and gives the reason (the loss warns once); otherwise ``(name, None)``."""
    if name == "triton" and op.triton_inexact is not None:
        return "torch", f"{op.triton_inexact}; computing with backend='torch'"
    return name, None
