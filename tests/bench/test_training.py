"""The end-to-end training benchmark (benchmarks/training.py) on CPU: synthetic tokenizer and data, the per-step
breakdown, stock vs st_fast rows on a tiny model, the MNRL batch probe, the budget and the GPU grid."""

from __future__ import annotations

import argparse
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from benchmarks import training

CPU = torch.device("cpu")


def make_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--budget-s", type=float, default=None)
    training.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return training.write_model_folder(str(tmp_path_factory.mktemp("models")), training.ARCHS["tiny"], seed=3)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic vocabulary, tokenizer, model folder and data


def test_vocabulary_words_are_single_tokens(tiny_folder):
    words = training.synthetic_words()
    assert len(words) == len(set(words)) == training.VOCAB_SIZE - len(training.SPECIAL_TOKENS)
    assert words[:3] == ["baa", "bab", "bac"] and all(word.isalpha() and word.islower() for word in words)
    model = training.load_model(tiny_folder, training.ARCHS["tiny"], CPU, max_seq_length=32)
    tokenizer = model[0].tokenizer
    assert len(tokenizer) == training.VOCAB_SIZE
    text = training.synthetic_pairs(4, seed=0)["positive"][0]
    ids = tokenizer(text, truncation=False)["input_ids"]
    assert len(ids) == len(text.split()) + 2 and tokenizer.unk_token_id not in ids  # [CLS] words [SEP]
    assert model.max_seq_length == 32
    assert len(tokenizer(text, truncation=True)["input_ids"]) == min(len(text.split()) + 2, 32)


def test_model_folder_is_deterministic(tmp_path, tiny_folder):
    from safetensors.torch import load_file

    again = training.write_model_folder(str(tmp_path), training.ARCHS["tiny"], seed=3)
    other = training.write_model_folder(str(tmp_path / "other"), training.ARCHS["tiny"], seed=4)
    first, second, third = (load_file(f"{folder}/model.safetensors") for folder in (tiny_folder, again, other))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not torch.equal(first["embeddings.word_embeddings.weight"], third["embeddings.word_embeddings.weight"])
    assert open(f"{tiny_folder}/vocab.txt").read() == open(f"{again}/vocab.txt").read()


def test_synthetic_pairs_are_deterministic_with_the_intended_duplicates():
    rows = 600
    data = training.synthetic_pairs(rows, seed=7)
    assert data == training.synthetic_pairs(rows, seed=7)
    assert data != training.synthetic_pairs(rows, seed=8)
    anchors, positives = data["anchor"], data["positive"]
    duplicates = round(rows * training.DUPLICATE_FRACTION)  # 30: 10 of each kind
    assert len(anchors) == len(positives) == rows
    assert len(set(anchors) | set(positives)) == 2 * rows - duplicates
    assert len(set(anchors)) == rows - duplicates // 3  # anchors repeating another row's anchor
    assert len(set(positives)) == rows - duplicates // 3  # positives repeating a positive (the anchor copies are new)
    assert len(set(anchors) & set(positives)) == duplicates // 3  # positives repeating another row's anchor
    counts = Counter(anchors + positives)
    sharing = [i for i in range(rows) if counts[anchors[i]] > 1 or counts[positives[i]] > 1]
    assert len(sharing) == 2 * duplicates  # every target and its (distinct, untouched) source
    low, high = training.ANCHOR_WORDS
    assert all(low <= len(text.split()) <= high for text in anchors)
    low, high = training.POSITIVE_WORDS
    assert all(low <= len(text.split()) <= high for text in set(positives) - set(anchors))


# --------------------------------------------------------------------------------------------------------------------
# The MNRL batch probe


def test_probe_picks_the_largest_batch_that_fits():
    attempts, freed = [], []

    def attempt(batch: int) -> str:
        attempts.append(batch)
        if batch > 4096:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at {batch}")
        return f"ran {batch}"

    batch, result, notes = training.largest_fitting_batch(
        [1024, 16384, 4096, 8192], attempt, on_oom=lambda: freed.append(1)
    )
    assert (batch, result) == (4096, "ran 4096")
    assert attempts == [16384, 8192, 4096] and notes == ["16384: OOM", "8192: OOM"] and len(freed) == 2


def test_probe_passes_over_refused_candidates_and_reports_when_none_fits():
    def attempt(batch: int) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")  # the pre-OutOfMemoryError spelling

    batch, result, notes = training.largest_fitting_batch([256, 512, 1024], attempt, admit=lambda b: b < 1024)
    assert (batch, result) == (None, None)
    assert notes == ["1024: over budget", "512: OOM", "256: OOM"]


def test_probe_lets_other_errors_through():
    def attempt(batch: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        training.largest_fitting_batch([8, 16], attempt)


# --------------------------------------------------------------------------------------------------------------------
# The breakdown arithmetic


def test_step_breakdowns_subtract_the_loss_stage_and_leave_the_rest_to_other():
    timer = training.StepTimer(training.Clock(CPU))  # CPU marks are perf_counter seconds: plain numbers here
    timer.begin = 0.0
    for start in (0.0, 1.0):
        timer.cpu_ms("sampler", 5.0)
        timer.cpu_ms("collate", 10.0)
        timer.span("compute_loss", start + 0.100, start + 0.400)  # 300 ms, holding a 50 ms loss stage
        timer.span("loss_stage", start + 0.200, start + 0.250)
        timer.span("backward", start + 0.400, start + 0.700)  # 300 ms, holding a 20 ms loss-stage backward
        timer.span("loss_stage", start + 0.500, start + 0.520)
        timer.span("optimizer", start + 0.750, start + 0.800)
        timer._current["end"] = start + 1.0
        timer.steps.append(timer._current)
        timer._current = timer._new_step()
    (step,) = timer.step_breakdowns(skip=1)
    assert step["step_ms"] == pytest.approx(1000.0)
    assert step["loss_stage_ms"] == pytest.approx(70.0) and step["encoder_ms"] == pytest.approx(530.0)
    assert step["sampler_ms"] == 5.0 and step["collate_ms"] == 10.0 and step["optimizer_ms"] == pytest.approx(50.0)
    assert step["other_ms"] == pytest.approx(1000.0 - 70 - 530 - 5 - 10 - 50)


def test_step_breakdowns_leave_unmeasured_parts_empty():
    timer = training.StepTimer(training.Clock(CPU))
    timer.begin = 0.0
    timer.span("compute_loss", 0.1, 0.2)
    timer._current["end"] = 0.5
    timer.steps.append(timer._current)
    (step,) = timer.step_breakdowns(skip=0)
    assert step["encoder_ms"] is None and step["loss_stage_ms"] is None and step["sampler_ms"] is None
    assert step["other_ms"] == pytest.approx(500.0)


# --------------------------------------------------------------------------------------------------------------------
# Tiny CPU runs: the hooks fire on both trainers, and the rows agree


@pytest.fixture(scope="module")
def tiny_runs(tiny_folder):
    from datasets import Dataset

    setup = training.Setup(
        device=CPU, dataset=Dataset.from_dict(training.synthetic_pairs(120, seed=5)), folders={"tiny": tiny_folder},
        max_seq_length=32, warmup=1, steps=2, mini_batch_size=4, seed=11,
    )  # fmt: skip
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return setup, {(loss, flavour): training.train_once(flavour, training.ARCHS["tiny"], loss, 16, setup)
                       for loss in ("cmnrl", "mnrl") for flavour in ("stock", "st_fast")}  # fmt: skip
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("loss", ["cmnrl", "mnrl"])
@pytest.mark.parametrize("flavour", ["stock", "st_fast"])
def test_every_hook_fires_on_the_object_the_trainer_calls(tiny_runs, loss, flavour):
    _, results = tiny_runs
    result = results[loss, flavour]
    steps, calls = result["total_steps"], result["calls"]
    assert steps == 3 and len(result["steps"]) == 2 and len(result["losses"]) == 3
    assert calls["compute_loss"] == calls["backward"] == calls["optimizer"] == steps
    # CMNRL: one calculate_loss per step (through the fused descriptor for st_fast); MNRL: a forward and a backward
    assert calls["loss_stage"] == steps * (1 if loss == "cmnrl" else 2)
    assert calls["sampler"] == steps + 1  # accelerate fetches one batch ahead
    assert calls["collate"] == steps + 1
    assert result["peak_mb"] is None


@pytest.mark.parametrize("loss", ["cmnrl", "mnrl"])
def test_tiny_rows_agree_and_their_breakdown_adds_up(tiny_runs, loss):
    setup, results = tiny_runs
    rows = training.compare_rows(
        training.ARCHS["tiny"], loss, 16, setup, results[loss, "stock"], results[loss, "st_fast"]
    )
    assert [row["trainer"] for row in rows] == ["stock", "st_fast"]
    stock, fast = rows
    assert stock["max_step_loss_rel_diff"] is None and fast["max_step_loss_rel_diff"] < 1e-4
    assert stock["speedup_vs_stock"] == 1.0
    assert fast["speedup_vs_stock"] == pytest.approx(stock["step_ms"] / fast["step_ms"])
    for row in rows:
        assert row["mini_batch"] == (4 if loss == "cmnrl" else None) and row["steps"] == 2
        assert row["samples_per_s"] == pytest.approx(16 / (row["step_ms"] / 1e3))
        parts = [row[key] for key in training.BREAKDOWN]
        assert all(isinstance(part, float) and part >= 0.0 for part in parts), row
        assert row["encoder_ms"] > 0 and row["loss_stage_ms"] > 0 and row["collate_ms"] > 0
        assert sum(parts) <= row["step_ms"] * 1.001 + 0.05, row


# --------------------------------------------------------------------------------------------------------------------
# run(): the smoke grid, the budget and the GPU grid


def test_run_smoke_yields_stock_and_st_fast_rows_per_loss():
    rows = training.run(make_args("--smoke", "--training-threads", "1", "--training-steps", "1"))
    assert [(row["loss"], row["trainer"]) for row in rows] == [
        ("cmnrl", "stock"), ("cmnrl", "st_fast"), ("mnrl", "stock"), ("mnrl", "st_fast"),
    ]  # fmt: skip
    for row in rows:
        assert row["model"] == "tiny" and row["batch"] == 16 and row["steps"] == 1 and row["device"] == "cpu"
        if row["trainer"] == "st_fast":
            assert row["max_step_loss_rel_diff"] < 1e-4, row


def test_run_reports_cases_over_budget_as_skipped():
    rows = training.run(make_args("--smoke", "--budget-s", "1e-9", "--training-mnrl-batch-sizes", "16", "8"))
    assert [(row["loss"], row["trainer"]) for row in rows] == [("cmnrl", None), ("mnrl", None)]
    assert rows[0]["note"] == "skipped: predicted not to fit --budget-s"
    assert rows[1]["note"] == "skipped: none of [16, 8] fits (16: over budget; 8: over budget)"


def test_gpu_grid_and_the_large_cases():
    config = training._config(make_args("--gpu"))
    assert [arch.name for arch in config["models"]] == ["minilm-l6", "bert-base"]
    assert config["batches"] == [1024, 4096, 16384] and config["mnrl_batches"] == [16384, 8192, 4096, 2048, 1024]
    assert config["mini_batch_size"] == 128 and config["steps"] == 3 and config["warmup"] == 1
    assert not config["large"] and training._config(make_args("--gpu", "--training-large"))["large"]
    assert training._config(make_args("--smoke"))["large"]  # only the default --gpu grid leaves cases out

    def never(*args):
        raise AssertionError("a left-out case must not run")

    setup = SimpleNamespace(device=CPU)
    (row,) = training._cmnrl_case(training.ARCHS["bert-base"], 16384, setup, never, config, never)
    assert row["trainer"] is None and "--training-large" in row["note"]
    # the cost grows with the model and the batch, from a fixed set-up part
    costs = [training.case_cost(training.ARCHS[name], "cmnrl", batch) for name in ("minilm-l6", "bert-base")
             for batch in (1024, 4096)]  # fmt: skip
    assert costs == sorted(costs) and training.case_cost(training.ARCHS["tiny"], "mnrl", 1) > 0
