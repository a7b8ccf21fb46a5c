"""The loss stage of CachedMultipleNegativesRankingLoss (GradCache): stock sentence-transformers vs st_fast.

Inputs: what the stock GradCache machinery hands to ``calculate_loss`` after its first (no-grad) embedding pass:
``reps[column][mini_batch]``, detached (mini_batch_size, D) leaf tensors that require gradients, for the anchors and
k candidate columns (N = k·B). One call is ``loss.calculate_loss(reps, None, with_backward=True)`` (the loss and
every cached embedding's ``.grad``), with fresh ``.grad`` each time and the same inputs for every implementation:

* ``stock``: ``sentence_transformers...CachedMultipleNegativesRankingLoss``: a mini_batch_size x N autograd graph
  and a backward per mini-batch;
* ``torch`` / ``native`` / ``triton``: ``st_fast.losses.CachedMultipleNegativesRankingLoss(backend=...)``, each
  backend that runs on the device (triton on CUDA only).

Columns: median time of ``--repeats`` calls (fewer when they pass ``--cached-time-budget`` seconds: ``runs``) after
one warm-up; peak memory of one call (as in the fused_loss part);
``x_vs_stock`` = stock time / time; ``gemm3_ms``: the three GEMMs any exact loss stage needs (scores (B, D) x (D, N),
then the two gradient GEMMs (B, N) x (N, D) and (N, B) x (B, D)) alone, fp32, measured in the same run
(``triton.testing.do_bench`` on a GPU, ``torch.utils.benchmark.Timer`` on CPU), and
``x_gemm3`` = time / gemm3_ms (1.0 would be the GEMM floor). For half-precision cases ``gemm3_dtype_ms`` times the
same GEMMs in the case's dtype. ``loss_err`` / ``grad_err``: largest absolute differences from stock.
``--cached-no-memory`` / ``--cached-no-gemm3`` leave the memory / GEMM columns empty (the demo's short run).
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch

from benchmarks.common import (
    DTYPES,
    add_loss_options,
    dtype_name,
    free_memory,
    loss_stage,
    make_cached_losses,
    make_embeddings,
    make_reps,
    measure_each,
    op_seconds,
    result_columns,
    row_threads,
    run_cases,
    stage_grads,
)

TITLE = "CachedMultipleNegativesRankingLoss loss stage (calculate_loss with backward): stock vs st_fast"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = add_loss_options(
        parser, "cached_loss", "cached",
        sizes="B values (default: 1024 4096, plus 16384 with --cached-large; smoke: 64; gpu: 4096 16384)",
        k="candidate columns per anchor, N = k·B (default: 1 2; gpu: 1)", k_nargs="+",
        no_stock="skip the stock loss (x_vs_stock left empty)",
    )  # fmt: skip
    group.add_argument("--cached-mini-batch-size", type=int, default=None,
                       help="mini_batch_size of the cached reps (default 32; smoke 16)")  # fmt: skip
    group.add_argument("--cached-large", action="store_true", help="add B=16384 to the default CPU sizes (slow stock)")
    group.add_argument("--cached-no-memory", action="store_true",
                       help="no peak-memory measurement (the warm-up call runs without the profiler)")  # fmt: skip
    group.add_argument("--cached-no-gemm3", action="store_true", help="skip the GEMM-floor columns (gemm3_*)")


def cached_cases(args: argparse.Namespace) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, k, D, dtype) cases from the size preset and the --cached-* overrides."""
    if args.smoke:
        batch_sizes, ks, dim, dtypes = [64], [1, 2], 32, ["fp32"]
    elif args.gpu:
        batch_sizes, ks, dim, dtypes = [4096, 16384], [1], 1024, ["bf16"]
    else:
        batch_sizes, ks, dim, dtypes = [1024, 4096] + ([16384] if args.cached_large else []), [1, 2], 384, ["fp32"]
    explicit_dtypes = args.cached_dtypes is not None
    batch_sizes = args.cached_batch_sizes or batch_sizes
    ks = args.cached_k or ks
    dim = args.cached_dim or dim
    dtypes = args.cached_dtypes or dtypes
    cases = [(b, k, dim, DTYPES[name]) for b in batch_sizes for k in ks for name in dtypes]
    if args.gpu and not explicit_dtypes:
        cases.insert(1, (min(batch_sizes), ks[0], dim, torch.float32))  # fp32 reference point at the smallest batch
    return cases


def gemm3_seconds(batch: int, n: int, dim: int, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds of the score GEMM and the two gradient GEMMs of one exact loss stage, nothing else
    (:func:`benchmarks.common.op_seconds`)."""
    generator = torch.Generator(device="cpu").manual_seed(2)
    queries = torch.randn(batch, dim, generator=generator).to(device=device, dtype=dtype)
    docs = torch.randn(n, dim, generator=generator).to(device=device, dtype=dtype)
    scores = torch.empty(batch, n, device=device, dtype=dtype)
    grad_queries, grad_docs = torch.empty_like(queries), torch.empty_like(docs)

    def three_gemms() -> None:
        torch.matmul(queries, docs.T, out=scores)
        torch.matmul(scores, docs, out=grad_queries)
        torch.matmul(scores.T, queries, out=grad_docs)

    return op_seconds(three_gemms, device)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    return run_cases(args, "cached", cached_cases(args), functools.partial(case_rows, args), "cached_loss")


def case_rows(args: argparse.Namespace, case: tuple[int, int, int, torch.dtype], device: torch.device, repeats: int,
              backends: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one case: stock and each backend on the same cached embeddings."""
    batch, k, dim, dtype = case
    mini_batch_size = args.cached_mini_batch_size or (16 if args.smoke else 32)
    rows: list[dict[str, Any]] = []
    losses = make_cached_losses(backends, mini_batch_size, with_stock=not args.cached_no_stock)
    n = k * batch
    gemm3 = None if args.cached_no_gemm3 else gemm3_seconds(batch, n, dim, torch.float32, device)
    gemm3_dtype = None
    if dtype != torch.float32 and not args.cached_no_gemm3:
        gemm3_dtype = gemm3_seconds(batch, n, dim, dtype, device)
    free_memory(device)
    reps = make_reps(make_embeddings(batch, k, dim, dtype, device), mini_batch_size)
    calls = {
        name: functools.partial(loss_stage, losses[name], reps)
        for name in (["stock"] if "stock" in losses else []) + backends
    }  # stock first: the reference
    leaves = [chunk for column in reps for chunk in column]
    results = measure_each(calls, functools.partial(stage_grads, reps), leaves, device, repeats,
                           args.cached_time_budget, memory=not args.cached_no_memory)  # fmt: skip
    stock = results.get("stock")
    for name, result in results.items():
        row: dict[str, Any] = {"backend": name, "B": batch, "k": k, "N": n, "D": dim, "dtype": dtype_name(dtype),
                               "mbs": mini_batch_size}  # fmt: skip
        row.update(dict.fromkeys(["time_ms", "peak_mb", "x_vs_stock", "gemm3_ms", "x_gemm3", "gemm3_dtype_ms"]))
        row.update(dict.fromkeys(["loss_err", "grad_err", "memory_by", "runs", "threads"]))
        row["threads"] = row_threads(device)
        row["gemm3_ms"] = None if gemm3 is None else gemm3 * 1e3
        row["gemm3_dtype_ms"] = None if gemm3_dtype is None else gemm3_dtype * 1e3
        row.update(result_columns(name, result, stock, "x_vs_stock"))
        if not result.get("oom") and gemm3 is not None:
            row["x_gemm3"] = result["seconds"] / gemm3
        rows.append(row)
    return rows
