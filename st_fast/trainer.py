"""``SentenceTransformerTrainer``: the stock trainer with st_fast's fused losses and duplicate-free sampler swapped in.

Change one import::

    from st_fast import SentenceTransformerTrainer  # instead of: from sentence_transformers import ...

and everything else (arguments, callbacks, evaluators, model cards, checkpoints, ``accelerate launch``) stays the
stock trainer's. Two parts are swapped, each through a stock hook (spec: BaseTrainer.prepare_loss /
get_batch_sampler / call_model_init):

* the loss: after the stock ``prepare_loss``, every loss (a single loss, each value of a loss dict, the result of a
  ``model -> loss`` callable, and the losses re-created by ``model_init`` / hyperparameter search) goes through
  :func:`st_fast.losses.fuse`, which returns the st_fast class with the same configuration and model, or the loss
  unchanged when st_fast has no equivalent. The fused loss shares the stock object's state (see
  :func:`st_fast.losses.fuse`): changes to the user's loss object reach it, and no module's mode is touched. The
  model card is the stock card (same loss names, links and configuration) plus the ``st_fast`` tag.
* the batch sampler: ``BatchSamplers.NO_DUPLICATES`` / ``NO_DUPLICATES_HASHED`` (or the stock
  ``NoDuplicatesBatchSampler`` class given as ``batch_sampler``) become :class:`st_fast.NoDuplicatesBatchSampler`,
  which yields the same batches. The per-dataset samplers inside the multi-dataset samplers (round robin,
  proportional) are built by the same hook, so they are swapped too, for train and eval dataloaders alike.

At each ``train()`` start, on the main process only, one or two lines on stderr say what st_fast swapped in, with the
backend that will run on the model's device and dtype (``native`` for a float32 model on a CPU), and what it left
stock and why; no logging configuration is needed. They are a log record of logger ``st_fast.trainer`` (INFO), so an
application that configures logging gets them through its own handlers instead (see
:func:`st_fast.report.emit_report`). ``trainer.st_fast_report`` holds the same as a dict (part -> description).

``st_fast=`` takes a :class:`StFastConfig` or a dict of its fields: ``{"loss": False}``, ``{"sampler": False}``,
``{"backend": "torch"}``, ``{"report": False}`` (no report), ``{"mask_duplicates": True}`` (beyond stock: every fused
MNRL-family loss leaves candidates whose text equals the row's positive or anchor out of the row's softmax, see
:class:`st_fast.losses.MultipleNegativesRankingLoss`; the report says so), or ``st_fast=False`` (the stock trainer
exactly, without the report). The options are checked when the trainer is built: an unknown option or backend name
(ValueError), a flag that is not a bool (TypeError), and a backend that cannot run on the model's device or dtype
(RuntimeError for ``"triton"`` on a CPU without ``TRITON_INTERPRET=1`` or ``"native"`` where its extension is not
built, TypeError for either with float64 embeddings) fail in the constructor, not at the first step.

:func:`st_fast.patch` applies the same hooks to the stock trainer classes (for code you do not own); both call the
swap functions of :mod:`st_fast.swaps`; the report is :mod:`st_fast.report`.
"""

from __future__ import annotations

from typing import Any

from sentence_transformers.sentence_transformer.trainer import (
    SentenceTransformerTrainer as StockSentenceTransformerTrainer,
)

from st_fast.config import StFastConfig
from st_fast.report import swap_report
from st_fast.swaps import (
    fast_batch_sampler,
    fast_multi_dataset_batch_sampler,
    finish_init,
    fuse_loss,
    fuse_trainer_losses,
)

__all__ = ["SentenceTransformerTrainer", "StFastConfig", "StFastTrainerMixin"]  # + MultiVectorEncoderTrainer (lazy)


class StFastTrainerMixin:
    """st_fast's hooks for a stock sentence-transformers trainer class (any subclass of the stock ``BaseTrainer``):
    the keyword ``st_fast`` and the swaps of :mod:`st_fast.swaps` in ``prepare_loss``, ``call_model_init``,
    ``get_batch_sampler`` and ``get_multi_dataset_batch_sampler``. ``class T(StFastTrainerMixin, StockTrainer)`` is
    the st_fast form of ``StockTrainer`` (:class:`SentenceTransformerTrainer`, :class:`MultiVectorEncoderTrainer`)."""

    _st_fast_owner = True  # st_fast.patch() leaves this class's hooks to the class itself

    def __init__(self, *args: Any, st_fast: StFastConfig | dict[str, Any] | bool | None = None, **kwargs: Any):
        self.st_fast_config = StFastConfig.coerce(st_fast)  # before the stock __init__, which calls prepare_loss
        super().__init__(*args, **kwargs)
        finish_init(self, self.st_fast_config)

    @property
    def st_fast_report(self) -> dict[str, str]:
        """Part (``loss`` or ``loss[<dataset>]``, ``batch sampler``, ``multi-dataset batch sampler``) -> what st_fast
        does with it: the st_fast class and the backend that will run (resolved for the model's device and dtype),
        or why it was left stock. What the report at train start shows."""
        return swap_report(self)

    def prepare_loss(self, loss, model):
        return fuse_loss(self, super().prepare_loss(loss, model), self.st_fast_config)

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if hasattr(self, "loss"):
            fuse_trainer_losses(self, self.st_fast_config)
        return model

    def get_batch_sampler(self, dataset, *args, **kwargs):
        return fast_batch_sampler(self, super().get_batch_sampler, self.st_fast_config, dataset, *args, **kwargs)

    def get_multi_dataset_batch_sampler(self, *args, **kwargs):
        stock = super().get_multi_dataset_batch_sampler
        return fast_multi_dataset_batch_sampler(self, stock, self.st_fast_config, *args, **kwargs)


class SentenceTransformerTrainer(StFastTrainerMixin, StockSentenceTransformerTrainer):
    """Drop-in for :class:`sentence_transformers.SentenceTransformerTrainer` that swaps in st_fast's parts.

    Same constructor, plus the keyword ``st_fast``: a :class:`StFastConfig`, a dict with its fields (``loss``,
    ``sampler``, ``backend``, ``report``, ``mask_duplicates``, ``self_check``) or a bool (``False``: the stock
    trainer exactly). See the module docstring.

    Example::

        from st_fast import SentenceTransformerTrainer

        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=train_dataset,
            loss=CachedMultipleNegativesRankingLoss(model, mini_batch_size=32),  # the stock class
        )  # trains with st_fast's fused CachedMultipleNegativesRankingLoss and native NoDuplicatesBatchSampler
    """


def __getattr__(name: str):
    # MultiVectorEncoderTrainer exists from sentence-transformers 6.2: built on first access, so that this module
    # imports with 6.0 / 6.1 too (AttributeError there, naming the version that has it).
    if name == "MultiVectorEncoderTrainer":
        try:
            from sentence_transformers.multi_vector_encoder.trainer import (
                MultiVectorEncoderTrainer as StockMultiVectorEncoderTrainer,
            )
        except ImportError as exc:
            raise AttributeError(
                "st_fast.MultiVectorEncoderTrainer needs sentence-transformers >= 6.2 (MultiVectorEncoder), "
                f"the installed one has no multi_vector_encoder.trainer: {exc}"
            ) from exc

        class MultiVectorEncoderTrainer(StFastTrainerMixin, StockMultiVectorEncoderTrainer):
            """Drop-in for sentence-transformers' ``MultiVectorEncoderTrainer`` (ColBERT-style late interaction) that
            swaps in st_fast's parts: the fused MaxSim losses (:class:`st_fast.losses.
            MultiVectorMultipleNegativesRankingLoss`, :class:`st_fast.losses.
            CachedMultiVectorMultipleNegativesRankingLoss`, also inside the stock multi-vector wrappers) and the
            native duplicate-free sampler. Same constructor plus ``st_fast`` (as :class:`SentenceTransformerTrainer`).
            """

        MultiVectorEncoderTrainer.__module__ = __name__
        MultiVectorEncoderTrainer.__qualname__ = name
        globals()[name] = MultiVectorEncoderTrainer
        return MultiVectorEncoderTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
