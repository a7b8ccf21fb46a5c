"""st_fast.SentenceTransformerTrainer and st_fast.patch(): the same training as the stock trainer, with st_fast's parts.

Each comparison trains twice from the same seed — once with the stock trainer, once with st_fast — and compares the
batches every step consumed (a digest of the tokenized anchors) and the step losses. Dropout is on in both runs, so
equal losses also show that st_fast consumes the RNG exactly as the stock code does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import types

import pytest
import torch
from conftest import make_tiny_model
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

    # Logged once at train begin; the model card names the same loss and tags st_fast.
    reports = [record.getMessage() for record in caplog.records if record.name == "st_fast.trainer"]
    assert len(reports) == 1 and "fused" in reports[0] and "st_fast.NoDuplicatesBatchSampler" in reports[0]
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


def test_report_says_what_was_left_stock(tiny_model, tmp_path, caplog):
    from sentence_transformers import util

    losses = {
        "a": stock_losses.MultipleNegativesRankingLoss(tiny_model, similarity_fct=util.euclidean_sim),
        "b": stock_losses.CoSENTLoss(tiny_model),
        "c": UserSubclassLoss(tiny_model),
    }
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "report", max_steps=1, batch_sampler="batch_sampler"),
        train_dataset=DatasetDict({"a": _pairs(64)}), loss=losses,  # a loss dict may name more datasets
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="st_fast.trainer"):
        trainer.train()
    (report,) = [record.getMessage() for record in caplog.records if record.name == "st_fast.trainer"]
    assert "similarity_fct=euclidean_sim has no fused kernel" in report
    assert "CoSENTLoss: left stock" in report
    assert "batch sampler: batch_sampler left stock" in report
    assert "UserSubclassLoss: left stock (a subclass of MultipleNegativesRankingLoss" in report
    assert type(trainer.loss["b"]) is stock_losses.CoSENTLoss and type(trainer.loss["c"]) is UserSubclassLoss


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


def test_patch_direct_stock_trainer_and_unpatch(tiny_model, tmp_path):
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

    # The st_fast trainer keeps its own options while patched (no second fusing, one report).
    trainer = FastTrainer(
        model=tiny_model, args=_args(tmp_path, "both", max_steps=2), train_dataset=_pairs(64),
        loss=stock_losses.MultipleNegativesRankingLoss(tiny_model), st_fast={"loss": False},
    )  # fmt: skip
    assert type(trainer.loss) is stock_losses.MultipleNegativesRankingLoss
    assert isinstance(trainer.get_train_dataloader().batch_sampler, NoDuplicatesBatchSampler)

    st_fast.unpatch()
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
