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
* Backward: one kernel launched twice, no atomics (deterministic, no contention), each program computing every
  score tile it visits once: for dR (COLUMNS off) a program owns a row tile and a D window and loops over column
  tiles accumulating dR = scale·P @ C; for dC (COLUMNS on) it owns a column tile and a D window and loops over row
  tiles accumulating dC = scale·Pᵀ @ R, computing the transposed tile Sᵀ = C @ Rᵀ directly. The score tile's dots
  loop over all of D in BLOCK_K chunks; its P tile is then multiplied into the whole window, held as two fp32
  accumulators (a power of two BLOCK_DO and a power-of-two tail BLOCK_DT, so D = 384 and 768 are not padded).
  The window is all of D up to D = 1024 (the launcher's per-D tile table keeps it in registers without spills at
  sm_90); wider D is split into windows across programs, each recomputing the score tiles. A third grid axis
  splits the loop (columns, resp. rows) when the first two do not fill the GPU; the (n_split, ·, D) fp32
  partials are summed by torch. Cost: 4·M·N·D FLOPs per launch, 8·M·N·D in all (+ 4·M·N·D' guided), for
  D <= 1024 ((ceil(D / 1024) + 1)·2·M·N·D per launch beyond). A single launch accumulating dR with fp32 atomics
  (or dC: each program would own a row tile, compute each score tile once in all, and add its Pᵀ @ R into the
  column tiles' rows) would cost 6·M·N·D, a quarter less, but with a nondeterministic summation order and all
  row-tile programs hitting the same column-tile rows at once; two launches chosen for determinism, not measured.
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


_OWN_POSITIVE = tl.constexpr(int(SegmentKind.OWN_POSITIVE))
_OWN_MASKED = tl.constexpr(int(SegmentKind.OWN_MASKED))
_PLAIN = tl.constexpr(int(SegmentKind.PLAIN))
_OWN_GROUP_MASKED = tl.constexpr(int(SegmentKind.OWN_GROUP_MASKED))
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
    a_rows = a_ptr + offs_a.to(tl.int64) * stride_a  # row base pointers (BLOCK_A,)
    b_rows = b_ptr + offs_b.to(tl.int64) * stride_b  # (BLOCK_B,)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_mask = (k0 + offs_k) < D
        a = tl.load(a_rows[:, None] + (k0 + offs_k)[None, :], mask=mask_a[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_rows[None, :] + (k0 + offs_k)[:, None], mask=k_mask[:, None] & mask_b[None, :], other=0.0)  # Bᵀ
        if UPCAST:  # bf16 under the interpreter: compute in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
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
    if KIND == _OWN_POSITIVE:
        if HARDNESS == _IN_BATCH:  # other rows' positives and negatives
            logit = tl.where((c % width) != g, logit + s * alpha, logit)
        elif HARDNESS == _HARD:  # the row's own hard negatives
            logit = tl.where(((c % width) == g) & (c >= width), logit + s * alpha, logit)
        elif HARDNESS == _ALL:  # everything but the positive
            logit = tl.where(c != g, logit + s * alpha, logit)
        masked = c >= N
    elif KIND == _OWN_MASKED:  # the row vector itself (MNRL's query_to_query, GIST's AA / PP blocks)
        masked = (c == g) | (c >= N)
    elif KIND == _OWN_GROUP_MASKED:  # the row's own positive and hard negatives (MNRL's doc_to_doc)
        masked = ((c % width) == g) | (c >= N)
    else:  # PLAIN: nothing masked
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
    R, C, GR, GC, SHIFT, THRESH, LABELS, offs_m, offs_n, M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc,
    row_start, width, scale, alpha,
    KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, PROTECT: tl.constexpr, LABELED: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr, TRANSPOSED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
):  # fmt: skip
    """Logits L of the tile of rows offs_m x columns offs_n (transposed when TRANSPOSED).

    Without GUIDED: :func:`_segment_logits` of the score tile. With GUIDED: the same of the shifted scores
    s - shift_i, then -inf where the guide tile γ = GR·GCᵀ exceeds threshold_i, except at the target column c == g
    when PROTECT. With LABELED (mask_duplicates, st_fast/ops/layout.py): -inf where the column's label equals the
    row's reference label LABELS[g] and c != g (LABELS: the labels of the N columns, one load per column tile).
    Tail rows and columns (offs >= M, N) have zero scores; tail columns are masked.
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
    if LABELED:
        column_labels = _per_column(tl.load(LABELS + offs_n, mask=col_mask, other=-1), TRANSPOSED)
        row_labels = _per_row(tl.load(LABELS + row_start + offs_m, mask=row_mask, other=-2), TRANSPOSED)
        logit = tl.where((column_labels == row_labels) & (c != g), float("-inf"), logit)
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
    R, C, GR, GC, SHIFT, THRESH, LABELS, LSE_PART,
    M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc, row_start, width, scale, alpha, tiles_per_split,
    KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, PROTECT: tl.constexpr, LABELED: tl.constexpr,
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
            R, C, GR, GC, SHIFT, THRESH, LABELS, offs_m, n0 + tl.arange(0, BLOCK_N), M, N, D, DG, stride_r, stride_c,
            stride_gr, stride_gc, row_start, width, scale, alpha, KIND, HARDNESS, GUIDED, PROTECT, LABELED, UPCAST,
            INPUT_PRECISION, GUIDE_PRECISION, False, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KG,
        )  # fmt: skip
        m_i, l_i = _online_lse_step(m_i, l_i, logit)

    # l_i >= 1 wherever m_i is finite (the max term is e^0); a fully masked row has m_i = -inf, l_i = 0: lse = -inf.
    lse = m_i + tl.log(tl.where(l_i > 0.0, l_i, 1.0))
    tl.store(LSE_PART + offs_m.to(tl.int64) * n_split + pid_s, lse, mask=offs_m < M)


@triton.jit
def _segment_lse_backward_kernel(
    R, C, GR, GC, SHIFT, THRESH, LABELS, LSE_REF, W_NORM, GRAD_FACTOR, OUT_PART,
    M, N, D, DG, stride_r, stride_c, stride_gr, stride_gc, row_start, width, scale, alpha, tiles_per_split,
    KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, PROTECT: tl.constexpr, LABELED: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, GUIDE_PRECISION: tl.constexpr, COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_KG: tl.constexpr,
    BLOCK_DO: tl.constexpr, BLOCK_DT: tl.constexpr,
):  # fmt: skip
    """One owned tile's gradient over a D window of BLOCK_DO + BLOCK_DT columns (all of D for D <= the launcher's
    window), summed over the other operand's tiles of split pid_s:

    * COLUMNS False (dR): OUT_PART[split, i, d] = grad_factor · Σ_{c in split} P̂_ic · C[c, d] for a row tile;
    * COLUMNS True (dC):  OUT_PART[split, c, d] = grad_factor · Σ_{i in split} P̂_ic · R[i, d] for a column tile,
      on transposed tiles (Sᵀ = C @ Rᵀ is (BLOCK_N, BLOCK_M), so Pᵀ @ R needs no transpose).

    Each score tile is computed once per program (its dot products loop over all of D in BLOCK_K chunks) and its
    P̂ tile is multiplied into the whole window: a power-of-two main part BLOCK_DO and, when BLOCK_DT > 0, a
    power-of-two tail part (D = 384 = 256 + 128, 768 = 512 + 256 without padding to the next power of two), two
    fp32 accumulators held by the program for the whole loop.

    P̂_ic = ŵ_i · exp(L_ic - lse_ref_i) with ŵ = w / max|w| (0 for dead rows and masked entries);
    grad_factor = scale · max|w|, so the sum over splits is dR = scale · P @ C (dC = scale · Pᵀ @ R).
    """
    BLOCK_OWNED: tl.constexpr = BLOCK_N if COLUMNS else BLOCK_M
    BLOCK_LOOP: tl.constexpr = BLOCK_M if COLUMNS else BLOCK_N
    n_owned = N if COLUMNS else M
    n_loop = M if COLUMNS else N
    offs_owned = tl.program_id(0) * BLOCK_OWNED + tl.arange(0, BLOCK_OWNED)
    d_begin = tl.program_id(1) * (BLOCK_DO + BLOCK_DT)
    pid_s = tl.program_id(2)
    offs_d = d_begin + tl.arange(0, BLOCK_DO)
    d_mask = offs_d < D
    acc = tl.zeros((BLOCK_OWNED, BLOCK_DO), dtype=tl.float32)
    if BLOCK_DT > 0:  # the window's tail part
        offs_dt = d_begin + BLOCK_DO + tl.arange(0, BLOCK_DT)
        dt_mask = offs_dt < D
        acc_t = tl.zeros((BLOCK_OWNED, BLOCK_DT), dtype=tl.float32)

    loop_begin = pid_s * tiles_per_split * BLOCK_LOOP
    loop_end = tl.minimum(n_loop, loop_begin + tiles_per_split * BLOCK_LOOP)
    for loop0 in range(loop_begin, loop_end, BLOCK_LOOP):
        offs_loop = loop0 + tl.arange(0, BLOCK_LOOP)
        offs_m = offs_loop if COLUMNS else offs_owned
        offs_n = offs_owned if COLUMNS else offs_loop
        logit = _logit_tile(
            R, C, GR, GC, SHIFT, THRESH, LABELS, offs_m, offs_n, M, N, D, DG, stride_r, stride_c, stride_gr,
            stride_gc, row_start, width, scale, alpha, KIND, HARDNESS, GUIDED, PROTECT, LABELED, UPCAST,
            INPUT_PRECISION, GUIDE_PRECISION, COLUMNS, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_KG,
        )  # fmt: skip
        p = _p_tile(LSE_REF, W_NORM, logit, offs_m, M, COLUMNS)  # (BLOCK_OWNED, BLOCK_LOOP)
        other = R if COLUMNS else C  # the operand the owned gradient is a product with
        stride_other = stride_r if COLUMNS else stride_c
        loop_mask = offs_loop < n_loop
        acc = _accumulate_p_product(acc, p, other, offs_loop, loop_mask, stride_other, offs_d, d_mask,
                                    UPCAST, INPUT_PRECISION)  # fmt: skip
        if BLOCK_DT > 0:
            acc_t = _accumulate_p_product(acc_t, p, other, offs_loop, loop_mask, stride_other, offs_dt, dt_mask,
                                          UPCAST, INPUT_PRECISION)  # fmt: skip

    grad_factor = tl.load(GRAD_FACTOR)
    out_rows = (pid_s * n_owned + offs_owned[:, None]).to(tl.int64) * D
    owned_mask = (offs_owned < n_owned)[:, None]
    tl.store(OUT_PART + out_rows + offs_d[None, :], acc * grad_factor, mask=owned_mask & d_mask[None, :])
    if BLOCK_DT > 0:
        tl.store(OUT_PART + out_rows + offs_dt[None, :], acc_t * grad_factor, mask=owned_mask & dt_mask[None, :])
