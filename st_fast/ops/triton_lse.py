"""Host launchers of the Triton kernel family (:mod:`st_fast.ops.triton_kernels`): the log-sum-exp of one score
segment and its gradient, optionally guided (GISTEmbed's false-negative mask inside the kernels).

    segment_lse_forward(rows, cols, ...)                    -> lse (M,) fp32
    segment_lse_backward(rows, cols, lse_ref, row_weight, ...) -> (scale·P @ C (M, D), scale·Pᵀ @ R (N, D)) fp32

with the logits L, P and the guide's mask as defined in :mod:`st_fast.ops.triton_kernels`. Each launcher checks
its operands once, picks the tile sizes and the loop splits, launches, and merges the split partials with torch
(deterministic). Both ops' Triton backends (:mod:`st_fast.ops.mnrl.triton_backend`,
:mod:`st_fast.ops.gist.triton_backend`) compose these two functions.
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

from st_fast.ops.layout import HardnessKind, SegmentKind
from st_fast.ops.triton_kernels import (  # noqa: F401 (the kernels are looked up here by the AOT-compile tests)
    TRITON_IMPORT_ERROR,
    _segment_lse_backward_kernel,
    _segment_lse_forward_kernel,
    triton,
)

_TRITON_IMPORT_ERROR: str | None = TRITON_IMPORT_ERROR


class SegmentGuide(NamedTuple):
    """The guide's side of a guided segment (GISTEmbed): rows (M, D') and columns (N, D') of one dtype among
    fp32 / fp16 / bf16, fp32 (M,) per-row shift h and threshold t, and whether the target column g = row_start + i
    of row i is protected from the mask."""

    rows: torch.Tensor
    cols: torch.Tensor
    shift: torch.Tensor
    threshold: torch.Tensor
    protect: bool


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_unavailable_reason(device_type: str) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device_type`` (``"cuda"``, ``"cpu"``, ...), or None when
    they can: on CUDA, and on CPU only under the interpreter (``TRITON_INTERPRET=1``, set before triton is
    imported)."""
    if _TRITON_IMPORT_ERROR is not None:
        return (
            f"the triton backend needs triton, which is not importable ({_TRITON_IMPORT_ERROR}); "
            'use backend="torch" or "native"'
        )
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return (
            "Triton runs on CUDA tensors, or on CPU only under TRITON_INTERPRET=1 (set before importing triton); "
            'use backend="torch" or "native" for CPU tensors'
        )
    return (
        f"Triton runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), not on {device_type!r} tensors; "
        'use backend="torch" or "native"'
    )


def triton_available_for(tensor: torch.Tensor) -> None:
    """Raise RuntimeError (with :func:`triton_unavailable_reason`) unless the Triton kernels can run on
    ``tensor``'s device."""
    reason = triton_unavailable_reason(tensor.device.type)
    if reason is not None:
        raise RuntimeError(reason)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _validate(
    rows: torch.Tensor, cols: torch.Tensor, kind: SegmentKind, row_start: int, width: int, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the segment's operands against the contract; return them with unit stride along D."""
    if not isinstance(rows, torch.Tensor) or not isinstance(cols, torch.Tensor):
        raise TypeError("rows and cols must be torch.Tensors")
    if rows.dim() != 2 or cols.dim() != 2:
        raise ValueError(
            f"rows and cols must be 2-D (M, D) and (N, D); got {tuple(rows.shape)} and {tuple(cols.shape)}"
        )
    if rows.dtype not in _DTYPES or cols.dtype != rows.dtype:
        raise TypeError(f"rows and cols must share one dtype among {_DTYPES}; got {rows.dtype} and {cols.dtype}")
    if rows.device != cols.device:
        raise ValueError(f"rows and cols must be on one device; got {rows.device} and {cols.device}")
    (m, d), (n, d_cols) = rows.shape, cols.shape
    if d != d_cols:
        raise ValueError(f"rows and cols must have the same feature size D; got {d} and {d_cols}")
    if m == 0 or n == 0 or d == 0:
        raise ValueError(f"empty segment: M={m}, N={n}, D={d} (all must be >= 1)")
    if width < 1:
        raise ValueError(f"width must be >= 1; got {width}")
    if kind in (SegmentKind.OWN_POSITIVE, SegmentKind.OWN_GROUP_MASKED) and n % width != 0:
        raise ValueError(f"{kind.name} columns must be k·width; got N={n}, width={width}")
    if kind in (SegmentKind.OWN_MASKED, SegmentKind.PLAIN) and n != width:
        raise ValueError(f"{kind.name} columns must number width; got N={n}, width={width}")
    if row_start < 0 or row_start + m > width:
        raise ValueError(f"rows' global indices [{row_start}, {row_start + m}) must lie in [0, width={width})")
    if not (math.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"alpha must be finite and >= 0; got {alpha}")
    triton_available_for(rows)
    return _unit_stride(rows), _unit_stride(cols)


def _validate_guide(guide: SegmentGuide, rows: torch.Tensor, cols: torch.Tensor) -> SegmentGuide:
    """Check the guide's operands against the segment's; return them with unit stride along D'."""
    guide_rows, guide_cols = guide.rows, guide.cols
    for x in (guide_rows, guide_cols):
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device != rows.device:
            raise ValueError("guided segment: 2-D guide operands on the rows' device expected")
    if guide_rows.dtype not in _DTYPES or guide_cols.dtype != guide_rows.dtype:
        raise TypeError(f"guided segment: guide rows and cols must share one dtype among {_DTYPES}")
    if guide_rows.shape[1] != guide_cols.shape[1]:
        raise ValueError("guided segment: feature sizes of the guide rows and columns differ")
    if guide_rows.shape[0] != rows.shape[0] or guide_cols.shape[0] != cols.shape[0]:
        raise ValueError("guided segment: the guide operands must have the rows' and columns' counts")
    for name, vec in (("shift", guide.shift), ("threshold", guide.threshold)):
        if vec.dtype != torch.float32 or vec.shape != (rows.shape[0],) or vec.device != rows.device:
            raise ValueError(f"guided segment: {name} must be float32 of shape ({rows.shape[0]},) on {rows.device}")
    return SegmentGuide(
        _unit_stride(guide_rows), _unit_stride(guide_cols), guide.shift.contiguous(), guide.threshold.contiguous(),
        bool(guide.protect),
    )  # fmt: skip


def _kinds(kind: SegmentKind | int, hardness: HardnessKind | int, alpha: float) -> tuple[SegmentKind, HardnessKind]:
    kind, hardness = SegmentKind(kind), HardnessKind(hardness)
    if kind != SegmentKind.OWN_POSITIVE or alpha <= 0.0:  # the penalty exists only for OWN_POSITIVE with alpha > 0
        hardness = HardnessKind.NONE
    return kind, hardness


def _input_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 at the "highest" matmul precision, else 'tf32' (ignored for fp16/bf16 operands)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _blocks(m: int, n: int, d: int) -> dict[str, int]:
    """The forward's config (and the interpreter's backward tiles): tiles of at most 64 x 64, BLOCK_K <= 64 along D.

    ``tl.dot`` needs every tile dimension >= 16.
    """
    pow2 = triton.next_power_of_2
    return {
        "BLOCK_M": min(64, max(16, pow2(m))),
        "BLOCK_N": min(64, max(16, pow2(n))),
        "BLOCK_K": min(64, max(16, pow2(d))),
    }


class BackwardConfig(NamedTuple):
    """Tiles of the backward kernel: the owned tile (rows for dR, columns for dC), the loop tile, the D window
    (BLOCK_DO + BLOCK_DT columns of the gradient held by one program), BLOCK_K along D in the score tile's dots."""

    block_owned: int
    block_loop: int
    block_k: int
    block_do: int
    block_dt: int
    num_warps: int
    num_stages: int

    def blocks(self, columns: bool) -> dict[str, int]:
        """The kernel's BLOCK_M / BLOCK_N / BLOCK_K / BLOCK_DO / BLOCK_DT for dR (columns False) or dC (True)."""
        block_m, block_n = (self.block_loop, self.block_owned) if columns else (self.block_owned, self.block_loop)
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": self.block_k, "BLOCK_DO": self.block_do,
                "BLOCK_DT": self.block_dt}  # fmt: skip


# Backward tiles on CUDA per operand size (2: fp16 / bf16, 4: fp32) and D range:
# (largest D, owned tile, loop tile, BLOCK_K, num_warps, num_stages).
# NOT YET MEASURED ON A GPU: chosen so that every kernel compiles for sm_90 without register spills and within
# the shared memory of one SM (tests/triton_aot.py, run by tests/ops/test_triton_lse.py); benchmarks/gpu_check.sh
# is to measure their speed and replace them.
_CUDA_BACKWARD_TILES = {
    2: ((128, 64, 64, 64, 4, 2), (256, 64, 64, 64, 8, 2), (512, 32, 64, 64, 8, 2), (1024, 16, 64, 64, 8, 2)),
    4: ((128, 64, 32, 32, 8, 2), (256, 32, 32, 32, 8, 2), (512, 16, 32, 32, 8, 2), (1024, 16, 16, 16, 8, 2)),
}
# The widest D window one program holds; larger D is split into windows of this many columns across programs,
# each recomputing the score tiles (once per window, i.e. ceil(D / 1024) times).
_MAX_D_WINDOW = 1024


def _d_window(d: int, max_window: int) -> tuple[int, int, int]:
    """(BLOCK_DO, BLOCK_DT, number of windows): a window of BLOCK_DO + BLOCK_DT >= min(d, max_window) columns as a
    power of two plus a power-of-two tail (0 when the tail would not save anything over the next power of two)."""
    pow2 = triton.next_power_of_2
    if d >= max_window:
        return max_window, 0, triton.cdiv(d, max_window)
    if d <= 16:
        return 16, 0, 1
    main = pow2(d) // 2 if pow2(d) != d else d
    tail = 0 if main == d else max(16, pow2(d - main))
    if main + tail >= pow2(d):
        return pow2(d), 0, 1
    return main, tail, 1


def _backward_config(m: int, n: int, d: int, device_type: str, element_size: int, guided: bool) -> BackwardConfig:
    """One config under the interpreter (the forward's tiles); on CUDA the row of :data:`_CUDA_BACKWARD_TILES`
    for the operands' element size and D (its last row beyond 1024), with half the loop tile when guided (the
    guide's score tile takes registers too)."""
    block_do, block_dt, _ = _d_window(d, _MAX_D_WINDOW)
    if device_type != "cuda":
        blocks = _blocks(m, n, d)
        return BackwardConfig(blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"], block_do, block_dt, 4, 1)
    table = _CUDA_BACKWARD_TILES[4 if element_size >= 4 else 2]
    _, owned, loop, block_k, num_warps, num_stages = next((row for row in table if d <= row[0]), table[-1])
    if guided:
        loop = max(16, loop // 2)
    return BackwardConfig(owned, loop, block_k, block_do, block_dt, num_warps, num_stages)


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split(n_tiles: int, n_other_programs: int, device: torch.device, n_split: int | None) -> tuple[int, int]:
    """(n_split, tiles_per_split) for a loop over n_tiles, aiming at ~2 programs per SM on CUDA (1 split on CPU).

    n_split is reduced so that no split is empty.
    """
    if n_split is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            n_split = -(-2 * _sm_count(index) // n_other_programs)
        else:
            n_split = 1
    if n_split < 1:
        raise ValueError(f"n_split must be >= 1; got {n_split}")
    n_split = min(n_split, n_tiles)
    tiles_per_split = -(-n_tiles // n_split)
    return -(-n_tiles // tiles_per_split), tiles_per_split


def _launch_options(
    rows: torch.Tensor,
    kind: SegmentKind,
    hardness: HardnessKind,
    guide: SegmentGuide | None = None,
    labeled: bool = False,
) -> dict:
    """The kernels' feature flags (constexprs) for one segment; without a guide its flags are off and its tile
    size is the smallest (the guide operands are not read)."""
    guide_rows = rows if guide is None else guide.rows
    upcast = rows.device.type == "cpu" and torch.bfloat16 in (rows.dtype, guide_rows.dtype)
    # fp32 guide tiles take registers (64 spills at sm_90 next to fp32 operands; 32 spills next to fp32 D = 1024)
    block_kg = 64 if guide_rows.dtype != torch.float32 else 32 if rows.dtype != torch.float32 else 16
    return {
        "KIND": int(kind),
        "HARDNESS": int(hardness),
        "GUIDED": guide is not None,
        "PROTECT": guide is not None and guide.protect,
        "LABELED": labeled,
        "UPCAST": upcast,
        "INPUT_PRECISION": _input_precision(rows.dtype),
        "GUIDE_PRECISION": _input_precision(guide_rows.dtype),
        "BLOCK_KG": 16 if guide is None else min(block_kg, max(16, triton.next_power_of_2(guide_rows.shape[1]))),
    }


def _guide_arguments(rows: torch.Tensor, guide: SegmentGuide | None) -> tuple:
    """(GR, GC, SHIFT, THRESH) pointers and (D', stride_gr, stride_gc) of the kernels; placeholders (never read)
    without a guide."""
    if guide is None:
        placeholder = torch.zeros(1, dtype=torch.float32, device=rows.device)
        return (placeholder,) * 4, (0, 0, 0)
    pointers = (guide.rows, guide.cols, guide.shift, guide.threshold)
    return pointers, (guide.rows.shape[1], guide.rows.stride(0), guide.cols.stride(0))


def _label_pointer(rows: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The LABELS pointer of the kernels: the columns' labels (N,) int32 / int64, or a placeholder (never read)."""
    if labels is None:
        return torch.zeros(1, dtype=torch.int64, device=rows.device)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
        raise TypeError("labels must be an int32 or int64 tensor")
    if labels.shape != (cols.shape[0],) or labels.device != rows.device:
        raise ValueError(f"labels must have shape ({cols.shape[0]},) (one per column) and be on {rows.device}")
    return labels.contiguous()


def _prepare(rows, cols, kind, row_start, width, hardness, alpha, guide, labels=None):
    rows, cols = _validate(rows, cols, SegmentKind(kind), row_start, width, float(alpha))
    kind, hardness = _kinds(kind, hardness, float(alpha))
    if guide is not None:
        guide = _validate_guide(guide, rows, cols)
    guide_pointers, guide_sizes = _guide_arguments(rows, guide)
    pointers = (*guide_pointers, _label_pointer(rows, cols, labels))
    return rows, cols, _launch_options(rows, kind, hardness, guide, labels is not None), (pointers, guide_sizes)


def segment_lse_forward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    *,
    kind: SegmentKind | int,
    scale: float,
    row_start: int,
    width: int,
    hardness: HardnessKind | int = HardnessKind.NONE,
    alpha: float = 0.0,
    guide: SegmentGuide | None = None,
    n_split: int | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """lse (M,) fp32: lse_i = log Σ_c exp(L_ic) over one segment; -inf for a fully masked row.

    rows (M, D) and cols (N, D) share a dtype (fp32/fp16/bf16) and device. ``guide`` masks the guide's false
    negatives and shifts the scores (GISTEmbed). ``n_split`` overrides the number of column splits (merged
    deterministically by torch). ``labels`` (N,) int32 / int64: mask_duplicates, column c masked for row g when
    labels[c] == labels[g] and c != g (st_fast/ops/layout.py).
    """
    rows, cols, options, (guide_pointers, guide_sizes) = _prepare(
        rows, cols, kind, row_start, width, hardness, alpha, guide, labels
    )
    (m, d), n = rows.shape, cols.shape[0]
    blocks = _blocks(m, n, d)
    row_tiles = triton.cdiv(m, blocks["BLOCK_M"])
    n_split, tiles_per_split = _split(triton.cdiv(n, blocks["BLOCK_N"]), row_tiles, rows.device, n_split)

    lse_part = torch.empty((m, n_split), dtype=torch.float32, device=rows.device)
    dg, stride_gr, stride_gc = guide_sizes
    _segment_lse_forward_kernel[(row_tiles, n_split)](
        rows, cols, *guide_pointers, lse_part, m, n, d, dg, rows.stride(0), cols.stride(0), stride_gr, stride_gc,
        row_start, width, float(scale), float(alpha), tiles_per_split,
        **options, **blocks, num_warps=4, num_stages=3,
    )  # fmt: skip
    return lse_part[:, 0] if n_split == 1 else torch.logsumexp(lse_part, dim=1)


def segment_lse_backward(
    rows: torch.Tensor,
    cols: torch.Tensor,
    lse_ref: torch.Tensor,
    row_weight: torch.Tensor,
    *,
    kind: SegmentKind | int,
    scale: float,
    row_start: int,
    width: int,
    hardness: HardnessKind | int = HardnessKind.NONE,
    alpha: float = 0.0,
    guide: SegmentGuide | None = None,
    n_split: int | None = None,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_rows (M, D), d_cols (N, D)) fp32: scale·P @ C and scale·Pᵀ @ R with P_ic = w_i·exp(L_ic - lse_ref_i).

    lse_ref and row_weight are fp32 (M,); lse_ref may be a joint LSE over several segments. Rows with w_i = 0 or
    lse_ref_i = -inf contribute nothing. ``guide`` and ``labels`` as in :func:`segment_lse_forward`. ``n_split``
    overrides the number of loop splits of both kernels.
    """
    rows, cols, options, (guide_pointers, guide_sizes) = _prepare(
        rows, cols, kind, row_start, width, hardness, alpha, guide, labels
    )
    (m, d), n = rows.shape, cols.shape[0]
    for name, vec in (("lse_ref", lse_ref), ("row_weight", row_weight)):
        if not isinstance(vec, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if vec.dtype != torch.float32:
            raise TypeError(f"{name} must be float32; got {vec.dtype}")
        if vec.shape != (m,):
            raise ValueError(f"{name} must have shape ({m},); got {tuple(vec.shape)}")
        if vec.device != rows.device:
            raise ValueError(f"{name} must be on {rows.device}; got {vec.device}")
    lse_ref = lse_ref.contiguous()
    # P is formed with w / max|w| in [-1, 1] (no fp16 underflow), the products are rescaled by scale·max|w|.
    w_max = row_weight.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    w_norm = (row_weight / w_max).contiguous()
    grad_factor = (w_max * float(scale)).reshape(1)

    config = _backward_config(m, n, d, rows.device.type, rows.element_size(), guide is not None)
    d_windows = _d_window(d, _MAX_D_WINDOW)[2]
    dg, stride_gr, stride_gc = guide_sizes
    operands = (rows, cols, *guide_pointers, lse_ref, w_norm, grad_factor)
    sizes = (m, n, d, dg, rows.stride(0), cols.stride(0), stride_gr, stride_gc, row_start, width, float(scale),
             float(alpha))  # fmt: skip

    gradients = []
    # dR: programs own (row tile, D window) and loop over column tiles; dC: own (column tile, D window), loop over
    # row tiles. Two launches, no atomics: deterministic. (One launch computing each score tile once in all would
    # accumulate dR or dC with fp32 atomics: 6·M·N·D FLOPs instead of 8, but a nondeterministic summation order.)
    for columns, owned, looped in ((False, m, n), (True, n, m)):
        owned_tiles = triton.cdiv(owned, config.block_owned)
        loop_tiles = triton.cdiv(looped, config.block_loop)
        splits, tiles_per_split = _split(loop_tiles, owned_tiles * d_windows, rows.device, n_split)
        partials = torch.empty((splits, owned, d), dtype=torch.float32, device=rows.device)
        _segment_lse_backward_kernel[(owned_tiles, d_windows, splits)](
            *operands, partials, *sizes, tiles_per_split, **options, COLUMNS=columns, **config.blocks(columns),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        gradients.append(partials[0] if splits == 1 else partials.sum(0))
    return gradients[0], gradients[1]
