"""What the MNRL op computes: the loss configuration, one call's problem and the checks on its inputs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from st_fast.ops.layout import DIRECTION_TO_KIND, HARDNESS_TO_KIND, HardnessKind, SegmentKind
from st_fast.ops.learnable_scale import scalar_value

SIMILARITIES = ("cos", "dot")


@dataclass(frozen=True)
class ContrastiveSpec:
    """Configuration of the MultipleNegativesRankingLoss family (sentence-transformers 6.2 §2.1).

    kinds: the selected directions as segment kinds, in the canonical order Q2D, Q2Q, D2Q, D2D.
    joint: one softmax over all segments (``partition_mode="joint"``) or the mean of one LSE per segment.
    scale: logit = scale · similarity (+ hardness penalty alpha · stopgrad(similarity) on Q2D, see layout.py).
    """

    kinds: tuple[SegmentKind, ...]
    joint: bool
    scale: float
    hardness: HardnessKind
    alpha: float

    loss_label: ClassVar[str] = "fused loss"

    @classmethod
    def from_loss_config(
        cls,
        *,
        scale: float,
        directions: Sequence[str] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
    ) -> ContrastiveSpec:
        unknown = set(directions) - set(DIRECTION_TO_KIND)
        if unknown or "query_to_doc" not in directions:
            raise ValueError(f"directions must include 'query_to_doc' and be among {list(DIRECTION_TO_KIND)}")
        if partition_mode not in ("joint", "per_direction"):
            raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
        if hardness_mode not in HARDNESS_TO_KIND:
            raise ValueError(f"unknown hardness_mode {hardness_mode!r}")
        if not scale > 0:
            raise ValueError("Scale must be a positive value.")
        kinds = tuple(sorted({DIRECTION_TO_KIND[d] for d in directions}))
        active = hardness_mode is not None and hardness_strength > 0.0
        return cls(
            kinds=kinds,
            joint=partition_mode == "joint",
            scale=scalar_value(scale),
            hardness=HARDNESS_TO_KIND[hardness_mode] if active else HardnessKind.NONE,
            alpha=scalar_value(hardness_strength) if active else 0.0,
        )

    @property
    def fuses_doc_to_query(self) -> bool:
        """query_to_doc with doc_to_query: the chunked driver derives doc_to_query from the query_to_doc tile's
        columns (the symmetric path of :mod:`st_fast.ops.mnrl.chunked`)."""
        return SegmentKind.PLAIN in self.kinds

    @property
    def needs_query_columns(self) -> bool:
        return SegmentKind.OWN_MASKED in self.kinds or SegmentKind.PLAIN in self.kinds

    def scale_gradient(self, score_coefficient_sum: torch.Tensor) -> torch.Tensor:
        """d loss / d scale from Σ C⊙S (:mod:`st_fast.ops.learnable_scale`): logits = scale · S, so Σ C⊙S / scale."""
        return score_coefficient_sum / self.scale


@dataclass(frozen=True)
class ContrastiveProblem:
    """One call of the MNRL op, as its backends see it besides the two operands queries (W, D) and docs (k·W, D):
    the local rows ``row_offset .. row_offset + batch_size`` and whether the operands are raw embeddings whose
    cosine normalization the backend applies itself (``normalize``). ``chunk_bytes`` sizes the row chunks of the
    chunked backends (default: st_fast.ops.chunked.DEFAULT_CHUNK_BYTES). ``labels``: None, or ``mask_duplicates``'
    text labels (query labels (W,), doc labels (k·W,)), int64 on the operands' device, equal iff the texts are equal
    (see :mod:`st_fast.ops.layout`)."""

    spec: ContrastiveSpec
    row_offset: int
    batch_size: int
    normalize: bool = False
    chunk_bytes: int | None = None
    labels: tuple[torch.Tensor, torch.Tensor] | None = None


def check_embeddings(queries: torch.Tensor, docs: Sequence[torch.Tensor]) -> None:
    """Clear errors for inputs the op cannot take: queries (B, D) and k >= 1 candidate columns, each (B, D),
    one floating dtype and one device, B >= 1."""
    if not isinstance(queries, torch.Tensor) or any(not isinstance(d, torch.Tensor) for d in docs):
        raise TypeError("embeddings must be torch.Tensor objects")
    if len(docs) < 1:
        raise ValueError(f"Expected at least 2 embeddings, got {1 + len(docs)}")
    if queries.dim() != 2:
        raise ValueError(f"anchor embeddings must be 2-D (batch, dim), got shape {tuple(queries.shape)}")
    if queries.shape[0] == 0:
        raise ValueError("empty batch: the anchor embeddings have 0 rows")
    for column, doc in enumerate(docs, start=1):
        if doc.shape != queries.shape:
            raise ValueError(
                f"embedding column {column} has shape {tuple(doc.shape)}, expected {tuple(queries.shape)} "
                "(every column must have the anchors' batch size and dimension)"
            )
        if doc.dtype != queries.dtype:
            raise TypeError(f"embedding column {column} has dtype {doc.dtype}, the anchors have {queries.dtype}")
        if doc.device != queries.device:
            raise ValueError(f"embedding column {column} is on {doc.device}, the anchors are on {queries.device}")
    if not queries.is_floating_point():
        raise TypeError(f"embeddings must be floating point, got {queries.dtype}")


def check_labels(labels: Sequence[torch.Tensor], width: int, columns: int, device: torch.device) -> None:
    """Clear errors for ``mask_duplicates`` labels that do not fit: (query labels (W,), doc labels (k·W,)), int64,
    on the embeddings' device."""
    if len(labels) != 2:
        raise ValueError("labels must be (query labels, doc labels)")
    for what, tensor, count in (("query", labels[0], width), ("doc", labels[1], columns)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.int64 or tuple(tensor.shape) != (count,):
            raise ValueError(f"{what} labels must be an int64 tensor of shape ({count},)")
        if tensor.device != device:
            raise ValueError(f"{what} labels are on {tensor.device}, the embeddings are on {device}")
