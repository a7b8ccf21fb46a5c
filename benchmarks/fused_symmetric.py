"""``python -m benchmarks fused_loss --symmetric``: the symmetric loss (query_to_doc + doc_to_query, derived from one
score tile) against the one-direction loss and stock, forward + backward, and the cached symmetric loss stage against
stock's.

Default case: CPU, 1 thread (``--fused-threads`` to change), B = 4096, k = 1, D = 384, fp32; with ``--gpu``
B = 16384, D = 1024, bf16; ``--fused-batch-sizes / --fused-k / --fused-dim / --fused-dtypes`` replace them (smoke:
B 64, D 32). Cosine, scale 20, random embeddings. Rows per case and st_fast backend (``--fused-backends``):

* ``MNRL`` (st_fast, one direction) and ``MNSRL`` (st_fast and stock: MultipleNegativesSymmetricRankingLoss, i.e.
  directions query_to_doc + doc_to_query, per_direction): ``compute_loss_from_embeddings`` + ``backward``;
* ``CMNRL stage`` (st_fast) and ``CMNSRL stage`` (st_fast and stock): ``calculate_loss(reps, with_backward=True)``
  of the cached losses on mini-batches of ``--cached-mini-batch-size`` (default 32).

Columns: ``time_ms`` (median of up to ``--repeats`` calls within ``--fused-time-budget`` s per implementation, after
one warm-up; the calls after the first alternate over the implementations, ``benchmarks.common.time_alternating``, so
that a change in the machine's load reaches all of them),
``x_one_direction`` = time / the same backend's one-direction time (MNRL for MNSRL, CMNRL stage for the CMNSRL
stage; goal <= 1.15), ``speedup_vs_stock`` = stock's time of the same loss / time (goal >= 2), ``floor_fraction`` =
(GEMM floor FLOPs / time) / the measured (B, D) x (D, N) matmul rate, with the floor of the loss from
:func:`st_fast.ops.mnrl.chunked.gemm_flops` (``kept=False``: scores, their recompute and two gradient GEMMs per
score matrix, 8·B·N·D for both the one-direction and the symmetric loss), ``peak_mb``, ``loss_err`` / ``grad_err``
(largest absolute differences from stock's loss and gradients; one-direction rows have no stock row here: see the
plain fused_loss part).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import torch

from benchmarks.common import (
    SCALE,
    available_backends,
    bench_device,
    cpu_threads,
    dtype_name,
    forward_backward,
    free_memory,
    loss_stage,
    make_embeddings,
    make_losses,
    make_reps,
    matmul_tflops,
    measure,
    progress,
    repeats_of,
    result_columns,
    row_threads,
    single_size_cases,
    stage_grads,
    time_alternating,
)

SYMMETRIC = ("query_to_doc", "doc_to_query")
# row name -> (loss class name, whether stock's is timed too); the one-direction losses are compared with stock in
# the plain fused_loss and cached_loss parts
LOSSES = {
    "MNRL": ("MultipleNegativesRankingLoss", False),
    "MNSRL": ("MultipleNegativesSymmetricRankingLoss", True),
    "CMNRL stage": ("CachedMultipleNegativesRankingLoss", False),
    "CMNSRL stage": ("CachedMultipleNegativesSymmetricRankingLoss", True),
}
ONE_DIRECTION = {"MNSRL": "MNRL", "CMNSRL stage": "CMNRL stage"}


def symmetric_cases(args: argparse.Namespace) -> list[tuple[int, int, int, torch.dtype]]:
    return single_size_cases(args, k=1)


def _losses(backends: list[str], mini_batch_size: int) -> dict[tuple[str, str], Any]:
    """(loss, implementation) -> loss object, the stock ones first; implementation is a backend name or ``stock``."""
    by_loss = {
        loss_name: make_losses(cls, backends, with_stock, scale=SCALE,
                               **({"mini_batch_size": mini_batch_size} if loss_name.endswith("stage") else {}))
        for loss_name, (cls, with_stock) in LOSSES.items()
    }  # fmt: skip
    out = {(loss_name, "stock"): losses["stock"] for loss_name, losses in by_loss.items() if "stock" in losses}
    for name in backends:
        out.update({(loss_name, name): losses[name] for loss_name, losses in by_loss.items()})
    return out


def _call(loss_name: str, loss: Any, embeddings: list[torch.Tensor],
          reps: list[list[torch.Tensor]]) -> tuple[Any, Any]:  # fmt: skip
    """(one timed call, its gradients) of a loss: the cached stage on ``reps`` or forward + backward."""
    if loss_name.endswith("stage"):
        return (lambda: loss_stage(loss, reps)), (lambda: stage_grads(reps))
    return (lambda: forward_backward(loss, embeddings)), (lambda: [x.grad for x in embeddings])


def run_symmetric(args: argparse.Namespace) -> list[dict[str, Any]]:
    from st_fast.ops.mnrl.chunked import gemm_flops

    device = bench_device(args, "fused_device")
    repeats = repeats_of(args)
    mini_batch_size = getattr(args, "cached_mini_batch_size", None) or (16 if args.smoke else 32)
    threads = args.fused_threads or (1 if device.type == "cpu" else None)
    rows: list[dict[str, Any]] = []
    with cpu_threads(threads):
        for batch, k, dim, dtype in progress(symmetric_cases(args), desc="fused_loss --symmetric"):
            backends = available_backends(device, dtype, args.fused_backends)
            losses = _losses(backends, mini_batch_size)
            tflops = matmul_tflops(batch, k * batch, dim, dtype, device)
            embeddings = make_embeddings(batch, k, dim, dtype, device)
            reps = make_reps(embeddings, mini_batch_size)
            results: dict[tuple[str, str], dict[str, Any]] = {}
            calls = {key: _call(key[0], loss, embeddings, reps) for key, loss in losses.items()}
            for key, (fn, grads) in calls.items():  # stock first: the reference of the error columns
                results[key] = measure(fn, grads, device, 1, args.fused_time_budget)
            # the other timed calls alternate, so that a change of the machine's load hits every implementation
            timed = {key: fn for key, (fn, _) in calls.items() if not results[key].get("oom")}
            more = time_alternating(timed, repeats - 1, device=device, budget_s=args.fused_time_budget)
            for key, times in more.items():
                times = [results[key]["seconds"], *times]
                results[key]["seconds"], results[key]["runs"] = statistics.median(times), len(times)
            for (loss_name, impl), result in results.items():
                directions = SYMMETRIC if loss_name in ONE_DIRECTION else ("query_to_doc",)
                row: dict[str, Any] = {"loss": loss_name, "backend": impl, "B": batch, "k": k, "N": k * batch,
                                       "D": dim, "dtype": dtype_name(dtype)}  # fmt: skip
                row.update(dict.fromkeys(["time_ms", "x_one_direction", "speedup_vs_stock", "floor_fraction"]))
                row.update(dict.fromkeys(["peak_mb", "loss_err", "grad_err", "memory_by", "runs"]))
                row.update(matmul_tflops=tflops, threads=row_threads(device))
                row.update(result_columns(impl, result, results.get((loss_name, "stock")), "speedup_vs_stock"))
                if result.get("oom"):
                    rows.append(row)
                    continue
                one = results.get((ONE_DIRECTION.get(loss_name, ""), impl))
                if one and not one.get("oom"):
                    row["x_one_direction"] = result["seconds"] / one["seconds"]
                floor = gemm_flops(directions, batch, batch, k, dim, kept=False)
                row["floor_fraction"] = floor / result["seconds"] / (tflops * 1e12)
                rows.append(row)
            embeddings = reps = losses = results = None
            free_memory(device)
    return rows
