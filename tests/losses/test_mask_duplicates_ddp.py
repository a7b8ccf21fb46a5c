"""mask_duplicates under real ``torch.distributed``: 2 spawned CPU processes (gloo, ``file://`` rendezvous) each take
their shard of one global batch whose texts repeat across the ranks, gather the texts with the embeddings, and
compute the masked loss of their rows. With stock's gather semantics (each rank's loss is the mean over its local
rows) the mean of the rank losses is the single-process masked loss of the global batch; without the other rank's
texts (local labels only) it would not be."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch
from gloo_worker import run_gloo_worker
from parity import relative_error

WORLD_SIZE, RANK_BATCH, VOCAB, DIM = 2, 3, 50, 16
DIRECTIONS = [
    ("query_to_doc",),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]
DEADLINE_S = 180.0  # generous (imports of 2 processes on 2 cores); only reached if something hangs


class BagModel(torch.nn.Module):
    """A deterministic stand-in encoder: the sum of the token embeddings of a text's ids."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.embedding = torch.nn.Parameter(torch.randn(VOCAB, DIM, generator=generator))

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = features["attention_mask"].to(self.embedding.dtype)
        return {"sentence_embedding": (self.embedding[features["input_ids"]] * weights[..., None]).sum(dim=1)}


def global_features() -> list[dict[str, torch.Tensor]]:
    """3 columns of WORLD_SIZE·RANK_BATCH texts from a pool of 12, each positive the anchor's own text (so that the
    positive logit is the largest and a masked twin of it matters); repeats across the ranks: anchors (and positives)
    0 and 4, positives 1 and 5, and positive 1 as hard negative 3."""
    generator = torch.Generator().manual_seed(3)
    pool = torch.randint(1, VOCAB, (12, 5), generator=generator)
    picks = [torch.randint(0, 12, (WORLD_SIZE * RANK_BATCH,), generator=generator) for _ in range(3)]
    picks[0][4] = picks[0][0]
    picks[1] = picks[0].clone()
    picks[1][5] = picks[1][1]
    picks[2][3] = picks[1][1]
    return [{"input_ids": pool[p], "attention_mask": torch.ones_like(pool[p])} for p in picks]


def masked_loss(features, directions, *, gather: bool) -> torch.Tensor:
    from st_fast.losses import MultipleNegativesRankingLoss

    loss = MultipleNegativesRankingLoss(
        BagModel(), mask_duplicates=True, gather_across_devices=gather, directions=directions
    )
    return loss(features, None)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    def work(out: Path) -> dict:
        rows = slice(rank * RANK_BATCH, (rank + 1) * RANK_BATCH)
        shard = [{key: value[rows] for key, value in column.items()} for column in global_features()]
        return {directions: masked_loss(shard, directions, gather=True).detach() for directions in DIRECTIONS}

    run_gloo_worker(rank, WORLD_SIZE, init_file, out_dir, 60.0, work)


@pytest.fixture(scope="module")
def rank_losses(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("mask_duplicates_ddp")
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker, args=(rank, str(out_dir / "rendezvous"), str(out_dir)))
        for rank in range(WORLD_SIZE)
    ]
    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + DEADLINE_S
        while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in processes):
                break
            time.sleep(0.1)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)
    errors = [(out_dir / f"rank{rank}.error") for rank in range(WORLD_SIZE)]
    problems = [error.read_text() for error in errors if error.exists()]
    problems += [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(processes) if p.exitcode != 0]
    if problems:
        pytest.fail("distributed workers failed:\n" + "\n".join(problems))
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("directions", DIRECTIONS)
def test_two_process_gloo_masks_duplicates_across_ranks(rank_losses, directions):
    mean = torch.stack([losses[directions] for losses in rank_losses]).double().mean()
    single = masked_loss(global_features(), directions, gather=False).detach()
    assert relative_error(mean, single) < 1e-5
    # the duplicates sit on different ranks (rows 0 / 4, 1 / 5, 1 / 3 of 3-row shards), so only labels over the
    # gathered texts give this loss; the masking does change it
    from st_fast.losses import MultipleNegativesRankingLoss

    unmasked = MultipleNegativesRankingLoss(BagModel(), directions=directions)(global_features(), None).detach()
    assert relative_error(unmasked, single) > 1e-4
