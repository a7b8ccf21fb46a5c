"""The Triton kernel family of both fused ops: the log-sum-exp of one score segment and its gradient.

For rows R (M, D), columns C (N, D), row i with global index g = row_start + i and block width W (layout.py):

    s_ic   = <R_i, C_c>                                   (fp32 accumulation)
    L_ic   = scale·s_ic (+ alpha·s_ic where penalized)    (-inf where the kind masks (g, c), or c >= N)
    lse_i  = log Σ_c exp(L_ic)                                               _segment_lse_forward_kernel
    P_ic   = w_i · exp(L_ic - lse_ref_i)                  (0 on masked entries, dead rows)
    dR     = scale · P @ C,   dC = scale · Pᵀ @ R           _segment_lse_backward_kernel (COLUMNS off / on)

With ``GUIDED`` (the GISTEmbed op) the guide's rows GR (M, D') and columns GC (N, D'), a per-row shift h_i and a
per-row threshold t_i enter every tile:

    γ_ic  = <GR_i, GC_c>                                  (fp32 accumulation, recomputed next to s_ic)
    L_ic  = scale·(s_ic - h_i),  also -inf where γ_ic > t_i, except c == g when ``PROTECT`` (the target column)

The shift h (the row's positive score) does not change the gradient; it keeps the statistics small, so that the
loss log Z - positive does not cancel two numbers of magnitude scale. The hardness penalty is a stop-gradient, so
∂L/∂s = scale on every unmasked entry. The M x N score (and guide) matrices are never stored: every kernel
recomputes its tiles from R and C (and GR, GC). Without ``GUIDED`` the guide arguments are not read.

Shared pieces (``@triton.jit`` helpers, each used by every kernel that needs it): the score tile
(:func:`_score_tile`, in either orientation :func:`_oriented_score_tile`), the logits of a tile with the segment's
and the guide's masks (:func:`_logit_tile`), the online log-sum-exp step (:func:`_online_lse_step`), the P-tile
with its rows' backward statistics (:func:`_p_tile`) and its product with an operand tile
(:func:`_accumulate_p_product`). Features are constexpr flags: GUIDED, PROTECT, the segment KIND and HARDNESS, and
TRANSPOSED / COLUMNS for the orientation of the backward's tiles.

Tiling
------
* Score tile: S[a, b] = Σ_k A[a, k]·B[b, k] for a (BLOCK_A, BLOCK_B) tile, looping over D in BLOCK_K chunks into one
  fp32 accumulator with ``tl.dot``. fp32 inputs use ``input_precision="ieee"`` unless
  ``torch.get_float32_matmul_precision()`` allows TF32; fp16/bf16 inputs go to the tensor cores as they are.
  On CPU (``TRITON_INTERPRET=1``) bf16 tiles are upcast to fp32 after the load, because the interpreter computes
  bf16 arithmetic wrongly without an error.
* Forward: grid (row tiles, column splits). Program (m, s) runs an online max / sum-exp over the column
  tiles of split s and writes the partial log-sum-exp of its rows to an (M, n_split) fp32 buffer; torch merges the
  splits with ``logsumexp`` (deterministic). Cost: 2·M·N·D FLOPs (+ 2·M·N·D' guided) and M·N exp2.
* Backward: one kernel launched twice, each launch recomputing its score tiles over the full D, no atomics
  (deterministic, no contention): for dR (COLUMNS off) a program owns (row tile, D-output tile) and loops over column
  tiles accumulating dR = scale·P @ C; for dC (COLUMNS on) it owns (column tile, D-output tile) and loops over row
  tiles accumulating dC = scale·Pᵀ @ R, computing the transposed tile Sᵀ = C @ Rᵀ directly. A third grid axis
  splits the loop
  (columns, resp. rows) when the first two do not fill the GPU; the (n_split, ·, D) fp32 partials are summed by
  torch. Cost: (n_dtiles + 1)·2·M·N·D FLOPs per launch with n_dtiles = ceil(D / BLOCK_DO), i.e. 8·M·N·D in all for
  D <= 128 (16·M·N·D at D = 384). The D-output tile keeps the fp32 accumulator in registers for any D. Chosen over
  one kernel with fp32 atomics for dR (6·M·N·D, but nondeterministic, and all column-tile programs would hit the
  same row tiles at once) for determinism and simplicity; not measured.
* Before the P·C products, P is normalized by max_i |w_i| (so that P ∈ [-1, 1] does not underflow in fp16) and cast
  to the input dtype; the accumulator is multiplied back by scale·max|w| at the end.

All statistics are fp32 and in natural units (the running max is a logit itself, so a single-entry row gets
lse = L exactly); exponentials are exp2((L - max)·log2(e)) (the online softmax of Milakov & Gimelshein 2018, as in
Triton's fused-attention tutorial). A row whose entries are all masked gets lse = -inf (never NaN); rows with w = 0
or lse_ref = -inf contribute exactly zero gradient.
"""

from __future__ import annotations

from st_fast.ops.layout import HardnessKind, SegmentKind

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: str | None = None
except ImportError as _exc:  # the package imports without triton; every launcher raises via triton_available_for

    class _NoTriton:
        """Stand-in for ``triton`` / ``triton.language`` so that the kernel definitions below still parse."""

        constexpr = int

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()  # type: ignore[assignment]
    TRITON_IMPORT_ERROR = str(_exc)


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
# Shared helpers
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
def _oriented_score_tile(
    A_ROWS, A_COLS, offs_m, offs_n, row_mask, col_mask, stride_rows, stride_cols, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """The score tile of rows offs_m x columns offs_n: (BLOCK_M, BLOCK_N), or with TRANSPOSED its transpose
    (BLOCK_N, BLOCK_M), computed as columns x rows directly (so that Pᵀ @ R needs no transpose)."""
    if TRANSPOSED:
        s = _score_tile(A_COLS, A_ROWS, offs_n, offs_m, col_mask, row_mask, stride_cols, stride_rows, D,
                        BLOCK_N, BLOCK_M, BLOCK_K, UPCAST, INPUT_PRECISION)  # fmt: skip
    else:
        s = _score_tile(A_ROWS, A_COLS, offs_m, offs_n, row_mask, col_mask, stride_rows, stride_cols, D,
                        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION)  # fmt: skip
    return s


@triton.jit
def _per_row(x, TRANSPOSED: tl.constexpr):
    """A per-row vector broadcast against a tile: along its rows, or along its columns when TRANSPOSED."""
    if TRANSPOSED:
        y = x[None, :]
    else:
        y = x[:, None]
    return y


@triton.jit
def _per_column(x, TRANSPOSED: tl.constexpr):
    """A per-column vector broadcast against a tile (the transpose of :func:`_per_row`)."""
    if TRANSPOSED:
        y = x[:, None]
    else:
        y = x[None, :]
    return y


@triton.jit
def _logit_tile(
    R, C, GR, GC, SHIFT, THRESH, offs_m, offs_n, M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc,
    row_start, width, scale, alpha,
    KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, PROTECT: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
):  # fmt: skip
    """Logits L of the tile of rows offs_m x columns offs_n (transposed when TRANSPOSED).

    Without GUIDED: :func:`_segment_logits` of the score tile. With GUIDED: the same of the shifted scores
    s - shift_i, then -inf where the guide tile γ = GR·GCᵀ exceeds threshold_i, except at the target column c == g
    when PROTECT. Tail rows and columns (offs >= M, N) have zero scores; tail columns are masked.
    """
    row_mask = offs_m < M
    col_mask = offs_n < N
    g = _per_row(row_start + offs_m, TRANSPOSED)
    c = _per_column(offs_n, TRANSPOSED)
    s = _oriented_score_tile(R, C, offs_m, offs_n, row_mask, col_mask, stride_r, stride_c, D,
                             BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, INPUT_PRECISION, TRANSPOSED)  # fmt: skip
    if GUIDED:
        s = s - _per_row(tl.load(SHIFT + offs_m, mask=row_mask, other=0.0), TRANSPOSED)
    logit = _segment_logits(s, g, c, N, width, scale, alpha, KIND, HARDNESS)
    if GUIDED:
        gamma = _oriented_score_tile(GR, GC, offs_m, offs_n, row_mask, col_mask, stride_gr, stride_gc, DG,
                                     BLOCK_M, BLOCK_N, BLOCK_KG, UPCAST, GUIDE_PRECISION, TRANSPOSED)  # fmt: skip
        false_negative = gamma > _per_row(tl.load(THRESH + offs_m, mask=row_mask, other=0.0), TRANSPOSED)
        if PROTECT:
            false_negative = false_negative & (c != g)
        logit = tl.where(false_negative, float("-inf"), logit)
    return logit


@triton.jit
def _online_lse_step(m_i, l_i, logit):
    """One column tile of the online log-sum-exp: running max m_i and sum l_i = Σ exp(L - m_i), rescaled when m_i
    grows; a row with nothing unmasked yet keeps m = -inf and is shifted by 0 (no -inf - (-inf) = NaN)."""
    m_new = tl.maximum(m_i, tl.max(logit, axis=1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2((m_i - m_shift) * _LOG2E) + tl.sum(tl.exp2((logit - m_shift[:, None]) * _LOG2E), axis=1)
    return m_new, l_i


@triton.jit
def _p_tile(LSE_REF, W_NORM, logit, offs_m, M, TRANSPOSED: tl.constexpr):
    """P̂ = ŵ·exp(L - lse_ref) of a logit tile whose rows are offs_m (its columns when TRANSPOSED); 0 on dead rows
    (ŵ = 0, lse_ref = -inf, tail rows), which never form L - (-inf)."""
    row_mask = offs_m < M
    lse = tl.load(LSE_REF + offs_m, mask=row_mask, other=float("-inf"))
    w = tl.load(W_NORM + offs_m, mask=row_mask, other=0.0)
    live = (w != 0.0) & (lse != float("-inf"))
    lse = tl.where(live, lse, 0.0)
    p = tl.exp2((logit - _per_row(lse, TRANSPOSED)) * _LOG2E)
    return tl.where(_per_row(live, TRANSPOSED), p, 0.0) * _per_row(w, TRANSPOSED)


@triton.jit
def _accumulate_p_product(
    acc, p, X, offs_x, mask_x, stride_x, offs_d, d_mask, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr
):
    """acc + P̂ @ X[offs_x, offs_d]: P̂ cast to the operand's dtype (it lies in [-1, 1]), fp32 accumulation."""
    x_ptrs = X + offs_x[:, None].to(tl.int64) * stride_x + offs_d[None, :]
    x = tl.load(x_ptrs, mask=mask_x[:, None] & d_mask[None, :], other=0.0)  # (len(offs_x), BLOCK_DO)
    if UPCAST:
        x = x.to(tl.float32)
    return tl.dot(p.to(x.dtype), x, acc, input_precision=INPUT_PRECISION)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _segment_lse_forward_kernel(
    R, C, GR, GC, SHIFT, THRESH, LSE_PART,
    M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc, row_start, width, scale, alpha, tiles_per_split,
    KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, PROTECT: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
):  # fmt: skip
    """LSE_PART[i, split] = log Σ_{c in split} exp(L_ic) for the rows of tile pid_m (-inf if all masked)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(N, n_begin + tiles_per_split * BLOCK_N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        logit = _logit_tile(
            R, C, GR, GC, SHIFT, THRESH, offs_m, n0 + tl.arange(0, BLOCK_N), M, N, D, DG, stride_r, stride_c,
            stride_gr, stride_gc, row_start, width, scale, alpha, KIND, HARDNESS, GUIDED, PROTECT, UPCAST,
            INPUT_PRECISION, GUIDE_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KG,
        )  # fmt: skip
        m_i, l_i = _online_lse_step(m_i, l_i, logit)

    # l_i >= 1 wherever m_i is finite (the max term is e^0); a fully masked row has m_i = -inf, l_i = 0: lse = -inf.
    lse = m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0))
    tl.store(LSE_PART + offs_m.to(tl.int64) * n_split + pid_s, lse, mask=offs_m < M)


@triton.jit
def _segment_lse_backward_kernel(
    R, C, GR, GC, SHIFT, THRESH, LSE_REF, W_NORM, GRAD_FACTOR, OUT_PART,
    M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc, row_start, width, scale, alpha, tiles_per_split,
    KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, PROTECT: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr, COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):  # fmt: skip
    """One (owned tile, D tile) of a gradient, summed over the other operand's tiles of split pid_s:

    * COLUMNS False (dR): OUT_PART[split, i, d] = grad_factor · Σ_{c in split} P̂_ic · C[c, d] for a row tile;
    * COLUMNS True (dC):  OUT_PART[split, c, d] = grad_factor · Σ_{i in split} P̂_ic · R[i, d] for a column tile,
      on transposed tiles (Sᵀ = C @ Rᵀ is (BLOCK_N, BLOCK_M), so Pᵀ @ R needs no transpose).

    P̂_ic = ŵ_i · exp(L_ic - lse_ref_i) with ŵ = w / max|w| (0 for dead rows and masked entries);
    grad_factor = scale · max|w|, so the sum over splits is dR = scale · P @ C (dC = scale · Pᵀ @ R).
    """
    BLOCK_OWNED: tl.constexpr = BLOCK_N if COLUMNS else BLOCK_M
    BLOCK_LOOP: tl.constexpr = BLOCK_M if COLUMNS else BLOCK_N
    n_owned = N if COLUMNS else M
    n_loop = M if COLUMNS else N
    offs_owned = tl.program_id(0) * BLOCK_OWNED + tl.arange(0, BLOCK_OWNED)
    offs_d = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    pid_s = tl.program_id(2)
    d_mask = offs_d < D

    acc = tl.zeros((BLOCK_OWNED, BLOCK_DO), dtype=tl.float32)
    loop_begin = pid_s * tiles_per_split * BLOCK_LOOP
    loop_end = tl.minimum(n_loop, loop_begin + tiles_per_split * BLOCK_LOOP)
    for loop0 in range(loop_begin, loop_end, BLOCK_LOOP):
        offs_loop = loop0 + tl.arange(0, BLOCK_LOOP)
        offs_m = offs_loop if COLUMNS else offs_owned
        offs_n = offs_owned if COLUMNS else offs_loop
        logit = _logit_tile(
            R, C, GR, GC, SHIFT, THRESH, offs_m, offs_n, M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc,
            row_start, width, scale, alpha, KIND, HARDNESS, GUIDED, PROTECT, UPCAST, INPUT_PRECISION,
            GUIDE_PRECISION, COLUMNS, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KG,
        )  # fmt: skip
        p = _p_tile(LSE_REF, W_NORM, logit, offs_m, M, COLUMNS)  # (BLOCK_OWNED, BLOCK_LOOP)
        other = R if COLUMNS else C  # the operand the owned gradient is a product with
        stride_other = stride_r if COLUMNS else stride_c
        acc = _accumulate_p_product(acc, p, other, offs_loop, offs_loop < n_loop, stride_other, offs_d, d_mask,
                                    UPCAST, INPUT_PRECISION)  # fmt: skip

    acc = acc * tl.load(GRAD_FACTOR)
    out_ptrs = OUT_PART + (pid_s * n_owned + offs_owned[:, None]).to(tl.int64) * D + offs_d[None, :]
    tl.store(out_ptrs, acc, mask=(offs_owned < n_owned)[:, None] & d_mask[None, :])
