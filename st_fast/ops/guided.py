"""The guided (GISTEmbed) variant of the fused contrastive op: GISTEmbedLoss without the (B, N, D) tensors.

Notation (sentence-transformers 6.2 GISTEmbedLoss / CachedGISTEmbedLoss): B local anchors a_i, k candidate columns
c_0 (positives), c_1 .. c_{k-1} (negatives) of W = B·world rows each (gathered), row i of this rank has global index
g = o + i. Primes are the guide's embeddings; every similarity is the cosine with each norm clamped at 1e-8.
The logits of row i are, concatenated in one softmax and divided by the temperature T:

=====  ===========================  ====================  =================================================
block  trainable similarity          guide similarity      entries masked to -inf
=====  ===========================  ====================  =================================================
AP     s(a_i, c_0[col]), W cols     s(a'_i, c'_0[col])    guide > threshold_i, except col == g (the target)
AA     s(a_i, a_j), B local cols    s(a'_i, a'_j)         guide > threshold_i  (contrast_anchors)
PP     s(c_0[g], c_0[col]), W cols  s(c'_0[g], c'_0[col])  guide > threshold_i  (contrast_positives)
AN_j   s(a_i, c_j[col]), W cols     s(a'_i, c'_j[col])    guide > threshold_i  (each negative column j >= 1)
=====  ===========================  ====================  =================================================

    t_i = s(a'_i, c'_0[g]);  threshold_i = t_i - margin (absolute) or t_i - |t_i|·margin (relative)
    loss = mean_i [ logsumexp_row_i(logits / T) - s(a_i, c_0[g]) / T ]

Computation (``torch`` and ``native`` backends): for each chunk of rows, the trainable and the guide GEMMs of every
block, the guide masks applied to the trainable scores in place (-inf), then the row kernel of the MNRL op
(PyTorch or native C++/CUDA) with one joint partition at scale 1/T: segment 0 is ``[AP | AN_1 | ..]`` (kind Q2D,
positive at column g), AA and PP are kind D2Q segments (nothing masked by the kernel). AA is laid out W wide with
the local anchors at columns o .. o+B and -inf elsewhere, so that the kernel's own-column index g stays inside the
row. Each row is shifted by its positive score first (the softmax CE is invariant; it keeps the loss free of the
cancellation log Z - positive logit at logits of magnitude 1/T). Then ``d_rows += G @ columns`` and
``d_columns += Gᵀ @ rows`` per block. Memory beyond the inputs: the fp32 gradients and one chunk of scores and
guide scores (chunk x (k+2)·W), never B x N at once, never (B, N, D).

The ``triton`` backend (:mod:`st_fast.ops.triton_guided`) computes the guide tile next to each score tile inside
the kernels and never stores either; it is selected only by ``backend="triton"``: until it has been measured and
checked on a GPU, ``auto`` takes native (or torch) on every device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from st_fast.ops.backends import BACKENDS, native_available
from st_fast.ops.chunked import RowKernel, chunk_rows_for_budget
from st_fast.ops.layout import HardnessKind, SegmentKind
from st_fast.ops.learnable_scale import as_scale_gradient, learnable, scalar_value, score_coefficient_sum
from st_fast.ops.row_kernel_torch import torch_row_kernel
from st_fast.ops.spec import ContrastiveSpec, compute_dtype

MARGIN_STRATEGIES = ("absolute", "relative")
COSINE_EPS = 1e-8  # nn.CosineSimilarity's clamp of each norm


@dataclass(frozen=True)
class GuidedSpec:
    """Configuration of GISTEmbedLoss: temperature, false-negative filter and the optional blocks."""

    temperature: float
    margin_strategy: str
    margin: float
    contrast_anchors: bool
    contrast_positives: bool
    mask_dtype: torch.dtype = torch.float32  # the dtype stock computes guide similarities in (see StockGuide)

    def __post_init__(self) -> None:
        if self.margin_strategy not in MARGIN_STRATEGIES:
            raise ValueError("margin_strategy must be 'absolute' or 'relative'.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    def row_spec(self) -> ContrastiveSpec:
        """The row kernel's view: one joint softmax at scale 1/T over [AP | AN..], AA?, PP? (no hardness)."""
        kinds = (SegmentKind.Q2D,) + (SegmentKind.D2Q,) * (int(self.contrast_anchors) + int(self.contrast_positives))
        return ContrastiveSpec(kinds, True, 1.0 / self.temperature, HardnessKind.NONE, 0.0)

    def thresholds(self, positive_guide: torch.Tensor) -> torch.Tensor:
        """(n, 1) guide similarity above which an entry is a false negative, computed as stock does (the same
        operations on the same dtype, so that the masks are the same)."""
        t = positive_guide[:, None]
        return t - self.margin if self.margin_strategy == "absolute" else t - t.abs() * self.margin


@dataclass(frozen=True)
class StockGuide:
    """The false-negative decisions exactly as stock makes them.

    Stock compares ``nn.CosineSimilarity(dim=-1)`` of the raw guide embeddings (normalize, multiply and sum in
    ``mask_dtype``, e.g. bfloat16: every product rounded) with a threshold computed from such a similarity. The
    driver computes the guide similarities with GEMMs of normalized operands instead; they differ from stock's by
    less than :meth:`tolerance`, so only the entries that close to their threshold (ties such as duplicate texts at
    margin 0 among them) are recomputed here the stock way, pair by pair (elementwise: bitwise equal to stock's
    broadcast computation), and the thresholds are computed from stock's own diagonal similarities.
    """

    anchors: torch.Tensor  # (B, D') raw guide embeddings of the local anchors
    candidates: torch.Tensor  # (k·W, D') raw guide embeddings of the candidate columns
    spec: GuidedSpec

    def similarity(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Stock's guide similarity of each pair (rows[p], columns[p]), in ``mask_dtype`` (as autocast would cast)."""
        dtype = self.spec.mask_dtype
        return F.cosine_similarity(rows.to(dtype), columns.to(dtype), dim=-1, eps=COSINE_EPS)

    def tolerance(self, compute_dtype: torch.dtype) -> float:
        """A bound on |GEMM similarity - stock similarity| for unit vectors: stock's rounding (normalization,
        each product and the result: below 4 eps of ``mask_dtype``) plus both summations (2·D' eps of the GEMM's
        dtype)."""
        return 4 * torch.finfo(self.spec.mask_dtype).eps + 2 * self.anchors.shape[1] * torch.finfo(compute_dtype).eps

    def false_negatives(
        self, guide: torch.Tensor, threshold: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor
    ) -> torch.Tensor:
        """guide (n, m) GEMM similarities of raw rows (n, D') x columns (m, D'), threshold (n, 1) in mask_dtype ->
        stock's mask ``similarity > threshold``."""
        limit = threshold.to(guide.dtype)
        mask = guide > limit
        near = ((guide - limit).abs() <= self.tolerance(guide.dtype)).nonzero(as_tuple=True)
        if near[0].numel():
            mask[near] = self.similarity(rows[near[0]], columns[near[1]]) > threshold[near[0], 0]
        return mask


@dataclass
class GuidedLossAndGrad:
    """Mean loss over the local rows (0-dim) and, when requested, the gradients of both trainable operands."""

    loss: torch.Tensor
    grad_anchors: torch.Tensor | None
    grad_candidates: torch.Tensor | None


def guided_loss_and_grad(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    anchors_guide: torch.Tensor,
    candidates_guide: torch.Tensor,
    spec: GuidedSpec,
    row_offset: int,
    width: int,
    row_kernel: RowKernel,
    stock_guide: StockGuide,
    *,
    need_grad: bool,
    chunk_bytes: int | None = None,
) -> GuidedLossAndGrad:
    """The chunked driver. anchors (B, D) and candidates (k·W, D) normalized, column j at rows j·W .. (j+1)·W;
    the guide's normalized embeddings of the same row counts (their own dimension); ``width`` = W; the masks are
    decided as stock decides them (``stock_guide``)."""
    batch_size, offset = anchors.shape[0], row_offset
    positives, positives_guide = candidates[:width], candidates_guide[:width]
    raw_anchors, raw_candidates = stock_guide.anchors, stock_guide.candidates
    raw_positives = raw_candidates[:width]
    row_spec = spec.row_spec()
    segment_columns = [candidates.shape[0]] + [width] * (len(row_spec.kinds) - 1)
    chunk = chunk_rows_for_budget(batch_size, 2 * sum(segment_columns), anchors.device, chunk_bytes)
    buffers = [torch.empty(chunk, n, dtype=anchors.dtype, device=anchors.device) for n in segment_columns]
    guide_buffer = torch.empty(chunk, candidates.shape[0], dtype=anchors_guide.dtype, device=anchors.device)
    grad_anchors = torch.zeros_like(anchors) if need_grad else None
    grad_candidates = torch.zeros_like(candidates) if need_grad else None
    loss_sum = torch.zeros((), dtype=anchors.dtype, device=anchors.device)
    local_anchors = slice(offset, offset + batch_size)  # columns of the local anchors in the W-wide AA segment
    for begin in range(0, batch_size, chunk):
        n = min(chunk, batch_size - begin)
        rows, global_rows = slice(begin, begin + n), slice(offset + begin, offset + begin + n)
        local_index = torch.arange(n, device=anchors.device)
        diagonal = (local_index, local_index + (offset + begin))  # (chunk row, its target column)
        # [AP | AN_1 | ..]: the positive column offset + begin + r is never masked
        ap_an = torch.matmul(anchors[rows], candidates.T, out=buffers[0][:n])
        guide = torch.matmul(anchors_guide[rows], candidates_guide.T, out=guide_buffer[:n])
        threshold = spec.thresholds(stock_guide.similarity(raw_anchors[rows], raw_positives[global_rows]))
        false_negative = stock_guide.false_negatives(guide, threshold, raw_anchors[rows], raw_candidates)
        false_negative[diagonal] = False
        ap_an.masked_fill_(false_negative, float("-inf"))
        segments, x = [ap_an], 1
        if spec.contrast_anchors:
            aa = buffers[x][:n]
            aa[:, :offset] = float("-inf")
            aa[:, offset + batch_size :] = float("-inf")
            block = aa[:, local_anchors]
            block.copy_(torch.matmul(anchors[rows], anchors.T))
            guide = torch.matmul(anchors_guide[rows], anchors_guide.T, out=guide_buffer[:n, :batch_size])
            masked = stock_guide.false_negatives(guide, threshold, raw_anchors[rows], raw_anchors)
            block.masked_fill_(masked, float("-inf"))
            segments.append(aa)
            x += 1
        if spec.contrast_positives:
            pp = torch.matmul(positives[global_rows], positives.T, out=buffers[x][:n])
            guide = torch.matmul(positives_guide[global_rows], positives_guide.T, out=guide_buffer[:n, :width])
            masked = stock_guide.false_negatives(guide, threshold, raw_positives[global_rows], raw_positives)
            pp.masked_fill_(masked, float("-inf"))
            segments.append(pp)
        # Shift each row by its positive score: the loss and its gradient are invariant, and the row kernel's
        # loss = log Z - positive logit then no longer cancels two large numbers (logits reach 1/T = 100).
        positive = ap_an[diagonal].clone()[:, None]
        for segment in segments:
            segment.sub_(positive)
        grad_scale = 1.0 / batch_size if need_grad else None
        loss_sum += row_kernel(segments, row_spec, offset + begin, width, grad_scale).sum()
        if not need_grad:
            continue
        # the row kernel left the gradient coefficients d(loss)/d(score) in the segments
        grad_anchors[rows].addmm_(segments[0], candidates)
        grad_candidates.addmm_(segments[0].T, anchors[rows])
        x = 1
        if spec.contrast_anchors:
            coefficients = segments[x][:, local_anchors]
            grad_anchors[rows].addmm_(coefficients, anchors)
            grad_anchors.addmm_(coefficients.T, anchors[rows])
            x += 1
        if spec.contrast_positives:
            grad_candidates[global_rows].addmm_(segments[x], positives)
            grad_candidates[:width].addmm_(segments[x].T, positives[global_rows])
    return GuidedLossAndGrad(loss_sum / batch_size, grad_anchors, grad_candidates)


class ChunkedGuidedBackend:
    """torch / native: the chunked driver above with a row kernel; gradients computed in the forward pass."""

    def __init__(self, row_kernel: RowKernel, stock_guide: StockGuide, chunk_bytes: int | None) -> None:
        self.row_kernel, self.stock_guide, self.chunk_bytes = row_kernel, stock_guide, chunk_bytes

    def forward(self, anchors, candidates, anchors_guide, candidates_guide, spec, row_offset, width, need_grad):
        result = guided_loss_and_grad(
            anchors, candidates, anchors_guide, candidates_guide, spec, row_offset, width, self.row_kernel,
            self.stock_guide, need_grad=need_grad, chunk_bytes=self.chunk_bytes,
        )  # fmt: skip
        return result.loss, result

    def backward(self, state: GuidedLossAndGrad, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return state.grad_anchors * grad_loss, state.grad_candidates * grad_loss


class TritonGuidedBackend:
    """The ``triton`` backend: three guided segments (``[AP | AN..]`` with the target protected, AA, PP) of
    :mod:`st_fast.ops.triton_guided`, joint LSE in torch; the backward recomputes the score and guide tiles.
    Kept for backward: the operands and B-sized fp32 statistics, never a score tile."""

    def forward(self, anchors, candidates, anchors_guide, candidates_guide, spec, row_offset, width, need_grad):
        from st_fast.ops.triton_guided import guided_lse_forward

        segments = _triton_segments(anchors, candidates, anchors_guide, candidates_guide, spec, row_offset, width)
        positive_guide = anchors_guide.float() * candidates_guide[row_offset : row_offset + anchors.shape[0]].float()
        threshold = spec.thresholds(positive_guide.sum(dim=1))[:, 0].contiguous()
        shift = (anchors.float() * candidates[row_offset : row_offset + anchors.shape[0]].float()).sum(dim=1)
        scale = 1.0 / spec.temperature
        lses = torch.stack(
            [
                guided_lse_forward(r, c, gr, gc, shift, threshold, scale=scale, row_start=start, protect=protect)
                for (r, c, gr, gc, start, protect, _) in segments
            ]
        )
        log_z = torch.logsumexp(lses, dim=0)
        state = (anchors, candidates, anchors_guide, candidates_guide, shift, threshold, log_z, spec, row_offset, width)
        return log_z.mean(), state  # loss_i = log Z_i - scale·(positive_i - shift_i) = log Z_i in shifted units

    def backward(self, state, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from st_fast.ops.triton_guided import guided_lse_backward

        anchors, candidates, anchors_guide, candidates_guide, shift, threshold, log_z, spec, offset, width = state
        batch_size, scale = anchors.shape[0], 1.0 / spec.temperature
        grads = {"anchors": torch.zeros(anchors.shape, dtype=torch.float32, device=anchors.device)}
        grads["candidates"] = torch.zeros(candidates.shape, dtype=torch.float32, device=candidates.device)
        row_grad = (grad_loss.float() / batch_size).expand(batch_size).contiguous()
        segments = _triton_segments(anchors, candidates, anchors_guide, candidates_guide, spec, offset, width)
        for rows, cols, guide_rows, guide_cols, start, protect, targets in segments:
            d_rows, d_cols = guided_lse_backward(
                rows, cols, guide_rows, guide_cols, shift, threshold, log_z, row_grad, scale=scale,
                row_start=start, protect=protect,
            )  # fmt: skip
            (row_name, row_slice), (column_name, column_slice) = targets
            grads[row_name][row_slice] += d_rows
            grads[column_name][column_slice] += d_cols
        local = slice(offset, offset + batch_size)
        positive_grad = row_grad[:, None] * scale  # the positive term -scale·<a_i, c_0[g]> / B
        grads["anchors"] -= positive_grad * candidates[local].float()
        grads["candidates"][local] -= positive_grad * anchors.float()
        return grads["anchors"], grads["candidates"]


class FusedGuidedLoss(torch.autograd.Function):
    """anchors (B, D), candidates (k·W, D) -> 0-dim loss; the guide operands are constants (no gradient). The
    backend (chunked torch / native, or triton) computes the loss and the two gradients. ``temperature`` is the
    loss's temperature tensor when it needs a gradient (None otherwise); see :mod:`st_fast.ops.learnable_scale`."""

    @staticmethod
    def forward(
        ctx, anchors, candidates, temperature, anchors_guide, candidates_guide, spec, row_offset, width, backend
    ):  # fmt: skip
        need_grad = any(ctx.needs_input_grad[:3])
        with torch.autocast(anchors.device.type, enabled=False):  # fp32 math whatever the autocast context
            loss, state = backend.forward(
                anchors, candidates, anchors_guide, candidates_guide, spec, row_offset, width, need_grad
            )
        ctx.backend, ctx.state, ctx.spec = backend, state if need_grad else None, spec
        ctx.input_dtypes = (anchors.dtype, candidates.dtype)
        if ctx.needs_input_grad[2]:
            ctx.save_for_backward(anchors, candidates, temperature)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.state is None:
            raise RuntimeError("st_fast fused GIST loss: backward called twice on the same graph")
        state, ctx.state = ctx.state, None
        with torch.autocast(grad_loss.device.type, enabled=False):
            grad_anchors, grad_candidates = ctx.backend.backward(state, grad_loss)
        grad_temperature = None
        if ctx.needs_input_grad[2]:
            anchors, candidates, temperature = ctx.saved_tensors
            total = score_coefficient_sum((anchors, candidates), (grad_anchors, grad_candidates))
            grad_temperature = as_scale_gradient(-total / ctx.spec.temperature, temperature)
        grads = grad_anchors.to(ctx.input_dtypes[0]), grad_candidates.to(ctx.input_dtypes[1])
        return *grads, grad_temperature, *(None,) * 6


def _triton_segments(anchors, candidates, anchors_guide, candidates_guide, spec: GuidedSpec, offset: int, width: int):
    """(rows, cols, guide rows, guide cols, row_start, protect, ((row target, slice), (column target, slice))) of
    each block; row_start is the target column of the first row (protected in [AP | AN..] only)."""
    local, everything = slice(offset, offset + anchors.shape[0]), slice(None)
    segments = [
        (anchors, candidates, anchors_guide, candidates_guide, offset, True,
         (("anchors", everything), ("candidates", everything))),
    ]  # fmt: skip
    if spec.contrast_anchors:
        segments.append(
            (
                anchors,
                anchors,
                anchors_guide,
                anchors_guide,
                0,
                False,
                (("anchors", everything), ("anchors", everything)),
            )
        )
    if spec.contrast_positives:
        segments.append(
            (candidates[local], candidates[:width], candidates_guide[local], candidates_guide[:width], 0, False,
             (("candidates", local), ("candidates", slice(0, width))))
        )  # fmt: skip
    return segments


def resolve_guided_backend(name: str, device: torch.device, dtype: torch.dtype) -> RowKernel | str:
    """The row kernel for ``backend=name`` (torch / native), or ``"triton"``. ``auto``: native when built
    (float32), else torch; float64: torch. (``auto`` does not pick the guided triton kernels yet: they are tested in
    the Triton interpreter only.)"""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "triton":
        if dtype == torch.float64:
            raise TypeError("the triton backend takes float32/float16/bfloat16; use backend='torch' for float64")
        from st_fast.ops.triton_lse import triton_available_for

        triton_available_for(torch.empty(0, device=device))
        return "triton"
    if name == "auto":
        name = "native" if dtype != torch.float64 and native_available(device) else "torch"
    if name == "torch":
        return torch_row_kernel
    if dtype == torch.float64:
        raise TypeError("the native backend computes in float32; use backend='torch' for float64 embeddings")
    if not native_available(device):
        raise RuntimeError(f"the native backend is not available on {device} (see st_fast.native_info())")
    from st_fast.ops.row_kernel_native import native_row_kernel

    return native_row_kernel


def _check(name: str, tensors: Sequence[torch.Tensor], rows: int, reference: torch.Tensor) -> None:
    for column, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} {column}: expected a floating point torch.Tensor")
        if x.dim() != 2 or x.shape[0] != rows or x.shape[1] != reference.shape[1]:
            raise ValueError(f"{name} {column} has shape {tuple(x.shape)}, expected ({rows}, {reference.shape[1]})")
        if x.device != reference.device:
            raise ValueError(f"{name} {column} is on {x.device}, expected {reference.device}")


def _normalized(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x / max(‖x‖, 1e-8) per vector, in ``dtype``: nn.CosineSimilarity up to rounding."""
    return F.normalize(x.to(dtype), p=2, dim=-1, eps=COSINE_EPS).contiguous()


def fused_gist_loss(
    anchors: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    anchors_guide: torch.Tensor,
    candidates_guide: Sequence[torch.Tensor],
    *,
    row_offset: int = 0,
    temperature: float | torch.Tensor = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    mask_dtype: torch.dtype | None = None,
    backend: str = "auto",
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """GISTEmbedLoss of B local anchors against k >= 1 candidate columns of W rows each (gathered across ranks:
    row i's positive is candidates[0][row_offset + i]), guided by the guide's embeddings of the same rows.

    Args:
        anchors: (B, D) trainable anchor embeddings of this rank.
        candidates: k tensors (W, D): the positives, then the negative columns (W = B without gathering).
        anchors_guide, candidates_guide: the guide's embeddings (B, D') and k x (W, D'); no gradient flows to them.
        temperature: a number or a one-element tensor; a tensor that requires grad gets d loss / d temperature.
        mask_dtype: the dtype stock computes the guide similarities in (``nn.CosineSimilarity``'s output dtype: the
            guide's, or float32 under CUDA autocast); default: the guide embeddings' dtype. The torch / native
            backends decide every mask as stock does in that dtype (see :class:`StockGuide`).
        Other arguments as in sentence-transformers' GISTEmbedLoss; ``backend``: ``"auto"`` (native when built,
        else torch), ``"native"``, ``"torch"`` or ``"triton"`` (CUDA, or CPU under TRITON_INTERPRET=1; the Triton
        kernels decide the masks on their float32 tile similarities, so an entry within ~1e-5 of its threshold may
        be decided differently from stock; with a ``mask_dtype`` other than float32 the torch backend computes).
    Returns:
        0-dim loss, float32 (float64 for float64 embeddings); gradients reach ``anchors`` and ``candidates``.
        ``chunk_bytes`` sizes the row chunks of the torch / native backends (default: chunked.DEFAULT_CHUNK_BYTES).
    """
    candidates, candidates_guide = list(candidates), list(candidates_guide)
    if len(candidates) < 1 or len(candidates) != len(candidates_guide):
        raise ValueError("expected k >= 1 candidate columns and as many guide columns")
    if not isinstance(anchors, torch.Tensor) or anchors.dim() != 2 or not isinstance(anchors_guide, torch.Tensor):
        raise ValueError("anchor embeddings must be 2-D tensors (batch, dim)")
    _check("anchors", [anchors], anchors.shape[0], anchors)
    _check("guide anchors", [anchors_guide], anchors.shape[0], anchors_guide)
    batch_size, width = anchors.shape[0], candidates[0].shape[0]
    _check("candidate column", candidates, width, anchors)
    _check("guide candidate column", candidates_guide, width, anchors_guide)
    if batch_size == 0 or row_offset < 0 or row_offset + batch_size > width:
        raise ValueError(f"local rows [{row_offset}, {row_offset + batch_size}) are outside the {width} candidate rows")
    guide_dtype = compute_dtype(anchors_guide.dtype)
    spec = GuidedSpec(
        scalar_value(temperature), margin_strategy, scalar_value(margin), bool(contrast_anchors),
        bool(contrast_positives),
        anchors_guide.dtype if mask_dtype is None else mask_dtype,
    )  # fmt: skip
    dtype = compute_dtype(anchors.dtype)
    row_kernel = resolve_guided_backend(backend, anchors.device, dtype)
    if row_kernel == "triton" and spec.mask_dtype != torch.float32:
        row_kernel = torch_row_kernel  # the Triton kernels decide the masks in float32
    operand_dtype = anchors.dtype if row_kernel == "triton" else dtype
    anchor_operand = _normalized(anchors, dtype).to(operand_dtype)
    candidate_operand = _normalized(torch.cat(candidates, dim=0), dtype).to(operand_dtype)
    with torch.no_grad():
        anchor_guide = _normalized(anchors_guide.detach(), guide_dtype)
        candidate_guide = _normalized(torch.cat([c.detach() for c in candidates_guide], dim=0), guide_dtype)
    if row_kernel == "triton":
        guide_operand_dtype = anchors_guide.dtype if anchors_guide.dtype != torch.float64 else torch.float32
        backend = TritonGuidedBackend()
    else:  # the guide's similarities in its own compute dtype (a float64 guide stays float64, as in stock)
        guide_operand_dtype = guide_dtype
        stock_guide = StockGuide(anchors_guide.detach(), torch.cat([c.detach() for c in candidates_guide]), spec)
        backend = ChunkedGuidedBackend(row_kernel, stock_guide, chunk_bytes)
    temperature_input = temperature if learnable(temperature) else None
    return FusedGuidedLoss.apply(
        anchor_operand, candidate_operand, temperature_input, anchor_guide.to(guide_operand_dtype),
        candidate_guide.to(guide_operand_dtype), spec, row_offset, width, backend,
    )  # fmt: skip
