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
in the case's dtype measured in the same run; and ``floor_fraction`` = (8·B·N·D / time) / matmul rate, the fraction
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
import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import anchors as public
from benchmarks.common import budget_of, peak_memory_mb, progress, sync

TITLE = "MultipleNegativesRankingLoss forward + backward: stock vs st_fast fused op (random embeddings)"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
SCALE = 20.0


# ---------------------------------------------------------------------------------------------------------------
# helpers shared with benchmarks.cached_loss
# ---------------------------------------------------------------------------------------------------------------


def bench_device(args: argparse.Namespace, option: str | None = None) -> torch.device:
    """``--<part>-device`` when given, else CUDA with ``--gpu`` (an error without a GPU), else CPU."""
    name = getattr(args, option, None) if option else None
    if name is None:
        name = "cuda" if getattr(args, "gpu", False) else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--gpu / a cuda device was asked for but torch sees no CUDA device")
    return device


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends(device: torch.device, dtype: torch.dtype, wanted: list[str] | None) -> list[str]:
    """st_fast backends that can be timed on ``device``: torch always, native when its extension has the kernel
    for that device, triton on CUDA when not interpreted. A backend named in ``wanted`` that cannot run is skipped
    with a message."""
    from st_fast.ops.backends import native_available

    runnable = ["torch"]
    if dtype != torch.float64 and native_available(device):
        runnable.append("native")
    if dtype != torch.float64 and device.type == "cuda" and not triton_interpreted():
        try:
            import triton  # noqa: F401

            runnable.append("triton")
        except ImportError:
            pass
    if not wanted:
        return runnable
    for name in wanted:
        if name not in runnable:
            print(f"[bench] backend {name!r} cannot be timed on {device} / {dtype}: skipped", flush=True)
    return [name for name in wanted if name in runnable]


def model_stand_in() -> torch.nn.Module:
    """Stands in for the SentenceTransformer the loss constructors take: the loss stage never calls it, and the
    cached losses only look at ``model[0]`` (to reject StaticEmbedding models)."""
    return torch.nn.Sequential(torch.nn.Identity())


def cpu_peak_live_mb(fn: Callable[[], Any]) -> tuple[float, str]:
    """Peak of live CPU tensor bytes allocated during ``fn()`` (MiB) and how it was measured.

    The profiler's memory events (one per allocation and free, in time order) are summed into the live-bytes curve
    relative to the start of the call; its maximum is the peak. Falls back to peak-RSS growth (which only grows,
    so it under-reports after a bigger earlier case) when the profiler's events are not readable."""
    gc.collect()
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        live = peak = 0
        for event in events:
            if event.device_type() != torch.autograd.DeviceType.CPU:
                continue
            live += event.nbytes()
            peak = max(peak, live)
        if events:
            return peak / 2**20, "profiler"
    except Exception as exc:  # profiler internals differ between torch versions
        print(f"[bench] torch.profiler memory events unavailable ({exc!r}); using peak-RSS growth", flush=True)
    return peak_memory_mb(fn), "rss"


def peak_mb(fn: Callable[[], Any], device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return peak_memory_mb(fn, device="cuda"), "cuda max allocated"
    return cpu_peak_live_mb(fn)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Free what the last measurement left: garbage, torch's CUDA cache and st_fast's kept CPU scratch buffer (so
    that the next memory measurement sees its allocation, st_fast.ops.workspace)."""
    from st_fast.ops import workspace

    gc.collect()
    workspace.release()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def tf32_matmuls(allowed: bool | None):
    """Run the block with ``torch.backends.cuda.matmul.allow_tf32 = allowed`` (None: as it is), restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    if allowed is not None:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def matmul_tflops(m: int, n: int, d: int, dtype: torch.dtype, device: torch.device, repeats: int,
                  allow_tf32: bool | None = None) -> float:  # fmt: skip
    """TFLOP/s of one (m, d) x (d, n) matmul in ``dtype`` on ``device`` (2·m·n·d FLOPs; median of
    ``max(3, repeats)`` calls after one warm-up, CUDA events on a GPU), with TF32 allowed or not as
    ``allow_tf32`` says (None: torch's current setting)."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(m, d, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(d, n, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    with tf32_matmuls(allow_tf32):
        torch.matmul(a, b, out=out)
        seconds, _ = timed_runs(lambda: torch.matmul(a, b, out=out), max(3, repeats), device, float("inf"))
    return 2.0 * m * n * d / seconds / 1e12


def elapsed_seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one ``fn()`` takes: between two CUDA events recorded around it on a GPU (the device's own clock, after
    a synchronize so that earlier work is not counted), else ``time.perf_counter`` around it."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def timed_runs(fn: Callable[[], Any], repeats: int, device: torch.device, budget_s: float) -> tuple[float, int]:
    """Median time (s) of up to ``repeats`` calls of ``fn()`` (already warmed up; CUDA events on a GPU, see
    :func:`elapsed_seconds`) and how many ran: the runs stop early once they have used ``budget_s`` seconds, so
    that multi-second stock calls are timed once or twice."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget_s):
        times.append(elapsed_seconds(fn, device))
    return statistics.median(times), len(times)


def measure(fn: Callable[[], torch.Tensor], grads: Callable[[], list[torch.Tensor]], device: torch.device,
            repeats: int, budget_s: float, memory: bool = True) -> dict[str, Any]:  # fmt: skip
    """One untimed call under the memory measurement (it is also the warm-up and gives the loss and the gradients
    that the error columns compare), then the timed calls; ``{"oom": True}`` when the device ran out of memory.
    ``memory=False``: a plain warm-up call instead (peak None; the CPU profiler slows the stock losses' many small
    ops down by about 2x)."""
    result: dict[str, Any] = {}
    try:
        holder: list[torch.Tensor] = []
        if memory:
            result["peak"], result["memory_by"] = peak_mb(lambda: holder.append(fn()), device)
        else:
            holder.append(fn())
            result["peak"], result["memory_by"] = None, None
        result["loss"] = float(holder[0])
        result["grads"] = [g.detach().clone() for g in grads()]
        result["seconds"], result["runs"] = timed_runs(fn, repeats, device, budget_s)
    except Exception as exc:
        if not is_oom(exc):
            raise
        result = {"oom": True}
    free_memory(device)
    return result


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """Run the block with ``torch.set_num_threads(threads)`` (when given), restoring the previous count after. On a
    shared, loaded machine one thread avoids OpenMP workers waiting on descheduled siblings, which can make the
    many small ops of the stock losses tens of times slower with two threads."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))


def result_columns(name: str, result: dict[str, Any], stock: dict[str, Any] | None, ratio_key: str) -> dict[str, Any]:
    """The measured columns of one implementation's row: time, peak memory, its speed-up over stock under
    ``ratio_key`` and its loss / gradient differences from stock (or OOM markers)."""
    if result.get("oom"):
        return {"time_ms": "OOM", "peak_mb": "OOM", "memory_by": "OOM"}
    columns = {
        "time_ms": result["seconds"] * 1e3,
        "peak_mb": result["peak"],
        "memory_by": result["memory_by"],
        "runs": result["runs"],
    }
    if stock and not stock.get("oom"):
        columns[ratio_key] = stock["seconds"] / result["seconds"]
        if name != "stock":
            columns["loss_err"] = abs(result["loss"] - stock["loss"])
            columns["grad_err"] = max_abs_diff(result["grads"], stock["grads"])
    return columns


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


# ---------------------------------------------------------------------------------------------------------------
# the fused_loss part
# ---------------------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fused_loss")
    group.add_argument("--fused-batch-sizes", type=int, nargs="+", default=None,
                       help="B values (default: 1024 4096; smoke: 64; gpu: 4096 16384 32768)")  # fmt: skip
    group.add_argument("--fused-k", type=int, default=None,
                       help="candidate columns per anchor, N = k·B (default 2; gpu 1)")  # fmt: skip
    group.add_argument("--fused-dim", type=int, default=None, help="embedding size D (default 384; smoke 32; gpu 1024)")
    group.add_argument("--fused-dtypes", nargs="+", choices=list(DTYPES), default=None,
                       help="embedding dtypes (default fp32; gpu: bf16, plus fp32 at the smallest B)")  # fmt: skip
    group.add_argument("--fused-backends", nargs="+", choices=["torch", "native", "triton"], default=None,
                       help="st_fast backends to time (default: every one that runs on the device)")  # fmt: skip
    group.add_argument("--fused-device", default=None, help="torch device (default: cuda with --gpu, else cpu)")
    group.add_argument("--fused-time-budget", type=float, default=6.0,
                       help="seconds of timed calls per case and implementation before repeats stop early")  # fmt: skip
    group.add_argument("--fused-threads", type=int, default=None,
                       help="torch CPU threads for this part (default: torch's own count)")  # fmt: skip
    group.add_argument("--fused-no-stock", action="store_true", help="skip the stock loss (speed-up left empty)")
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


def single_size_cases(args: argparse.Namespace, k: int) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, k, D, dtype) cases of the one-size fused parts (``--symmetric``, ``--mask-duplicates``): smoke B 64,
    D 32; ``--gpu`` B 16384, D 1024, bf16; else B 4096, D 384, fp32; ``k`` hard-negative columns by default; the
    --fused-* options replace them."""
    if args.smoke:
        batch_sizes, dim, dtypes = [64], 32, ["fp32"]
    elif args.gpu:
        batch_sizes, dim, dtypes = [16384], 1024, ["bf16"]
    else:
        batch_sizes, dim, dtypes = [4096], 384, ["fp32"]
    batch_sizes = args.fused_batch_sizes or batch_sizes
    k, dim, dtypes = args.fused_k or k, args.fused_dim or dim, args.fused_dtypes or dtypes
    return [(b, k, dim, DTYPES[name]) for b in batch_sizes for name in dtypes]


def make_embeddings(batch: int, k: int, dim: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(batch * 31 + k * 7 + dim)
    return [
        torch.randn(batch, dim, generator=generator).to(device=device, dtype=dtype).requires_grad_()
        for _ in range(1 + k)
    ]


def make_fused_losses(backends: list[str], with_stock: bool) -> dict[str, torch.nn.Module]:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as StockMNRL

    from st_fast.losses import MultipleNegativesRankingLoss as FastMNRL

    losses: dict[str, torch.nn.Module] = {}
    for backend in backends:
        losses[backend] = FastMNRL(model_stand_in(), scale=SCALE, backend=backend)
    if with_stock:
        losses["stock"] = StockMNRL(model_stand_in(), scale=SCALE)
    return losses


def _forward_backward(loss_module: torch.nn.Module, embeddings: list[torch.Tensor]) -> torch.Tensor:
    for x in embeddings:
        x.grad = None
    loss = loss_module.compute_loss_from_embeddings(embeddings, None)
    loss.backward()
    return loss.detach()


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
    if getattr(args, "symmetric", False):
        from benchmarks.fused_symmetric import run_symmetric

        return run_symmetric(args)
    if getattr(args, "mask_duplicates", False):
        from benchmarks.fused_masking import run_masking

        return run_masking(args)
    with cpu_threads(args.fused_threads):
        return _run_anchors(args) if getattr(args, "anchors", False) else _run(args)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = bench_device(args, "fused_device")
    repeats = 1 if args.smoke else max(1, args.repeats)
    budget = budget_of(args)
    rows: list[dict[str, Any]] = []
    for case in progress(sorted(fused_cases(args), key=case_cost), desc="fused_loss"):
        batch, k, dim, dtype = case
        backends = available_backends(device, dtype, args.fused_backends)
        n = k * batch
        if not budget.admit(case_cost(case)):
            names = ([] if args.fused_no_stock else ["stock"]) + backends
            rows += skipped_rows(names, {"B": batch, "k": k, "N": n, "D": dim, "dtype": dtype_name(dtype)})
            continue
        losses = make_fused_losses(backends, with_stock=not args.fused_no_stock)
        tflops = matmul_tflops(batch, n, dim, dtype, device, repeats)
        free_memory(device)
        floor_flops = 8.0 * batch * n * dim
        embeddings = make_embeddings(batch, k, dim, dtype, device)
        results: dict[str, dict[str, Any]] = {}
        # stock first: its loss and gradients are the reference for the error columns
        for name in (["stock"] if "stock" in losses else []) + backends:
            result = measure(
                lambda: _forward_backward(losses[name], embeddings),  # noqa: B023
                lambda: [x.grad for x in embeddings],  # noqa: B023
                device, repeats, args.fused_time_budget,
            )  # fmt: skip
            for x in embeddings:
                x.grad = None
            results[name] = result
        stock = results.get("stock")
        for name, result in results.items():
            row: dict[str, Any] = {"backend": name, "B": batch, "k": k, "N": n, "D": dim, "dtype": dtype_name(dtype)}
            row.update(dict.fromkeys(["time_ms", "peak_mb", "speedup_vs_stock", "floor_fraction", "matmul_tflops"]))
            row.update(dict.fromkeys(["loss_err", "grad_err", "memory_by", "runs", "threads"]))
            row["matmul_tflops"] = tflops
            row["threads"] = torch.get_num_threads() if device.type == "cpu" else None
            row.update(result_columns(name, result, stock, "speedup_vs_stock"))
            if not result.get("oom"):
                row["floor_fraction"] = floor_flops / result["seconds"] / (tflops * 1e12)
            rows.append(row)
        embeddings = losses = results = None  # free this case's tensors before the next one
        free_memory(device)
        sync(device)
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


def matmul_rate(batch: int, n: int, dim: int, dtype: torch.dtype, device: torch.device,
                repeats: int) -> tuple[float, str]:  # fmt: skip
    """(TFLOP/s, precision) of the (B, D) x (D, N) matmul in the case's dtype; fp32 on a GPU is measured with TF32
    allowed (``allow_tf32`` set for this measurement only), the tensor-core rate that fp32 kernels can reach."""
    tf32 = device.type == "cuda" and dtype == torch.float32
    tflops = matmul_tflops(batch, n, dim, dtype, device, repeats, allow_tf32=True if tf32 else None)
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


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {text}"[:limit]


def measure_or_error(fn: Callable[[], torch.Tensor], embeddings: list[torch.Tensor], device: torch.device,
                     repeats: int, budget_s: float) -> dict[str, Any]:  # fmt: skip
    """:func:`measure` of one implementation, with any exception (not only OOM) as ``{"error": message}``, so that
    one failing implementation is a row and the run goes on."""
    try:
        result = measure(fn, lambda: [x.grad for x in embeddings], device, repeats, budget_s)
    except Exception as exc:
        print(f"[bench] {one_line(exc)}", flush=True)
        result = {"error": one_line(exc)}
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
    tflops, precision = matmul_rate(batch, n, dim, dtype, device, repeats)
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
        row["threads"] = torch.get_num_threads() if device.type == "cpu" else None
        if isinstance(what, str):
            rows.append({**row, "note": what})
            continue
        if kind == "anchor":
            fn = lambda: _anchor_forward_backward(what, embeddings)  # noqa: B023, E731
            row["note"] = f"{what.package} {what.version()}"
        else:
            fn = lambda: _forward_backward(losses[name], embeddings)  # noqa: B023, E731
        result = measure_or_error(fn, embeddings, device, repeats, args.fused_time_budget)
        row.update(anchor_columns(result, stock_seconds, reference, 8.0 * batch * n * dim, tflops))
        if kind == "stock" and "seconds" in result:
            stock_seconds = result["seconds"]
        rows.append(row)
    return rows


def _run_anchors(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = bench_device(args, "fused_device")
    repeats = 1 if args.smoke else max(1, args.repeats)
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
            print(f"[bench] case {columns}: {one_line(exc)}", flush=True)
            rows += case_note_rows(implementations, columns, one_line(exc))
        free_memory(device)
        budget.done(case_cost(case))
    return rows


def case_note_rows(implementations: list[tuple[str, str, Any]], columns: dict[str, Any],
                   note: str) -> list[dict[str, Any]]:  # fmt: skip
    """One row per implementation of a case that did not run, with ``note`` (its own reason for an anchor that
    cannot run here)."""
    return [{"impl": kind, "backend": name, **columns, "note": what if isinstance(what, str) else note}
            for kind, name, what in implementations]  # fmt: skip
