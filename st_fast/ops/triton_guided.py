"""Triton primitive of the guided (GISTEmbed) op: the segment log-sum-exp with the guide's mask inside the kernel.

For rows R (M, D), columns C (N, D), the guide's rows GR (M, D') and columns GC (N, D'), a per-row threshold t_i
and a per-row shift h_i:

    s_ic  = <R_i, C_c>,   γ_ic = <GR_i, GC_c>                        (fp32 accumulation, both recomputed per tile)
    L_ic  = scale·(s_ic - h_i),  -inf where γ_ic > t_i and not (PROTECT and c == row_start + i), or c >= N
    lse_i = log Σ_c exp(L_ic)                                                  guided_lse_forward
    P_ic  = w_i · exp(L_ic - lse_ref_i);  dR = scale · P @ C,  dC = scale · Pᵀ @ R     guided_lse_backward

The shift h (the row's positive score) does not change the gradient; it keeps the statistics small, so that the
loss log Z - positive does not cancel two numbers of magnitude scale. Same tiling, splits, fp16 normalization of P
and dead-row rules as :mod:`st_fast.ops.triton_lse` (whose score-tile function this module calls); the guide tile
adds 2·M·N·D' FLOPs to every kernel and is never stored either.
"""

from __future__ import annotations

import torch

from st_fast.ops.triton_lse import (
    _LOG2E,
    _blocks,
    _input_precision,
    _score_tile,
    _split,
    tl,
    triton,
    triton_available_for,
)


@triton.jit
def _guided_logits(s, gamma, shift, threshold, g, c, N, scale, PROTECT: tl.constexpr):
    """L = scale·(s - shift); -inf where the guide says false negative (gamma > threshold, the protected target
    c == g excepted) or c >= N. shift/threshold/g broadcast along rows, c along columns."""
    masked = gamma > threshold
    if PROTECT:
        masked = masked & (c != g)
    masked = masked | (c >= N)
    return tl.where(masked, float("-inf"), (s - shift) * scale)


@triton.jit
def _guided_lse_forward_kernel(
    R, C, GR, GC, SHIFT, THRESH, LSE_PART,
    M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc, row_start, scale, tiles_per_split,
    PROTECT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
):  # fmt: skip
    """LSE_PART[i, split] = log Σ_{c in split} exp(L_ic) (online max / sum-exp, as the unguided kernel)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    g = row_start + offs_m
    shift = tl.load(SHIFT + offs_m, mask=row_mask, other=0.0)
    threshold = tl.load(THRESH + offs_m, mask=row_mask, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_mask = offs_n < N
        s = _score_tile(R, C, offs_m, offs_n, row_mask, col_mask, stride_r, stride_c, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)  # fmt: skip
        gamma = _score_tile(GR, GC, offs_m, offs_n, row_mask, col_mask, stride_gr, stride_gc, DG,
                            BLOCK_M, BLOCK_N, BLOCK_KG, UPCAST, GUIDE_PRECISION)  # fmt: skip
        logit = _guided_logits(s, gamma, shift[:, None], threshold[:, None], g[:, None], offs_n[None, :], N, scale,
                               PROTECT)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(logit, axis=1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing unmasked yet: no -inf - (-inf)
        l_i = l_i * tl.exp2((m_i - m_shift) * _LOG2E) + tl.sum(tl.exp2((logit - m_shift[:, None]) * _LOG2E), axis=1)
        m_i = m_new
    lse = m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0))
    tl.store(LSE_PART + offs_m.to(tl.int64) * n_split + pid_s, lse, mask=row_mask)


@triton.jit
def _guided_lse_backward_rows_kernel(
    R, C, GR, GC, SHIFT, THRESH, LSE_REF, W_NORM, GRAD_FACTOR, D_ROWS_PART,
    M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc, row_start, scale, tiles_per_split,
    PROTECT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):  # fmt: skip
    """D_ROWS_PART[split, i, d] = grad_factor · Σ_{c in split} P̂_ic · C[c, d] for a (row tile, D tile)."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    row_mask = offs_m < M
    d_mask = offs_d < D
    g = row_start + offs_m
    shift = tl.load(SHIFT + offs_m, mask=row_mask, other=0.0)
    threshold = tl.load(THRESH + offs_m, mask=row_mask, other=0.0)
    lse = tl.load(LSE_REF + offs_m, mask=row_mask, other=float("-inf"))
    w = tl.load(W_NORM + offs_m, mask=row_mask, other=0.0)
    row_live = (w != 0.0) & (lse != float("-inf"))
    lse = tl.where(row_live, lse, 0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_mask = offs_n < N
        s = _score_tile(R, C, offs_m, offs_n, row_mask, col_mask, stride_r, stride_c, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)  # fmt: skip
        gamma = _score_tile(GR, GC, offs_m, offs_n, row_mask, col_mask, stride_gr, stride_gc, DG,
                            BLOCK_M, BLOCK_N, BLOCK_KG, UPCAST, GUIDE_PRECISION)  # fmt: skip
        logit = _guided_logits(s, gamma, shift[:, None], threshold[:, None], g[:, None], offs_n[None, :], N, scale,
                               PROTECT)  # fmt: skip
        p = tl.where(row_live[:, None], tl.exp2((logit - lse[:, None]) * _LOG2E), 0.0) * w[:, None]
        c_ptrs = C + offs_n[:, None].to(tl.int64) * stride_c + offs_d[None, :]
        c_out = tl.load(c_ptrs, mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            c_out = c_out.to(tl.float32)
        acc = tl.dot(p.to(c_out.dtype), c_out, acc, input_precision=INPUT_PRECISION)

    acc = acc * tl.load(GRAD_FACTOR)
    out_ptrs = D_ROWS_PART + (pid_s * M + offs_m[:, None]).to(tl.int64) * D + offs_d[None, :]
    tl.store(out_ptrs, acc, mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _guided_lse_backward_cols_kernel(
    R, C, GR, GC, SHIFT, THRESH, LSE_REF, W_NORM, GRAD_FACTOR, D_COLS_PART,
    M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc, row_start, scale, tiles_per_split,
    PROTECT: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):  # fmt: skip
    """D_COLS_PART[split, c, d] = grad_factor · Σ_{i in split} P̂_ic · R[i, d], on transposed tiles."""
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
        shift = tl.load(SHIFT + offs_m, mask=row_mask, other=0.0)
        threshold = tl.load(THRESH + offs_m, mask=row_mask, other=0.0)
        lse = tl.load(LSE_REF + offs_m, mask=row_mask, other=float("-inf"))
        w = tl.load(W_NORM + offs_m, mask=row_mask, other=0.0)
        row_live = (w != 0.0) & (lse != float("-inf"))
        lse = tl.where(row_live, lse, 0.0)

        s_t = _score_tile(C, R, offs_n, offs_m, col_mask, row_mask, stride_c, stride_r, D,
                          BLOCK_N, BLOCK_M, BLOCK_K, UPCAST, INPUT_PRECISION)  # fmt: skip
        gamma_t = _score_tile(GC, GR, offs_n, offs_m, col_mask, row_mask, stride_gc, stride_gr, DG,
                              BLOCK_N, BLOCK_M, BLOCK_KG, UPCAST, GUIDE_PRECISION)  # fmt: skip
        logit_t = _guided_logits(s_t, gamma_t, shift[None, :], threshold[None, :], g[None, :], offs_n[:, None], N,
                                 scale, PROTECT)  # fmt: skip
        p_t = tl.where(row_live[None, :], tl.exp2((logit_t - lse[None, :]) * _LOG2E), 0.0) * w[None, :]
        r_ptrs = R + offs_m[:, None].to(tl.int64) * stride_r + offs_d[None, :]
        r_out = tl.load(r_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST:
            r_out = r_out.to(tl.float32)
        acc = tl.dot(p_t.to(r_out.dtype), r_out, acc, input_precision=INPUT_PRECISION)

    acc = acc * tl.load(GRAD_FACTOR)
    out_ptrs = D_COLS_PART + (pid_s * N + offs_n[:, None]).to(tl.int64) * D + offs_d[None, :]
    tl.store(out_ptrs, acc, mask=col_mask[:, None] & d_mask[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------------------------------------------


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def _prepare(rows, cols, guide_rows, guide_cols, shift, threshold):
    for x in (rows, cols, guide_rows, guide_cols):
        if x.dim() != 2 or x.device != rows.device:
            raise ValueError("guided segment: 2-D operands on one device expected")
    if cols.dtype != rows.dtype or guide_cols.dtype != guide_rows.dtype:
        raise TypeError("guided segment: rows/cols and guide rows/cols must share their dtypes")
    (m, d), (n, d_cols) = rows.shape, cols.shape
    if d != d_cols or guide_rows.shape[1] != guide_cols.shape[1]:
        raise ValueError("guided segment: feature sizes of rows and columns differ")
    if guide_rows.shape[0] != m or guide_cols.shape[0] != n:
        raise ValueError("guided segment: the guide operands must have the rows' and columns' counts")
    for name, vec in (("shift", shift), ("threshold", threshold)):
        if vec.dtype != torch.float32 or vec.shape != (m,):
            raise ValueError(f"guided segment: {name} must be float32 of shape ({m},)")
    triton_available_for(rows)
    return (*map(_unit_stride, (rows, cols, guide_rows, guide_cols)), shift.contiguous(), threshold.contiguous())


def _options(rows: torch.Tensor, guide_rows: torch.Tensor, protect: bool, dg: int) -> dict:
    upcast = rows.device.type == "cpu" and (rows.dtype == torch.bfloat16 or guide_rows.dtype == torch.bfloat16)
    return {
        "PROTECT": bool(protect),
        "UPCAST": upcast,
        "INPUT_PRECISION": _input_precision(rows.dtype),
        "GUIDE_PRECISION": _input_precision(guide_rows.dtype),
        "BLOCK_KG": min(64, max(16, triton.next_power_of_2(dg))),
    }


def guided_lse_forward(
    rows, cols, guide_rows, guide_cols, shift, threshold, *, scale: float, row_start: int, protect: bool,
    n_split: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """lse (M,) fp32 of one guided segment (see the module docstring); -inf for a fully masked row."""
    rows, cols, guide_rows, guide_cols, shift, threshold = _prepare(
        rows, cols, guide_rows, guide_cols, shift, threshold
    )
    (m, d), n, dg = rows.shape, cols.shape[0], guide_rows.shape[1]
    blocks = _blocks(m, n, d)
    del blocks["BLOCK_DO"]
    row_tiles = triton.cdiv(m, blocks["BLOCK_M"])
    n_split, tiles_per_split = _split(triton.cdiv(n, blocks["BLOCK_N"]), row_tiles, rows.device, n_split)
    lse_part = torch.empty((m, n_split), dtype=torch.float32, device=rows.device)
    _guided_lse_forward_kernel[(row_tiles, n_split)](
        rows, cols, guide_rows, guide_cols, shift, threshold, lse_part, m, n, d, dg, rows.stride(0), cols.stride(0),
        guide_rows.stride(0), guide_cols.stride(0), row_start, float(scale), tiles_per_split,
        **_options(rows, guide_rows, protect, dg), **blocks, num_warps=4, num_stages=3,
    )  # fmt: skip
    return lse_part[:, 0] if n_split == 1 else torch.logsumexp(lse_part, dim=1)


def guided_lse_backward(
    rows, cols, guide_rows, guide_cols, shift, threshold, lse_ref, row_weight, *, scale: float, row_start: int,
    protect: bool, n_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(d_rows (M, D), d_cols (N, D)) fp32: scale·P @ C and scale·Pᵀ @ R with P_ic = w_i·exp(L_ic - lse_ref_i)."""
    rows, cols, guide_rows, guide_cols, shift, threshold = _prepare(
        rows, cols, guide_rows, guide_cols, shift, threshold
    )
    (m, d), n, dg = rows.shape, cols.shape[0], guide_rows.shape[1]
    w_max = row_weight.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    w_norm = (row_weight / w_max).float().contiguous()
    grad_factor = (w_max * float(scale)).float().reshape(1)
    lse_ref = lse_ref.float().contiguous()

    blocks = _blocks(m, n, d)
    options = _options(rows, guide_rows, protect, dg)
    num_warps = 8 if blocks["BLOCK_DO"] > 128 else 4
    row_tiles, col_tiles = triton.cdiv(m, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"])
    d_tiles = triton.cdiv(d, blocks["BLOCK_DO"])
    common = (m, n, d, dg, rows.stride(0), cols.stride(0), guide_rows.stride(0), guide_cols.stride(0), row_start,
              float(scale))  # fmt: skip
    operands = (rows, cols, guide_rows, guide_cols, shift, threshold, lse_ref, w_norm, grad_factor)

    split_r, tiles_r = _split(col_tiles, row_tiles * d_tiles, rows.device, n_split)
    d_rows = torch.empty((split_r, m, d), dtype=torch.float32, device=rows.device)
    _guided_lse_backward_rows_kernel[(row_tiles, d_tiles, split_r)](
        *operands, d_rows, *common, tiles_r, **options, **blocks, num_warps=num_warps, num_stages=2
    )
    split_c, tiles_c = _split(row_tiles, col_tiles * d_tiles, rows.device, n_split)
    d_cols = torch.empty((split_c, n, d), dtype=torch.float32, device=rows.device)
    _guided_lse_backward_cols_kernel[(col_tiles, d_tiles, split_c)](
        *operands, d_cols, *common, tiles_c, **options, **blocks, num_warps=num_warps, num_stages=2
    )
    return (d_rows[0] if split_r == 1 else d_rows.sum(0)), (d_cols[0] if split_c == 1 else d_cols.sum(0))
