"""Drop-in MultipleNegativesRankingLoss and MultipleNegativesSymmetricRankingLoss on the fused contrastive op."""

from __future__ import annotations

from typing import Any

import torch
from sentence_transformers.sentence_transformer.losses import (
    MultipleNegativesRankingLoss as StockMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses import (
    MultipleNegativesSymmetricRankingLoss as StockMultipleNegativesSymmetricRankingLoss,
)
from torch import Tensor

from st_fast.losses import self_check
from st_fast.losses.duplicate_masking import MaskDuplicatesOption, batch_labels, remembering_texts
from st_fast.losses.plan import LossFamily, StFastLoss, replaces
from st_fast.losses.self_check import SelfCheckOption, stock_function, stock_view
from st_fast.losses.similarity import fused_similarity_name
from st_fast.losses.stock_contract import (
    BackendOption,
    autocast_state,
    positive_problem,
    scalar_kind,
    scalar_problem,
    stock_dtype,
    stock_helper,
    stock_only_layout,
    subclassing_deprecated_stock,
    warn_deprecated_like_stock,
    warn_once,
    warn_stock_fallback_once,
)
from st_fast.ops import BACKENDS, fused_mnrl_loss
from st_fast.ops.backends import MNRL
from st_fast.ops.mnrl.spec import check_embeddings


class FusedMNRLMixin(StFastLoss):
    """Replaces ``compute_loss_from_embeddings`` of a stock MNRL-family class with the fused op.

    The configuration attributes (scale, similarity_fct, directions, partition_mode, hardness_mode,
    hardness_strength, gather_across_devices) are the stock class's own, read at every call; ``backend`` picks the
    kernels. What the fused op cannot compute exactly (see :meth:`fallback_reason`) is computed by the stock method.

    ``mask_duplicates`` (default False: stock's loss): leave a candidate out of a row's softmax when its text equals
    the row's reference text (see :mod:`st_fast.ops.layout`); the texts are taken from the features ``forward``
    receives (:mod:`st_fast.losses.duplicate_masking`).
    """

    family = LossFamily("MNRL", MNRL)
    backend = BackendOption(BACKENDS)
    mask_duplicates = MaskDuplicatesOption()
    self_check = SelfCheckOption()
    mask_duplicates_applies = True  # the loss gets the features (token ids) in forward: the trainer may set it
    _replaced_method = "compute_loss_from_embeddings"  # where the stock class looks its helpers up

    def forward(self, sentence_features: Any, labels: Tensor | None) -> Tensor:
        if not self.mask_duplicates:
            return super().forward(sentence_features, labels)
        sentence_features = list(sentence_features)
        with remembering_texts(self, sentence_features):
            return super().forward(sentence_features, labels)

    def get_config_dict(self) -> dict[str, Any]:
        """The stock configuration, plus ``mask_duplicates: True`` when it is on (so the model card records it)."""
        config = super().get_config_dict()
        if self.mask_duplicates:
            config["mask_duplicates"] = True
        return config

    def check_stock_fallback(self, reason: str) -> None:
        """Raises ValueError for a stock fallback (``reason``) of a loss with ``mask_duplicates``: stock has no such
        masking, so computing this call with it would silently give the unmasked loss."""
        if self.mask_duplicates:
            raise ValueError(f"mask_duplicates=True cannot be computed here ({reason}); the stock loss has no masking")

    def fallback_reason(self) -> str | None:
        """Why this call must be computed by the stock implementation (None: the fused op computes it exactly)."""
        if fused_similarity_name(self.similarity_fct) is None:
            name = getattr(self.similarity_fct, "__name__", repr(self.similarity_fct))
            return f"similarity_fct={name} has no fused kernel (only cos_sim and dot_score do)"
        problem = scalar_problem("scale", self.scale, differentiable=True) or positive_problem("scale", self.scale)
        if problem is None and self.hardness_mode is not None:
            problem = scalar_problem("hardness_strength", self.hardness_strength, differentiable=False)
        return problem

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        reason = self.fallback_reason() or stock_only_layout(embeddings)
        if reason is not None:
            self.check_stock_fallback(reason)
            warn_stock_fallback_once(self, reason)
            return super().compute_loss_from_embeddings(embeddings, labels)
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        if self.computes_stock(list(embeddings)):
            return super().compute_loss_from_embeddings(embeddings, labels)
        return self.fused_loss(embeddings[0], list(embeddings[1:]))

    # ----------------------------------------------------------------------------------------------------------------
    # The first-use self-check (st_fast.losses.self_check)

    def self_check_config(self, columns: list[Tensor]) -> dict[str, Any]:
        """Everything the comparison with stock depends on besides the embeddings."""
        return {
            "scale": self.scale, "similarity_fct": getattr(self.similarity_fct, "__name__", repr(self.similarity_fct)),
            "directions": tuple(self.directions), "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode, "hardness_strength": self.hardness_strength,
            "columns": len(columns), "backend": self.backend, "device": columns[0].device.type,
        }  # fmt: skip

    def stock_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """Stock's loss of ``columns`` (one device, no gathering): the stock method as it is now, on a view."""
        view = stock_view(self, gather_across_devices=False)
        return stock_function(self, "compute_loss_from_embeddings")(view, list(columns), None)

    def fused_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """st_fast's loss of ``columns`` (one device, no gathering, no duplicate masking)."""
        view = stock_view(self, gather_across_devices=False, _st_fast_mask_duplicates=False)
        return view.fused_loss(columns[0], list(columns[1:]))

    def computes_stock(self, columns: list[Tensor], guides: list[Tensor] | None = None) -> bool:
        """Run the first-use self-check of this configuration (once per process); True when the stock method must
        compute it (a mismatch: see :mod:`st_fast.losses.self_check`)."""
        if not self.self_check:
            return False
        check_embeddings(columns[0], columns[1:])  # bad input: the op's clear error, before any comparison
        result = self_check.run(self, columns, guides or ())
        if not result.passed:
            self.check_stock_fallback(f"its self-check against stock found a mismatch ({result.detail})")
        return not result.passed

    def fused_loss(self, queries: Tensor, docs: list[Tensor]) -> Tensor:
        """The loss of local anchors (B, D) against candidate columns k x (B, D), gathered across ranks when
        ``gather_across_devices`` (local rows against every rank's columns, positive of row i at rank·B + i),
        in the dtype stock returns (computed in float32, float64 for float64 embeddings)."""
        check_embeddings(queries, docs)
        dtype = self.stock_loss_dtype(queries, docs[0])
        batch_size, offset = queries.shape[0], 0
        text_labels = None
        if self.mask_duplicates:
            gather = None
            if self.gather_across_devices:
                gather = stock_helper(self, self._replaced_method, "all_gather_with_grad")
            text_labels = batch_labels(self, batch_size, 1 + len(docs), queries.device, gather)
        if self.gather_across_devices:
            all_gather_with_grad = stock_helper(self, self._replaced_method, "all_gather_with_grad")
            queries = all_gather_with_grad(queries)
            docs = [all_gather_with_grad(doc) for doc in docs]
            offset = stock_helper(self, self._replaced_method, "get_rank")() * batch_size
        plan = self.plan(queries.device, queries.dtype, mask_duplicates=text_labels is not None)
        if plan.reason is not None:
            warn_once(self, plan.reason)
        loss = fused_mnrl_loss(
            queries, docs, row_offset=offset, batch_size=batch_size, scale=self.scale,
            similarity=fused_similarity_name(self.similarity_fct), directions=self.directions,
            partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
            hardness_strength=self.hardness_strength, backend=plan.runs(), labels=text_labels,
        )  # fmt: skip
        return loss.to(dtype)

    def stock_loss_dtype(self, queries: Tensor, doc: Tensor) -> torch.dtype:
        """The dtype of stock's loss for these embeddings now: its similarity, scale, hardness penalty,
        logsumexp and mean on one-element slices (autocast included)."""
        penalized = self.hardness_mode is not None and bool(self.hardness_strength > 0.0)
        key = (
            "mnrl", queries.dtype, doc.dtype, queries.device.type, autocast_state(queries.device.type),
            self.similarity_fct, scalar_kind(self.scale), scalar_kind(self.hardness_strength) if penalized else None,
        )  # fmt: skip

        def probe() -> torch.dtype:
            similarity = self.similarity_fct(queries[:1].detach(), doc[:1].detach())
            logits = similarity * self.scale
            if penalized:
                logits = logits + self.hardness_strength * similarity
            return (-(logits[:, 0] - torch.logsumexp(logits, dim=1))).mean().dtype

        return stock_dtype(key, probe)


@replaces(StockMultipleNegativesRankingLoss)
class MultipleNegativesRankingLoss(FusedMNRLMixin, StockMultipleNegativesRankingLoss):
    """sentence-transformers' :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss`
    computed by st_fast's fused op: the same loss and gradients without the (B, k·W) score matrices.

    For row i with query q_i, positive d_i and candidates c (all positives and hard negatives of the batch)::

        loss = mean_i [ log Σ_c exp(scale · sim(q_i, c)) - scale · sim(q_i, d_i) ]

    extended by ``directions``, ``partition_mode`` and ``hardness_mode`` exactly as the stock class.

    Args:
        Same as the stock class (model, scale, similarity_fct, gather_across_devices, directions, partition_mode,
        hardness_mode, hardness_strength), plus
        backend: ``"auto"`` (native C++/CUDA kernels when built, else Triton on CUDA, else torch),
            ``"triton"``, ``"native"`` or ``"torch"``.
        mask_duplicates: False (default: stock's loss, the same ``get_config_dict()``), or True (not in stock): a
            candidate whose text (token ids) equals the row's positive (query_to_doc, doc_to_doc) or anchor
            (query_to_query, doc_to_query) is left out of that row's softmax, as stock leaves out a row's own
            document in doc_to_doc; the target is never masked. Needs the features (call the loss, not
            ``compute_loss_from_embeddings``: RuntimeError); a configuration the fused op cannot compute (see
            below) raises ValueError instead of falling back to stock.
            ``get_config_dict()`` then has ``mask_duplicates: True`` (and so the model card).

    Every attribute is read at call time, as stock does. ``scale`` may be a tensor; one that requires grad gets
    stock's gradient. ``similarity_fct`` other than ``util.cos_sim`` / ``util.dot_score``, or a ``hardness_strength``
    tensor that requires grad, falls back to the stock computation with a one-time warning. Non-finite embeddings
    give a non-finite loss, as in stock (no error, so that fp16 loss scaling keeps working). The loss is computed in
    float32 (float64 for float64 embeddings) and returned in the dtype stock returns (e.g. bfloat16 under CUDA
    bf16 autocast, where stock's value carries bf16 rounding and st_fast's only the final rounding).

    Example::

        from st_fast.losses import MultipleNegativesRankingLoss

        loss = MultipleNegativesRankingLoss(model, scale=20.0)  # instead of sentence_transformers' class
    """

    def __init__(self, *args: Any, backend: str = "auto", mask_duplicates: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.mask_duplicates = mask_duplicates


with subclassing_deprecated_stock():

    @replaces(StockMultipleNegativesSymmetricRankingLoss)
    class MultipleNegativesSymmetricRankingLoss(FusedMNRLMixin, StockMultipleNegativesSymmetricRankingLoss):
        """Deprecated upstream alias (MNRL with ``directions=("query_to_doc", "doc_to_query")`` and
        ``partition_mode="per_direction"``) on the fused op. Same arguments as the stock class plus ``backend`` and
        ``mask_duplicates`` (see :class:`MultipleNegativesRankingLoss`)."""

        def __init__(self, *args: Any, backend: str = "auto", mask_duplicates: bool = False, **kwargs: Any) -> None:
            warn_deprecated_like_stock(StockMultipleNegativesSymmetricRankingLoss)
            super().__init__(*args, **kwargs)
            self.backend = backend
            self.mask_duplicates = mask_duplicates
