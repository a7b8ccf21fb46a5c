"""Drop-in GISTEmbedLoss on the guided fused op (st_fast.ops.guided): no (B, N, D) tensors, no B x N scores."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as StockGISTEmbedLoss
from sentence_transformers.util import all_gather_with_grad, batch_to_device, get_rank
from torch import Tensor, nn

from st_fast.ops import BACKENDS
from st_fast.ops.guided import COSINE_EPS, fused_gist_loss

logger = logging.getLogger(__name__)


def validate_guided_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


class FusedGISTMixin:
    """The GIST loss of given embeddings on the fused guided op, and the guide's view of the input features.

    Uses the stock class's own configuration attributes (temperature, margin_strategy, margin, contrast_anchors,
    contrast_positives, gather_across_devices, similarity_fct, must_retokenize, tokenizer, guide); ``backend``
    picks the row kernel.
    """

    backend: str

    def has_fused_similarity(self) -> bool:
        """True for the stock similarity (nn.CosineSimilarity(dim=-1), eps 1e-8), the one the fused op computes."""
        fct = self.similarity_fct
        return isinstance(fct, nn.CosineSimilarity) and fct.dim in (-1,) and fct.eps == COSINE_EPS

    def guide_features(self, sentence_feature: dict[str, Tensor]) -> dict[str, Tensor]:
        """The guide's input for one column: the model's token ids decoded and re-tokenized by the guide (as stock,
        flattened ``cu_seq_lens_q`` batches included), on the guide's device. Call under no_grad."""
        input_ids = sentence_feature["input_ids"]
        if "cu_seq_lens_q" in sentence_feature:
            flat_input_ids = input_ids[0].tolist()
            bounds = sentence_feature["cu_seq_lens_q"].tolist()
            input_ids = [flat_input_ids[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        decoded = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return batch_to_device(self.guide.preprocess(decoded), self.guide.device)

    def gist_loss(
        self, anchors: Tensor, candidates: list[Tensor], anchors_guide: Tensor, candidates_guide: list[Tensor]
    ) -> Tensor:
        """Loss of the local anchors (B, D) against k candidate columns (B, D) each, guided by the guide's
        embeddings; candidates (and their guide embeddings) are gathered across ranks when
        ``gather_across_devices``, anchors stay local (row i's positive at rank·B + i)."""
        offset = 0
        if self.gather_across_devices:
            candidates = [all_gather_with_grad(candidate) for candidate in candidates]
            candidates_guide = [all_gather_with_grad(candidate) for candidate in candidates_guide]
            offset = get_rank() * anchors.shape[0]
        return fused_gist_loss(
            anchors, candidates, anchors_guide, candidates_guide, row_offset=offset, temperature=self.temperature,
            margin_strategy=self.margin_strategy, margin=self.margin, contrast_anchors=self.contrast_anchors,
            contrast_positives=self.contrast_positives, backend=self.backend,
        )  # fmt: skip


def warn_similarity_fallback_once(loss: nn.Module) -> None:
    if getattr(loss, "_st_fast_warned", False):
        return
    loss._st_fast_warned = True
    logger.warning(
        "st_fast %s: similarity_fct=%r is not nn.CosineSimilarity(dim=-1, eps=1e-8); using the stock computation.",
        type(loss).__name__,
        loss.similarity_fct,
    )


class GISTEmbedLoss(FusedGISTMixin, StockGISTEmbedLoss):
    """sentence-transformers' :class:`~sentence_transformers.sentence_transformer.losses.GISTEmbedLoss` computed by
    st_fast's guided fused op: the same loss and gradients without the (B, N, D) broadcast tensors that the stock
    ``nn.CosineSimilarity(a[:, None], b[None])`` materializes and saves, and without any B x N score matrix.

    For anchor a_i with positive p_i (and an optional negative column), guide embeddings a'_i, p'_i, and
    t_i = cos(a'_i, p'_i)::

        logits_i = [cos(a_i, p_*) | cos(a_i, a_*) | cos(p_i, p_*) | cos(a_i, n_*)] / temperature
        entries whose guide similarity exceeds t_i - margin (absolute) or t_i - |t_i|·margin (relative) -> -inf
        (the target cos(a_i, p_i) never), loss = mean_i CE(logits_i, target i)

    with the anchor-anchor and positive-positive blocks only when ``contrast_anchors`` / ``contrast_positives``.

    Args:
        Same as the stock class (model, guide, temperature, margin_strategy, margin, contrast_anchors,
        contrast_positives, gather_across_devices), plus
        backend: ``"auto"`` (native C++/CUDA row kernel with chunked GEMMs when built, else PyTorch),
            ``"native"``, ``"torch"`` or ``"triton"`` (guided Triton kernels that mask inside the score tiles; opt-in:
            ``auto`` does not pick them before they have been checked on a GPU).

    The guide embedding and re-tokenization are the stock ones (same ``embed_columns`` calls, in the same order).
    Cosine similarities normalize each vector with its norm clamped at 1e-8 (nn.CosineSimilarity's eps), which
    equals stock up to rounding. The loss is float32 (float64 for float64 embeddings), also under autocast.

    Example::

        from st_fast.losses import GISTEmbedLoss

        loss = GISTEmbedLoss(model, guide)  # instead of sentence_transformers' class
    """

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = validate_guided_backend(backend)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        if not self.has_fused_similarity():
            warn_similarity_fallback_once(self)
            return super().forward(sentence_features, labels)
        sentence_features = list(sentence_features)
        # as stock: the guide runs on shallow copies (the model fills the dicts it is given)
        guide_features = [dict(sentence_feature) for sentence_feature in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = [self.guide_features(sentence_feature) for sentence_feature in sentence_features]
            guide_embeddings = embed_columns(self.guide, guide_features)
        return self.loss_from_embeddings(embeddings, guide_embeddings)

    def loss_from_embeddings(self, embeddings: list[Tensor], guide_embeddings: list[Tensor]) -> Tensor:
        """The loss of the model's column embeddings [anchor, positive(, negative)] guided by the guide's."""
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        if len(guide_embeddings) != len(embeddings):
            raise ValueError(f"Expected {len(embeddings)} guide embeddings, got {len(guide_embeddings)}")
        return self.gist_loss(embeddings[0], list(embeddings[1:]), guide_embeddings[0], list(guide_embeddings[1:]))
