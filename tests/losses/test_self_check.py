"""The first-use self-check (st_fast.losses.self_check): a fused loss compares itself with the stock method as it is
at call time, and where the stock math changed (here: monkeypatched inside the test: a scaled loss, another mask,
label smoothing) it returns stock's changed numbers, with one warning; it cannot pass vacuously; it can be turned off.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from gist_cases import PrecomputedEncoder, column_features
from parity import EmbeddingsOnlyModel as _Model
from parity import random_columns
from sentence_transformers import util
from sentence_transformers.sentence_transformer import losses as stock_losses

from st_fast import losses as fast_losses
from st_fast.losses import self_check

MNRL = stock_losses.MultipleNegativesRankingLoss
CMNRL = stock_losses.CachedMultipleNegativesRankingLoss


@pytest.fixture(autouse=True)
def _fresh_results(monkeypatch):
    """Each test starts with no verdict recorded in this process."""
    monkeypatch.setattr(self_check, "_results", {})


def _mnrl(cls=fast_losses.MultipleNegativesRankingLoss, **kwargs):
    return cls(_Model(), **kwargs)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "self-check" in r.getMessage()]


def _loss(loss, columns) -> float:
    return float(loss.compute_loss_from_embeddings(columns, None).detach())


def test_passes_and_computes_fused_on_the_installed_stock(caplog, monkeypatch):
    loss = _mnrl(scale=20.0)
    calls = []
    stock = MNRL.compute_loss_from_embeddings
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", lambda *a: calls.append(1) or stock(*a))
    columns = random_columns(9, 16, 3)
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        first = _loss(loss, columns)
        checked = len(calls)
        second = _loss(loss, columns)
    assert checked == 4  # stock in float64 and float32, on the call's slice and on the random batch
    assert len(calls) == checked  # once per configuration: the second call computes fused only
    assert first == second and not _warnings(caplog)
    assert self_check.last_result(loss).startswith("self-check passed")


def _scaled(original, factor):
    def patched(self, *args, **kwargs):
        return original(self, *args, **kwargs) * factor

    return patched


def test_follows_a_changed_stock_loss_and_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", _scaled(MNRL.compute_loss_from_embeddings, 1.1))
    columns = random_columns(7, 12, 2, seed=3)
    stock_value = float(MNRL(_Model(), scale=20.0).compute_loss_from_embeddings(columns, None))
    loss = _mnrl(scale=20.0)
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        values = [_loss(loss, columns) for _ in range(3)]
    assert values == [pytest.approx(stock_value, rel=1e-6)] * 3
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "MultipleNegativesRankingLoss" in warnings[0] and "scale=20.0" in warnings[0]
    import sentence_transformers

    assert sentence_transformers.__version__ in warnings[0]
    assert "MISMATCH" in self_check.last_result(loss)


def _label_smoothing_mnrl(self, embeddings, labels):
    """MNRL with label smoothing 0.1 (what a future stock might do)."""
    queries, docs = embeddings[0], torch.cat(embeddings[1:])
    scores = util.cos_sim(queries, docs) * self.scale
    target = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(scores, target, label_smoothing=0.1)


def test_follows_label_smoothing_with_gradients(monkeypatch):
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", _label_smoothing_mnrl)
    columns = random_columns(6, 10, 2, seed=4)
    expected = _label_smoothing_mnrl(MNRL(_Model(), scale=20.0), columns, None)
    expected_grads = torch.autograd.grad(expected, columns)
    actual = _mnrl(scale=20.0).compute_loss_from_embeddings(columns, None)
    grads = torch.autograd.grad(actual, columns)
    torch.testing.assert_close(actual, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


def _masked_last_column(self, reps, labels=None, *, with_backward=False):
    """A cached loss stage whose softmax leaves out the last candidate column (another mask)."""
    queries, docs = torch.cat(reps[0]), torch.cat([torch.cat(r) for r in reps[1:]])
    scores = util.cos_sim(queries, docs) * self.scale
    scores[: queries.shape[0] - 1, -1] = float("-inf")
    loss = F.cross_entropy(scores, torch.arange(queries.shape[0]))
    if with_backward:
        loss.backward()
        loss = loss.detach()
    return loss


def test_cached_loss_stage_follows_a_changed_mask(caplog, monkeypatch):
    monkeypatch.setattr(CMNRL, "calculate_loss", _masked_last_column)
    columns = random_columns(8, 12, 2, seed=5)
    reps = [[c[:4], c[4:]] for c in columns]
    expected = _masked_last_column(CMNRL(_Model(), mini_batch_size=4), reps)
    loss = fast_losses.CachedMultipleNegativesRankingLoss(_Model(), mini_batch_size=4)
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        actual = loss.calculate_loss(reps)
        again = loss.calculate_loss(reps)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(again, expected)
    assert len(_warnings(caplog)) == 1


def test_gist_follows_a_scaled_stock_forward(tokenizer, caplog, monkeypatch):
    gist = stock_losses.GISTEmbedLoss
    monkeypatch.setattr(gist, "forward", _scaled(gist.forward, 0.5))
    model, guide = PrecomputedEncoder(tokenizer), PrecomputedEncoder(tokenizer)
    columns = random_columns(7, 16, 3, seed=6)
    model.columns, guide.columns = columns, [c.detach() * 2 for c in columns]
    features = column_features(3)
    expected = float(gist(model, guide, temperature=0.3)(features, None))
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        actual = float(fast_losses.GISTEmbedLoss(model, guide, temperature=0.3)(features, None))
    assert actual == pytest.approx(expected, rel=1e-6)
    assert len(_warnings(caplog)) == 1


def test_cannot_pass_on_a_stock_without_gradient(monkeypatch):
    """A stock method whose loss has no gradient (every term zero) is no proof: the check fails, and stock computes."""
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", lambda self, e, labels: (e[0] * 0).sum())
    loss = _mnrl()
    value = loss.compute_loss_from_embeddings(random_columns(5, 8, 2), None)
    assert float(value) == 0.0
    assert "MISMATCH" in self_check.last_result(loss)


def test_a_one_row_first_batch_is_no_mismatch_and_no_pass(caplog):
    """One row proves nothing (loss 0, zero gradients, both sides): not a mismatch (which would send every later
    batch to stock), and the random batch still has to pass; later batches are fused and the verdict stands."""
    loss = _mnrl()
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        assert float(loss.compute_loss_from_embeddings(random_columns(1, 8, 2), None).detach()) == 0.0
        assert self_check.last_result(loss).startswith("self-check passed")  # on the random batch
        columns = random_columns(8, 8, 2, seed=2)
        expected = float(MNRL(_Model()).compute_loss_from_embeddings(columns, None))
        assert _loss(loss, columns) == pytest.approx(expected, rel=1e-5)
    assert not _warnings(caplog)


def test_equal_but_gradient_free_rows_are_inconclusive_not_a_mismatch(monkeypatch, caplog):
    """When both batches prove nothing (a stock whose loss and gradients are 0 wherever st_fast's are: here every
    candidate's score patched to the same value on both sides), the call is fused, reported as inconclusive and
    checked again at the next call."""
    calls = []
    stock = MNRL.compute_loss_from_embeddings
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", lambda *a: calls.append(1) or stock(*a))
    loss = _mnrl()
    one_row = random_columns(1, 8, 2)
    monkeypatch.setattr(self_check, "random_columns", lambda columns, **_: [c[:1].detach() for c in columns])
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        loss.compute_loss_from_embeddings(one_row, None)
        assert self_check.last_result(loss).startswith("self-check inconclusive so far"), self_check.last_result(loss)
        loss.compute_loss_from_embeddings(one_row, None)
    assert len(calls) == 8  # checked again: 2 x (float64, float32) per call
    assert not _warnings(caplog)  # no mismatch was found: nothing to warn about


def test_dot_score_at_scale_20_with_unit_embeddings_passes(caplog):
    from sentence_transformers import util as st_util

    columns = [torch.nn.functional.normalize(c.detach(), dim=-1) for c in random_columns(6, 384, 2)]
    loss = _mnrl(similarity_fct=st_util.dot_score)
    with caplog.at_level(logging.WARNING, logger="st_fast"):
        value = _loss(loss, columns)
    assert value == pytest.approx(float(MNRL(_Model(), similarity_fct=st_util.dot_score)
                                        .compute_loss_from_embeddings(columns, None)), abs=1e-6)  # fmt: skip
    assert self_check.last_result(loss).startswith("self-check passed") and not _warnings(caplog)


def test_a_one_row_batch_is_checked_on_the_random_batch_too(monkeypatch):
    """One row: its loss is 0 for any embeddings (LSE([s]) - s), so the call's slice alone proves nothing; the
    random batch of 4 rows catches the changed stock."""
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", _scaled(MNRL.compute_loss_from_embeddings, 1.1))
    loss = _mnrl()
    loss.compute_loss_from_embeddings(random_columns(1, 8, 2), None)
    assert "MISMATCH" in self_check.last_result(loss)


def test_off_computes_fused_without_asking_stock(monkeypatch):
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", _scaled(MNRL.compute_loss_from_embeddings, 1.1))
    columns = random_columns(7, 12, 2, seed=3)
    on, off = _mnrl(), _mnrl()
    off.self_check = False
    assert _loss(off, columns) != pytest.approx(_loss(on, columns), rel=1e-3)
    assert self_check.last_result(off) == "self-check off"
    with pytest.raises(TypeError):
        off.self_check = "no"


def test_fused_view_of_a_stock_object_checks_itself(monkeypatch):
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", _scaled(MNRL.compute_loss_from_embeddings, 1.1))
    stock = MNRL(_Model(), scale=20.0)
    columns = random_columns(7, 12, 2, seed=8)
    fused = fast_losses.fuse(stock)
    assert _loss(fused, columns) == pytest.approx(_loss(stock, columns), rel=1e-6)


def test_mask_duplicates_on_a_mismatch_is_an_error(monkeypatch):
    """Stock has no duplicate masking: a loss with mask_duplicates that fails its check raises, never silently
    computes the unmasked stock loss."""
    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", _scaled(MNRL.compute_loss_from_embeddings, 1.1))
    loss = _mnrl(mask_duplicates=True)
    with pytest.raises(ValueError, match="self-check"):
        loss.compute_loss_from_embeddings(random_columns(7, 12, 2), None)


# ---------------------------------------------------------------------------------------------------------------------
# Through the trainer and patch(): the option, and the report


def _train_one_step(trainer_class, model, tmp_path, name: str, **kwargs):
    from datasets import Dataset
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    texts = [f"text number {i}" for i in range(16)]
    data = Dataset.from_dict({"anchor": texts, "positive": [t + " again" for t in texts]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / name), max_steps=1, per_device_train_batch_size=8, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    loss = MNRL(model)
    trainer = trainer_class(model=model, args=args, train_dataset=data, loss=loss, **kwargs)
    before = trainer.st_fast_report["loss"]
    trainer.train()
    return trainer, before


def test_trainer_report_shows_the_check(tiny_model, tmp_path, caplog):
    from st_fast.trainer import SentenceTransformerTrainer

    with caplog.at_level(logging.INFO, logger="st_fast"):
        trainer, before = _train_one_step(SentenceTransformerTrainer, tiny_model, tmp_path, "on")
    assert "self-check not run yet" in before
    after = trainer.st_fast_report["loss"]
    assert "self-check passed: loss " in after, after
    shown = [r.getMessage() for r in caplog.records if r.name == "st_fast.trainer"]
    assert any("self-check not run yet" in line for line in shown)  # shown at train start, before the first batch


def test_trainer_option_turns_the_check_off(tiny_model, tmp_path, monkeypatch):
    from st_fast.trainer import SentenceTransformerTrainer

    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", _scaled(MNRL.compute_loss_from_embeddings, 1.1))
    trainer, _ = _train_one_step(SentenceTransformerTrainer, tiny_model, tmp_path, "off", st_fast={"self_check": False})
    assert "self-check off" in trainer.st_fast_report["loss"]
    assert not self_check._results  # never compared


def test_patch_follows_a_changed_stock_through_the_stock_trainer(tiny_model, tmp_path, monkeypatch, caplog):
    from sentence_transformers import SentenceTransformerTrainer as StockTrainer

    import st_fast

    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", _scaled(MNRL.compute_loss_from_embeddings, 1.1))
    st_fast.patch()
    try:
        with caplog.at_level(logging.WARNING, logger="st_fast"):
            trainer, _ = _train_one_step(StockTrainer, tiny_model, tmp_path, "patched")
        assert "MISMATCH" in trainer.st_fast_report["loss"]  # (the property goes with unpatch())
    finally:
        st_fast.unpatch()
    assert len(_warnings(caplog)) == 1


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_first_call_in_evaluation_mode_is_checked_properly(mode):
    """An evaluation loop may make the first call, without autograd (inference tensors included): the check still
    compares gradients, and passes on the unchanged stock."""
    columns = [c.detach() for c in random_columns(5, 8, 2)]
    loss = _mnrl()
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        value = loss.compute_loss_from_embeddings([c.clone() for c in columns], None)
    assert self_check.last_result(loss).startswith("self-check passed"), self_check.last_result(loss)
    assert float(value) == pytest.approx(float(MNRL(_Model()).compute_loss_from_embeddings(columns, None)), rel=1e-5)


def test_a_stock_method_that_cannot_run_on_the_check_leaves_the_call_to_stock(monkeypatch):
    """Nothing proven, nothing fused: the call goes to the stock method, whose own error the user then sees."""

    def broken(self, embeddings, labels):
        raise RuntimeError("stock cannot compute this")

    monkeypatch.setattr(MNRL, "compute_loss_from_embeddings", broken)
    loss = _mnrl()
    with pytest.raises(RuntimeError, match="stock cannot compute this"):
        loss.compute_loss_from_embeddings(random_columns(5, 8, 2), None)
    assert "could not run on the check's rows" in self_check.last_result(loss)
