"""MaxSim (late interaction) in-batch losses of sentence-transformers' MultiVectorEncoder: stock vs st_fast.

Two stages, on the same random unit token embeddings (queries (B, Lq, D), documents (B, k, Ld, D): the positive and
k - 1 hard negatives per query; document masks with a random number of trailing padding tokens and a few holes, as
skiplist words leave):

* ``loss``: the non-cached loss's scoring and cross-entropy, forward and backward: stock is
  ``cross_entropy(colbert_scores(q, d, masks) · scale, arange(B)·k)`` (the 4-D similarity tensor per chunk), st_fast
  is ``st_fast.ops.maxsim.fused_maxsim_loss(..., backend=...)``;
* ``cached``: the GradCache loss stage, ``calculate_loss(reps, masks, with_backward=True)`` of stock's
  ``CachedMultiVectorMultipleNegativesRankingLoss`` (one score chunk of ``score_mini_batch_size`` queries at a time)
  and of st_fast's drop-in (one fused pass); ``reps[column][mini_batch]`` are (mbs, T, D) leaves.

Columns: median time of ``--repeats`` calls after one (memory-measured) warm-up; peak memory of one call (the CPU
profiler's peak of live tensor bytes, or CUDA max allocated); ``x_vs_stock`` = stock time / time; ``gemm_ms``: the
products GEMM alone ((B·Lq, D) x (D, B·k·Ld) in fp32, timed on a slice and scaled), the floor of any exact forward,
and ``x_gemm`` = time / gemm_ms; ``loss_err`` / ``grad_err``: largest absolute differences from stock. ``native``
is timed where its MaxSim kernels run (CPU, float32 / bfloat16). The public MaxSim kernels (late-interaction-kernels,
flash-maxsim) are not installed on the benchmark machines: not compared.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch

from benchmarks.common import (
    DTYPES,
    add_loss_options,
    dtype_name,
    free_memory,
    measure_each,
    model_stand_in,
    op_seconds,
    result_columns,
    row_threads,
    run_cases,
)

TITLE = "MaxSim in-batch loss (MultiVectorEncoder): stock vs st_fast, non-cached loss and cached loss stage"
STAGES = ("loss", "cached")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = add_loss_options(
        parser, "maxsim", "maxsim",
        sizes="B values (default: 32 128 256; smoke: 8; gpu: 256 1024)",
        k="documents per query k (the positive and k-1 hard negatives; default 2)",
        no_stock="skip the stock loss (x_vs_stock left empty)",
        dim="token embedding size D (default 128; smoke 16)",
        dtypes="embedding dtypes (default fp32; gpu: fp32 bf16)",
    )  # fmt: skip
    group.add_argument("--maxsim-query-tokens", type=int, default=None, help="Lq (default 32; smoke 6)")
    group.add_argument("--maxsim-document-tokens", type=int, default=None, help="Ld (default 180; smoke 20)")
    group.add_argument("--maxsim-stages", nargs="+", choices=STAGES, default=list(STAGES), help="what to time")
    group.add_argument("--maxsim-mini-batch-size", type=int, default=None,
                       help="cached stage: mini_batch_size = score_mini_batch_size (default 32; smoke 4)")  # fmt: skip


def maxsim_cases(args: argparse.Namespace) -> list[tuple[int, int, int, torch.dtype]]:
    """(B, k, D, dtype) cases from the size preset and the --maxsim-* overrides."""
    if args.smoke:
        batch_sizes, dim, dtypes = [8], 16, ["fp32"]
    elif args.gpu:
        batch_sizes, dim, dtypes = [256, 1024], 128, ["fp32", "bf16"]
    else:
        batch_sizes, dim, dtypes = [32, 128, 256], 128, ["fp32"]
    batch_sizes = args.maxsim_batch_sizes or batch_sizes
    per_group = args.maxsim_k or 2
    dim = args.maxsim_dim or dim
    dtypes = args.maxsim_dtypes or dtypes
    return [(b, per_group, dim, DTYPES[name]) for b in batch_sizes for name in dtypes]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    return run_cases(args, "maxsim", maxsim_cases(args), functools.partial(case_rows, args), "maxsim")


def token_sizes(args: argparse.Namespace) -> tuple[int, int]:
    """(Lq, Ld) of the cases."""
    query_tokens = args.maxsim_query_tokens or (6 if args.smoke else 32)
    return query_tokens, args.maxsim_document_tokens or (20 if args.smoke else 180)


def make_batch(batch: int, per_group: int, query_tokens: int, document_tokens: int, dim: int, dtype: torch.dtype,
               device: torch.device):  # fmt: skip
    """Unit token embeddings and masks (see the module docstring), seeded."""
    g = torch.Generator().manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(batch, query_tokens, dim, generator=g), dim=-1)
    documents = torch.nn.functional.normalize(torch.randn(batch, per_group, document_tokens, dim, generator=g), dim=-1)
    lengths = torch.randint(document_tokens // 2, document_tokens + 1, (batch, per_group), generator=g)
    document_mask = torch.arange(document_tokens) < lengths.unsqueeze(-1)
    document_mask &= torch.rand(batch, per_group, document_tokens, generator=g) > 0.05  # skiplist holes
    document_mask[..., 0] = True
    query_mask = torch.ones(batch, query_tokens, dtype=torch.bool)
    to = dict(device=device)
    return (queries.to(dtype=dtype, **to), documents.to(dtype=dtype, **to), query_mask.to(**to),
            document_mask.to(**to))  # fmt: skip


def gemm_seconds(batch: int, per_group: int, query_tokens: int, document_tokens: int, dim: int,
                 device: torch.device) -> float:  # fmt: skip
    """Seconds of the (B·Lq, D) x (D, B·k·Ld) fp32 products GEMM, timed on a slice of at most 1024 x 16384 outputs
    and scaled by the number of such slices (:func:`benchmarks.common.op_seconds`)."""
    rows, columns = batch * query_tokens, batch * per_group * document_tokens
    slice_rows, slice_columns = min(rows, 1024), min(columns, 16384)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(slice_rows, dim, generator=g).to(device)
    b = torch.randn(slice_columns, dim, generator=g).to(device)
    out = torch.empty(slice_rows, slice_columns, device=device)
    seconds = op_seconds(lambda: torch.matmul(a, b.T, out=out), device)
    return seconds * (rows / slice_rows) * (columns / slice_columns)


def loss_calls(args, batch, per_group, backends):
    """(calls, grads, leaves) of the ``loss`` stage."""
    from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

    from st_fast.ops.maxsim import fused_maxsim_loss

    queries, documents, query_mask, document_mask = batch
    queries, documents = queries.requires_grad_(), documents.requires_grad_()
    labels = torch.arange(queries.shape[0], device=queries.device) * per_group

    def stock() -> torch.Tensor:
        queries.grad = documents.grad = None
        scores = colbert_scores(queries, documents, query_mask, document_mask)
        loss = torch.nn.functional.cross_entropy(scores, labels)
        loss.backward()
        return loss.detach()

    def fused(backend: str) -> torch.Tensor:
        queries.grad = documents.grad = None
        loss = fused_maxsim_loss(queries, documents, query_mask, document_mask, backend=backend)
        loss.backward()
        return loss.detach()

    calls = {"stock": stock} if not args.maxsim_no_stock else {}
    calls.update({name: functools.partial(fused, name) for name in backends})
    return calls, lambda: [queries.grad, documents.grad], [queries, documents]


def cached_calls(args, batch, per_group, backends):
    """(calls, grads, leaves) of the ``cached`` stage."""
    from sentence_transformers.multi_vector_encoder.losses import CachedMultiVectorMultipleNegativesRankingLoss as Stock
    from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

    from st_fast.losses.cached_multi_vector_multiple_negatives_ranking import (
        CachedMultiVectorMultipleNegativesRankingLoss as Fused,
    )

    queries, documents, query_mask, document_mask = batch
    mini_batch_size = args.maxsim_mini_batch_size or (4 if args.smoke else 32)
    columns = [(queries, query_mask)] + [(documents[:, n], document_mask[:, n]) for n in range(per_group)]
    reps = [[e[i : i + mini_batch_size].detach().clone().requires_grad_() for i in range(0, len(e), mini_batch_size)]
            for e, _ in columns]  # fmt: skip
    masks = [[m[i : i + mini_batch_size] for i in range(0, len(m), mini_batch_size)] for _, m in columns]
    options = dict(similarity_fct=colbert_scores, mini_batch_size=mini_batch_size)
    losses = {} if args.maxsim_no_stock else {"stock": Stock(model_stand_in(), **options)}
    losses.update({name: Fused(model_stand_in(), backend=name, **options) for name in backends})

    def stage(loss) -> torch.Tensor:
        for column in reps:
            for chunk in column:
                chunk.grad = None
        return loss.calculate_loss(reps, masks, with_backward=True).detach()

    calls = {name: functools.partial(stage, loss) for name, loss in losses.items()}
    leaves = [chunk for column in reps for chunk in column]
    return calls, lambda: [torch.cat([chunk.grad for chunk in column]) for column in reps], leaves


def case_rows(args: argparse.Namespace, case: tuple[int, int, int, torch.dtype], device: torch.device, repeats: int,
              backends: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one case: per stage, stock and each backend on the same embeddings."""
    batch_size, per_group, dim, dtype = case
    from st_fast._native_maxsim import native_maxsim_available

    if not native_maxsim_available(device, dtype):  # the row kernels may be built while the MaxSim ones are not
        backends = [name for name in backends if name != "native"]
    query_tokens, document_tokens = token_sizes(args)
    gemm = gemm_seconds(batch_size, per_group, query_tokens, document_tokens, dim, device)
    rows: list[dict[str, Any]] = []
    for stage in args.maxsim_stages:
        free_memory(device)
        batch = make_batch(batch_size, per_group, query_tokens, document_tokens, dim, dtype, device)
        make_calls = loss_calls if stage == "loss" else cached_calls
        calls, grads, leaves = make_calls(args, batch, per_group, backends)
        results = measure_each(calls, grads, leaves, device, repeats, args.maxsim_time_budget)
        stock = results.get("stock")
        for name, result in results.items():
            row: dict[str, Any] = {"stage": stage, "backend": name, "B": batch_size, "k": per_group}
            row.update({"Lq": query_tokens, "Ld": document_tokens, "D": dim, "dtype": dtype_name(dtype)})
            row.update(dict.fromkeys(["time_ms", "peak_mb", "x_vs_stock", "gemm_ms", "x_gemm", "loss_err",
                                      "grad_err", "memory_by", "runs"]))  # fmt: skip
            row["threads"] = row_threads(device)
            row["gemm_ms"] = gemm * 1e3
            row.update(result_columns(name, result, stock, "x_vs_stock"))
            if not result.get("oom"):
                row["x_gemm"] = result["seconds"] / gemm
            rows.append(row)
    return rows
