"""examples/demo.py (the README's main command) at its smallest settings: it trains with the one-import trainer,
shows the same model (per-step losses, NDCG@10) and prints the component table of the replaced parts."""

from __future__ import annotations

import re

import torch

SMALL = [
    "--steps", "2", "--batch-size", "8", "--mini-batch-size", "4", "--eval-pairs", "16", "--max-seq-length", "32",
    "--device", "cpu", "--threads", "1",
    "--loss-batch-size", "64", "--loss-dim", "32", "--sampler-rows", "3000", "--sampler-batch-size", "32",
]  # fmt: skip


def test_demo_summary(tmp_path, capsys):
    from examples import demo

    threads = torch.get_num_threads()
    try:
        assert demo.main([*SMALL, "--output-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    summary = out.split("=== st_fast demo summary ===", 1)[1]

    # the st_fast run is the one-import trainer, which swapped the stock loss and sampler for st_fast's
    assert "one-import trainer: yes" in summary
    assert re.search(r"^stock +run: sentence_transformers\.SentenceTransformerTrainer trained "
                     r"sentence_transformers\.CachedMultipleNegativesRankingLoss on "
                     r"sentence_transformers\.NoDuplicatesBatchSampler batches$", summary, re.M)  # fmt: skip
    assert re.search(r"^st_fast +run: st_fast\.SentenceTransformerTrainer trained "
                     r"st_fast\.CachedMultipleNegativesRankingLoss \(backend \w+\) on "
                     r"st_fast\.NoDuplicatesBatchSampler batches$", summary, re.M)  # fmt: skip

    # the component table: part, size, stock time, st_fast time, speed-up (and the check of the results)
    seconds = r"[0-9.e+-]+ s"
    for part, size in [
        (r"CachedMNRL loss stage, fwd\+bwd \(\w+\)", r"B=N=64, D=32, mbs 32"),
        (r"no-duplicates sampler, first epoch", r"3,000 rows, batch 32"),
        (r"no-duplicates sampler, later epoch", r"3,000 rows, batch 32"),
        (r"training run, 2 steps \(whole trainer\)", r"batch 8, MiniLM-L6, 32 tokens"),
    ]:
        assert re.search(rf"^{part} +{size} +{seconds} +{seconds} +[0-9.]+x ", summary, re.M), part
    assert re.search(r"same \d+ batches", summary)

    # the same model: identical step losses (2 per run) and NDCG@10 before / after for both runs
    losses = dict(re.findall(r"^(stock|st_fast) +[0-9.]+ +[0-9.]+ +((?:[0-9.]+ ?){2})$", summary, re.M))
    assert set(losses) == {"stock", "st_fast"}
    assert re.search(r"^same model: yes: step losses agree to \S+ \(relative\); NDCG@10 [0-9.]+ before -> stock "
                     r"[0-9.]+, st_fast [0-9.]+ after$", summary, re.M)  # fmt: skip
