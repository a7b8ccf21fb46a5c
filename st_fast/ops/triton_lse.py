"""Triton primitive of the fused contrastive op: the log-sum-exp of one score segment and its gradient.

For rows R (M, D), columns C (N, D), row i with global index g = row_start + i and block width W (layout.py):

    s_ic   = <R_i, C_c>                                   (fp32 accumulation)
    L_ic   = scale·s_ic (+ alpha·s_ic where penalized)    (-inf where the kind masks (g, c))
    lse_i  = log Σ_c exp(L_ic)                                          segment_lse_forward
    P_ic   = w_i · exp(L_ic - lse_ref_i)                  (0 on masked entries, dead rows)
    dR     = scale · P @ C,   dC = scale · Pᵀ @ R                      segment_lse_backward

The hardness penalty is a stop-gradient, so ∂L/∂s = scale on every unmasked entry. The M x N score matrix is never
stored: every kernel recomputes its score tiles from R and C.

Tiling
------
* Score tile (``_score_tile``): S[a, b] = Σ_k A[a, k]·B[b, k] for a (BLOCK_A, BLOCK_B) tile, looping over D in
  BLOCK_K chunks into one fp32 accumulator with ``tl.dot``. fp32 inputs use ``input_precision="ieee"`` unless
  ``torch.get_float32_matmul_precision()`` allows TF32; fp16/bf16 inputs go to the tensor cores as they are.
  On CPU (``TRITON_INTERPRET=1``) bf16 tiles are upcast to fp32 after the load, because the interpreter computes
  bf16 arithmetic wrongly without an error.
* Forward: grid (row tiles, column splits). Program (m, s) runs an online max / sum-exp over the column
  tiles of split s and writes the partial log-sum-exp of its rows to an (M, n_split) fp32 buffer; torch merges the
  splits with ``logsumexp`` (deterministic). n_split is chosen so that about two programs per SM run even when M
  is small; it is 1 on CPU. Cost: 2·M·N·D FLOPs and M·N exp2.
* Backward: two kernels, each recomputing its score tiles over the full D, no atomics (deterministic, no
  contention): ``_segment_lse_backward_rows_kernel`` owns (row tile, D-output tile) and loops over column tiles
  accumulating dR = scale·P @ C; ``_segment_lse_backward_cols_kernel`` owns (column tile, D-output tile) and loops
  over row tiles accumulating dC = scale·Pᵀ @ R, computing the transposed tile Sᵀ = C @ Rᵀ directly. A third grid
  axis splits the loop (columns, resp. rows) when the first two do not fill the GPU; the (n_split, ·, D) fp32
  partials are summed by torch. Cost: (n_dtiles + 1)·2·M·N·D FLOPs per kernel with n_dtiles = ceil(D / BLOCK_DO),
  i.e. 8·M·N·D in all for D <= 128 (16·M·N·D at D = 384). The D-output tile keeps the fp32 accumulator in
  registers for any D. Chosen over one kernel with fp32 atomics for dR (6·M·N·D, but nondeterministic, and all
  column-tile programs would hit the same row tiles at once) for determinism and simplicity; not measured.
* Before the P·C products, P is normalized by max_i |w_i| (so that P ∈ [-1, 1] does not underflow in fp16) and cast
  to the input dtype; the accumulator is multiplied back by scale·max|w| at the end.

All statistics are fp32 and in natural units (the running max is a logit itself, so a single-entry row gets
lse = L exactly); exponentials are exp2((L - max)·log2(e)). A row whose entries are all masked gets lse = -inf
(never NaN); rows with w = 0 or lse_ref = -inf contribute exactly zero gradient.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from st_fast.ops.layout import HardnessKind, SegmentKind

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except ImportError as _exc:  # the package imports without triton; every launcher raises via triton_available_for

    class _NoTriton:
        """Stand-in for ``triton`` / ``triton.language`` so that the kernel definitions below still parse."""

        constexpr = int

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()  # type: ignore[assignment]
    _TRITON_IMPORT_ERROR = str(_exc)


_Q2D = tl.constexpr(int(SegmentKind.Q2D))
_Q2Q = tl.constexpr(int(SegmentKind.Q2Q))
_D2Q = tl.constexpr(int(SegmentKind.D2Q))
_D2D = tl.constexpr(int(SegmentKind.D2D))
_NONE = tl.constexpr(int(HardnessKind.NONE))
_IN_BATCH = tl.constexpr(int(HardnessKind.IN_BATCH))
_HARD = tl.constexpr(int(HardnessKind.HARD))
_ALL = tl.constexpr(int(HardnessKind.ALL))
_LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _score_tile(
    a_ptr,
    b_ptr,
    offs_a,
    offs_b,
    mask_a,
    mask_b,
    stride_a,
    stride_b,
    D,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """S[a, b] = Σ_k A[offs_a[a], k] · B[offs_b[b], k] over the full D: fp32 (BLOCK_A, BLOCK_B), 0 off the masks."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_a[:, None].to(tl.int64) * stride_a + offs_k[None, :]  # (BLOCK_A, BLOCK_K)
    b_ptrs = b_ptr + offs_b[None, :].to(tl.int64) * stride_b + offs_k[:, None]  # (BLOCK_K, BLOCK_B): Bᵀ
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = (k0 + offs_k) < D
        a = tl.load(a_ptrs, mask=mask_a[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & mask_b[None, :], other=0.0)
        if UPCAST:  # bf16 under the interpreter: compute in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _segment_logits(
    s,
    g,
    c,
    N,
    width,
    scale,
    alpha,
    KIND: tl.constexpr,
    HARDNESS: tl.constexpr,
):
    """Logits L for a score tile s; g (row global index) and c (column index) broadcast against s.

    L = scale·s, plus alpha·s on the entries the hardness penalizes (Q2D only), and -inf where the kind masks the
    entry or c >= N (the tile's tail).
    """
    logit = s * scale
    if KIND == _Q2D:
        if HARDNESS == _IN_BATCH:  # other rows' positives and negatives
            logit = tl.where((c % width) != g, logit + s * alpha, logit)
        elif HARDNESS == _HARD:  # the row's own hard negatives
            logit = tl.where(((c % width) == g) & (c >= width), logit + s * alpha, logit)
        elif HARDNESS == _ALL:  # everything but the positive
            logit = tl.where(c != g, logit + s * alpha, logit)
        masked = c >= N
    elif KIND == _Q2Q:  # the query itself
        masked = (c == g) | (c >= N)
    elif KIND == _D2D:  # the document itself and its own hard negatives
        masked = ((c % width) == g) | (c >= N)
    else:  # D2Q: nothing masked
        masked = c >= N
    return tl.where(masked, float("-inf"), logit)


@triton.jit
def _segment_lse_forward_kernel(
    R,
    C,
    LSE_PART,
    M,
    N,
    D,
    stride_r,
    stride_c,
    row_start,
    width,
    scale,
    alpha,
    tiles_per_split,
    KIND: tl.constexpr,
    HARDNESS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """LSE_PART[i, split] = log Σ_{c in split} exp(L_ic) for the rows of tile pid_m (-inf if all masked).

    Online softmax statistics: m_i = max_c L_ic, l_i = Σ_c exp(L_ic - m_i), rescaled whenever m_i grows.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    g = row_start + offs_m

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = _score_tile(R, C, offs_m, offs_n, row_mask, offs_n < N, stride_r, stride_c, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)  # fmt: skip
        logit = _segment_logits(s, g[:, None], offs_n[None, :], N, width, scale, alpha, KIND, HARDNESS)
        m_new = tl.maximum(m_i, tl.max(logit, axis=1))
        # A row with nothing unmasked yet keeps m = -inf: shift by 0 instead so that no -inf - (-inf) = NaN appears.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2((m_i - m_shift) * _LOG2E) + tl.sum(tl.exp2((logit - m_shift[:, None]) * _LOG2E), axis=1)
        m_i = m_new

    # l_i >= 1 wherever m_i is finite (the max term is e^0); a fully masked row has m_i = -inf, l_i = 0: lse = -inf.
    lse = m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0))
    tl.store(LSE_PART + offs_m.to(tl.int64) * n_split + pid_s, lse, mask=row_mask)


@triton.jit
def _segment_lse_backward_rows_kernel(
    R,
    C,
    LSE_REF,
    W_NORM,
    GRAD_FACTOR,
    D_ROWS_PART,
    M,
    N,
    D,
    stride_r,
    stride_c,
    row_start,
    width,
    scale,
    alpha,
    tiles_per_split,
    KIND: tl.constexpr,
    HARDNESS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """D_ROWS_PART[split, i, d] = grad_factor · Σ_{c in split} P̂_ic · C[c, d] for a (row tile, D tile).

    P̂_ic = ŵ_i · exp(L_ic - lse_ref_i) with ŵ = w / max|w| (0 for dead rows and masked entries);
    grad_factor = scale · max|w|, so the sum over splits is dR = scale · P @ C.
    """
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_mask = offs_m < M
    d_mask = offs_d < D
    g = row_start + offs_m

    lse = tl.load(LSE_REF + offs_m, mask=row_mask, other=float("-inf"))
    w = tl.load(W_NORM + offs_m, mask=row_mask, other=0.0)
    row_live = (w != 0.0) & (lse != float("-inf"))
    lse = tl.where(row_live, lse, 0.0)  # dead rows: never form L - (-inf); their P is zeroed below

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_mask = offs_n < N
        s = _score_tile(R, C, offs_m, offs_n, row_mask, col_mask, stride_r, stride_c, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)  # fmt: skip
        logit = _segment_logits(s, g[:, None], offs_n[None, :], N, width, scale, alpha, KIND, HARDNESS)
        # P̂ = ŵ·exp(L - lse_ref): (BLOCK_M, BLOCK_N)
        p = tl.where(row_live[:, None], tl.exp2((logit - lse[:, None]) * _LOG2E), 0.0) * w[:, None]
        c_ptrs = C + offs_n[:, None].to(tl.int64) * stride_c + offs_d[None, :]
        c_out = tl.load(c_ptrs, mask=col_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_DO)
        if UPCAST:
            c_out = c_out.to(tl.float32)
        acc = tl.dot(p.to(c_out.dtype), c_out, acc, input_precision=INPUT_PRECISION)

    acc = acc * tl.load(GRAD_FACTOR)
    out_ptrs = D_ROWS_PART + (pid_s * M + offs_m[:, None]).to(tl.int64) * D + offs_d[None, :]
    tl.store(out_ptrs, acc, mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _segment_lse_backward_cols_kernel(
    R,
    C,
    LSE_REF,
    W_NORM,
    GRAD_FACTOR,
    D_COLS_PART,
    M,
    N,
    D,
    stride_r,
    stride_c,
    row_start,
    width,
    scale,
    alpha,
    tiles_per_split,
    KIND: tl.constexpr,
    HARDNESS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    """D_COLS_PART[split, c, d] = grad_factor · Σ_{i in split} P̂_ic · R[i, d] for a (column tile, D tile).

    Works on transposed tiles: Sᵀ = C @ Rᵀ is (BLOCK_N, BLOCK_M), so Pᵀ @ R needs no transpose; P̂ and grad_factor
    as in the rows kernel.
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    col_mask = offs_n < N
    d_mask = offs_d < D

    acc = tl.zeros((BLOCK_N, BLOCK_DO), dtype=tl.float32)
    m_begin = pid_s * tiles_per_split * BLOCK_M
    m_end = tl.minimum(M, m_begin + tiles_per_split * BLOCK_M)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_mask = offs_m < M
        g = row_start + offs_m
        lse = tl.load(LSE_REF + offs_m, mask=row_mask, other=float("-inf"))
        w = tl.load(W_NORM + offs_m, mask=row_mask, other=0.0)
        row_live = (w != 0.0) & (lse != float("-inf"))  # also false on the tail rows offs_m >= M
        lse = tl.where(row_live, lse, 0.0)

        s_t = _score_tile(C, R, offs_n, offs_m, col_mask, row_mask, stride_c, stride_r, D,
                          BLOCK_N, BLOCK_M, BLOCK_K, UPCAST, INPUT_PRECISION)  # fmt: skip
        logit_t = _segment_logits(s_t, g[None, :], offs_n[:, None], N, width, scale, alpha, KIND, HARDNESS)
        # P̂ᵀ = ŵ·exp(L - lse_ref) transposed: (BLOCK_N, BLOCK_M)
        p_t = tl.where(row_live[None, :], tl.exp2((logit_t - lse[None, :]) * _LOG2E), 0.0) * w[None, :]
        r_ptrs = R + offs_m[:, None].to(tl.int64) * stride_r + offs_d[None, :]
        r_out = tl.load(r_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_DO)
        if UPCAST:
            r_out = r_out.to(tl.float32)
        acc = tl.dot(p_t.to(r_out.dtype), r_out, acc, input_precision=INPUT_PRECISION)

    acc = acc * tl.load(GRAD_FACTOR)
    out_ptrs = D_COLS_PART + (pid_s * N + offs_n[:, None]).to(tl.int64) * D + offs_d[None, :]
    tl.store(out_ptrs, acc, mask=col_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available_for(tensor: torch.Tensor) -> None:
    """Raise RuntimeError unless the Triton kernels can run on ``tensor``'s device.

    They run on CUDA tensors, and on CPU tensors only under the interpreter (``TRITON_INTERPRET=1``, set before
    triton is imported).
    """
    if _TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(
            f"the triton backend needs triton, which is not importable ({_TRITON_IMPORT_ERROR}); "
            'use backend="torch" or "native"'
        )
    device_type = tensor.device.type
    if device_type == "cuda":
        return
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return
        raise RuntimeError(
            "Triton runs on CUDA tensors, or on CPU only under TRITON_INTERPRET=1 (set before importing triton); "
            'use backend="torch" or "native" for CPU tensors'
        )
    raise RuntimeError(
        f"Triton runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), not on {device_type!r} tensors; "
        'use backend="torch" or "native"'
    )


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
    if kind in (SegmentKind.Q2D, SegmentKind.D2D) and n % width != 0:
        raise ValueError(f"{kind.name} columns must be k·width; got N={n}, width={width}")
    if kind in (SegmentKind.Q2Q, SegmentKind.D2Q) and n != width:
        raise ValueError(f"{kind.name} columns must number width; got N={n}, width={width}")
    if row_start < 0 or row_start + m > width:
        raise ValueError(f"rows' global indices [{row_start}, {row_start + m}) must lie in [0, width={width})")
    if not (math.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"alpha must be finite and >= 0; got {alpha}")
    triton_available_for(rows)
    return (rows if rows.stride(1) == 1 else rows.contiguous()), (cols if cols.stride(1) == 1 else cols.contiguous())


def _kinds(kind: SegmentKind | int, hardness: HardnessKind | int, alpha: float) -> tuple[SegmentKind, HardnessKind]:
    kind, hardness = SegmentKind(kind), HardnessKind(hardness)
    if kind != SegmentKind.Q2D or alpha <= 0.0:  # the penalty exists only for Q2D with alpha > 0
        hardness = HardnessKind.NONE
    return kind, hardness


def _input_precision(dtype: torch.dtype) -> str:
    """'ieee' for fp32 at the "highest" matmul precision, else 'tf32' (ignored for fp16/bf16 operands)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _blocks(m: int, n: int, d: int) -> dict[str, int]:
    """One config per shape: tiles of at most 64 x 64, BLOCK_K <= 64 along D, D-output tiles of 128 (256 for D >= 512).

    ``tl.dot`` needs every tile dimension >= 16.
    """
    pow2 = triton.next_power_of_2
    return {
        "BLOCK_M": min(64, max(16, pow2(m))),
        "BLOCK_N": min(64, max(16, pow2(n))),
        "BLOCK_K": min(64, max(16, pow2(d))),
        "BLOCK_DO": min(256 if d >= 512 else 128, max(16, pow2(d))),
    }


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


def _launch_options(rows: torch.Tensor, kind: SegmentKind, hardness: HardnessKind) -> dict:
    return {
        "KIND": int(kind),
        "HARDNESS": int(hardness),
        "UPCAST": rows.device.type == "cpu" and rows.dtype == torch.bfloat16,
        "INPUT_PRECISION": _input_precision(rows.dtype),
    }


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
    n_split: int | None = None,
) -> torch.Tensor:
    """lse (M,) fp32: lse_i = log Σ_c exp(L_ic) over one segment; -inf for a fully masked row.

    rows (M, D) and cols (N, D) share a dtype (fp32/fp16/bf16) and device. ``n_split`` overrides the number of
    column splits (merged deterministically by torch).
    """
    rows, cols = _validate(rows, cols, SegmentKind(kind), row_start, width, float(alpha))
    kind, hardness = _kinds(kind, hardness, float(alpha))
    (m, d), n = rows.shape, cols.shape[0]
    blocks = _blocks(m, n, d)
    del blocks["BLOCK_DO"]
    row_tiles = triton.cdiv(m, blocks["BLOCK_M"])
    n_split, tiles_per_split = _split(triton.cdiv(n, blocks["BLOCK_N"]), row_tiles, rows.device, n_split)

    lse_part = torch.empty((m, n_split), dtype=torch.float32, device=rows.device)
    _segment_lse_forward_kernel[(row_tiles, n_split)](
        rows, cols, lse_part, m, n, d, rows.stride(0), cols.stride(0), row_start, width,
        float(scale), float(alpha), tiles_per_split,
        **_launch_options(rows, kind, hardness), **blocks, num_warps=4, num_stages=3,
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
    n_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_rows (M, D), d_cols (N, D)) fp32: scale·P @ C and scale·Pᵀ @ R with P_ic = w_i·exp(L_ic - lse_ref_i).

    lse_ref and row_weight are fp32 (M,); lse_ref may be a joint LSE over several segments. Rows with w_i = 0 or
    lse_ref_i = -inf contribute nothing. ``n_split`` overrides the number of loop splits of both kernels.
    """
    rows, cols = _validate(rows, cols, SegmentKind(kind), row_start, width, float(alpha))
    kind, hardness = _kinds(kind, hardness, float(alpha))
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

    blocks = _blocks(m, n, d)
    options = _launch_options(rows, kind, hardness)
    scalars = (row_start, width, float(scale), float(alpha))
    num_warps = 8 if blocks["BLOCK_DO"] > 128 else 4
    row_tiles, col_tiles = triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"])
    d_tiles = triton.cdiv(d, blocks["BLOCK_DO"])

    split_r, tiles_r = _split(col_tiles, row_tiles * d_tiles, rows.device, n_split)
    d_rows = torch.empty((split_r, m, d), dtype=torch.float32, device=rows.device)
    _segment_lse_backward_rows_kernel[(row_tiles, d_tiles, split_r)](
        rows, cols, lse_ref, w_norm, grad_factor, d_rows, m, n, d, rows.stride(0), cols.stride(0), *scalars, tiles_r,
        **options, **blocks, num_warps=num_warps, num_stages=2,
    )  # fmt: skip

    split_c, tiles_c = _split(row_tiles, col_tiles * d_tiles, rows.device, n_split)
    d_cols = torch.empty((split_c, n, d), dtype=torch.float32, device=rows.device)
    _segment_lse_backward_cols_kernel[(col_tiles, d_tiles, split_c)](
        rows, cols, lse_ref, w_norm, grad_factor, d_cols, m, n, d, rows.stride(0), cols.stride(0), *scalars, tiles_c,
        **options, **blocks, num_warps=num_warps, num_stages=2,
    )  # fmt: skip
    return (d_rows[0] if split_r == 1 else d_rows.sum(0)), (d_cols[0] if split_c == 1 else d_cols.sum(0))
