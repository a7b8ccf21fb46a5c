"""st_fast.SentenceTransformerTrainer and st_fast.patch(): the same training as the stock trainer, with st_fast's parts.

Each comparison trains twice from the same seed — once with the stock trainer, once with st_fast — and compares the
batches every step consumed (a digest of the tokenized anchors) and the step losses. Dropout is on in both runs, so
equal losses also show that st_fast consumes the RNG exactly as the stock code does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import types

import pytest
import torch
from conftest import make_tiny_model, make_tiny_multi_vector_model, multi_vector_training
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformer
from sentence_transformers import SentenceTransformerTrainer as StockTrainer
from sentence_transformers.base import sampler as stock_sampler
from sentence_transformers.base.trainer import BaseTrainer
from sentence_transformers.sentence_transformer import losses as stock_losses
from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments
from stock_behaviour import multi_sampler_forwards_set_epoch
from transformers import TrainerCallback

import st_fast
from examples.debian_pairs import load_debian_pairs
from st_fast import losses as fast_losses
from st_fast.sampler import NoDuplicatesBatchSampler
from st_fast.trainer import SentenceTransformerTrainer as FastTrainer
from st_fast.trainer import StFastConfig

LOSS_RTOL = 1e-4


class RecordingMixin:
    """Records, per ``compute_loss`` call, a digest of the batch and the loss value."""

    def __init__(self, *args, **kwargs):
        self.batch_digests: list[str] = []
        self.step_losses: list[float] = []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["anchor_input_ids"]
        self.batch_digests.append(hashlib.sha1(ids.cpu().numpy().tobytes()).hexdigest()[:16])
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self.step_losses.append(float((loss[0] if return_outputs else loss).detach()))
        return loss


class RecordingStock(RecordingMixin, StockTrainer):
    pass


class RecordingFast(RecordingMixin, FastTrainer):
    pass


@pytest.fixture(autouse=True)
def _always_unpatched():
    yield
    st_fast.unpatch()


def _args(tmp_path, name: str, **overrides) -> SentenceTransformerTrainingArguments:
    config = dict(
        output_dir=str(tmp_path / name), max_steps=10, per_device_train_batch_size=16, learning_rate=5e-5,
        seed=42, batch_sampler="no_duplicates", report_to="none", save_strategy="no", logging_steps=1,
        use_cpu=True, disable_tqdm=True, dataloader_drop_last=True,
    )  # fmt: skip
    config.update(overrides)
    return SentenceTransformerTrainingArguments(**config)


def _pairs(limit: int) -> Dataset:
    return load_debian_pairs(limit=limit).select_columns(["anchor", "positive"])


def _sampler_batches(trainer) -> list[list[int]]:
    batch_sampler = trainer.get_train_dataloader().batch_sampler
    batch_sampler = getattr(batch_sampler, "batch_sampler", batch_sampler)  # under accelerate's BatchSamplerShard
    return [list(batch) for batch in batch_sampler]


def _assert_same_training(stock, fast) -> None:
    assert fast.batch_digests == stock.batch_digests
    assert len(fast.step_losses) == len(stock.step_losses) > 0
    torch.testing.assert_close(
        torch.tensor(fast.step_losses, dtype=torch.float64), torch.tensor(stock.step_losses, dtype=torch.float64),
        rtol=LOSS_RTOL, atol=0.0,
    )  # fmt: skip


def _max_rel_diff(stock, fast) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(fast.step_losses, stock.step_losses, strict=True))


# ---------------------------------------------------------------------------------------------------------------------
# End to end: all-MiniLM-L6-v2 on the real Debian pairs, stock trainer vs st_fast trainer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stock_class", "kwargs", "fast_class"),
    [
        (stock_losses.MultipleNegativesRankingLoss, {}, fast_losses.MultipleNegativesRankingLoss),
        (
            stock_losses.CachedMultipleNegativesRankingLoss,
            {"mini_batch_size": 4},
            fast_losses.CachedMultipleNegativesRankingLoss,
        ),
    ],
    ids=["MNRL", "CachedMNRL"],
)  # fmt: skip
def test_real_model_stock_vs_st_fast(minilm_path, tmp_path, stock_class, kwargs, fast_class, caplog):
    dataset = _pairs(200)
    trainers = {}
    for name, trainer_class in (("stock", RecordingStock), ("fast", RecordingFast)):
        model = SentenceTransformer(minilm_path, device="cpu")
        model.max_seq_length = 32  # small steps: the file must stay fast on 2 CPU cores
        trainer = trainer_class(
            model=model, args=_args(tmp_path, name, per_device_train_batch_size=8), train_dataset=dataset,
            loss=stock_class(model, **kwargs),
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="st_fast.trainer"):
            trainer.train()
        trainers[name] = trainer
    stock, fast = trainers["stock"], trainers["fast"]

    assert type(stock.loss) is stock_class and type(fast.loss) is fast_class
    assert fast.loss.model is fast.model
    assert isinstance(fast.get_train_dataloader().batch_sampler, NoDuplicatesBatchSampler)
    assert _sampler_batches(fast) == _sampler_batches(stock)
    assert len(stock.step_losses) == 10
    _assert_same_training(stock, fast)
    print(
        f"\n{stock_class.__name__}: stock {stock.step_losses}\n  st_fast max rel diff {_max_rel_diff(stock, fast):.2e}"
    )

    # Reported once at train begin; the model card names the same loss and tags st_fast.
    reports = _reports(caplog)
    assert len(reports) == 1
    assert f"loss: st_fast {fast_class.__name__}, " in reports[0]
    assert "backend native (auto; cpu, float32)" in reports[0]
    assert "batch sampler: st_fast NoDuplicatesBatchSampler" in reports[0]
    card = fast.model.model_card_data
    assert f"loss:{stock_class.__name__}" in card.tags and "st_fast" in card.tags
    assert "st_fast" not in stock.model.model_card_data.tags


def test_model_card_renders_the_fused_loss_as_stock(tiny_model, tmp_path):
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "card", max_steps=2), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model, scale=10.0),
    )  # fmt: skip
    trainer.train()
    tiny_model.save(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    # rendered as stock renders the stock class (the template links only sentence_transformers.* names), plus the tag
    assert "st_fast.losses" not in card
    assert "[<code>MultipleNegativesRankingLoss</code>](https://sbert.net/" in card
    assert '"scale": 10.0' in card and "loss:MultipleNegativesRankingLoss" in card and "- st_fast" in card


# ---------------------------------------------------------------------------------------------------------------------
# Options and what is left stock
# ---------------------------------------------------------------------------------------------------------------------


def test_options_turn_parts_off(tiny_model, tmp_path):
    loss = stock_losses.MultipleNegativesRankingLoss(tiny_model)
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "off"), train_dataset=_pairs(64), loss=loss, st_fast=False
    )
    assert trainer.loss is loss
    assert type(trainer.get_train_dataloader().batch_sampler) is stock_sampler.NoDuplicatesBatchSampler
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "loss-off"), train_dataset=_pairs(64), loss=loss,
        st_fast={"loss": False, "backend": "torch"},
    )  # fmt: skip
    assert trainer.loss is loss
    assert isinstance(trainer.get_train_dataloader().batch_sampler, NoDuplicatesBatchSampler)
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "torch"), train_dataset=_pairs(64), loss=loss,
        st_fast=StFastConfig(backend="torch"),
    )  # fmt: skip
    assert type(trainer.loss) is fast_losses.MultipleNegativesRankingLoss and trainer.loss.backend == "torch"
    hashed = _args(tmp_path, "hashed", batch_sampler="no_duplicates_hashed")
    stock = StockTrainer(model=tiny_model, args=hashed, train_dataset=_pairs(64), loss=loss)
    trainer = FastTrainer(model=tiny_model, args=hashed, train_dataset=_pairs(64), loss=loss)
    fast_sampler = trainer.get_train_dataloader().batch_sampler
    assert isinstance(fast_sampler, NoDuplicatesBatchSampler) and fast_sampler.precompute_hashes
    assert _sampler_batches(trainer) == _sampler_batches(stock)
    with pytest.raises(ValueError, match="unknown option"):
        StFastConfig.coerce({"sampler": True, "kernels": True})


class UserSubclassLoss(stock_losses.MultipleNegativesRankingLoss):
    pass


NOT_RUN = ", self-check not run yet (runs on the first batch)"  # the loss report's end before the first batch
VERDICTS = "[st_fast] self-check against sentence-transformers "  # the line after the first step


def _reports(caplog) -> list[str]:
    """The swap reports shown at train start (not the self-check verdict line after the first step)."""
    messages = [record.getMessage() for record in caplog.records if record.name == "st_fast.trainer"]
    return [message for message in messages if not message.startswith(VERDICTS)]


def _verdicts(caplog) -> list[str]:
    messages = [record.getMessage() for record in caplog.records if record.name == "st_fast.trainer"]
    return [message for message in messages if message.startswith(VERDICTS)]


def test_report_says_what_was_left_stock(tiny_model, tmp_path, caplog):
    from sentence_transformers import util

    losses = {
        "a": stock_losses.MultipleNegativesRankingLoss(tiny_model, similarity_fct=util.euclidean_sim),
        "b": stock_losses.CoSENTLoss(tiny_model),
        "c": UserSubclassLoss(tiny_model),
        "d": stock_losses.MatryoshkaLoss(
            tiny_model, stock_losses.MultipleNegativesRankingLoss(tiny_model), matryoshka_dims=[32, 16]
        ),
        "e": stock_losses.MatryoshkaLoss(tiny_model, stock_losses.CoSENTLoss(tiny_model), matryoshka_dims=[32, 16]),
    }
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "report", max_steps=1, batch_sampler="batch_sampler"),
        train_dataset=DatasetDict({"a": _pairs(64)}), loss=losses,  # a loss dict may name more datasets
    )  # fmt: skip
    trainer.train()
    (report,) = _reports(caplog)
    swapped, stock = report.splitlines()  # one line of what st_fast computes, one of what it left stock
    assert swapped == (
        "[st_fast] loss[d]: MatryoshkaLoss around st_fast MultipleNegativesRankingLoss, backend native (auto; cpu, "
        f"float32){NOT_RUN}; multi-dataset batch sampler: proportional: set_epoch forwarded to the per-dataset "
        "samplers under DDP sharding"
    )  # fmt: skip
    assert stock.startswith("[st_fast] loss[a]: MultipleNegativesRankingLoss left stock (MultipleNegativesRankingLoss "
                            "computes stock: similarity_fct=euclidean_sim has no fused kernel")  # fmt: skip
    assert "; loss[b]: CoSENTLoss left stock (CoSENTLoss has no st_fast equivalent); " in stock
    assert "; loss[c]: UserSubclassLoss left stock (a subclass of MultipleNegativesRankingLoss: " in stock
    assert "; loss[e]: MatryoshkaLoss(CoSENTLoss) left stock (CoSENTLoss has no st_fast equivalent)" in stock
    # the default batch sampler, which nobody expects st_fast to replace, is not shown; the report dict has it
    assert stock.endswith("; loss[e]: MatryoshkaLoss(CoSENTLoss) left stock (CoSENTLoss has no st_fast equivalent)")
    assert trainer.st_fast_report["batch sampler"] == (
        "batch_sampler left stock (st_fast replaces only no_duplicates / no_duplicates_hashed)"
    )
    assert _verdicts(caplog) == []  # only dataset "a" trained, whose loss is stock: no self-check ran
    assert type(trainer.loss["b"]) is stock_losses.CoSENTLoss and type(trainer.loss["c"]) is UserSubclassLoss
    assert trainer.st_fast_report["loss[b]"] == "CoSENTLoss left stock (CoSENTLoss has no st_fast equivalent)"
    assert list(trainer.st_fast_report) == [
        "loss[a]", "loss[b]", "loss[c]", "loss[d]", "loss[e]", "batch sampler", "multi-dataset batch sampler"
    ]  # fmt: skip


@contextlib.contextmanager
def _no_logging_configured():
    """No handler anywhere (pytest's capture handlers taken off the root logger): a plain script's logging."""
    root = logging.getLogger()
    saved = root.handlers[:]
    for handler in saved:
        root.removeHandler(handler)
    try:
        assert not logging.getLogger("st_fast.trainer").hasHandlers()
        assert logging.getLogger("st_fast.trainer").getEffectiveLevel() == logging.WARNING  # Python's default
        yield
    finally:
        for handler in saved:
            root.addHandler(handler)


def test_report_shown_without_logging_configuration_once_per_train(tiny_model, tmp_path, capsys):
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "shown", max_steps=1), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model),
    )  # fmt: skip
    loss = "st_fast MultipleNegativesRankingLoss, backend native (auto; cpu, float32)"
    expected = {"loss": loss + NOT_RUN, "batch sampler": "st_fast NoDuplicatesBatchSampler (same batches as stock's)"}
    assert trainer.st_fast_report == expected  # before training: the decisions the dataloader will get
    # first among the callbacks: the report is printed before the progress bar is drawn, not onto its line
    assert type(trainer.callback_handler.callbacks[0]).__name__ == "SwapReportCallback"
    line = "[st_fast] loss: " + expected["loss"] + "; batch sampler: " + expected["batch sampler"]
    with _no_logging_configured():
        capsys.readouterr()
        trainer.train()
        first = capsys.readouterr()
        trainer.train()
        second = capsys.readouterr()
    for captured in (first, second):  # once per train(), on stderr: the report, then the verdicts of the first step
        report, verdicts = [text for text in captured.err.splitlines() if "st_fast" in text]
        assert "\n" + report + "\n" in "\n" + captured.err  # each on its own line
        assert verdicts.startswith(VERDICTS) and "loss: MultipleNegativesRankingLoss passed: loss " in verdicts
        assert "; batch sampler: checked" in verdicts and "first 3 batches equal stock's" in verdicts
        assert "st_fast" not in captured.out
    assert first.err.splitlines()[-2:].count(line) == 0 and line in first.err
    assert trainer.st_fast_report["loss"].startswith(loss + ", self-check passed: loss ")
    assert trainer.st_fast_report["batch sampler"].startswith(expected["batch sampler"] + ", self-check checked")


def test_report_starts_on_its_own_line_after_an_unfinished_progress_bar(tiny_model, tmp_path, capsys):
    """The stock model card's widget bar leaves its line open; the report must not be glued to it (issue 26)."""
    import sys

    from st_fast import report

    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "own-line", max_steps=1), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model),
    )  # fmt: skip
    with _no_logging_configured():
        capsys.readouterr()
        sys.stderr.write("Computing widget examples:   0%|          | 0/1 [00:00<?, ?it/s]")
        assert report.emit_report(trainer)
        err = capsys.readouterr().err
    assert "?it/s]\n[st_fast] loss: st_fast MultipleNegativesRankingLoss" in err, err


def test_report_goes_through_configured_logging_once(tiny_model, tmp_path, caplog, capsys):
    """With a handler configured (pytest's, on the root logger, which stays at WARNING) the report is one INFO record
    of ``st_fast.trainer`` and st_fast's own stderr handler stays out (not shown twice); a level above INFO on the
    ``st_fast`` logger silences it."""
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "logged", max_steps=1), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model),
    )  # fmt: skip
    assert logging.getLogger().level == logging.WARNING
    capsys.readouterr()
    trainer.train()
    record, verdicts = [record for record in caplog.records if record.name == "st_fast.trainer"]
    assert record.levelno == logging.INFO and "backend native (auto; cpu, float32)" in record.getMessage()
    assert verdicts.levelno == logging.INFO and verdicts.getMessage().startswith(VERDICTS)
    assert "[st_fast]" not in capsys.readouterr().err
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="st_fast")
    trainer.train()
    assert _reports(caplog) == [] and _verdicts(caplog) == []


def test_report_off_and_on_the_main_process_only(tiny_model, tmp_path, caplog):
    def build(name: str, **kwargs):
        return FastTrainer(
            model=tiny_model, args=_args(tmp_path, name, max_steps=1), train_dataset=_pairs(64),
            loss=stock_losses.MultipleNegativesRankingLoss(tiny_model), **kwargs,
        )  # fmt: skip

    quiet = build("quiet", st_fast={"report": False})
    quiet.train()
    assert _reports(caplog) == [] and _verdicts(caplog) == []
    assert quiet.st_fast_report["loss"].startswith(
        "st_fast MultipleNegativesRankingLoss, backend native (auto; cpu, float32), self-check passed"
    )
    build("stock", st_fast=False).train()  # the stock trainer exactly: no report either
    assert _reports(caplog) == []
    other_rank = build("rank1", st_fast=StFastConfig(backend="torch"))
    other_rank.is_world_process_zero = lambda: False  # what a process of rank > 0 answers
    other_rank.train()
    assert _reports(caplog) == []
    assert _verdicts(caplog) == []
    assert other_rank.st_fast_report["loss"].startswith(
        "st_fast MultipleNegativesRankingLoss, backend torch (asked; cpu, float32), self-check passed"
    )
    loud = build("loud")
    loud.is_world_process_zero = lambda: True
    loud.train()
    assert len(_reports(caplog)) == 1


def test_options_are_validated(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="'backend' must be one of 'auto', 'triton', 'native', 'torch', got 'cuda'"):
        StFastConfig(backend="cuda")
    for bad in ({"loss": "yes"}, {"sampler": 1}, {"report": None}):
        with pytest.raises(TypeError, match=f"st_fast option '{next(iter(bad))}' must be True or False"):
            StFastConfig(**bad)
    with pytest.raises(TypeError, match="must be True or False"):
        StFastConfig.coerce({"report": "no"})
    with pytest.raises(ValueError, match="unknown option.*known: loss, sampler, backend, report"):
        StFastConfig.coerce({"reports": False})
    with pytest.raises(ValueError, match="must be one of"):
        FastTrainer(
            model=tiny_model, args=_args(tmp_path, "cuda"), train_dataset=_pairs(64),
            loss=stock_losses.MultipleNegativesRankingLoss(tiny_model), st_fast={"backend": "cuda"},
        )  # fmt: skip
    with pytest.raises(ValueError, match="must be one of"):
        st_fast.patch({"backend": "cuda"})
    assert not st_fast.is_patched()
    with pytest.raises(TypeError, match="'report' must be True or False"):
        st_fast.patch({"report": 0})
    assert not st_fast.is_patched()


def _mnrl_trainer(model, tmp_path, name: str, trainer_class=FastTrainer, **kwargs):
    return trainer_class(
        model=model, args=_args(tmp_path, name, max_steps=1), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(model), **kwargs,
    )  # fmt: skip


def test_a_backend_that_cannot_run_on_the_model_fails_at_construction(tiny_model, tmp_path, monkeypatch):
    import st_fast.ops.backends as backends

    # triton on CPU tensors without the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"the loss \(MultipleNegativesRankingLoss\) cannot run with "
                                           r"backend='triton' on cpu with float32 embeddings: "):  # fmt: skip
        _mnrl_trainer(tiny_model, tmp_path, "triton", st_fast={"backend": "triton"})
    st_fast.patch({"backend": "triton"})  # patch(): the stock trainer's constructor fails the same way
    with pytest.raises(RuntimeError, match="backend='triton' on cpu"):
        _mnrl_trainer(tiny_model, tmp_path, "triton-patched", trainer_class=StockTrainer)
    st_fast.unpatch()

    # native where its extension is not built for the device; auto then takes torch
    monkeypatch.setattr(backends, "native_available", lambda device: False)
    with pytest.raises(RuntimeError, match="backend='native' on cpu.*native backend is not available on cpu"):
        _mnrl_trainer(tiny_model, tmp_path, "native", st_fast={"backend": "native"})
    trainer = _mnrl_trainer(tiny_model, tmp_path, "auto")
    assert (
        trainer.st_fast_report["loss"]
        == "st_fast MultipleNegativesRankingLoss, backend torch (auto; cpu, float32)" + NOT_RUN
    )
    monkeypatch.undo()

    # float64 embeddings: native / triton compute in float32 only; auto takes torch
    tiny_model.double()
    with pytest.raises(TypeError, match="backend='native' on cpu with float64 embeddings: .*use backend='torch'"):
        _mnrl_trainer(tiny_model, tmp_path, "f64", st_fast={"backend": "native"})
    trainer = _mnrl_trainer(tiny_model, tmp_path, "f64-auto")
    assert (
        trainer.st_fast_report["loss"]
        == "st_fast MultipleNegativesRankingLoss, backend torch (auto; cpu, float64)" + NOT_RUN
    )
    # a user's st_fast loss is checked as well, whatever st_fast= says
    with pytest.raises(TypeError, match="float64"):
        FastTrainer(
            model=tiny_model, args=_args(tmp_path, "own"), train_dataset=_pairs(64), st_fast={"loss": False},
            loss=fast_losses.MultipleNegativesRankingLoss(tiny_model, backend="native"),
        )  # fmt: skip


@pytest.mark.skipif(not st_fast.native_info()["triton"], reason="needs triton (the interpreter runs it on CPU)")
def test_report_names_the_backend_each_loss_computes_with(minilm_path, tiny_model, tmp_path, monkeypatch):
    """Under TRITON_INTERPRET=1 triton runs on CPU tensors: MNRL computes with it; the drop-in GIST loss computes
    what its Triton kernels cannot decide exactly with torch, and says so; a cached loss's stage is named."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    guide = make_tiny_model(minilm_path, seed=1)
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "gist"), train_dataset=DatasetDict({"m": _pairs(64)}),
        st_fast={"backend": "triton"}, loss={
            "m": stock_losses.MultipleNegativesRankingLoss(tiny_model),
            "c": stock_losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=8),
            "g": stock_losses.GISTEmbedLoss(tiny_model, guide),
        },
    )  # fmt: skip
    report = trainer.st_fast_report
    assert report["loss[m]"] == "st_fast MultipleNegativesRankingLoss, backend triton (asked; cpu, float32)" + NOT_RUN
    assert report["loss[c]"] == (
        "st_fast CachedMultipleNegativesRankingLoss, loss stage on backend triton (asked; cpu, float32)" + NOT_RUN
    )
    assert report["loss[g]"].startswith(
        "st_fast GISTEmbedLoss, backend torch (triton asked: the guided Triton kernels cannot decide masks"
    ) and report["loss[g]"].endswith("; cpu, float32)" + NOT_RUN)


def test_report_says_the_backend_option_leaves_an_st_fast_loss_you_built_as_it_is(tiny_model, tmp_path):
    """st_fast={"backend": ...} sets the backend of the losses the trainer fuses; an st_fast loss object the user
    built keeps its own backend, and the report says that the option was not applied to it."""
    from st_fast.losses import MultipleNegativesRankingLoss

    own = MultipleNegativesRankingLoss(tiny_model)  # backend="auto"
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "own"), train_dataset=_pairs(16), loss=own, st_fast={"backend": "torch"}
    )  # fmt: skip
    assert trainer.loss is own and own.backend == "auto"
    assert "option backend='torch' not applied" in trainer.st_fast_report["loss"]
    fused = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "fused"), train_dataset=_pairs(16),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model), st_fast={"backend": "torch"},
    )  # fmt: skip
    assert "not applied" not in fused.st_fast_report["loss"] and "backend torch (asked" in fused.st_fast_report["loss"]


# ---------------------------------------------------------------------------------------------------------------------
# Multi-dataset training, eval data, model_init, gradient accumulation, resume
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("multi", ["round_robin", "proportional"])
def test_dict_losses_with_dataset_dict(minilm_path, tmp_path, multi):
    train = DatasetDict({"first": _pairs(96), "second": _pairs(160).select(range(96, 160))})
    evaluation = DatasetDict(
        {"first": _pairs(200).select(range(160, 200)), "second": _pairs(240).select(range(200, 240))}
    )
    trainers = {}
    for name, trainer_class in (("stock", RecordingStock), ("fast", RecordingFast)):
        model = make_tiny_model(minilm_path)
        loss = {
            "first": stock_losses.MultipleNegativesRankingLoss(model),
            "second": stock_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4),
        }
        trainer = trainer_class(
            model=model, train_dataset=train, eval_dataset=evaluation, loss=loss,
            args=_args(
                tmp_path, name, max_steps=6, per_device_train_batch_size=8, per_device_eval_batch_size=8,
                multi_dataset_batch_sampler=multi, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=3,
            ),
        )  # fmt: skip
        trainer.train()
        trainers[name] = trainer
    stock, fast = trainers["stock"], trainers["fast"]
    assert type(fast.loss["first"]) is fast_losses.MultipleNegativesRankingLoss
    assert type(fast.loss["second"]) is fast_losses.CachedMultipleNegativesRankingLoss
    for trainer in (fast.get_train_dataloader(), fast.get_eval_dataloader()):
        children = trainer.batch_sampler.batch_samplers
        assert all(isinstance(child, NoDuplicatesBatchSampler) for child in children)
    _assert_same_training(stock, fast)  # eval losses included (compute_loss runs for eval batches too)
    evals = [
        [
            value
            for log in t.state.log_history
            for key, value in log.items()
            if key.startswith("eval_") and key.endswith("_loss")
        ]
        for t in (stock, fast)
    ]  # eval_first_loss, eval_second_loss at steps 3 and 6
    assert len(evals[0]) == 4
    torch.testing.assert_close(torch.tensor(evals[1]), torch.tensor(evals[0]), rtol=LOSS_RTOL, atol=0.0)


def test_model_init_and_loss_callable(minilm_path, tmp_path):
    def model_init():
        return make_tiny_model(minilm_path, seed=3)

    trainer = FastTrainer(
        model_init=model_init, args=_args(tmp_path, "init", max_steps=2), train_dataset=_pairs(64),
        loss=lambda model: stock_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4),
    )  # fmt: skip
    assert type(trainer.loss) is fast_losses.CachedMultipleNegativesRankingLoss
    trainer.train()  # call_model_init builds a fresh model; the loss must follow it and stay fused
    assert type(trainer.loss) is fast_losses.CachedMultipleNegativesRankingLoss
    assert trainer.loss.model is trainer.model


def test_resume_from_checkpoint_gives_the_same_batches(minilm_path, tmp_path):
    dataset = _pairs(80)  # 5 batches of 16 per epoch, 2 per step: 8 steps cross three epoch boundaries

    class StopAt(TrainerCallback):
        def __init__(self, step: int | None) -> None:
            self.step = step

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                control.should_training_stop = True

    def run(name: str, stop_at: int | None = None, resume: str | None = None) -> RecordingFast:
        model = make_tiny_model(minilm_path)
        trainer = RecordingFast(
            model=model, train_dataset=dataset, loss=stock_losses.MultipleNegativesRankingLoss(model),
            args=_args(tmp_path, name, max_steps=8, save_strategy="steps", save_steps=4, gradient_accumulation_steps=2),
            callbacks=[StopAt(stop_at)],
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run("whole")
    first = run("interrupted", stop_at=4)  # the same schedule (max_steps=8), stopped after the checkpoint at step 4
    resumed = run("interrupted", resume=str(tmp_path / "interrupted" / "checkpoint-4"))
    assert first.batch_digests + resumed.batch_digests == whole.batch_digests
    torch.testing.assert_close(
        torch.tensor(first.step_losses + resumed.step_losses), torch.tensor(whole.step_losses), rtol=LOSS_RTOL, atol=0.0
    )


# ---------------------------------------------------------------------------------------------------------------------
# st_fast.patch(): the stock trainer, constructed directly or by model.fit
# ---------------------------------------------------------------------------------------------------------------------


def test_patch_is_a_plain_function_sharing_the_trainers_swaps():
    import st_fast._patching as patching
    import st_fast.swaps as swaps
    import st_fast.trainer as trainer_module

    assert isinstance(st_fast.patch, types.FunctionType) and st_fast.patch is patching.patch
    assert st_fast.unpatch is patching.unpatch and st_fast.is_patched is patching.is_patched
    for name in ("fuse_loss", "fast_batch_sampler", "finish_init"):  # one implementation of each swap
        assert getattr(patching, name) is getattr(swaps, name) is getattr(trainer_module, name)


def test_patch_direct_stock_trainer_and_unpatch(tiny_model, tmp_path, caplog):
    originals = {name: BaseTrainer.__dict__[name] for name in ("prepare_loss", "call_model_init", "get_batch_sampler")}
    st_fast.patch()
    st_fast.patch()  # idempotent
    assert st_fast.is_patched()
    trainer = StockTrainer(
        model=tiny_model, args=_args(tmp_path, "patched", max_steps=2), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model),
    )  # fmt: skip
    assert type(trainer.loss) is fast_losses.MultipleNegativesRankingLoss
    assert isinstance(trainer.get_train_dataloader().batch_sampler, NoDuplicatesBatchSampler)
    trainer.train()
    (report,) = _reports(caplog)  # the patched stock trainer reports too, once
    assert report.startswith("[st_fast] loss: st_fast MultipleNegativesRankingLoss, backend native (auto; cpu")
    assert trainer.st_fast_report["loss"].split(", self-check")[0] + NOT_RUN in report

    # The st_fast trainer keeps its own options while patched (no second fusing, one report).
    caplog.clear()
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "both", max_steps=2), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model), st_fast={"loss": False},
    )  # fmt: skip
    assert type(trainer.loss) is stock_losses.MultipleNegativesRankingLoss
    assert isinstance(trainer.get_train_dataloader().batch_sampler, NoDuplicatesBatchSampler)
    trainer.train()
    (report,) = _reports(caplog)
    assert "loss: MultipleNegativesRankingLoss left stock (st_fast loss=False)" in report

    st_fast.unpatch()
    assert not hasattr(trainer, "st_fast_report") or isinstance(trainer, FastTrainer)
    assert "st_fast_report" not in BaseTrainer.__dict__
    st_fast.unpatch()  # a no-op when not patched
    assert not st_fast.is_patched()
    assert {name: BaseTrainer.__dict__[name] for name in originals} == originals
    trainer = StockTrainer(
        model=tiny_model, args=_args(tmp_path, "unpatched", max_steps=2), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model),
    )  # fmt: skip
    assert type(trainer.loss) is stock_losses.MultipleNegativesRankingLoss
    assert type(trainer.get_train_dataloader().batch_sampler) is stock_sampler.NoDuplicatesBatchSampler


def test_patch_covers_model_fit(tiny_model, tmp_path, monkeypatch):
    from sentence_transformers import InputExample
    from sentence_transformers.sentence_transformer.datasets import NoDuplicatesDataLoader

    built = []
    original_init = StockTrainer.__init__

    def spy_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(StockTrainer, "__init__", spy_init)
    examples = [InputExample(texts=[row["anchor"], row["positive"]]) for row in _pairs(64)]
    loader = NoDuplicatesDataLoader(examples, batch_size=16)
    st_fast.patch({"backend": "torch"})
    tiny_model.fit(train_objectives=[(loader, stock_losses.MultipleNegativesRankingLoss(tiny_model))], epochs=1,
                   show_progress_bar=False, output_path=None)  # fmt: skip
    (trainer,) = built
    (loss,) = trainer.loss.values()  # fit() trains a dict of one loss per objective
    assert type(loss) is fast_losses.MultipleNegativesRankingLoss and loss.backend == "torch"
    children = trainer.get_train_dataloader().batch_sampler.batch_samplers
    assert all(isinstance(child, NoDuplicatesBatchSampler) for child in children)
    assert trainer.state.global_step == 4


# ---------------------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo on CPU) vs one process over the same global batches
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_match_one_process_over_the_same_global_batches(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).with_name("ddp_train.py"))
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )  # examples
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for command in (
        [*torchrun, script, str(tmp_path / "two")],
        [sys.executable, script, str(tmp_path / "one"), "--group", "2"],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-4000:]
        # the swap report, with no logging configured, shown by the main process only (torchrun forwards both)
        reports = [line for line in done.stderr.splitlines() if line.startswith("[st_fast] loss: ")]
        assert len(reports) == 1 and reports[0].startswith(
            "[st_fast] loss: st_fast MultipleNegativesRankingLoss, backend native (auto; cpu, float32)"
        ), reports

    ranks = [json.loads((tmp_path / "two" / f"losses-rank{rank}.json").read_text()) for rank in (0, 1)]
    one = json.loads((tmp_path / "one" / "losses-rank0.json").read_text())
    assert all(r["loss_class"].startswith("st_fast.") and r["sampler"] == "st_fast.sampler" for r in [*ranks, one])
    # Each rank's loss is the mean over its local rows (against all gathered candidates); equal local batch sizes
    # make the global loss the mean of the two.
    two = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    assert len(two) == len(one["losses"]) == 5
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one["losses"]), rtol=LOSS_RTOL, atol=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Mixed precision: bf16 autocast on the CPU
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stock_class", "kwargs"),
    [
        (stock_losses.MultipleNegativesRankingLoss, {}),
        (stock_losses.CachedMultipleNegativesRankingLoss, {"mini_batch_size": 4}),
    ],
    ids=["MNRL", "CachedMNRL"],
)  # fmt: skip
def test_bf16_mixed_precision_training(minilm_path, tmp_path, stock_class, kwargs):
    """bf16 autocast (``bf16=True``) on the CPU: the encoder runs in bf16, and both stock (whose similarity functions
    upcast the embeddings) and st_fast (fp32 loss math) compute the loss from the same bf16 embeddings, so the
    batches are identical and the step losses agree to LOSS_RTOL over every step."""
    runs = {}
    for name, trainer_class in (("stock", RecordingStock), ("st_fast", RecordingFast)):
        model = make_tiny_model(minilm_path)
        args = _args(tmp_path, name, max_steps=3, per_device_train_batch_size=8, bf16=True)
        trainer = trainer_class(model=model, args=args, train_dataset=_pairs(64), loss=stock_class(model, **kwargs))
        trainer.train()
        runs[name] = trainer
    stock, fast = runs["stock"], runs["st_fast"]
    _assert_same_training(stock, fast)
    assert isinstance(
        fast.loss, (fast_losses.MultipleNegativesRankingLoss, fast_losses.CachedMultipleNegativesRankingLoss)
    )


def test_multi_dataset_sampler_reshuffles_every_epoch_under_ddp_sharding(tiny_model, tmp_path):
    """accelerate's batch-sampler sharding calls ``batch_sampler.sampler.set_epoch`` only; the trainer makes that
    reach the round-robin sampler and, through it (as its own ``set_epoch`` does: sentence-transformers >= 6.1),
    st_fast's per-dataset samplers, so each epoch yields what the samplers yield when told the epoch directly."""
    from accelerate.data_loader import prepare_data_loader
    from sentence_transformers.base.sampler import RoundRobinBatchSampler

    data = DatasetDict({"first": _pairs(48), "second": _pairs(96).select(range(48, 96))})
    args = _args(tmp_path, "multi", per_device_train_batch_size=4, multi_dataset_batch_sampler="round_robin")

    def sharded_epochs(tell_sampler: bool):
        trainer = FastTrainer(
            model=tiny_model, args=args, train_dataset=data, loss=stock_losses.MultipleNegativesRankingLoss(tiny_model)
        )
        multi = trainer.get_train_dataloader().batch_sampler
        multi = getattr(multi, "batch_sampler", multi)
        assert all(isinstance(child, NoDuplicatesBatchSampler) for child in multi.batch_samplers)
        loader = torch.utils.data.DataLoader(range(96), batch_sampler=multi, collate_fn=list)
        sharded = prepare_data_loader(loader, num_processes=2, process_index=0, put_on_device=False, even_batches=False)
        epochs = []
        for epoch in range(2):
            sharded.set_epoch(epoch)
            if tell_sampler:
                multi.set_epoch(epoch)
            epochs.append([list(batch) for batch in sharded])
        return multi, epochs

    multi, epochs = sharded_epochs(tell_sampler=False)
    _, reference = sharded_epochs(tell_sampler=True)
    assert epochs[0] and epochs == reference
    assert multi.epoch == 1
    if multi_sampler_forwards_set_epoch(RoundRobinBatchSampler):
        assert all(child.epoch == 1 for child in multi.batch_samplers)
        assert epochs[0] != epochs[1]


def test_patch_after_a_trainer_was_built_warns_there(tiny_model, tmp_path, caplog):
    """A stock trainer built before patch() keeps its stock loss: patch() says so, where the mistake is made."""

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "built before this call" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="st_fast"):
        st_fast.patch()  # what earlier tests may have left alive
    st_fast.unpatch()
    before = int(warned()[0].split("patch(): ")[1].split(" ")[0]) if warned() else 0
    caplog.clear()
    early = StockTrainer(
        model=tiny_model, args=_args(tmp_path, "early", max_steps=1), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model),
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        st_fast.patch()
    (warning,) = warned()
    assert f"{before + 1} trainer(s) (SentenceTransformerTrainer) were built before this call" in warning, warning
    assert type(early.loss) is stock_losses.MultipleNegativesRankingLoss
    assert early.st_fast_report["loss"] == (
        "MultipleNegativesRankingLoss left stock (the trainer was built before st_fast.patch(): losses are fused "
        "when a trainer is built)"
    )
    st_fast.unpatch()
    del early
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        st_fast.patch()  # the early trainer is gone: back to what was there before
    assert len(warned()) == (1 if before else 0)


@pytest.mark.parametrize("how", ["trainer", "patch"])
@pytest.mark.parametrize(
    "loss_name", ["MultiVectorMultipleNegativesRankingLoss", "CachedMultiVectorMultipleNegativesRankingLoss"]
)
def test_multi_vector_training_fuses_the_maxsim_loss_and_trains_as_stock(minilm_path, tmp_path, how, loss_name, caplog):
    """st_fast.MultiVectorEncoderTrainer, or st_fast.patch() with the stock MultiVectorEncoderTrainer: the stock
    multi-vector loss becomes st_fast's fused MaxSim loss, the report names it, and two steps give the stock
    trainer's step losses and weights on the same batches (copies of one model)."""
    import copy

    from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainer as StockMultiVectorTrainer

    model = make_tiny_multi_vector_model(minilm_path)
    runs = []
    for fused in (False, True):
        encoder = copy.deepcopy(model)
        stock_class, kwargs, dataset, args = multi_vector_training(loss_name, str(tmp_path / str(fused)))
        trainer_class = st_fast.MultiVectorEncoderTrainer if fused and how == "trainer" else StockMultiVectorTrainer
        if fused and how == "patch":
            st_fast.patch()
        try:
            trainer = trainer_class(
                model=encoder, args=args, train_dataset=dataset, loss=stock_class(encoder, **kwargs)
            )
            assert (type(trainer.loss) is getattr(fast_losses, loss_name)) is fused
            with caplog.at_level(logging.INFO, logger="st_fast.trainer"):
                trainer.train()
            if fused:  # patch()'s st_fast_report property goes with unpatch()
                assert isinstance(trainer.loss, stock_class) and loss_name in trainer.st_fast_report["loss"]
                assert f"st_fast {loss_name}" in caplog.text
        finally:
            st_fast.unpatch()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs.append((losses, torch.cat([p.detach().flatten() for p in encoder.parameters()])))
    (stock_seen, stock_weights), (fused_seen, fused_weights) = runs
    assert len(stock_seen) == 2
    torch.testing.assert_close(torch.tensor(fused_seen), torch.tensor(stock_seen), rtol=1e-4, atol=1e-5)
    # AdamW divides by sqrt(v): where a gradient is float32 noise (~1e-10) its rounding moves the weight by up to lr;
    # a tenth of one step (lr = 1e-3) bounds what rounding may move, far below a wrong gradient's full steps
    torch.testing.assert_close(fused_weights, stock_weights, rtol=0, atol=1e-4)
