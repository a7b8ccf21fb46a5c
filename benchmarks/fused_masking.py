"""``python -m benchmarks fused_loss --mask-duplicates``: the cost of mask_duplicates, the fused MNRL op with and
without text labels, forward + backward, in the same process.

Default case: CPU, 1 thread (``--fused-threads`` to change), B = 4096, k = 2, D = 384, fp32; with ``--gpu``
B = 16384, D = 1024, bf16; ``--fused-batch-sizes / --fused-k / --fused-dim / --fused-dtypes`` replace them (smoke:
B 64, D 32). Cosine, scale 20, random embeddings; the labels give about 5 % of the texts a twin (so that masked
entries exist, as in a real batch). Directions: query_to_doc (one pass) and query_to_doc + doc_to_query (the
symmetric path), each on the st_fast backends (``--fused-backends``; triton on CUDA, or on the CPU interpreter).

Rows: ``mask`` off / on per case, directions and backend, with ``time_ms`` (median of up to ``--repeats`` calls
within ``--fused-time-budget`` s, after one warm-up, the calls alternating over the rows of a case,
``benchmarks.common.time_alternating``, so that a change in the machine's load reaches all of them) and
``x_unmasked`` = time / the unmasked time (goal <= 1.05); and a ``labels`` row: the exact text labels of the
(k+1)·B texts (:func:`st_fast.ops.text_labels.text_labels` on token rows of 32 ids), which the
drop-in losses compute once per step.
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
    free_memory,
    make_embeddings,
    progress,
    repeats_of,
    row_threads,
    single_size_cases,
    time_alternating,
)

DIRECTIONS = {"query_to_doc": ("query_to_doc",), "symmetric": ("query_to_doc", "doc_to_query")}
TWIN_FRACTION = 0.05
TEXT_LENGTH = 32


def masking_cases(args: argparse.Namespace) -> list[tuple[int, int, int, torch.dtype]]:
    return single_size_cases(args, k=2)


def twin_texts(count: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Token rows (count, TEXT_LENGTH) of random texts, about TWIN_FRACTION of them a copy of another."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(1000, 30000, (count, TEXT_LENGTH), generator=generator)
    twins = torch.randperm(count, generator=generator)[: int(TWIN_FRACTION * count)]
    rows[twins] = rows[torch.randint(0, count, (twins.shape[0],), generator=generator)]
    return rows.to(device)


def _loss_call(embeddings: list[torch.Tensor], directions: tuple[str, ...], backend: str, labels: Any) -> Any:
    """One forward + backward of the fused op (with ``labels``: masked)."""
    from st_fast.ops import fused_mnrl_loss

    def step() -> None:
        for x in embeddings:
            x.grad = None
        loss = fused_mnrl_loss(
            embeddings[0], embeddings[1:], scale=SCALE, directions=directions, backend=backend, labels=labels
        )
        loss.backward()

    return step


def _labels_call(features: list[dict[str, torch.Tensor]]) -> Any:
    from st_fast.ops.text_labels import text_labels

    return lambda: text_labels(features)


def run_masking(args: argparse.Namespace) -> list[dict[str, Any]]:
    from st_fast.ops.text_labels import text_labels

    device = bench_device(args, "fused_device")
    repeats = repeats_of(args)
    threads = args.fused_threads or (1 if device.type == "cpu" else None)
    rows: list[dict[str, Any]] = []
    with cpu_threads(threads):
        for batch, k, dim, dtype in progress(masking_cases(args), desc="fused_loss --mask-duplicates"):
            backends = available_backends(device, dtype, args.fused_backends)
            embeddings = make_embeddings(batch, k, dim, dtype, device)
            texts = twin_texts((k + 1) * batch, device)
            features = [{"input_ids": texts, "attention_mask": torch.ones_like(texts)}]
            labels = text_labels(features)
            labels = (labels[:batch], labels[batch:])

            calls = {("labels", "-", "-"): _labels_call(features)}
            for name, directions in DIRECTIONS.items():
                for backend in backends:
                    for masked in (False, True):
                        call = _loss_call(embeddings, directions, backend, labels if masked else None)
                        calls[(name, backend, "on" if masked else "off")] = call
            for fn in calls.values():
                fn()  # warm-up
            times = time_alternating(calls, repeats, device=device, budget_s=args.fused_time_budget)
            for (name, backend, mask), values in times.items():
                seconds = statistics.median(values)
                row = {"directions": name, "backend": backend, "mask": mask, "B": batch, "k": k, "D": dim,
                       "dtype": dtype_name(dtype), "time_ms": 1e3 * seconds, "x_unmasked": None, "runs": len(values),
                       "threads": row_threads(device)}  # fmt: skip
                if mask == "on":
                    row["x_unmasked"] = seconds / statistics.median(times[(name, backend, "off")])
                rows.append(row)
            embeddings = labels = None
            free_memory(device)
    return rows
