"""st_fast.losses.MultipleNegativesRankingLoss with ``gather_across_devices=True`` against the stock class.

1. Simulation (as upstream's gather test, spec §6): ``all_gather_with_grad`` and ``get_rank`` are monkeypatched in
   both the stock and the st_fast module so that this process is rank 1 of 2; rank 0's block of every column is a
   fixed random tensor, so each gathered column is ``[other, local]``. st_fast (float32) is compared with stock on
   float64 copies (reference) and stock on the same float32 inputs (baseline), via ``parity.assert_parity``.
2. Real ``torch.distributed``: 2 spawned CPU processes (gloo, ``file://`` rendezvous) each take their shard of one
   global batch and compute the gathered loss and the gradients of their local embeddings. With the stock semantics
   (spec §1.3: each rank's loss is the mean over its local rows; the all_gather backward sums every rank's gradient
   back to the owner) the mean of the rank losses is the single-process loss of the global batch, and each rank's
   local gradient is world_size x the matching rows of the single-process gradient.
"""

from __future__ import annotations

import importlib
import time
import warnings
from pathlib import Path

import pytest
import torch
from gloo_worker import run_gloo_worker
from parity import assert_parity, float64_copies, loss_and_grads, random_columns, relative_error

from st_fast.ops.backends import native_available

FP32_RTOL = 1e-5
STOCK_MODULE = "sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking"

# Backends that run on CPU tensors without the interpreter: torch always, native when its extension is built.
CPU_BACKENDS = ["torch"] + (["native"] if native_available(torch.device("cpu")) else [])

ALL_FOUR = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
SYMMETRIC = ("query_to_doc", "doc_to_query")
CONFIGS = {
    "default": {},
    "all4-joint": dict(directions=ALL_FOUR),
    "q2d+d2q-per_direction": dict(directions=SYMMETRIC, partition_mode="per_direction"),
    # the symmetric path: doc_to_query from this rank's query_to_doc columns plus a GEMM over the other ranks' queries
    "q2d+d2q-joint-hard_negatives-5": dict(directions=SYMMETRIC, hardness_mode="hard_negatives", hardness_strength=5.0),
    "all_negatives-5": dict(hardness_mode="all_negatives", hardness_strength=5.0),
    "in_batch_negatives-9": dict(hardness_mode="in_batch_negatives", hardness_strength=9.0),
    "hard_negatives-5": dict(hardness_mode="hard_negatives", hardness_strength=5.0),
    # upstream's gather simulation config
    "all4-joint-all_negatives-5": dict(directions=ALL_FOUR, hardness_mode="all_negatives", hardness_strength=5.0),
    "q2d+d2q-per_direction-in_batch_negatives-9": dict(
        directions=SYMMETRIC, partition_mode="per_direction", hardness_mode="in_batch_negatives", hardness_strength=9.0
    ),
}
# The Triton interpreter is slow: a few small cases only.
TRITON_CONFIGS = ["default", "all4-joint-all_negatives-5", "q2d+d2q-per_direction-in_batch_negatives-9"]


def _losses(config: dict, backend: str, *, gather: bool = True):
    from sentence_transformers.sentence_transformer import losses as stock_losses

    from st_fast import losses as fast_losses

    kwargs = dict(gather_across_devices=gather, **config)
    stock = stock_losses.MultipleNegativesRankingLoss(None, **kwargs)
    fast = fast_losses.MultipleNegativesRankingLoss(None, backend=backend, **kwargs)
    return stock, fast


# --------------------------------------------------------------------------------------------------------------------
# 1. Simulated rank 1 of 2
# --------------------------------------------------------------------------------------------------------------------


class FakeGather:
    """``all_gather_with_grad`` as seen by rank 1 of 2: rank 0's block (a fixed tensor per column, in the order the
    loss gathers them: queries, then each docs column) followed by the local tensor."""

    def __init__(self, others: list[torch.Tensor]) -> None:
        self.others = others
        self.calls = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        other = self.others[self.calls]
        self.calls += 1
        assert tensor.shape == other.shape, (tensor.shape, other.shape)
        return torch.cat([other.to(tensor.dtype), tensor], dim=0)


def _simulated(monkeypatch, loss_fn, others, embeddings):
    """(loss, grads of the local embeddings) of ``loss_fn`` as rank 1 of 2, with rank 0's columns ``others``."""
    gather = FakeGather(others)
    module = importlib.import_module(STOCK_MODULE)  # st_fast looks the helpers up there too
    monkeypatch.setattr(module, "all_gather_with_grad", gather)
    monkeypatch.setattr(module, "get_rank", lambda: 1)
    result = loss_and_grads(lambda e: loss_fn.compute_loss_from_embeddings(e, None), embeddings)
    assert gather.calls == len(embeddings), f"gathered {gather.calls} tensors for {len(embeddings)} columns"
    return result


def _check_simulation(monkeypatch, config_name, backend, batch, negatives, dim=16):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock, fast = _losses(CONFIGS[config_name], backend)
    columns = 2 + negatives
    embeddings = random_columns(batch, dim, columns, seed=10 * batch + negatives)
    # rank 0's columns: float32 values (exact in float64 too, so reference and float32 runs see the same batch)
    others = [x.detach() for x in random_columns(batch, dim, columns, seed=1000 + 10 * batch + negatives)]
    expected = _simulated(monkeypatch, stock, others, float64_copies(embeddings))
    baseline = _simulated(monkeypatch, stock, others, embeddings)
    actual = _simulated(monkeypatch, fast, others, embeddings)
    assert_parity(actual, expected, baseline, rtol=FP32_RTOL)
    return actual, expected


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_simulated_rank1_matches_stock(monkeypatch, backend, batch, negatives, config_name):
    _check_simulation(monkeypatch, config_name, backend, batch, negatives)


@pytest.mark.parametrize("config_name", TRITON_CONFIGS)
@pytest.mark.parametrize("batch, negatives", [(5, 2), (1, 0)])
def test_simulated_rank1_matches_stock_triton(monkeypatch, batch, negatives, config_name):
    _check_simulation(monkeypatch, config_name, "triton", batch, negatives)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_simulation_is_not_vacuous(monkeypatch, backend):
    """Rank 0's block is really part of the candidates: the rank-1 loss differs from the ungathered local loss."""
    (loss, _), _ = _check_simulation(monkeypatch, "all4-joint-all_negatives-5", backend, 5, 2)
    _, fast_local = _losses(CONFIGS["all4-joint-all_negatives-5"], backend, gather=False)
    local = loss_and_grads(
        lambda e: fast_local.compute_loss_from_embeddings(e, None), random_columns(5, 16, 4, seed=52)
    )
    assert relative_error(loss, local[0]) > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_upstream_duplicate_gather_equals_doubled_batch(monkeypatch, backend):
    """As upstream checks it: gather = cat([x, x]), rank 1 -> the loss of the ungathered doubled batch."""
    config = CONFIGS["all4-joint-all_negatives-5"]
    _, fast = _losses(config, backend)
    stock_plain, _ = _losses(config, backend, gather=False)
    module = importlib.import_module(STOCK_MODULE)  # st_fast looks the helpers up there too
    monkeypatch.setattr(module, "all_gather_with_grad", lambda x: torch.cat([x, x], dim=0))
    monkeypatch.setattr(module, "get_rank", lambda: 1)
    embeddings = random_columns(5, 16, 3, seed=7)
    loss = fast.compute_loss_from_embeddings(embeddings, None)
    doubled = [torch.cat([x, x], dim=0).detach().double() for x in embeddings]
    reference = stock_plain.compute_loss_from_embeddings(doubled, None)
    assert relative_error(loss.detach(), reference) < FP32_RTOL


# --------------------------------------------------------------------------------------------------------------------
# 2. Real torch.distributed: 2 spawned CPU processes on gloo
# --------------------------------------------------------------------------------------------------------------------

WORLD_SIZE, RANK_BATCH, DIST_DIM, DIST_COLUMNS = 2, 3, 16, 3  # 3 rows per rank, one hard negative
DIST_CONFIGS = ["default", "all4-joint", "q2d+d2q-per_direction", "q2d+d2q-joint-hard_negatives-5", "all_negatives-5"]
# "stock" runs the stock class in the same workers: it checks the harness itself (the identities below hold for it).
DIST_BACKENDS = ["stock", *CPU_BACKENDS]
DIST_DEADLINE_S = 180.0  # generous (imports of 2 processes on 2 cores); only reached if something hangs
GLOO_TIMEOUT_S = 60.0


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str, backends: list[str]) -> None:
    """One rank: loss and local-embedding gradients of every (backend, config) on this rank's shard.

    Module-level so that spawn can pickle it; results go to ``out_dir/rank{rank}.pt``, a traceback to
    ``out_dir/rank{rank}.error``."""

    def work(out: Path) -> dict:
        columns = torch.load(out / "columns.pt")
        rows = slice(rank * RANK_BATCH, (rank + 1) * RANK_BATCH)
        results = {}
        for backend in backends:
            for config_name in DIST_CONFIGS:
                stock, fast = _losses(CONFIGS[config_name], "torch" if backend == "stock" else backend)
                loss_fn = stock if backend == "stock" else fast
                local = [c[rows].clone().requires_grad_() for c in columns]
                loss = loss_fn.compute_loss_from_embeddings(local, None)
                grads = torch.autograd.grad(loss, local)
                results[(backend, config_name)] = (loss.detach(), [g.detach() for g in grads])
        return results

    run_gloo_worker(rank, world_size, init_file, out_dir, GLOO_TIMEOUT_S, work)


def _run_workers(out_dir: Path) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    init_file = out_dir / "rendezvous"
    processes = [
        context.Process(
            target=_distributed_worker, args=(rank, WORLD_SIZE, str(init_file), str(out_dir), DIST_BACKENDS)
        )
        for rank in range(WORLD_SIZE)
    ]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + DIST_DEADLINE_S
        while any(p.is_alive() for p in processes):
            failed = [rank for rank, p in enumerate(processes) if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    problems = []
    for rank, process in enumerate(processes):
        error = out_dir / f"rank{rank}.error"
        if error.exists():
            problems.append(f"rank {rank} raised:\n{error.read_text()}")
        elif process.exitcode != 0:
            problems.append(f"rank {rank} exit code {process.exitcode} (terminated after {DIST_DEADLINE_S:.0f} s?)")
    if problems:
        pytest.fail("distributed workers failed:\n" + "\n".join(problems))


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """(global float32 columns, {(backend, config): [(loss, grads) of rank r for r in ranks]})."""
    out_dir = tmp_path_factory.mktemp("gathered_mnrl_dist")
    columns = [x.detach() for x in random_columns(WORLD_SIZE * RANK_BATCH, DIST_DIM, DIST_COLUMNS, seed=2024)]
    torch.save(columns, out_dir / "columns.pt")
    _run_workers(out_dir)
    per_rank = [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    return columns, {key: [ranks[key] for ranks in per_rank] for key in per_rank[0]}


@pytest.mark.parametrize("config_name", DIST_CONFIGS)
@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_two_process_gloo_matches_single_process_stock(distributed_results, backend, config_name):
    columns, results = distributed_results
    stock_plain, _ = _losses(CONFIGS[config_name], "torch", gather=False)
    ref_loss, ref_grads = loss_and_grads(
        lambda e: stock_plain.compute_loss_from_embeddings(e, None), float64_copies(columns)
    )
    rank_results = results[(backend, config_name)]
    mean_loss = torch.stack([loss.double() for loss, _ in rank_results]).mean()
    assert relative_error(mean_loss, ref_loss) < FP32_RTOL, (
        f"{backend}/{config_name}: mean rank loss {mean_loss.item():.8g} vs single-process {ref_loss.item():.8g}"
    )
    for rank, (_, grads) in enumerate(rank_results):
        rows = slice(rank * RANK_BATCH, (rank + 1) * RANK_BATCH)
        for column, (grad, ref_grad) in enumerate(zip(grads, ref_grads, strict=True)):
            error = relative_error(grad / WORLD_SIZE, ref_grad[rows])
            assert error < FP32_RTOL, f"{backend}/{config_name}: rank {rank} column {column} gradient error {error:.3g}"
