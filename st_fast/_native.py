"""The Python/C++ boundary: loading of the compiled extensions, the integer codes they share with Python, and the
validated wrappers over their raw-pointer entry points.

``st_fast._C`` (C++/pybind11) is always built; ``st_fast._C_cuda`` only where nvcc was available at build time.

* Codes: :class:`SegmentKind`, :class:`HardnessKind` and :class:`StoreDtype` are defined here, once, for Python
  (``st_fast.ops.layout`` re-exports the first two). Their C++ counterparts (csrc/include/st_fast/contrastive_row.h,
  half_store.h) are exported by each extension as ``boundary_codes`` ({enum name: {member name: code}}); an extension
  whose codes differ from these is refused at import, like one built for another Python (see :func:`boundary_errors`).
* Raw calls: every entry point that takes raw addresses is called from a wrapper here, which checks shape, dtype,
  device, contiguity and lifetime first: :func:`native_row_kernel` (``contrastive_rows``, CPU and CUDA),
  :func:`native_row_statistics` / :func:`native_row_coefficients` (``contrastive_statistics`` /
  ``contrastive_coefficients``, the symmetric path's two passes),
  :func:`add_arrow_chunks` (``NoDupSamplerCore.add_chunk``) and :func:`store_coefficients` (``store_f32_as``, a test
  hook of the row kernels' coefficient stores).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from enum import IntEnum
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from st_fast.ops.mnrl.spec import ContrastiveSpec


class SegmentKind(IntEnum):
    """The kind of a score segment of the contrastive row kernel (see st_fast/ops/layout.py)."""

    Q2D = 0
    Q2Q = 1
    D2Q = 2
    D2D = 3


class HardnessKind(IntEnum):
    """Which Q2D entries the hardness penalty applies to (see st_fast/ops/layout.py)."""

    NONE = 0
    IN_BATCH = 1
    HARD = 2
    ALL = 3


class StoreDtype(IntEnum):
    """The dtype in which the row kernels store gradient coefficients."""

    FP32 = 0
    BF16 = 1
    FP16 = 2


STORE_DTYPES = {torch.float32: StoreDtype.FP32, torch.bfloat16: StoreDtype.BF16, torch.float16: StoreDtype.FP16}

BOUNDARY_ENUMS: tuple[type[IntEnum], ...] = (SegmentKind, HardnessKind, StoreDtype)


def boundary_errors(ext: ModuleType) -> list[str]:
    """How ``ext.boundary_codes`` differs from the enums above (empty when they agree)."""
    exported = getattr(ext, "boundary_codes", None)
    if not isinstance(exported, dict):
        return ["it exports no boundary_codes"]
    errors = []
    for enum in BOUNDARY_ENUMS:
        expected = {member.name: int(member) for member in enum}
        actual = exported.get(enum.__name__)
        if actual != expected:
            errors.append(f"{enum.__name__}: the extension has {actual}, st_fast/_native.py has {expected}")
    unknown = sorted(set(exported) - {enum.__name__ for enum in BOUNDARY_ENUMS})
    if unknown:
        errors.append(f"codes unknown to st_fast/_native.py: {unknown}")
    return errors


def _try_import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        ext = importlib.import_module(name)
    except ModuleNotFoundError as exc:  # not built into this install
        if exc.name != name:
            return None, str(exc)
        how = "ST_FAST_CUDA=1 pip install ." if "_cuda" in name.rsplit(".", 1)[-1] else "pip install ."
        return None, f"not built into this install (e.g. a CPU-only wheel or build); build it with `{how}`"
    except ImportError as exc:  # built for another Python, or a missing shared library
        return None, str(exc)
    errors = boundary_errors(ext)
    if errors:  # built from other sources than this Python code: its kernels would misread the codes
        return None, f"{name} was built from sources that disagree with st_fast/_native.py ({'; '.join(errors)})"
    return ext, None


cpu_ext, cpu_ext_error = _try_import("st_fast._C")
cuda_ext, cuda_ext_error = _try_import("st_fast._C_cuda")


def require_cpu_ext() -> ModuleType:
    if cpu_ext is None:
        raise RuntimeError(
            f"st_fast's C++ extension is not available ({cpu_ext_error}). Reinstall st_fast with `pip install .` "
            "so that it is compiled."
        )
    return cpu_ext


def require_cuda_ext() -> ModuleType:
    if cuda_ext is None:
        raise RuntimeError(
            f"st_fast's CUDA extension is not available ({cuda_ext_error}). Build it with "
            "`ST_FAST_CUDA=1 pip install --no-build-isolation .` on a machine with nvcc."
        )
    return cuda_ext


def triton_status() -> tuple[bool, str]:
    """(importable, why not) for Triton, without importing it when it is absent."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'st-fast[triton]', or a CUDA build of torch, brings it)"
    return True, ""


def native_info() -> dict[str, Any]:
    """What compiled and optional parts this installation has, for logs and bug reports."""
    triton_ok, triton_why = triton_status()
    return {
        "cpu_extension": cpu_ext is not None,
        "cpu_extension_error": cpu_ext_error,
        "openmp": bool(cpu_ext is not None and cpu_ext.openmp),
        "openmp_threads": cpu_ext.openmp_max_threads() if cpu_ext is not None else 0,
        "cuda_extension": cuda_ext is not None,
        "cuda_extension_error": cuda_ext_error,
        "cuda_devices_seen_by_extension": cuda_ext.device_count() if cuda_ext is not None else 0,
        # the CUDA release and gencode targets the extension was compiled for, e.g. "13.0", ["sm_80", "sm_90",
        # "compute_90"] (PTX of the newest target, which newer GPUs JIT-compile)
        "cuda_version": getattr(cuda_ext, "cuda_version", None),
        "cuda_archs": getattr(cuda_ext, "cuda_archs", "").split() if cuda_ext is not None else [],
        "cuda_row_lanes": CUDA_ROW_LANES,  # threads per row of the CUDA row kernels (ST_FAST_CUDA_ROW_LANES)
        "torch": torch.__version__,
        "torch_cuda_available": torch.cuda.is_available(),
        "triton": triton_ok,
        "triton_error": triton_why or None,
    }


# --------------------------------------------------------------------------------------------------------------------
# The contrastive row kernel (csrc/include/st_fast/contrastive_row.h): the row kernel of the ``native`` backend, C++
# (CPU, OpenMP over rows) or CUDA (one warp per row). Same contract as st_fast.ops.row_kernel_torch.torch_row_kernel.


_ROW_KERNEL_ENTRY_POINTS = ("contrastive_rows", "contrastive_statistics", "contrastive_coefficients")


def native_row_kernel_available(device: torch.device) -> bool:
    ext = {"cpu": cpu_ext, "cuda": cuda_ext}.get(device.type)
    return ext is not None and all(hasattr(ext, name) for name in _ROW_KERNEL_ENTRY_POINTS)


def _check_segments(scores: list[torch.Tensor], coefficients: list[torch.Tensor] | None) -> torch.dtype | None:
    """Checks the score segments (contiguous fp32, one device, one row count) and the coefficient outputs (one
    dtype, shaped as the scores); returns the coefficients' dtype (None without them)."""
    first = scores[0]
    for segment in scores:
        if segment.dtype != torch.float32 or segment.device != first.device or not segment.is_contiguous():
            raise ValueError("native row kernel: score segments must be contiguous float32 tensors on one device")
        if segment.shape[0] != first.shape[0]:
            raise ValueError("native row kernel: every score segment must have the same number of rows")
    if coefficients is None:
        return None
    out_dtype = coefficients[0].dtype
    if out_dtype not in STORE_DTYPES:
        raise ValueError(f"native row kernel: coefficients must be float32, bfloat16 or float16, got {out_dtype}")
    for out, segment in zip(coefficients, scores, strict=True):
        same_layout = out.shape == segment.shape and out.device == first.device and out.is_contiguous()
        if out.dtype != out_dtype or not same_layout:
            raise ValueError("native row kernel: coefficients must be contiguous, one dtype, shaped as the scores")
    return out_dtype


def _scale_pointers(scores: list[torch.Tensor], scales: Sequence[Any] | None) -> tuple[list[int], list[int]]:
    first = scores[0]
    if scales is None:
        return [0] * len(scores), [0] * len(scores)  # 0: no scale
    row_scale_ptrs = [_pointer(s.rows, "a row scale", (first.shape[0],), first.device) for s in scales]
    col_scale_ptrs = [
        _pointer(s.columns, "a column scale", (x.shape[1],), first.device) for s, x in zip(scales, scores, strict=True)
    ]
    return row_scale_ptrs, col_scale_ptrs


# Threads per row of the CUDA row kernels: 32 (one warp per row, the default) or 256 (one block per row, BlockLanes in
# csrc/cuda/block_lanes.cuh): a switch for measuring the block kernels on a GPU (ST_FAST_CUDA_ROW_LANES=256 python -m
# benchmarks fused_loss --gpu), not yet a choice made from measurements.
CUDA_ROW_LANES_CHOICES = (32, 256)
CUDA_ROW_LANES = int(os.environ.get("ST_FAST_CUDA_ROW_LANES") or 32)
if CUDA_ROW_LANES not in CUDA_ROW_LANES_CHOICES:
    raise ValueError(f"ST_FAST_CUDA_ROW_LANES must be one of {CUDA_ROW_LANES_CHOICES}, got {CUDA_ROW_LANES}")


def _label_pointers(scores: list[torch.Tensor], labels: Any | None, *, two_pass: bool) -> list[Any]:
    """The label arguments of the row kernels' entry points: (one pointer per segment,) plus the query labels'
    pointer for the two-pass ones; 0 without ``labels`` (a ``st_fast.ops.row_kernel.DuplicateLabels``: contiguous
    int32 tensors, ``segments[x]`` of segment x's length, on the scores' device)."""
    if labels is None:
        pointers = [[0] * len(scores)]
        return pointers + [0] if two_pass else pointers
    device = scores[0].device

    def pointer(tensor: torch.Tensor, what: str, length: int | None) -> int:
        if tensor.dtype != torch.int32 or tensor.device != device or tensor.dim() != 1:
            raise ValueError(f"native row kernel: {what} must be a 1-D int32 tensor on {device}")
        if (length is not None and tensor.shape[0] != length) or not tensor.is_contiguous():
            raise ValueError(f"native row kernel: {what} must be contiguous, of the segment's length {length}")
        return tensor.data_ptr()

    if len(labels.segments) != len(scores):
        raise ValueError("native row kernel: one label tensor per score segment")
    segment_ptrs = [pointer(t, "segment labels", x.shape[1]) for t, x in zip(labels.segments, scores, strict=True)]
    if not two_pass:
        return [segment_ptrs]
    return [segment_ptrs, pointer(labels.queries, "query labels", None)]


def _call(name: str, device: torch.device, *args: Any) -> None:
    if device.type == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream().cuda_stream
            getattr(require_cuda_ext(), name)(*args, stream, lanes_per_row=CUDA_ROW_LANES)
    else:
        getattr(require_cpu_ext(), name)(*args)


def _grad_scale_args(grad_scale: float | torch.Tensor, device: torch.device) -> tuple[float, int]:
    """(host grad_scale, address of its device-side factor or 0) for a grad_scale given as a number or as a
    one-element float32 tensor on the scores' device (read by the kernel there: no host sync)."""
    if isinstance(grad_scale, torch.Tensor):
        return 1.0, _pointer(grad_scale.reshape(1), "a grad_scale tensor", (1,), device)
    return float(grad_scale), 0


def native_row_kernel(
    scores: list[torch.Tensor],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float | torch.Tensor | None,
    scales: Sequence[Any] | None = None,
    coefficients: list[torch.Tensor] | None = None,
    labels: Any | None = None,
) -> torch.Tensor:
    """Per-row losses (n,) fp32; writes the gradient coefficients into ``coefficients`` (default: over ``scores``)
    when ``grad_scale`` is given (a number, or a one-element fp32 tensor on the scores' device, which the kernel reads
    on the device). ``scales``: one ``SegmentScales`` (``.rows`` (n,), ``.columns`` (length,) fp32) per segment, or
    None; ``labels``: mask_duplicates' ``DuplicateLabels`` (int32), or None."""
    first = scores[0]
    rows = first.shape[0]
    if coefficients is None:
        coefficients = scores
    out_dtype = _check_segments(scores, coefficients)
    row_scale_ptrs, col_scale_ptrs = _scale_pointers(scores, scales)
    row_loss = torch.empty(rows, dtype=torch.float32, device=first.device)
    host_grad_scale, grad_scale_factor = (-1.0, 0) if grad_scale is None else _grad_scale_args(grad_scale, first.device)
    args = (
        [s.data_ptr() for s in scores], row_scale_ptrs, col_scale_ptrs,
        [c.data_ptr() for c in coefficients] if grad_scale is not None else [0] * len(scores),
        int(STORE_DTYPES[out_dtype]), [s.shape[1] for s in scores], [int(SegmentKind(k)) for k in spec.kinds], rows,
        row_start, width, spec.scale, spec.alpha, int(HardnessKind(spec.hardness)), spec.joint,
        host_grad_scale, row_loss.data_ptr(), grad_scale_factor, *_label_pointers(scores, labels, two_pass=False),
    )  # fmt: skip
    _call("contrastive_rows", first.device, *args)
    return row_loss


def _pointer(tensor: torch.Tensor, what: str, shape: tuple[int, ...], device: torch.device) -> int:
    """The data pointer of a contiguous float32 tensor of ``shape`` on ``device`` (clear errors otherwise)."""
    if tensor.dtype != torch.float32 or tensor.device != device or tuple(tensor.shape) != shape:
        raise ValueError(f"native row kernel: {what} must be a float32 {shape} tensor on {device}")
    if not tensor.is_contiguous():
        raise ValueError(f"native row kernel: {what} must be contiguous")
    return tensor.data_ptr()


def _statistics_outputs(
    scores: list[torch.Tensor], block: Any, column_max: torch.Tensor, column_sum: torch.Tensor
) -> tuple[int, torch.device, torch.Tensor, torch.Tensor, list[int]]:
    """The statistics pass's checks and outputs (both forms): (rows, device, row LSEs (rows, segments), positive
    logits (rows,), pointers of the column max / sum (block.count,))."""
    first = scores[0]
    rows, device = first.shape[0], first.device
    _check_segments(scores, None)
    row_lse = torch.empty(rows, len(scores), dtype=torch.float32, device=device)
    positive = torch.empty(rows, dtype=torch.float32, device=device)
    column_ptrs = [_pointer(t, "a column statistic", (block.count,), device) for t in (column_max, column_sum)]
    return rows, device, row_lse, positive, column_ptrs


def native_row_statistics(
    scores: list[torch.Tensor],
    kinds: Sequence[int],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    block: Any,
    column_max: torch.Tensor,
    column_sum: torch.Tensor,
    scales: Sequence[Any] | None = None,
    labels: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric path's statistics pass (contract: st_fast.ops.row_kernel): (row LSEs (n, segments), positive
    logits (n,)) fp32; ``column_max`` / ``column_sum`` ((block.count,) fp32) are continued in place."""
    rows, device, row_lse, positive, column_ptrs = _statistics_outputs(scores, block, column_max, column_sum)
    row_scale_ptrs, col_scale_ptrs = _scale_pointers(scores, scales)
    _call(
        "contrastive_statistics", device, [s.data_ptr() for s in scores], row_scale_ptrs, col_scale_ptrs,
        [s.shape[1] for s in scores], [int(SegmentKind(k)) for k in kinds], rows, row_start, width, spec.scale,
        spec.alpha, int(HardnessKind(spec.hardness)), row_lse.data_ptr(), positive.data_ptr(), block.begin,
        block.count, *column_ptrs, *_label_pointers(scores, labels, two_pass=True),
    )  # fmt: skip
    return row_lse, positive


def native_row_coefficients(
    scores: list[torch.Tensor],
    kinds: Sequence[int],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float | torch.Tensor,
    block: Any,
    row_ref: torch.Tensor,
    column_ref: torch.Tensor,
    scales: Sequence[Any] | None = None,
    coefficients: list[torch.Tensor] | None = None,
    factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: Any | None = None,
) -> None:
    """The symmetric path's coefficient pass (contract: st_fast.ops.row_kernel): writes the coefficients into
    ``coefficients`` (default: over ``scores``) from the references ``row_ref`` (n, segments) and ``column_ref``
    (block.count,), fp32, and the optional ``factors`` (row (n,), column (block.count,)). ``grad_scale``: a number
    or a one-element fp32 tensor on the scores' device (read there)."""
    first = scores[0]
    rows, device = first.shape[0], first.device
    if coefficients is None:
        coefficients = scores
    out_dtype = _check_segments(scores, coefficients)
    row_scale_ptrs, col_scale_ptrs = _scale_pointers(scores, scales)
    factor_ptrs = [0, 0]  # 0: no factors
    if factors is not None:
        factor_ptrs = [
            _pointer(factors[0], "the row factors", (rows,), device),
            _pointer(factors[1], "the column factors", (block.count,), device),
        ]
    host_grad_scale, grad_scale_factor = _grad_scale_args(grad_scale, device)
    _call(
        "contrastive_coefficients", device, [s.data_ptr() for s in scores], row_scale_ptrs, col_scale_ptrs,
        [c.data_ptr() for c in coefficients], int(STORE_DTYPES[out_dtype]), [s.shape[1] for s in scores],
        [int(SegmentKind(k)) for k in kinds], rows, row_start, width, spec.scale, spec.alpha,
        int(HardnessKind(spec.hardness)), spec.joint, host_grad_scale,
        _pointer(row_ref, "the row references", (rows, len(scores)), device), block.begin, block.count,
        _pointer(column_ref, "the column references", (block.count,), device), len(spec.kinds),
        *factor_ptrs, grad_scale_factor, *_label_pointers(scores, labels, two_pass=True),
    )  # fmt: skip


def native_row_exp_statistics(
    scores: list[torch.Tensor],
    kinds: Sequence[int],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    block: Any,
    column_max: torch.Tensor,
    column_sum: torch.Tensor,
    shift: float,
    labels: Any | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric path's statistics pass in the fixed-shift form (contract: st_fast.ops.row_kernel; CPU only):
    as :func:`native_row_statistics` without scales or hardness, and every score is replaced by
    e = exp(scale · score - shift) (0 where masked; mask_duplicates' duplicates keep their e), the input of
    :func:`native_row_exp_coefficients`."""
    if scores[0].device.type != "cpu":
        raise ValueError(f"native row kernel: the fixed-shift statistics run on the CPU only, got {scores[0].device}")
    rows, device, row_lse, positive, column_ptrs = _statistics_outputs(scores, block, column_max, column_sum)
    require_cpu_ext().contrastive_exp_statistics(
        [s.data_ptr() for s in scores], [s.shape[1] for s in scores], [int(SegmentKind(k)) for k in kinds], rows,
        row_start, width, spec.scale, float(shift), row_lse.data_ptr(), positive.data_ptr(), block.begin,
        block.count, *column_ptrs, *_label_pointers(scores, labels, two_pass=True),
    )  # fmt: skip
    return row_lse, positive


def native_row_exp_coefficients(
    exps: list[torch.Tensor],
    kinds: Sequence[int],
    spec: ContrastiveSpec,
    row_start: int,
    width: int,
    grad_scale: float,
    block: Any,
    row_factor: torch.Tensor,
    column_factor: torch.Tensor,
    coefficients: list[torch.Tensor] | None = None,
    labels: Any | None = None,
) -> None:
    """The symmetric path's coefficient pass in the fixed-shift form (CPU only): from e (the output of
    :func:`native_row_exp_statistics`), ``row_factor`` = exp(shift - row_ref) (n, segments) and ``column_factor`` =
    exp(shift - column_ref) (block.count,), fp32, writes the same coefficients as :func:`native_row_coefficients`
    into ``coefficients`` (default: over ``exps``)."""
    first = exps[0]
    rows, device = first.shape[0], first.device
    if device.type != "cpu":
        raise ValueError(f"native row kernel: the fixed-shift coefficients run on the CPU only, got {device}")
    if coefficients is None:
        coefficients = exps
    out_dtype = _check_segments(exps, coefficients)
    require_cpu_ext().contrastive_exp_coefficients(
        [s.data_ptr() for s in exps], [c.data_ptr() for c in coefficients], int(STORE_DTYPES[out_dtype]),
        [s.shape[1] for s in exps], [int(SegmentKind(k)) for k in kinds], rows, row_start, width, spec.scale,
        spec.joint, float(grad_scale), block.begin, block.count, len(spec.kinds),
        _pointer(row_factor, "the row factors", (rows, len(exps)), device),
        _pointer(column_factor, "the column factors", (block.count,), device),
        *_label_pointers(exps, labels, two_pass=True),
    )  # fmt: skip


def store_coefficients(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (fp32, CPU) stored as ``dtype`` element by element exactly as the row kernels store coefficients
    (round to nearest even; float16 saturates at +-65504). A test hook of csrc/include/st_fast/half_store.h."""
    if values.dtype != torch.float32 or values.device.type != "cpu":
        raise ValueError(
            f"store_coefficients: values must be a float32 CPU tensor, got {values.dtype} on {values.device}"
        )
    if dtype not in STORE_DTYPES:
        raise ValueError(f"store_coefficients: dtype must be float32, bfloat16 or float16, got {dtype}")
    values = values.contiguous()
    out = torch.empty(values.shape, dtype=dtype)
    require_cpu_ext().store_f32_as(values.data_ptr(), out.data_ptr(), values.numel(), int(STORE_DTYPES[dtype]))
    return out


def row_expf(values: torch.Tensor) -> torch.Tensor:
    """exp of ``values`` (fp32, CPU) by the CPU row kernels' own exp (``row_expf`` in
    csrc/include/st_fast/portability.h: a vectorizable polynomial; the CUDA build uses expf). A test hook."""
    if values.dtype != torch.float32 or values.device.type != "cpu":
        raise ValueError(f"row_expf: values must be a float32 CPU tensor, got {values.dtype} on {values.device}")
    values = values.contiguous()
    out = torch.empty_like(values)
    require_cpu_ext().row_expf(values.data_ptr(), out.data_ptr(), values.numel())
    return out


# --------------------------------------------------------------------------------------------------------------------
# The sampler core (csrc/sampler.cpp): cells are read zero-copy from Arrow buffers.


def add_arrow_chunks(core: Any, column: int, chunked: Any) -> None:
    """Append every chunk of the pyarrow ChunkedArray ``chunked`` (string, large_string, binary or large_binary) to
    column ``column`` of a ``NoDupSamplerCore``: raw buffer addresses, with each chunk handed to the core as the owner
    that keeps its buffers alive."""
    import pyarrow as pa

    for chunk in chunked.chunks:
        if len(chunk) == 0:
            continue
        large = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
        if not (large or pa.types.is_string(chunk.type) or pa.types.is_binary(chunk.type)):
            raise TypeError(f"unsupported Arrow type {chunk.type}")
        validity, offsets, data = chunk.buffers()
        all_null = chunk.null_count == len(chunk)
        core.add_chunk(
            column,
            validity.address if (validity is not None and chunk.null_count > 0) else 0,
            offsets.address if offsets is not None else 0,
            data.address if data is not None else 0,
            chunk.offset,
            len(chunk),
            large,
            all_null,
            chunk,
        )
