"""MultipleNegativesRankingLoss forward + backward: stock sentence-transformers vs st_fast's fused op, per backend.

Inputs: random (B, D) anchors and k random (B, D) candidate columns (positives, then hard negatives), leaf tensors
that require gradients; cosine similarity, scale 20, N = k·B candidates per anchor. One call is
``loss = compute_loss_from_embeddings(embeddings, None); loss.backward()`` with fresh ``.grad`` each time, for

* ``stock``: ``sentence_transformers...MultipleNegativesRankingLoss`` (the B x N score matrix through autograd);
* ``torch`` / ``native`` / ``triton``: ``st_fast.losses.MultipleNegativesRankingLoss(backend=...)``, each backend
  that runs on the device (triton on CUDA only: the CPU interpreter is never timed).

Columns: median time of ``--repeats`` calls (fewer when they pass ``--fused-time-budget`` seconds: ``runs``) after
one warm-up, timed with CUDA events on a GPU and ``time.perf_counter`` on CPU; peak memory of one call (CUDA max
allocated on a GPU; on CPU the peak of live tensor bytes recorded by ``torch.profiler(profile_memory=True)``,
falling back to peak-RSS growth); speed-up against stock; ``matmul TFLOP/s``, the rate of one (B, D) x (D, N) matmul
in the case's dtype measured in the same run (``benchmarks.common.op_seconds``: ``triton.testing.do_bench`` on a GPU,
``torch.utils.benchmark.Timer`` on CPU); and ``floor_fraction`` = (8·B·N·D / time) / matmul rate, the fraction
of the 4-GEMM floor that the call reaches (8·B·N·D FLOPs: the two score GEMMs, forward and recompute, plus the two
gradient GEMMs (B, N) x (N, D) and (N, B) x (B, D)). ``loss_err`` and ``grad_err`` are the largest absolute
differences of the loss and of the embedding gradients from stock's.

Cases run smallest B·N·D first; with ``--budget-s`` a case predicted not to fit the part's budget (see
``benchmarks.common.CaseBudget``; a case's cost is B·N·D plus a fixed set-up part, :func:`case_cost`) is one row per
implementation with the note ``skipped (budget)``.

``--anchors`` (the anchor grid, issue 13) times, on the same inputs in one process, stock, each st_fast backend that
runs on the device and the public kernels of :mod:`benchmarks.anchors` (Inf-CL, Cut Cross-Entropy ``cce`` and
``cce_exact``, Liger's fused linear cross-entropy and its SM90 scaled cross-entropy) on the one-direction case
(query-to-doc, cosine, scale 20; k = 1 unless ``--fused-k``): with ``--gpu`` B {1024, 4096, 16384, 65536} x
D {384, 768, 1024} x {fp32, bf16}; with ``--smoke`` B {64, 67}, D 32, fp32 on CPU (Triton anchors in the interpreter
when ``TRITON_INTERPRET=1``); ``--fused-batch-sizes / --fused-dim / --fused-dtypes`` replace the grid's values and
``--fused-anchors`` picks anchors. Its rows: ``impl`` (stock / st_fast / anchor), ``backend`` (the implementation's
name), the case, ``time_ms``, ``peak_mb``, ``speedup_vs_stock``, ``floor_fraction``, ``matmul_tflops`` with
``matmul_precision`` (fp32 cases on a GPU are measured with TF32 allowed for that matmul only, ``tf32``: the
tensor-core rate an fp32 kernel can reach; the implementations themselves run under torch's current TF32 setting,
which this part does not change), ``loss_rel_err`` = |loss − ref| / |ref| and ``grad_rel_err`` = max |g − g_ref| /
max |g_ref| over the embedding gradients against :func:`benchmarks.anchors.reference_loss_and_grads` (exact float64,
row-chunked, independent of st_fast), and ``note``: the package version of a timed anchor, the reason an anchor cannot
run here, the error of one that raised (the run goes on), ``out of memory``, or ``skipped (budget)``.

Time of ``--gpu --anchors --repeats 3`` on an H200 (an estimate, no run yet): about 100-120 s for the whole grid.
About 60 s are the 6 cases at B = 65536 (per call at D = 1024: stock fp32 ~0.7 s (a 16 GiB logits matrix and 4-5
buffers of its size, ~80 GiB peak; SIMT fp32 GEMMs unless TF32 is on), Liger fp32 ~0.6 s, Inf-CL ~1-2 s in both dtypes
(fp32/TF32 inside, 64 x 64 tiles), the float64 reference ~0.7 s, the bf16 kernels 0.05-0.3 s; each implementation
is called once for memory and warm-up, then up to 3 timed times within ``--fused-time-budget``); 30-40 s are one-time
compilation in the B = 1024 cases (Triton kernels per anchor, dtype and head size; CCE's torch.compile'd sort);
the rest is B <= 16384 (under 10 s). Since the cases run smallest first, a ``--budget-s`` below that drops the
B = 65536 cases at D 1024, then 768, then 384 (the largest first): the GPU check's ``--budget-s 90`` should keep
everything up to B = 65536 at D 768 (the B = 65536 cases: D 384 ~8 / 5 s fp32 / bf16, D 768 ~14 / 8 s, D 1024
~19 / 10 s).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import anchors as public
from benchmarks.common import (
    DTYPES,
    SCALE,
    CaseBudget,
    add_loss_options,
    available_backends,
    bench_device,
    budget_of,
    cpu_threads,
    dtype_name,
    error_line,
    forward_backward,
    free_memory,
    make_embeddings,
    make_fused_losses,
    matmul_tflops,
    measure,
    measure_each,
    progress,
    repeats_of,
    result_columns,
    row_threads,
    run_cases,
)

TITLE = "MultipleNegativesRankingLoss forward + backward: stock vs st_fast fused op (random embeddings)"


# ---------------------------------------------------------------------------------------------------------------
# the fused_loss part
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = add_loss_options(
        parser, "fused_loss", "fused",
        sizes="B values (default: 1024 4096; smoke: 64; gpu: 4096 16384 32768)",
        k="candidate columns per anchor, N = k·B (default 2; gpu 1)",
        no_stock="skip the stock loss (speed-up left empty)",
    )  # fmt: skip
    group.add_argument("--anchors", action="store_true",
                       help="the anchor grid (k = 1): stock, the st_fast backends and the public kernels (Inf-CL, "
                            "CCE, Liger) on the same inputs, with errors against a float64 reference")  # fmt: skip
    group.add_argument("--fused-anchors", nargs="+", choices=public.ANCHOR_NAMES, default=None,
                       help="with --anchors: which public kernels (default: all)")  # fmt: skip
    group.add_argument("--symmetric", action="store_true",
                       help="the symmetric loss and the cached symmetric stage vs one direction and stock "
                            "(benchmarks/fused_symmetric.py; CPU default: 1 thread, B 4096, k 1, D 384)")  # fmt: skip
    group.add_argument("--mask-duplicates", action="store_true",
                       help="the fused loss with and without mask_duplicates' text labels "
                            "(benchmarks/fused_masking.py; CPU default: 1 thread, B 4096, k 2, D 384)")  # fmt: skip


def fused_cases(args: argparse.Namespace) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, k, D, dtype) cases from the size preset and the --fused-* overrides."""
    if args.smoke:
        batch_sizes, k, dim, dtypes = [64], 2, 32, ["fp32"]
    elif args.gpu:
        batch_sizes, k, dim, dtypes = [4096, 16384, 32768], 1, 1024, ["bf16"]
    else:
        batch_sizes, k, dim, dtypes = [1024, 4096], 2, 384, ["fp32"]
    explicit_dtypes = args.fused_dtypes is not None
    batch_sizes = args.fused_batch_sizes or batch_sizes
    k = args.fused_k or k
    dim = args.fused_dim or dim
    dtypes = args.fused_dtypes or dtypes
    cases = [(b, k, dim, DTYPES[name]) for b in batch_sizes for name in dtypes]
    if args.gpu and not explicit_dtypes:
        cases.insert(1, (min(batch_sizes), k, dim, torch.float32))  # fp32 reference point at the smallest batch
    return cases


# The fixed part of a case's budget cost, in units of B·N·D: a case's set-up (the matmul-rate measurement, the
# reference, each implementation's Python, launches and first-call compilation) does not scale with its size.
# Estimate for an H200: ~2.5 s per case at ~4.5e-12 s per unit (a B = 65536, D = 1024 fp32 case, 4.4e12, ~20 s).
CASE_SETUP_COST = 2**39


def case_cost(case: tuple[int, int, int, torch.dtype]) -> int:
    """The :class:`CaseBudget` cost of a (B, k, D, dtype) case: B·N·D (what its score GEMMs scale with) plus
    :data:`CASE_SETUP_COST`, so that the compilation in the first, small cases does not predict later cases at
    many times their real time (only cost ratios matter)."""
    batch, k, dim, _ = case
    return batch * k * batch * dim + CASE_SETUP_COST


def skipped_rows(names: list[str], columns: dict[str, Any], note: str = "skipped (budget)") -> list[dict[str, Any]]:
    return [{"backend": name, **columns, "note": note} for name in names]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The fused_loss rows (the --anchors grid with ``--anchors``). ``--symmetric`` and ``--mask-duplicates`` run
    benchmarks/fused_symmetric.py and benchmarks/fused_masking.py instead, routed by ``benchmarks.__main__.MODES``."""
    if getattr(args, "anchors", False):
        with cpu_threads(args.fused_threads):
            return _run_anchors(args)
    cases = sorted(fused_cases(args), key=case_cost)
    return run_cases(args, "fused", cases, functools.partial(case_rows, args, budget_of(args)), "fused_loss")


def case_rows(args: argparse.Namespace, budget: CaseBudget, case: tuple[int, int, int, torch.dtype],
              device: torch.device, repeats: int, backends: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one case: stock and each backend on the same embeddings, or one ``skipped (budget)`` row each
    when ``budget`` does not admit the case."""
    batch, k, dim, dtype = case
    n = k * batch
    if not budget.admit(case_cost(case)):
        names = ([] if args.fused_no_stock else ["stock"]) + backends
        return skipped_rows(names, {"B": batch, "k": k, "N": n, "D": dim, "dtype": dtype_name(dtype)})
    losses = make_fused_losses(backends, with_stock=not args.fused_no_stock)
    tflops = matmul_tflops(batch, n, dim, dtype, device)
    free_memory(device)
    floor_flops = 8.0 * batch * n * dim
    embeddings = make_embeddings(batch, k, dim, dtype, device)
    # stock first: its loss and gradients are the reference for the error columns
    calls = {name: functools.partial(forward_backward, losses[name], embeddings)
             for name in (["stock"] if "stock" in losses else []) + backends}  # fmt: skip
    results = measure_each(calls, lambda: [x.grad for x in embeddings], embeddings, device, repeats,
                           args.fused_time_budget)  # fmt: skip
    rows: list[dict[str, Any]] = []
    for name, result in results.items():
        row: dict[str, Any] = {"backend": name, "B": batch, "k": k, "N": n, "D": dim, "dtype": dtype_name(dtype)}
        row.update(dict.fromkeys(["time_ms", "peak_mb", "speedup_vs_stock", "floor_fraction", "matmul_tflops"]))
        row.update(dict.fromkeys(["loss_err", "grad_err", "memory_by", "runs", "threads"]))
        row["matmul_tflops"] = tflops
        row["threads"] = row_threads(device)
        row.update(result_columns(name, result, results.get("stock"), "speedup_vs_stock"))
        if not result.get("oom"):
            row["floor_fraction"] = floor_flops / result["seconds"] / (tflops * 1e12)
        rows.append(row)
    budget.done(case_cost(case))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# --anchors: stock, st_fast and the public kernels against the float64 reference
# ---------------------------------------------------------------------------------------------------------------

ANCHOR_COLUMNS = ("time_ms", "peak_mb", "speedup_vs_stock", "floor_fraction", "matmul_tflops", "matmul_precision",
                  "loss_rel_err", "grad_rel_err", "memory_by", "runs", "threads", "note")  # fmt: skip


def anchor_cases(args: argparse.Namespace) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, k, D, dtype) cases of the anchor grid, smallest B·N·D first (fp32 before bf16 at equal cost): with
    ``--gpu`` B {1024, 4096, 16384, 65536} x D {384, 768, 1024} x {fp32, bf16}; with ``--smoke`` B {64, 67}, D 32,
    fp32; else B {256, 1024}, D 384, fp32; k = 1. ``--fused-batch-sizes / -k / -dim / -dtypes`` replace them."""
    if args.smoke:
        batch_sizes, dims, dtypes = [64, 67], [32], ["fp32"]
    elif args.gpu:
        batch_sizes, dims, dtypes = [1024, 4096, 16384, 65536], [384, 768, 1024], ["fp32", "bf16"]
    else:
        batch_sizes, dims, dtypes = [256, 1024], [384], ["fp32"]
    batch_sizes = args.fused_batch_sizes or batch_sizes
    k = args.fused_k or 1
    dims = [args.fused_dim] if args.fused_dim else dims
    dtypes = args.fused_dtypes or dtypes
    cases = [(b, k, dim, DTYPES[name]) for b in batch_sizes for dim in dims for name in dtypes]
    return sorted(cases, key=case_cost)


def matmul_rate(batch: int, n: int, dim: int, dtype: torch.dtype, device: torch.device) -> tuple[float, str]:
    """(TFLOP/s, precision) of the (B, D) x (D, N) matmul in the case's dtype; fp32 on a GPU is measured with TF32
    allowed (``allow_tf32`` set for this measurement only), the tensor-core rate that fp32 kernels can reach."""
    tf32 = device.type == "cuda" and dtype == torch.float32
    tflops = matmul_tflops(batch, n, dim, dtype, device, allow_tf32=True if tf32 else None)
    return tflops, "tf32" if tf32 else dtype_name(dtype)


def anchor_candidates(embeddings: list[torch.Tensor]) -> torch.Tensor:
    """The (N, D) candidate matrix of the anchors: the positives, then the hard negatives (a copy only when k > 1)."""
    return embeddings[1] if len(embeddings) == 2 else torch.cat(embeddings[1:])


def _anchor_forward_backward(anchor: public.Anchor, embeddings: list[torch.Tensor]) -> torch.Tensor:
    for x in embeddings:
        x.grad = None
    loss = anchor.loss(embeddings[0], anchor_candidates(embeddings), SCALE)
    loss.backward()
    return loss.detach()


def measure_or_error(fn: Callable[[], torch.Tensor], embeddings: list[torch.Tensor], device: torch.device,
                     repeats: int, budget_s: float) -> dict[str, Any]:  # fmt: skip
    """:func:`measure` of one implementation, with any exception (not only OOM) as ``{"error": message}``, so that
    one failing implementation is a row and the run goes on."""
    try:
        result = measure(fn, lambda: [x.grad for x in embeddings], device, repeats, budget_s)
    except Exception as exc:
        print(f"[bench] {error_line(exc)}", flush=True)
        result = {"error": error_line(exc)}
        free_memory(device)
    for x in embeddings:
        x.grad = None
    return result


def anchor_columns(result: dict[str, Any], stock_seconds: float | None, reference: tuple[float, list[torch.Tensor]],
                   floor_flops: float, tflops: float) -> dict[str, Any]:  # fmt: skip
    """Measured columns of one implementation's row: time, peak memory, speed-up over stock, fraction of the
    8·B·N·D floor at the measured matmul rate, and the loss / gradient errors relative to the float64 reference."""
    if "error" in result:
        return {"note": result["error"]}
    if result.get("oom"):
        return {"time_ms": "OOM", "peak_mb": "OOM", "memory_by": "OOM", "note": "out of memory"}
    seconds = result["seconds"]
    loss_rel_err, grad_rel_err = public.relative_errors(result["loss"], result["grads"], *reference)
    return {
        "time_ms": seconds * 1e3,
        "peak_mb": result["peak"],
        "speedup_vs_stock": stock_seconds / seconds if stock_seconds else None,
        "floor_fraction": floor_flops / seconds / (tflops * 1e12),
        "loss_rel_err": loss_rel_err,
        "grad_rel_err": grad_rel_err,
        "memory_by": result["memory_by"],
        "runs": result["runs"],
    }


def case_implementations(args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                         dim: int) -> list[tuple[str, str, Any]]:  # fmt: skip
    """(kind, name, what) of one case's implementations in timing order: stock, the st_fast backends that run on
    the device, then every selected anchor; ``what`` is the anchor (or None for stock / st_fast), or the reason
    string of an anchor that cannot run here."""
    implementations: list[tuple[str, str, Any]] = [] if args.fused_no_stock else [("stock", "stock", None)]
    implementations += [("st_fast", name, None) for name in available_backends(device, dtype, args.fused_backends)]
    for anchor in public.select(args.fused_anchors):
        implementations.append(("anchor", anchor.name, anchor.unavailable(device, dtype, dim) or anchor))
    return implementations


def anchor_case(args: argparse.Namespace, case: tuple[int, int, int, torch.dtype], device: torch.device,
                implementations: list[tuple[str, str, Any]], repeats: int) -> list[dict[str, Any]]:  # fmt: skip
    """Rows of one case: every implementation on the same embeddings, after the float64 reference of them."""
    batch, k, dim, dtype = case
    n = k * batch
    tflops, precision = matmul_rate(batch, n, dim, dtype, device)
    embeddings = make_embeddings(batch, k, dim, dtype, device)
    reference = public.reference_loss_and_grads(embeddings, SCALE)
    free_memory(device)
    losses = make_fused_losses([name for kind, name, _ in implementations if kind == "st_fast"],
                               with_stock=any(kind == "stock" for kind, _, _ in implementations))  # fmt: skip
    stock_seconds = None
    rows = []
    for kind, name, what in implementations:
        row: dict[str, Any] = {"impl": kind, "backend": name, "B": batch, "k": k, "N": n, "D": dim}
        row.update({"dtype": dtype_name(dtype), **dict.fromkeys(ANCHOR_COLUMNS)})
        row.update(matmul_tflops=tflops, matmul_precision=precision)
        row["threads"] = row_threads(device)
        if isinstance(what, str):
            rows.append({**row, "note": what})
            continue
        if kind == "anchor":
            fn = lambda: _anchor_forward_backward(what, embeddings)  # noqa: B023, E731
            row["note"] = f"{what.package} {what.version()}"
        else:
            fn = lambda: forward_backward(losses[name], embeddings)  # noqa: B023, E731
        result = measure_or_error(fn, embeddings, device, repeats, args.fused_time_budget)
        row.update(anchor_columns(result, stock_seconds, reference, 8.0 * batch * n * dim, tflops))
        if kind == "stock" and "seconds" in result:
            stock_seconds = result["seconds"]
        rows.append(row)
    return rows


def _run_anchors(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = bench_device(args, "fused_device")
    repeats = repeats_of(args)
    budget = budget_of(args)
    rows: list[dict[str, Any]] = []
    for case in progress(anchor_cases(args), desc="fused_loss --anchors"):
        batch, k, dim, dtype = case
        implementations = case_implementations(args, device, dtype, dim)
        columns = {"B": batch, "k": k, "N": k * batch, "D": dim, "dtype": dtype_name(dtype)}
        if not budget.admit(case_cost(case)):
            rows += case_note_rows(implementations, columns, "skipped (budget)")
            continue
        try:
            rows += anchor_case(args, case, device, implementations, repeats)
        except Exception as exc:  # the case's set-up (reference, losses) failed: its rows say why, the next case runs
            print(f"[bench] case {columns}: {error_line(exc)}", flush=True)
            rows += case_note_rows(implementations, columns, error_line(exc))
        free_memory(device)
        budget.done(case_cost(case))
    return rows


def case_note_rows(implementations: list[tuple[str, str, Any]], columns: dict[str, Any],
                   note: str) -> list[dict[str, Any]]:  # fmt: skip
    """One row per implementation of a case that did not run, with ``note`` (its own reason for an anchor that
    cannot run here)."""
    return [{"impl": kind, "backend": name, **columns, "note": what if isinstance(what, str) else note}
            for kind, name, what in implementations]  # fmt: skip
