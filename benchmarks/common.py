"""Shared helpers of the benchmark modules: timing, peak memory, and writing result tables.

Every benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> list[dict]``; the rows it returns are
printed as a table and written as JSON and Markdown under ``args.out`` by :func:`report`.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sync(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_alternating(fns: dict[str, Callable[[], Any]], rounds: int, *, device: str | torch.device = "cpu",
                     on_result: Callable[[str, int, Any], None] | None = None) -> dict[str, list[float]]:  # fmt: skip
    """Wall times (seconds) of each of ``fns``, one call each per round for ``rounds`` rounds, the order reversed
    every other round (A B, B A, A B, ...), so that a change in the machine's load reaches every function alike and
    round ``i``'s times form a pair measured side by side. ``on_result(name, round, value)`` gets each call's return
    value outside the timed region (to check results without timing the check). No warm-up: call each once first."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            sync(device)
            start = time.perf_counter()
            value = fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
            if on_result is not None:
                on_result(name, round_, value)
    return times


def peak_memory_mb(fn: Callable[[], Any], *, device: str = "cpu") -> float:
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
