"""Drop-in GISTEmbedLoss on the GIST fused op (st_fast.ops.gist): no (B, N, D) tensors, no B x N scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as StockGISTEmbedLoss
from torch import Tensor, nn

from st_fast.losses import self_check
from st_fast.losses.plan import LossFamily, LossPlan, StFastLoss, replaces
from st_fast.losses.self_check import SelfCheckOption, stock_function, stock_view
from st_fast.losses.stock_contract import (
    BackendOption,
    autocast_state,
    positive_problem,
    scalar_kind,
    scalar_problem,
    stock_dtype,
    stock_helper,
    warn_once,
    warn_stock_fallback_once,
)
from st_fast.ops import BACKENDS, fused_gist_loss
from st_fast.ops.backends import GIST
from st_fast.ops.gist.spec import COSINE_EPS, check_inputs

# stock method (its identity) -> whether it masks each row's own anchor-anchor / positive-positive entry
_SELF_NEGATIVES: dict[Any, bool] = {}  # keyed by the function itself (kept alive: no reused id)


def plain_cross_entropy(module: Any) -> bool:
    """True for ``nn.CrossEntropyLoss()`` with its default arguments and no hooks: the loss the fused op computes."""
    return (
        type(module) is nn.CrossEntropyLoss
        and module.weight is None
        and module.ignore_index == -100
        and module.reduction == "mean"
        and module.label_smoothing == 0.0
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


class FusedGISTMixin(StFastLoss):
    """The GIST loss of given embeddings on the fused guided op, and the guide's view of the input features.

    Uses the stock class's own attributes, read at every call (temperature, margin_strategy, margin,
    contrast_anchors, contrast_positives, gather_across_devices, similarity_fct, cross_entropy_loss,
    must_retokenize, tokenizer, guide); ``backend`` picks the row kernel. What the fused op cannot compute exactly
    (see :meth:`fallback_reason`) is computed by the stock method.
    """

    family = LossFamily("GIST", GIST)
    backend = BackendOption(BACKENDS, triton_kernels=False)  # "triton" computes with torch (see GISTEmbedLoss)
    self_check = SelfCheckOption()
    _replaced_method = "forward"  # where the stock class looks its helpers up

    def fallback_reason(self) -> str | None:
        """Why this call must be computed by the stock implementation (None: the fused op computes it exactly)."""
        fct = self.similarity_fct
        if not (type(fct) is nn.CosineSimilarity and fct.dim == -1 and fct.eps == COSINE_EPS):
            return f"similarity_fct={fct!r} is not nn.CosineSimilarity(dim=-1, eps=1e-8)"
        if not plain_cross_entropy(self.cross_entropy_loss):
            return (
                f"cross_entropy_loss={self.cross_entropy_loss!r} is not nn.CrossEntropyLoss() with its default "
                "weight, ignore_index, reduction and label_smoothing"
            )
        # stock's margin only decides masks, so it gets no gradient there either
        temperature = scalar_problem("temperature", self.temperature, differentiable=True)
        temperature = temperature or positive_problem("temperature", self.temperature)
        return temperature or scalar_problem("margin", self.margin, differentiable=True)

    def training_plan(
        self, device: torch.device, embedding_dtype: Callable[[nn.Module | None], torch.dtype]
    ) -> LossPlan:
        """As :meth:`StFastLoss.training_plan`, with the masks decided in the guide's embedding dtype (the guide's
        similarities decide them)."""
        dtype = embedding_dtype(getattr(self, "model", None))
        guide = getattr(self, "guide", None)
        return self.plan(device, dtype, mask_dtype=embedding_dtype(guide) if guide is not None else dtype)

    def guide_features(self, sentence_feature: dict[str, Tensor]) -> dict[str, Tensor]:
        """The guide's input for one column: the model's token ids decoded and re-tokenized by the guide (as stock,
        flattened ``cu_seq_lens_q`` batches included), on the guide's device. Call under no_grad."""
        input_ids = sentence_feature["input_ids"]
        if "cu_seq_lens_q" in sentence_feature:
            flat_input_ids = input_ids[0].tolist()
            bounds = sentence_feature["cu_seq_lens_q"].tolist()
            input_ids = [flat_input_ids[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
        decoded = self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        batch_to_device = stock_helper(self, self._replaced_method, "batch_to_device")
        return batch_to_device(self.guide.preprocess(decoded), self.guide.device)

    def gist_loss(
        self, anchors: Tensor, candidates: list[Tensor], anchors_guide: Tensor, candidates_guide: list[Tensor]
    ) -> Tensor:
        """Loss of the local anchors (B, D) against k candidate columns (B, D) each, guided by the guide's
        embeddings; candidates (and their guide embeddings) are gathered across ranks when
        ``gather_across_devices``, anchors stay local (row i's positive at rank·B + i). Masks are decided in the
        dtype of stock's guide similarity; the loss is returned in the dtype stock returns."""
        loss_dtype, mask_dtype = self.stock_dtypes(anchors, candidates[0], anchors_guide, candidates_guide[0])
        offset = 0
        if self.gather_across_devices:
            all_gather_with_grad = stock_helper(self, self._replaced_method, "all_gather_with_grad")
            candidates = [all_gather_with_grad(candidate) for candidate in candidates]
            candidates_guide = [all_gather_with_grad(candidate) for candidate in candidates_guide]
            offset = stock_helper(self, self._replaced_method, "get_rank")() * anchors.shape[0]
        plan = self.plan(anchors.device, anchors.dtype, mask_dtype=mask_dtype)
        if plan.reason is not None:
            warn_once(self, plan.reason)
        loss = fused_gist_loss(
            anchors, candidates, anchors_guide, candidates_guide, row_offset=offset, temperature=self.temperature,
            margin_strategy=self.margin_strategy, margin=self.margin, contrast_anchors=self.contrast_anchors,
            contrast_positives=self.contrast_positives, mask_dtype=mask_dtype,
            mask_self_negatives=self.stock_masks_self_negatives(), backend=plan.runs(),
        )  # fmt: skip
        return loss.to(loss_dtype)

    def stock_masks_self_negatives(self) -> bool:
        """Whether the installed stock method masks each row's own anchor-anchor and positive-positive entry
        (sentence-transformers 6.3: always; 6.0-6.2: only through the guide's threshold), found by running it once
        per process (and again if the method is replaced) on a 3-row batch whose anchors equal their positives,
        with margin -1 (the guide masks nothing), against the fused op both ways in float64. Where neither matches,
        the newest behaviour (True) is taken and the first-use self-check decides."""
        stock = stock_function(self, self._replaced_method)
        known = _SELF_NEGATIVES.get(stock)
        if known is None:
            known = _SELF_NEGATIVES[stock] = self._probe_self_negatives()
        return known

    def _probe_self_negatives(self) -> bool:
        generator = torch.Generator().manual_seed(0)
        anchors = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        columns, guides = [anchors, anchors.clone()], [anchors.clone(), anchors.clone()]
        settings = dict(
            margin_strategy="absolute", margin=-1.0, temperature=1.0, contrast_anchors=True, contrast_positives=True,
            similarity_fct=nn.CosineSimilarity(dim=-1), cross_entropy_loss=nn.CrossEntropyLoss(),
        )  # fmt: skip
        view = stock_view(self, **settings)
        with torch.no_grad(), torch.autocast(anchors.device.type, enabled=False):
            try:
                stock = float(view.stock_on_embeddings(columns, guides))
            except Exception:  # noqa: BLE001 (stock cannot run the probe: the self-check decides)
                return True
            fused = {}
            for masked in (True, False):
                fused[masked] = float(fused_gist_loss(
                    columns[0], columns[1:], guides[0], guides[1:], temperature=1.0, margin_strategy="absolute",
                    margin=-1.0, mask_self_negatives=masked, backend="torch",
                ))  # fmt: skip
        for masked in (True, False):
            if abs(fused[masked] - stock) <= 1e-9 * max(1.0, abs(stock)):
                return masked
        return True

    # ----------------------------------------------------------------------------------------------------------------
    # The first-use self-check (st_fast.losses.self_check)

    def self_check_config(self, columns: list[Tensor]) -> dict[str, Any]:
        """Everything the comparison with stock depends on besides the embeddings."""
        return {
            "temperature": self.temperature, "margin_strategy": self.margin_strategy, "margin": self.margin,
            "contrast_anchors": self.contrast_anchors, "contrast_positives": self.contrast_positives,
            "columns": len(columns), "backend": self.backend, "device": columns[0].device.type,
        }  # fmt: skip

    def fused_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """st_fast's loss of ``columns`` guided by ``guides`` (one device, no gathering)."""
        view = stock_view(self, gather_across_devices=False)
        return view.gist_loss(columns[0], list(columns[1:]), guides[0], list(guides[1:]))

    def computes_stock(self, columns: list[Tensor], guides: list[Tensor]) -> bool:
        """Run the first-use self-check of this configuration (once per process); True when the stock method must
        compute it (a mismatch: see :mod:`st_fast.losses.self_check`)."""
        if not self.self_check:
            return False
        check_inputs(columns[0], columns[1:], guides[0], guides[1:], 0)  # bad input: the op's clear error first
        return not self_check.run(self, columns, guides).passed

    def stock_dtypes(
        self, anchors: Tensor, positives: Tensor, anchors_guide: Tensor, positives_guide: Tensor
    ) -> tuple[torch.dtype, torch.dtype]:
        """(loss dtype, guide-similarity dtype) of stock for these embeddings now: its similarity_fct on one pair
        of the model's and of the guide's embeddings, then the temperature and cross-entropy (autocast included)."""
        device = anchors.device.type
        key = (
            "gist", anchors.dtype, positives.dtype, anchors_guide.dtype, positives_guide.dtype, device,
            autocast_state(device), scalar_kind(self.temperature),
        )  # fmt: skip

        def similarity_dtype(x: Tensor, y: Tensor) -> torch.dtype:
            return self.similarity_fct(x[:1, None].detach(), y[None, :1].detach()).dtype

        def loss_probe() -> torch.dtype:
            scores = torch.zeros(1, 1, dtype=similarity_dtype(anchors, positives), device=anchors.device)
            target = torch.zeros(1, dtype=torch.long, device=anchors.device)
            return self.cross_entropy_loss(scores / self.temperature, target).dtype

        return (
            stock_dtype((*key, "loss"), loss_probe),
            stock_dtype((*key, "mask"), lambda: similarity_dtype(anchors_guide, positives_guide)),
        )


class _PrecomputedColumns(nn.Module):
    """Stands in for the model or the guide when the stock ``forward`` runs on given embeddings: the feature dict
    ``{"st_fast_column": j}`` gives column j as the sentence embedding (no input_ids: stock embeds each column in its
    own call)."""

    def __init__(self, columns: list[Tensor]) -> None:
        super().__init__()
        self.columns = columns

    def forward(self, features: dict[str, Any]) -> dict[str, Tensor]:
        return {"sentence_embedding": self.columns[features["st_fast_column"]]}


@replaces(StockGISTEmbedLoss)
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
            ``"native"`` or ``"torch"``; ``"triton"`` computes with ``"torch"`` (one warning): the guided Triton
            kernels (:func:`st_fast.ops.fused_gist_loss`) decide masks in float32 tiles and cannot recheck entries at
            their thresholds (ties) the way stock decides them.

    The guide embedding and re-tokenization are the stock ones (same ``embed_columns`` calls, in the same order).
    Cosine similarities normalize each vector with its norm clamped at 1e-8 (nn.CosineSimilarity's eps), which
    equals stock up to rounding; the guide's similarities are rounded to the dtype stock compares them in (the
    guide's dtype, e.g. bfloat16) before the thresholds, computed as stock computes them. Every attribute is read at
    call time; ``temperature`` may be a tensor, and one that requires grad gets d loss / d temperature (stock's
    autograd gives NaN as soon as an entry is masked, since it differentiates -inf / T; st_fast gives the exact
    gradient, which equals stock's wherever stock's is finite). A replaced
    ``similarity_fct`` or ``cross_entropy_loss`` (other than a plain ``nn.CrossEntropyLoss()``) falls back to the
    stock computation with a one-time warning. The loss is computed in float32 (float64 for float64 embeddings) and
    returned in the dtype stock returns.

    Example::

        from st_fast.losses import GISTEmbedLoss

        loss = GISTEmbedLoss(model, guide)  # instead of sentence_transformers' class
    """

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None) -> Tensor:
        reason = self.fallback_reason()
        if reason is not None:
            warn_stock_fallback_once(self, reason)
            return super().forward(sentence_features, labels)
        sentence_features = list(sentence_features)
        # as stock: the guide runs on shallow copies (the model fills the dicts it is given)
        guide_features = [dict(sentence_feature) for sentence_feature in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = [self.guide_features(sentence_feature) for sentence_feature in sentence_features]
            guide_embeddings = embed_columns(self.guide, guide_features)
        return self.loss_from_embeddings(embeddings, guide_embeddings, sentence_features, labels)

    def stock_on_embeddings(self, columns: list[Tensor], guides: list[Tensor]) -> Tensor:
        """Stock's loss of ``columns`` guided by ``guides``: the stock ``forward`` as it is now, on a view whose
        model and guide return these embeddings (one device, no gathering, no re-tokenization)."""
        view = stock_view(
            self, model=_PrecomputedColumns(list(columns)), guide=_PrecomputedColumns(list(guides)),
            must_retokenize=False, gather_across_devices=False,
        )  # fmt: skip
        features = [{"st_fast_column": j} for j in range(len(columns))]
        return stock_function(self, "forward")(view, features, None)

    def loss_from_embeddings(
        self, embeddings: list[Tensor], guide_embeddings: list[Tensor], sentence_features: Any = None, labels=None
    ) -> Tensor:
        """The loss of the model's column embeddings [anchor, positive(, negative)] guided by the guide's (the
        first-use self-check's mismatch: stock's ``forward`` on ``sentence_features``)."""
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        if len(guide_embeddings) != len(embeddings):
            raise ValueError(f"Expected {len(embeddings)} guide embeddings, got {len(guide_embeddings)}")
        if self.computes_stock(list(embeddings), list(guide_embeddings)):
            if sentence_features is None:
                return self.stock_on_embeddings(list(embeddings), list(guide_embeddings))
            return super().forward(sentence_features, labels)
        return self.gist_loss(embeddings[0], list(embeddings[1:]), guide_embeddings[0], list(guide_embeddings[1:]))
