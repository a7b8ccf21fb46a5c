"""examples/demo.py (the README's main command): its logic without timing anything (thread choice from a load and
core count and from probe times, the estimate, progress lines, the turn-taking of the two training runs, a summary
that prints no ratio without how it was measured), then the whole demo at its smallest settings: it trains with the
one-import trainer, shows the same model (per-step losses, NDCG@10) and prints the table of the replaced parts."""

from __future__ import annotations

import argparse
import io
import random
import re
import time

import pytest
import torch

from examples import demo

SMALL = [
    "--steps", "4", "--batch-size", "4", "--mini-batch-size", "2", "--eval-pairs", "8", "--max-seq-length", "16",
    "--device", "cpu", "--threads", "1",
    "--loss-batch-size", "64", "--loss-dim", "32", "--sampler-rows", "2000", "--sampler-batch-size", "32",
]  # fmt: skip
RATIO = re.compile(r"\d(?:\.\d+)?x\b")


# --- thread choice -------------------------------------------------------------------------------------------------


def test_own_load_follows_the_kernels_one_minute_average():
    assert demo.own_load(0.0) == 0.0
    assert demo.own_load(60.0) == pytest.approx(0.632, abs=1e-3)
    assert demo.own_load(600.0, busy_threads=2) == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize(
    ("cores", "load", "own", "free", "candidates"),
    [
        (2, 5.0, 0.1, 0.0, [1, 2]),  # the machine: other jobs hold both cores; the probe still tries 2
        (2, 0.3, 0.0, 1.7, [1, 2]),
        (2, 1.0, 1.0, 2.0, [1, 2]),  # the load is this process's own
        (16, 4.0, 1.0, 13.0, [1, 13, 16]),  # the free count lies between: it is tried too
        (16, 0.0, 0.0, 16.0, [1, 16]),
        (1, 3.0, 0.0, 0.0, [1]),
    ],
)
def test_free_cores_and_thread_candidates(cores, load, own, free, candidates):
    assert demo.free_cores(cores, load, own) == pytest.approx(free)
    assert demo.thread_candidates(cores, load, own) == candidates


@pytest.mark.parametrize(
    ("samples", "chosen"),
    [
        ({1: [0.45, 0.41, 0.5], 2: [2.6]}, 1),  # the case: 2 threads on busy cores are several times slower
        ({1: [1.0, 1.0, 1.1], 2: [0.6, 0.62, 0.61]}, 2),  # a quiet machine: 2 threads clearly faster
        ({1: [1.0, 1.0, 1.0], 2: [0.9, 0.92, 0.88]}, 1),  # only slightly faster: 1 thread (less exposed to load)
        ({1: [1.0] * 3, 8: [0.3] * 3, 16: [0.28] * 3}, 8),  # 16 not clearly faster than 8
    ],
)
def test_choose_threads(samples, chosen):
    assert demo.choose_threads(samples) == chosen


def test_probe_alternates_thread_counts_and_drops_a_far_slower_one(monkeypatch):
    """A fake clock: each call 'takes' the time its thread count costs; 2 threads cost 5x, so one round is enough."""
    now = [0.0]
    cost = {1: 0.4, 2: 2.0}
    order = []

    def call():
        order.append(torch.get_num_threads())
        now[0] += cost.get(torch.get_num_threads(), 0.1)

    threads = torch.get_num_threads()
    monkeypatch.setattr(demo.time, "perf_counter", lambda: now[0])
    try:
        samples = demo._probe_threads([1, 2], call)
    finally:
        torch.set_num_threads(threads)
    assert set(samples) == {1, 2}
    assert samples[1] == pytest.approx([0.4] * demo.PROBE_ROUNDS) and samples[2] == pytest.approx([2.0])
    assert order[1:3] == [1, 2]  # after the warm-up: both counts in the first round, then 1 thread alone
    assert demo.choose_threads(samples) == 1
    note = demo.thread_note(samples, 1, "forward")
    assert "1 thread 0.40 s (median of 3)" in note and "2 threads 2.00 s (1 run, then dropped" in note


# --- the estimate and the progress lines ---------------------------------------------------------------------------


def _args(**overrides) -> argparse.Namespace:
    args = demo.parse_args(["--device", "cpu"])
    args.train_threads = 1
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def test_estimate_scales_with_the_sizes():
    cal = demo.Calibration(threads=1, encode_s=0.5, backward_s=1.2, loss_probe=(1024, 0.4, 0.1),
                           sampler_probe=(20_000, 0.05, 0.6))  # fmt: skip
    base = demo.estimate_stages(_args(), cal)
    assert list(base) == ["NDCG before", "training", "NDCG after", "loss stage", "sampler"]
    # training: 2 runs x 5 steps x 4 mini-batch pairs x (0.5 + 1.2) s, plus the runs' overhead
    assert base["training"] == pytest.approx(2 * (5 * 4 * 1.7 * demo.STEP_FACTOR + demo.RUN_OVERHEAD_S))
    assert base["NDCG after"] == pytest.approx(2 * base["NDCG before"])
    assert base["loss stage"] == pytest.approx(demo.LOSS_FACTOR * 3 * 0.5 * 16)  # 3 pairs, (4096 / 1024)^2
    bigger = demo.estimate_stages(_args(steps=10, loss_batch_size=8192, sampler_rows=400_000), cal)
    assert bigger["training"] - 2 * demo.RUN_OVERHEAD_S == pytest.approx(2 * (base["training"] - 2 * 3.0))
    assert bigger["loss stage"] == pytest.approx(4 * base["loss stage"])
    assert bigger["sampler"] == pytest.approx(2 * base["sampler"])
    assert set(demo.estimate_stages(_args(), demo.Calibration(1, 0.5, 1.2))) == {"NDCG before", "training",
                                                                               "NDCG after"}  # fmt: skip
    line = demo.estimate_line(base, 20.0, 5.5, 2)
    total = demo.duration(sum(base.values()))
    assert f"about {total} more" in line and "load average 5.5 on 2 cores" in line
    assert demo.duration(20 + sum(base.values())) + " in all" in line


def test_full_preset_and_explicit_sizes():
    quick, full = demo.parse_args([]), demo.parse_args(["--full"])
    assert (quick.steps, quick.eval_pairs, quick.sampler_rows, quick.repeats) == (5, 200, 200_000, 3)
    assert (full.steps, full.eval_pairs, full.sampler_rows, full.repeats) == (10, 300, 1_000_000, 5)
    assert demo.parse_args(["--full", "--steps", "3"]).steps == 3
    with pytest.raises(SystemExit):
        demo.parse_args(["--threads", "0"])


def test_progress_lines(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(demo.time, "time", lambda: now[0])
    out = io.StringIO()
    progress = demo.Progress(started=1000.0 - 5, stream=out)
    progress.say("before any plan")
    progress.plan = {"a": 10.0, "b": 30.0}
    progress.start("a", "stage a")
    now[0] += 20.0  # stage a took twice its estimate: the rest is forecast twice as long
    progress.end()
    progress.start("b")
    lines = out.getvalue().splitlines()
    assert lines == [
        "[demo 0:05] before any plan",
        "[demo 0:05, about 0:40 left] stage a (about 10 s) ...",
        "[demo 0:25, about 1:00 left] b (about 30 s) ...",
    ]
    assert demo.clock(125) == "2:05" and demo.duration(125) == "2 min 05 s" and demo.duration(42.4) == "42 s"


# --- the two runs taking turns -------------------------------------------------------------------------------------


def _job(name: str, seed: int, steps: int, order: list[str]):
    def run(hand_over):
        torch.manual_seed(seed)
        random.seed(seed)
        draws = []
        for _ in range(steps):
            hand_over()
            order.append(name)
            draws.append((float(torch.rand(())), random.random()))
        return draws

    return run


def _alone(seed: int, steps: int) -> list[tuple[float, float]]:
    torch.manual_seed(seed)
    random.seed(seed)
    return [(float(torch.rand(())), random.random()) for _ in range(steps)]


def test_lockstep_alternates_steps_and_keeps_each_runs_random_streams():
    order: list[str] = []
    lockstep = demo.Lockstep(["stock", "st_fast"])
    results = lockstep.run({"stock": _job("stock", 1, 3, order), "st_fast": _job("st_fast", 2, 4, order)})
    # turn 0 of each (seeding) is round 0 in order; then the order alternates per round: B A, A B, B A, then the
    # longer job alone
    assert order == ["st_fast", "stock", "stock", "st_fast", "st_fast", "stock", "st_fast"]
    assert results == {"stock": _alone(1, 3), "st_fast": _alone(2, 4)}  # as if each had run alone


def test_lockstep_raises_a_jobs_error_after_the_other_finished():
    order: list[str] = []

    def failing(hand_over):
        hand_over()
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        demo.Lockstep(["a", "b"]).run({"a": failing, "b": _job("b", 0, 3, order)})
    assert order == ["b"] * 3


# --- no ratio without its measurement ------------------------------------------------------------------------------


def test_speedup_comes_with_its_pairs_or_not_at_all():
    assert demo.speedup([2.0, 2.2, 1.8], [1.0, 1.0, 1.0]) == "2.00x [1.80-2.20, 3 pairs]"
    for stock, fast in [([2.0, 2.2], [1.0, 1.0]), ([2.0], [1.0]), ([], [])]:
        cell = demo.speedup(stock, fast)
        assert not RATIO.search(cell) and "too few for a ratio" in cell


def _runs(losses, steps, fast_steps=None):
    runs = [
        {"flavour": flavour, "trainer": f"{package}.SentenceTransformerTrainer", "one_import": flavour == "st_fast",
         "loss": f"{package}.CachedMultipleNegativesRankingLoss", "backend": "native" if flavour == "st_fast" else None,
         "sampler": f"{package}.NoDuplicatesBatchSampler", "losses": losses, "step_s": steps}
        for flavour, package in (("stock", "sentence_transformers"), ("st_fast", "st_fast"))
    ]  # fmt: skip
    if fast_steps is not None:
        runs[1]["step_s"] = fast_steps
    return runs


@pytest.mark.parametrize("pairs", [1, 2, 3, 5])
def test_summary_prints_no_ratio_without_its_pairs(pairs):
    args = _args(steps=pairs + 1)
    rows = [
        {"part": "CachedMNRL loss stage, fwd+bwd (native)", "size": "B=N=4096", "stock": [2.0] * pairs,
         "fast": [1.0] * pairs, "check": "loss diff 0", "same": True, "threads": 1},
        {"part": "training step (whole trainer step)", "size": "batch 32", "stock": [7.0] * pairs,
         "fast": [7.2] * pairs, "check": "see below", "same": None},
    ]  # fmt: skip
    runs = _runs([0.5] * (pairs + 1), [9.0] + [7.0] * pairs, [9.5] + [7.2] * pairs)
    lines, same = demo.summary(args, runs, rows, 0.9, {"stock": 0.95, "st_fast": 0.95}, encoder_s=6.5)
    assert same
    text = "\n".join(lines)
    ratio_lines = [line for line in lines if RATIO.search(line)]
    for line in ratio_lines:  # every ratio printed says how many pairs it comes from (and the table its range)
        assert "pairs" in line, line
    assert bool(re.search(r"\d\.\d\dx \[[0-9.]+-[0-9.]+, \d+ pairs\]", text)) == (pairs >= demo.MIN_PAIRS)
    assert "whole training run" not in text and "one run each" not in text and "train s" not in text
    note = next(line for line in lines if line.startswith("training step row"))
    if pairs >= demo.MIN_PAIRS:
        assert f"st_fast's step was slower in all {pairs} pairs (0.97x-0.97x)" in note
    else:
        assert "too few for a ratio" in note
    assert "in the calibration the encoder passes of one batch took 6.5 s; the median stock step took 7 s" in note


def test_training_note_claims_no_more_than_its_pairs():
    args = _args(steps=5)
    mixed = demo.training_note(args, [7.5, 7.3, 7.3, 8.0], [8.5, 8.5, 7.8, 7.6])
    assert "the 4 pairs' ratios run from 0.86x to 1.05x, on both sides of 1x: no consistent difference" in mixed
    faster = demo.training_note(args, [7.5, 7.3, 7.3, 8.0], [7.0, 7.0, 7.0, 7.0])
    assert "st_fast's step was faster in all 4 pairs (1.04x-1.14x)" in faster
    assert "too few for a ratio" in demo.training_note(_args(steps=3), [7.5, 7.3], [7.0, 7.0])


def test_summary_says_when_the_runs_differ():
    args = _args(steps=3)
    runs = _runs([0.5, 0.4, 0.3], [9.0, 7.0, 7.1])
    runs[1]["losses"] = [0.5, 0.4, 0.31]
    lines, same = demo.summary(args, runs, [], 0.9, {"stock": 0.95, "st_fast": 0.95})
    assert not same and any(line.startswith("same model: NO") for line in lines)


# --- the whole demo, smallest settings ------------------------------------------------------------------------------


def test_demo_summary(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        # the clock starts now: the module was imported at collection, maybe minutes earlier in this process
        assert demo.main([*SMALL, "--output-dir", str(tmp_path)], started=time.time()) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    head, summary = out.split("=== st_fast demo summary ===", 1)

    # first lines: what it does, the thread choice, the estimate; then a progress line per stage and per step
    progress = [line for line in head.splitlines() if line.startswith("[demo ")]
    assert progress[0].startswith("[demo 0:") and "importing" in progress[0]
    assert "torch CPU threads for training and evaluation: 1 (--threads)" in head
    assert re.search(r"^\[demo \d+:\d\d, about \d+:\d\d left\] estimate from the calibration: about .* more, so "
                     r"about .* in all .*: NDCG before .*, training .*, NDCG after .*, loss stage .*, sampler ", head,
                     re.M)  # fmt: skip
    steps = re.findall(r"^\[demo [^]]+\] (stock|st_fast) step (\d)/4: loss [0-9.]+, [0-9.]+ s$", head, re.M)
    turns = [("st_fast", "stock"), ("stock", "st_fast")] * 2  # the runs take turns, the order alternating per step
    assert steps == [(flavour, str(step)) for step, pair in enumerate(turns, 1) for flavour in pair]
    for stage in ("NDCG@10 of the pretrained model", "training stock and st_fast", "NDCG@10 of the two trained",
                  "the cached loss stage", "the no-duplicates sampler"):  # fmt: skip
        assert re.search(rf"^\[demo [^]]+\] {stage}.* \(about [0-9a-z ]+\) \.\.\.$", head, re.M), stage

    # the st_fast run is the one-import trainer, which swapped the stock loss and sampler for st_fast's
    assert "one-import trainer: yes" in summary
    assert re.search(r"^stock +run: sentence_transformers\.SentenceTransformerTrainer trained "
                     r"sentence_transformers\.CachedMultipleNegativesRankingLoss on "
                     r"sentence_transformers\.NoDuplicatesBatchSampler batches$", summary, re.M)  # fmt: skip
    assert re.search(r"^st_fast +run: st_fast\.SentenceTransformerTrainer trained "
                     r"st_fast\.CachedMultipleNegativesRankingLoss \(backend \w+\) on "
                     r"st_fast\.NoDuplicatesBatchSampler batches$", summary, re.M)  # fmt: skip

    # the table: part, size, median stock and st_fast times, speed-up with its range and pairs, the check
    seconds = r"[0-9.e+-]+ s"
    for part, size, pairs in [
        (r"CachedMNRL loss stage, fwd\+bwd \(\w+\)", r"B=N=64, D=32, mbs 32", 3),
        (r"no-duplicates sampler, first epoch", r"2,000 rows, batch 32", 3),
        (r"no-duplicates sampler, later epoch", r"2,000 rows, batch 32", 3),
        (r"training step \(whole trainer step\)", r"batch 4, MiniLM-L6, 16 tokens", 3),
    ]:
        assert re.search(rf"^{part} +{size} +{seconds} +{seconds} +[0-9.]+x \[[0-9.]+-[0-9.]+, {pairs} pairs\] ",
                         summary, re.M), part  # fmt: skip
    assert re.search(r"same \d+ batches", summary)
    for line in summary.splitlines():
        if RATIO.search(line):
            assert "pairs" in line, line

    # the same model: identical step losses (4 per run) and NDCG@10 before / after for both runs
    losses = dict(re.findall(r"^(stock|st_fast) +[0-9.]+ +((?:[0-9.]+ ?){4})$", summary, re.M))
    assert set(losses) == {"stock", "st_fast"}
    assert re.search(r"^same model: yes: step losses agree to \S+ \(relative\); NDCG@10 [0-9.]+ before -> stock "
                     r"[0-9.]+, st_fast [0-9.]+ after$", summary, re.M)  # fmt: skip
    assert re.search(r"^demo: .* in Python from its start \(set-up not included; estimated at \d+:\d\d: ", summary,
                     re.M)  # fmt: skip
