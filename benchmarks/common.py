"""The benchmark toolkit: what every part under ``benchmarks/`` imports, and the only module parts import.

A part is one module exposing ``add_arguments(parser)`` and ``run(args) -> list[dict]`` (and optionally ``TITLE``),
registered by one line in ``benchmarks/__main__.py``'s ``PARTS``; its rows are printed as a table and written as
JSON, Markdown and PNG under ``args.out`` by :func:`report`. Parts never import each other.

A loss part is three functions on this toolkit (``cached_loss`` and ``gist`` are the shortest examples)::

    def add_arguments(parser):  # --<prefix>-batch-sizes / -k / -dim / -dtypes / -backends / -device / ...
        group = add_loss_options(parser, "<part>", "<prefix>", sizes="...", k="...", no_stock="...")
    def run(args):
        return run_cases(args, "<prefix>", <cases>, functools.partial(case_rows, args), "<part>")
    def case_rows(args, case, device, repeats, backends):  # inputs, losses, then
        results = measure_each(calls, grads, leaves, device, repeats, args.<prefix>_time_budget)  # stock first
        return [{**<case columns>, **result_columns(name, result, results.get("stock"), "speedup_vs_stock")}, ...]

Sections: devices, dtypes and threads; timing; peak memory; inputs and losses (stock and st_fast, built the same way
for every part); a loss part (its options, its case loop, the measurement of one implementation and its row
columns); the wall-clock budget of a part's cases; writing the results.

Timing. Fixed-size operations (a matmul's rate, the GEMM floor) are timed by the libraries made for it:
``triton.testing.do_bench`` on CUDA (CUDA events, the L2 cache flushed before each call) and
``torch.utils.benchmark.Timer.blocked_autorange`` on CPU. A loss call is timed once per call by :func:`call_seconds`
(CUDA events around it on a GPU, ``time.perf_counter`` on CPU; both after a synchronize), because the parts need what
neither library offers: a cap on the number of calls of multi-second stock losses, a wall-clock budget per
implementation, and calls interleaved across implementations (:func:`time_alternating`) so that a change in a shared
machine's load reaches all of them alike. :class:`Clock` is that one hand timer; the end-to-end parts (training
steps, sampler epochs) use it too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

SCALE = 20.0  # the similarity scale of every loss part (sentence-transformers' default)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
BACKENDS = ("torch", "native", "triton")

# ---------------------------------------------------------------------------------------------------------------
# devices, dtypes and threads
# ---------------------------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of ``dtype`` in :data:`DTYPES` (``torch.bfloat16`` -> ``"bf16"``)."""
    return next(name for name, value in DTYPES.items() if value == dtype)


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
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET`` set and not 0)."""
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


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(threads)`` (when given), restoring the previous count after; yields
    the count in force. On a shared, loaded machine one thread avoids OpenMP workers waiting on descheduled siblings,
    which can make the many small ops of the stock losses tens of times slower with two threads."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def row_threads(device: torch.device) -> int | None:
    """The ``threads`` column of a row: torch's CPU thread count on CPU, None on a GPU."""
    return torch.get_num_threads() if device.type == "cpu" else None


@contextlib.contextmanager
def tf32_matmuls(allowed: bool | None) -> Iterator[None]:
    """Run the block with ``torch.backends.cuda.matmul.allow_tf32 = allowed`` (None: as it is), restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    if allowed is not None:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------


def sync(device: str | torch.device = "cpu") -> None:
    """Wait for the device's queued work (CUDA only; a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Points in time on the device's timeline: CUDA events (recorded on the current stream, read after a
    synchronize) on a GPU, ``time.perf_counter`` seconds elsewhere. The toolkit's one hand timer (see the module
    docstring for where it is used and why)."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: Any, end: Any) -> float:
        """Milliseconds from mark ``start`` to mark ``end`` (on CUDA: after ``end`` has completed)."""
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def call_seconds(fn: Callable[[], Any], device: str | torch.device = "cpu") -> float:
    """Seconds one ``fn()`` takes, after a synchronize (earlier work is not counted): between two CUDA events
    recorded around it on a GPU, ``time.perf_counter`` around it on CPU."""
    clock = Clock(device)
    sync(device)
    start = clock.mark()
    fn()
    end = clock.mark()
    sync(device)
    return clock.ms(start, end) / 1e3


def timed(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[float, Any]:
    """(seconds, result) of one ``fn()`` call (as :func:`call_seconds`), for end-to-end runs (an epoch, a training
    run) whose result is needed."""
    holder: list[Any] = []
    seconds = call_seconds(lambda: holder.append(fn()), device)
    return seconds, holder[0]


def timed_runs(fn: Callable[[], Any], repeats: int, device: str | torch.device, budget_s: float) -> tuple[float, int]:
    """Median seconds of up to ``repeats`` calls of ``fn()`` (already warmed up; each timed by :func:`call_seconds`)
    and how many ran: the runs stop early once they have used ``budget_s`` seconds, so that multi-second stock
    calls are timed once or twice."""
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + times[-1] <= budget_s):
        times.append(call_seconds(fn, device))
    return statistics.median(times), len(times)


def time_alternating(fns: dict[Any, Callable[[], Any]], rounds: int, *, device: str | torch.device = "cpu",
                     budget_s: float = math.inf,
                     on_result: Callable[[Any, int, Any], None] | None = None) -> dict[Any, list[float]]:  # fmt: skip
    """Seconds of each of ``fns``, one call each per round for ``rounds`` rounds, the order reversed every other
    round (A B, B A, A B, ...), so that a change in the machine's load reaches every function alike and round ``i``'s
    times form a pair measured side by side. A function whose calls have used ``budget_s`` seconds sits out the
    remaining rounds. ``on_result(name, round, value)`` gets each call's return value outside the timed region (to
    check results without timing the check). No warm-up: call each once first."""
    names = list(fns)
    times: dict[Any, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            if sum(times[name]) > budget_s:
                continue
            seconds, value = timed(fns[name], device)
            times[name].append(seconds)
            if on_result is not None:
                on_result(name, round_, value)
    return times


def op_seconds(fn: Callable[[], Any], device: str | torch.device, min_run_time: float = 0.5) -> float:
    """Median seconds of a fixed-size operation (a GEMM, a kernel): ``triton.testing.do_bench`` on CUDA (about 25 ms
    of warm-up, 100 ms of runs, the L2 cache flushed before each), else ``torch.utils.benchmark.Timer``'s
    ``blocked_autorange`` (blocks of calls for at least ``min_run_time`` seconds, at torch's current thread count;
    also on CUDA without triton, optional to st_fast: the Timer synchronizes around each block)."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median") / 1e3
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def matmul_tflops(m: int, n: int, d: int, dtype: torch.dtype, device: torch.device,
                  allow_tf32: bool | None = None) -> float:  # fmt: skip
    """TFLOP/s of one (m, d) x (d, n) matmul in ``dtype`` on ``device`` (2·m·n·d FLOPs over :func:`op_seconds`),
    with TF32 allowed or not as ``allow_tf32`` says (None: torch's current setting)."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(m, d, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(d, n, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    with tf32_matmuls(allow_tf32):
        seconds = op_seconds(lambda: torch.matmul(a, b, out=out), device)
    return 2.0 * m * n * d / seconds / 1e12


def error_line(exc: BaseException, limit: int = 300) -> str:
    """``exc`` as one line of a result row or note: ``error: Type: message``, whitespace collapsed, at most ``limit``
    characters."""
    text = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {text}"[:limit]


# ---------------------------------------------------------------------------------------------------------------
# peak memory
# ---------------------------------------------------------------------------------------------------------------


def peak_memory_mb(fn: Callable[[], Any], *, device: str | torch.device = "cpu") -> float:
    """Peak extra memory of one ``fn()`` call in MiB: CUDA max allocated on a GPU, else the growth of the
    process's peak RSS (ru_maxrss; only grows, so run the biggest consumers last or in a fresh process)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024.0


def _status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1])


def rss_peak_mb(fn: Callable[[], Any]) -> tuple[float, str]:
    """(peak growth of the process's resident memory during ``fn()`` in MiB, how it was measured): Linux's peak RSS
    (VmHWM) reset through /proc/self/clear_refs before the call, minus the RSS before it. It sees what torch's
    profiler does not (a native kernel's own buffers, a sampler's); glibc's free pages are returned first
    (``malloc_trim``) so that reusing them counts, but an allocator that keeps its own free lists can still make it
    under-report. Without /proc: the growth of ru_maxrss (:func:`peak_memory_mb`: only grows, so it under-reports
    after a bigger earlier call)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        return peak_memory_mb(fn), "ru_maxrss growth"
    fn()
    return max(0.0, (_status_kb("VmHWM") - before) / 1024.0), "rss (VmHWM growth)"


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
    """(peak MiB of one ``fn()`` call, how it was measured): CUDA max allocated, or :func:`cpu_peak_live_mb`."""
    if device.type == "cuda":
        return peak_memory_mb(fn, device="cuda"), "cuda max allocated"
    return cpu_peak_live_mb(fn)


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (``torch.cuda.OutOfMemoryError`` or a RuntimeError saying so)."""
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


# ---------------------------------------------------------------------------------------------------------------
# inputs and losses, stock and st_fast
# ---------------------------------------------------------------------------------------------------------------


def make_embeddings(batch: int, k: int, dim: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """``1 + k`` random (B, D) leaf tensors that require gradients (anchors, then k candidate columns), seeded by
    the shape, in ``dtype`` on ``device``."""
    generator = torch.Generator(device="cpu").manual_seed(batch * 31 + k * 7 + dim)
    return [
        torch.randn(batch, dim, generator=generator).to(device=device, dtype=dtype).requires_grad_()
        for _ in range(1 + k)
    ]


def make_reps(columns: list[torch.Tensor], mini_batch_size: int) -> list[list[torch.Tensor]]:
    """GradCache's cached embeddings of ``columns`` (each (B, D)): per column, detached leaf mini-batches of
    ``mini_batch_size`` rows that require gradients."""
    return [
        [chunk.detach().clone().requires_grad_() for chunk in column.detach().split(mini_batch_size)]
        for column in columns
    ]


def model_stand_in() -> torch.nn.Module:
    """Stands in for the SentenceTransformer the loss constructors take: the loss stage never calls it, and the
    cached losses only look at ``model[0]`` (to reject StaticEmbedding models)."""
    return torch.nn.Sequential(torch.nn.Identity())


def make_losses(name: str, backends: list[str], with_stock: bool, **options: Any) -> dict[str, torch.nn.Module]:
    """Loss ``name`` (a class name both ``st_fast.losses`` and sentence-transformers' losses define) for each
    st_fast backend, keyed by backend, then the stock one under ``"stock"`` when ``with_stock``; ``options`` (scale,
    mini_batch_size, ...) go to every constructor, the model is :func:`model_stand_in`."""
    import warnings

    from sentence_transformers.sentence_transformer import losses as stock

    from st_fast import losses as fast

    losses: dict[str, torch.nn.Module] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the symmetric aliases are deprecated upstream
        for backend in backends:
            losses[backend] = getattr(fast, name)(model_stand_in(), backend=backend, **options)
        if with_stock:
            losses["stock"] = getattr(stock, name)(model_stand_in(), **options)
    return losses


def make_fused_losses(backends: list[str], with_stock: bool) -> dict[str, torch.nn.Module]:
    """MultipleNegativesRankingLoss (scale :data:`SCALE`) per st_fast backend, and stock's."""
    return make_losses("MultipleNegativesRankingLoss", backends, with_stock, scale=SCALE)


def make_cached_losses(backends: list[str], mini_batch_size: int, with_stock: bool) -> dict[str, torch.nn.Module]:
    """CachedMultipleNegativesRankingLoss (scale :data:`SCALE`) per st_fast backend, and stock's."""
    return make_losses(
        "CachedMultipleNegativesRankingLoss", backends, with_stock, scale=SCALE, mini_batch_size=mini_batch_size
    )


def forward_backward(loss_module: torch.nn.Module, embeddings: list[torch.Tensor]) -> torch.Tensor:
    """One ``compute_loss_from_embeddings`` + ``backward`` on fresh ``.grad``; returns the detached loss."""
    for x in embeddings:
        x.grad = None
    loss = loss_module.compute_loss_from_embeddings(embeddings, None)
    loss.backward()
    return loss.detach()


def loss_stage(loss_module: torch.nn.Module, reps: list[list[torch.Tensor]]) -> torch.Tensor:
    """One GradCache loss stage ``calculate_loss(reps, None, with_backward=True)`` on fresh ``.grad``; returns the
    detached loss (every cached embedding holds its gradient)."""
    for column in reps:
        for chunk in column:
            chunk.grad = None
    return loss_module.calculate_loss(reps, None, with_backward=True).detach()


def stage_grads(reps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The gradients of the cached embeddings after :func:`loss_stage`, one (B, D) tensor per column."""
    return [torch.cat([chunk.grad for chunk in column]) for column in reps]


# ---------------------------------------------------------------------------------------------------------------
# a loss part: its options, its cases, one implementation's measurement and its row columns
# ---------------------------------------------------------------------------------------------------------------


def add_loss_options(parser: argparse.ArgumentParser, part: str, prefix: str, *, sizes: str, k: str, no_stock: str,
                     dtypes: str = "embedding dtypes (default fp32; gpu: bf16, plus fp32 at the smallest B)",
                     dim: str = "embedding size D (default 384; smoke 32; gpu 1024)",
                     backends: str = "st_fast backends to time (default: every one that runs on the device)",
                     threads: str = "torch CPU threads for this part (default: torch's own count)",
                     k_nargs: str | None = None) -> argparse._ArgumentGroup:  # fmt: skip
    """The options every loss part has, as ``--<prefix>-*`` in an argument group named ``part`` (returned, for the
    part's own options): batch sizes, k, D, dtypes, backends, device, time budget, threads and no-stock; the strings
    are their help texts (each part states its own defaults), ``k_nargs="+"`` takes several k values."""
    group = parser.add_argument_group(part)
    group.add_argument(f"--{prefix}-batch-sizes", type=int, nargs="+", default=None, help=sizes)
    group.add_argument(f"--{prefix}-k", type=int, nargs=k_nargs, default=None, help=k)
    group.add_argument(f"--{prefix}-dim", type=int, default=None, help=dim)
    group.add_argument(f"--{prefix}-dtypes", nargs="+", choices=list(DTYPES), default=None, help=dtypes)
    group.add_argument(f"--{prefix}-backends", nargs="+", choices=list(BACKENDS), default=None, help=backends)
    group.add_argument(f"--{prefix}-device", default=None, help="torch device (default: cuda with --gpu, else cpu)")
    group.add_argument(f"--{prefix}-time-budget", type=float, default=6.0,
                       help="seconds of timed calls per case and implementation before repeats stop early")  # fmt: skip
    group.add_argument(f"--{prefix}-threads", type=int, default=None, help=threads)
    group.add_argument(f"--{prefix}-no-stock", action="store_true", help=no_stock)
    return group


def repeats_of(args: argparse.Namespace) -> int:
    """Timed calls per implementation: ``--repeats`` (at least 1), 1 with ``--smoke``."""
    return 1 if getattr(args, "smoke", False) else max(1, args.repeats)


def single_size_cases(args: argparse.Namespace, k: int) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, k, D, dtype) cases of the one-size fused parts (``fused_loss --symmetric``, ``--mask-duplicates``): smoke
    B 64, D 32; ``--gpu`` B 16384, D 1024, bf16; else B 4096, D 384, fp32; ``k`` hard-negative columns by default;
    the --fused-* options replace them."""
    if args.smoke:
        batch_sizes, dim, dtypes = [64], 32, ["fp32"]
    elif args.gpu:
        batch_sizes, dim, dtypes = [16384], 1024, ["bf16"]
    else:
        batch_sizes, dim, dtypes = [4096], 384, ["fp32"]
    batch_sizes = args.fused_batch_sizes or batch_sizes
    k, dim, dtypes = args.fused_k or k, args.fused_dim or dim, args.fused_dtypes or dtypes
    return [(b, k, dim, DTYPES[name]) for b in batch_sizes for name in dtypes]


def run_cases(args: argparse.Namespace, prefix: str, cases: Sequence[tuple[int, int, int, torch.dtype]],
              case_rows: Callable[..., list[dict[str, Any]]], desc: str) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of a loss part: ``case_rows(case, device, repeats, backends)`` for each (B, k, D, dtype) case in
    order, under ``--<prefix>-threads`` on ``--<prefix>-device``, with the st_fast backends of ``--<prefix>-backends``
    that run there (:func:`available_backends`) and :func:`repeats_of` timed calls; what a case leaves is freed before
    the next one."""
    device = bench_device(args, f"{prefix}_device")
    rows: list[dict[str, Any]] = []
    with cpu_threads(getattr(args, f"{prefix}_threads")):
        for case in progress(cases, desc=desc):
            backends = available_backends(device, case[3], getattr(args, f"{prefix}_backends"))
            rows += case_rows(case, device, repeats_of(args), backends)
            free_memory(device)
            sync(device)
    return rows


def measure(fn: Callable[[], torch.Tensor], grads: Callable[[], list[torch.Tensor]], device: torch.device,
            repeats: int, budget_s: float, memory: bool = True) -> dict[str, Any]:  # fmt: skip
    """One untimed call under the memory measurement (it is also the warm-up and gives the loss and the gradients
    that the error columns compare), then :func:`timed_runs`; ``{"oom": True}`` when the device ran out of memory.
    ``memory=False``: a plain warm-up call instead (peak None; the CPU profiler slows the stock losses' many small
    ops down by about 2x). Keys: ``peak`` (MiB), ``memory_by``, ``loss``, ``grads``, ``seconds``, ``runs``."""
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


def measure_each(calls: dict[str, Callable[[], torch.Tensor]], grads: Callable[[], list[torch.Tensor]],
                 leaves: Sequence[torch.Tensor], device: torch.device, repeats: int, budget_s: float,
                 memory: bool = True) -> dict[str, dict[str, Any]]:  # fmt: skip
    """:func:`measure` of each implementation of ``calls`` (name -> one call) in order, all on the same inputs whose
    gradients ``grads()`` reads; ``leaves`` (the inputs) get fresh ``.grad`` after each. Put stock first: its loss
    and gradients are the reference of the error columns."""
    results = {}
    for name, fn in calls.items():
        results[name] = measure(fn, grads, device, repeats, budget_s, memory)
        for leaf in leaves:
            leaf.grad = None
    return results


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between paired tensors of ``a`` and ``b`` (in float64)."""
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b, strict=True))


def result_columns(name: str, result: dict[str, Any], stock: dict[str, Any] | None, ratio_key: str) -> dict[str, Any]:
    """The measured columns of one implementation's row from its :func:`measure` result: ``time_ms``, ``peak_mb``,
    ``memory_by``, ``runs``, its speed-up over stock under ``ratio_key`` and its loss / gradient differences from
    stock (``loss_err``, ``grad_err``), or OOM markers."""
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


# ---------------------------------------------------------------------------------------------------------------
# a part's cases: wall-clock budget and progress
# ---------------------------------------------------------------------------------------------------------------


class CaseBudget:
    """Wall-clock budget for a part's cases, run smallest first so that a short budget drops the largest.

    ``admit(cost)`` predicts a case's seconds from the last finished case, scaled by the ratio of their ``cost``
    (any size measure, e.g. B·N·D), and admits it when the prediction fits the time left; ``done(cost)`` records a
    finished case. Without a budget (``seconds`` None) every case is admitted. The first case is always admitted.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()
        self._case_start = self.start
        self._last: tuple[float, float] | None = None  # (cost, seconds) of the last finished case

    def time_left(self) -> float:
        if self.seconds is None:
            return float("inf")
        return self.seconds - (time.perf_counter() - self.start)

    def admit(self, cost: float) -> bool:
        self._case_start = time.perf_counter()
        if self.seconds is None or self._last is None:
            return self.seconds is None or self.time_left() > 0
        last_cost, last_seconds = self._last
        return last_seconds * max(cost / last_cost, 1.0) <= self.time_left()

    def done(self, cost: float) -> None:
        self._last = (cost, time.perf_counter() - self._case_start)


def budget_of(args) -> CaseBudget:
    """The :class:`CaseBudget` of ``--budget-s`` (seconds per part; none when absent)."""
    return CaseBudget(getattr(args, "budget_s", None))


def progress(iterable, **kwargs):
    """tqdm progress bar when tqdm is installed and stderr is a terminal, else the iterable itself."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, disable=not sys.stderr.isatty(), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# writing the results
# ---------------------------------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of ``rows`` (columns in first-seen order)."""
    if not rows:
        return "(no rows)"
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores)"


def report(name: str, rows: Sequence[dict[str, Any]], out_dir: str, *, title: str = "") -> str:
    """Print ``rows`` as a table and write ``<out_dir>/<name>.json`` and ``<out_dir>/<name>.md``."""
    os.makedirs(out_dir, exist_ok=True)
    table = format_table(rows)
    header = f"## {title or name} — {machine_description()}, torch {torch.__version__}"
    print(f"\n{header}\n\n{table}\n", flush=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"name": name, "machine": machine_description(), "rows": list(rows)}, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"{header}\n\n{table}\n")
    plot(name, rows, out_dir, title=title or name)
    return table


SIZE_KEYS = ("B", "rows")  # the x axis: batch size (loss parts) or dataset rows (sampler)
SERIES_KEYS = ("backend", "sampler")
METRICS = (("time", ("time_ms", "first epoch s")), ("memory", ("peak_mb", "peak MiB")))


def plot(name: str, rows: Sequence[dict[str, Any]], out_dir: str, *, title: str) -> list[str]:
    """PNG plots ``<name>_time.png`` / ``<name>_memory.png`` of each series (backend or sampler) against the batch
    size, log-log, one line per remaining configuration. Needs matplotlib (the ``bench`` extra); without it, or
    when the rows have no size or series column, nothing is drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    size_key = next((k for k in SIZE_KEYS if rows and k in rows[0]), None)
    series_key = next((k for k in SERIES_KEYS if rows and k in rows[0]), None)
    if size_key is None or series_key is None:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for metric, candidates in METRICS:
        value_key = next((k for k in candidates if any(isinstance(r.get(k), (int, float)) for r in rows)), None)
        if value_key is None:
            continue
        lines: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            value = row.get(value_key)
            if not isinstance(value, (int, float)) or not isinstance(row.get(size_key), (int, float)):
                continue
            others = [f"{k}={row[k]}" for k in ("dtype", "k", "D", "batch") if k in row and k != size_key]
            label = " ".join([str(row[series_key]), *others])
            lines.setdefault(label, []).append((row[size_key], value))
        if not lines:
            continue
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for label, points in sorted(lines.items()):
            xs, ys = zip(*sorted(points), strict=True)
            axis.plot(xs, ys, marker="o", label=label)
        axis.set(xscale="log", yscale="log", xlabel=size_key, ylabel=value_key)
        axis.set_title(f"{title}\n{machine_description()}")
        axis.title.set_fontsize(8)
        axis.legend(fontsize=7)
        axis.grid(True, which="both", alpha=0.3)
        path = os.path.join(out_dir, f"{name}_{metric}.png")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written
