"""``python -m benchmarks mask_duplicates_training --smoke`` in-process: both runs train one tiny epoch of the Debian
pairs with the local all-MiniLM-L6-v2, the st_fast run with mask_duplicates, and report time, steps and NDCG@10."""

from __future__ import annotations

import argparse

import torch

from benchmarks import mask_duplicates_training


def test_mask_training_rows():
    parser = argparse.ArgumentParser()
    mask_duplicates_training.add_arguments(parser)
    args = parser.parse_args(["--mask-training-rows", "40", "--mask-training-eval", "12"])
    args.smoke = True
    threads = torch.get_num_threads()
    rows = mask_duplicates_training.run(args)
    assert torch.get_num_threads() == threads
    assert [row["run"] for row in rows] == list(mask_duplicates_training.RUNS)
    for row in rows:
        assert row["epoch_s"] > 0 and row["steps"] >= 2 and 0.0 <= row["ndcg@10"] <= 1.0
        assert row["rows_trained"] == 40 and row["eval_pairs"] == 12
    assert rows[0]["dup_batches"] == 0  # the no-duplicates sampler's batches hold no repeated text
