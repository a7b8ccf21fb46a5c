"""What the GIST op computes: the loss configuration, the false-negative decisions as stock takes them, one call's
problem and the checks on its inputs.

Notation (sentence-transformers 6.2 GISTEmbedLoss / CachedGISTEmbedLoss): B local anchors a_i, k candidate columns
c_0 (positives), c_1 .. c_{k-1} (negatives) of W = B·world rows each (gathered), row i of this rank has global index
g = o + i. Primes are the guide's embeddings; every similarity is the cosine with each norm clamped at 1e-8.
The logits of row i are, concatenated in one softmax and divided by the temperature T:

=====  ===========================  ====================  =================================================
block  trainable similarity          guide similarity      entries masked to -inf
=====  ===========================  ====================  =================================================
AP     s(a_i, c_0[col]), W cols     s(a'_i, c'_0[col])    guide > threshold_i, except col == g (the target)
AA     s(a_i, a_j), B local cols    s(a'_i, a'_j)         guide > threshold_i  (contrast_anchors); j == i too
                                                           when ``mask_self_negatives``
PP     s(c_0[g], c_0[col]), W cols  s(c'_0[g], c'_0[col])  guide > threshold_i  (contrast_positives); col == g
                                                           too when ``mask_self_negatives``
AN_j   s(a_i, c_j[col]), W cols     s(a'_i, c'_j[col])    guide > threshold_i  (each negative column j >= 1)
=====  ===========================  ====================  =================================================

    t_i = s(a'_i, c'_0[g]);  threshold_i = t_i - margin (absolute) or t_i - |t_i|·margin (relative)
    loss = mean_i [ logsumexp_row_i(logits / T) - s(a_i, c_0[g]) / T ]

``mask_self_negatives``: sentence-transformers 6.3 always masks each row's own entry of the AA and PP blocks
(``aa_sim[rows, rows] = -inf``, ``pp_sim[rows, offset + rows] = -inf``); 6.0-6.2 mask it only through the guide's
threshold, so that a row whose anchor equals its positive (t_i = 1, margin 0) keeps its self-similarity as a
negative. The drop-in losses ask the installed stock class which it does
(:func:`st_fast.losses.self_check.stock_masks_self_negatives`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from st_fast.ops.layout import HardnessKind, SegmentKind
from st_fast.ops.mnrl.spec import ContrastiveSpec

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
    mask_self_negatives: bool = True  # each row's own AA / PP entry is -inf (sentence-transformers >= 6.3)

    loss_label: ClassVar[str] = "fused GIST loss"

    def __post_init__(self) -> None:
        if self.margin_strategy not in MARGIN_STRATEGIES:
            raise ValueError("margin_strategy must be 'absolute' or 'relative'.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    @property
    def self_block_kind(self) -> SegmentKind:
        """The segment kind of the AA and PP blocks, by the kernels' masking rule: the row's own column g masked
        (OWN_MASKED) with ``mask_self_negatives``, else nothing masked but by the guide (PLAIN)."""
        return SegmentKind.OWN_MASKED if self.mask_self_negatives else SegmentKind.PLAIN

    def row_spec(self) -> ContrastiveSpec:
        """The row kernel's view: one joint softmax at scale 1/T over [AP | AN..], AA?, PP? (no hardness)."""
        blocks = int(self.contrast_anchors) + int(self.contrast_positives)
        kinds = (SegmentKind.OWN_POSITIVE,) + (self.self_block_kind,) * blocks
        return ContrastiveSpec(kinds, True, 1.0 / self.temperature, HardnessKind.NONE, 0.0)

    def thresholds(self, positive_guide: torch.Tensor) -> torch.Tensor:
        """(n, 1) guide similarity above which an entry is a false negative, computed as stock does (the same
        operations on the same dtype, so that the masks are the same)."""
        t = positive_guide[:, None]
        return t - self.margin if self.margin_strategy == "absolute" else t - t.abs() * self.margin

    def scale_gradient(self, score_coefficient_sum: torch.Tensor) -> torch.Tensor:
        """d loss / d T from Σ C⊙S (:mod:`st_fast.ops.learnable_scale`): logits = S / T, so -Σ C⊙S / T."""
        return -score_coefficient_sum / self.temperature


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
        stock's mask ``similarity > threshold``. The near-threshold entries are found with ``nonzero``: one host sync
        per call on CUDA (the GIST op's only one, tests/ops/test_host_sync.py), the price of stock's exact masks."""
        limit = threshold.to(guide.dtype)
        mask = guide > limit
        near = ((guide - limit).abs() <= self.tolerance(guide.dtype)).nonzero(as_tuple=True)
        if near[0].numel():
            mask[near] = self.similarity(rows[near[0]], columns[near[1]]) > threshold[near[0], 0]
        return mask


@dataclass(frozen=True)
class GuidedProblem:
    """One call of the GIST op, as its backends see it besides the two operands anchors (B, D) and candidates
    (k·W, D): the local rows' offset o and the width W, the guide's normalized embeddings (anchors (B, D'),
    candidates (k·W, D'), in the backend's operand dtype) and its raw ones (for :class:`StockGuide`). No gradient
    flows to the guide. ``chunk_bytes`` sizes the row chunks of the chunked backends (default:
    st_fast.ops.chunked.DEFAULT_CHUNK_BYTES)."""

    spec: GuidedSpec
    row_offset: int
    width: int
    anchors_guide: torch.Tensor
    candidates_guide: torch.Tensor
    raw_anchors_guide: torch.Tensor
    raw_candidates_guide: tuple[torch.Tensor, ...]
    chunk_bytes: int | None = None

    def stock_guide(self) -> StockGuide:
        """The mask decisions as stock takes them, on the raw guide embeddings."""
        return StockGuide(self.raw_anchors_guide, torch.cat(self.raw_candidates_guide), self.spec)


def _check(name: str, tensors: Sequence[torch.Tensor], rows: int, reference: torch.Tensor) -> None:
    for column, x in enumerate(tensors):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} {column}: expected a floating point torch.Tensor")
        if x.dim() != 2 or x.shape[0] != rows or x.shape[1] != reference.shape[1]:
            raise ValueError(f"{name} {column} has shape {tuple(x.shape)}, expected ({rows}, {reference.shape[1]})")
        if x.device != reference.device:
            raise ValueError(f"{name} {column} is on {x.device}, expected {reference.device}")


def check_inputs(
    anchors: torch.Tensor,
    candidates: Sequence[torch.Tensor],
    anchors_guide: torch.Tensor,
    candidates_guide: Sequence[torch.Tensor],
    row_offset: int,
) -> None:
    """Clear errors for inputs the op cannot take: anchors (B, D), k >= 1 candidate columns (W, D), the guide's
    embeddings of the same row counts (B, D') and k x (W, D'), floating point, one device per model, B >= 1 and the
    local rows ``row_offset .. row_offset + B`` inside the W candidate rows."""
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
