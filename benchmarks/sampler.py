"""NoDuplicatesBatchSampler: stock sentence-transformers (default and precompute_hashes=True modes) vs st_fast.

Data: synthetic MS MARCO-like (anchor, positive, negative) triplets. Queries repeat (about 2 rows each), the positive
follows the query, and negatives are drawn from the same passage pool as the positives, so duplicates occur within
and across columns. Per dataset size and batch size:

* first epoch: construct the sampler and iterate epoch 0 (the stock hashed mode's ``datasets.map`` hashing and
  st_fast's key building included);
* later epoch: ``set_epoch(1)`` on the same sampler and iterate again;
* peak memory: growth of the process's peak RSS while constructing the sampler and consuming one epoch (the peak
  mark is reset through /proc/self/clear_refs before each measurement; batches are dropped as they are consumed);
* every st_fast epoch is checked batch-for-batch against the stock sampler's.

The stock default mode re-reads every row from the dataset (about 30 s per epoch at 1M rows on a 2-core CPU), so it
is timed only up to ``--sampler-stock-default-max-rows`` rows; larger sizes compare against it through the note.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import numpy as np
import torch

from benchmarks.common import progress, repeats_of, rss_peak_mb, timed

TITLE = "NoDuplicatesBatchSampler: stock vs st_fast (synthetic triplets)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampler")
    group.add_argument("--sampler-rows", type=int, nargs="+", default=None,
                       help="dataset sizes (default: 100000 1000000; smoke: 3000)")  # fmt: skip
    group.add_argument("--sampler-batch-sizes", type=int, nargs="+", default=None,
                       help="batch sizes (default: 128 8192; smoke: 32)")  # fmt: skip
    group.add_argument("--sampler-stock-default-max-rows", type=int, default=100_000,
                       help="largest dataset the (slow) stock default mode is timed on")  # fmt: skip
    group.add_argument("--sampler-no-memory", action="store_true", help="skip the peak-memory measurements")


def make_triplets(num_rows: int, seed: int = 0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    num_queries = max(1, num_rows // 2)
    queries = rng.integers(num_queries, size=num_rows)
    negatives = rng.integers(num_queries, size=num_rows)
    filler = "is described in this passage, which goes on about the subject at some length"
    return Dataset.from_dict(
        {
            "anchor": [f"query {q}: what should one know about topic {q * 7919 % 100003}?" for q in queries.tolist()],
            "positive": [f"passage {q}: topic {q * 7919 % 100003} {filler}" for q in queries.tolist()],
            "negative": [f"passage {q}: topic {q * 7919 % 100003} {filler}" for q in negatives.tolist()],
        }
    )


def _make_sampler(impl: str, dataset, batch_size: int):
    kwargs = {"batch_size": batch_size, "drop_last": False, "generator": torch.Generator().manual_seed(42), "seed": 42,
              "valid_label_columns": ["label", "score"]}  # fmt: skip
    if impl == "st_fast":
        from st_fast.sampler import NoDuplicatesBatchSampler

        return NoDuplicatesBatchSampler(dataset, **kwargs)
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    if impl == "stock hashed":
        return NoDuplicatesBatchSampler(dataset, precompute_hashes=True, **kwargs)
    return NoDuplicatesBatchSampler(dataset, **kwargs)


def _epoch(sampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def _measure(impl: str, dataset, batch_size: int, repeats: int) -> dict[str, Any]:
    """Median first/later epoch times over ``repeats`` fresh samplers, and the batches of both epochs."""
    firsts, laters = [], []
    batches = None

    def first_epoch():
        sampler = _make_sampler(impl, dataset, batch_size)
        return sampler, _epoch(sampler, 0)

    for _ in range(repeats):
        first, (sampler, epoch0) = timed(first_epoch)
        later, epoch1 = timed(lambda: _epoch(sampler, 1))  # noqa: B023
        firsts.append(first)
        laters.append(later)
        batches = (epoch0, epoch1)
    return {"first": float(np.median(firsts)), "later": float(np.median(laters)), "batches": batches}


def _peak_memory(impl: str, dataset, batch_size: int) -> float:
    """Peak RSS growth (MiB) while constructing a sampler and consuming one epoch (batches are dropped as they come):
    :func:`benchmarks.common.rss_peak_mb` (the kernel's peak-RSS mark reset first, so every measurement starts from
    the current RSS; the growth of ``ru_maxrss`` where /proc is not there)."""

    def one_epoch() -> None:
        sampler = _make_sampler(impl, dataset, batch_size)
        for _ in sampler:
            pass
        del sampler

    return rss_peak_mb(one_epoch)[0]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    logging.getLogger("sentence_transformers.base.sampler").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets

    datasets.disable_progress_bars()
    from st_fast._native import native_info

    info = native_info()
    if not info["cpu_extension"]:
        raise RuntimeError(f"st_fast's C++ extension is not built: {info['cpu_extension_error']}")

    smoke = bool(getattr(args, "smoke", False))
    sizes = args.sampler_rows or ([3000] if smoke else [100_000, 1_000_000])
    batch_sizes = args.sampler_batch_sizes or ([32] if smoke else [128, 8192])
    repeats = repeats_of(args)
    stock_default_max = max(args.sampler_stock_default_max_rows, max(sizes) if smoke else 0)
    device_note = "CPU sampler (--gpu has no effect)" if getattr(args, "gpu", False) else ""

    # imports and first-call costs stay out of the timings
    tiny = make_triplets(64)
    for impl in ("st_fast", "stock hashed", "stock default"):
        _epoch(_make_sampler(impl, tiny, 8), 0)

    rows: list[dict[str, Any]] = []
    for num_rows in sizes:
        dataset = make_triplets(num_rows)
        for batch_size in progress(batch_sizes, desc=f"sampler {num_rows} rows"):
            results: dict[str, dict[str, Any]] = {}
            impls = ["st_fast", "stock hashed"] + (["stock default"] if num_rows <= stock_default_max else [])
            for impl in impls:
                # the stock modes take seconds per epoch: one run is enough
                results[impl] = _measure(impl, dataset, batch_size, repeats if impl == "st_fast" else 1)
                if not args.sampler_no_memory:
                    results[impl]["memory"] = _peak_memory(impl, dataset, batch_size)
            fast = results["st_fast"]
            for impl in impls:
                result = results[impl]
                row = {
                    "rows": num_rows,
                    "batch": batch_size,
                    "sampler": impl,
                    "first epoch s": result["first"],
                    "later epoch s": result["later"],
                    "batches": len(result["batches"][0]),
                    "peak MiB": result.get("memory"),
                }
                if impl == "st_fast":
                    hashed = results["stock hashed"]
                    row["x vs hashed first"] = hashed["first"] / fast["first"]
                    row["x vs hashed later"] = hashed["later"] / fast["later"]
                    if "stock default" in results:
                        row["x vs default"] = results["stock default"]["later"] / fast["later"]
                    row["identical"] = all(results[other]["batches"] == fast["batches"] for other in impls)
                    if not row["identical"]:
                        raise AssertionError(f"st_fast batches differ from stock ({num_rows} rows, batch {batch_size})")
                    notes = [f"median of {repeats}"] if repeats > 1 else []
                    if "stock default" not in results:
                        notes.append(f"stock default not timed above {stock_default_max} rows")
                    if device_note:
                        notes.append(device_note)
                    row["note"] = "; ".join(notes)
                rows.append(row)
    return rows
