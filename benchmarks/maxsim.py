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
is timed where its MaxSim kernels run (CPU, float32 / bfloat16).

A third stage, ``scores`` (first; on by default with ``--smoke`` and ``--gpu``, asked for with ``--maxsim-stages`` on
CPU), is the forward that every public MaxSim kernel has: the (B, B·k) score matrix without gradients, of stock's
``colbert_scores``, st_fast's ``st_fast.ops.maxsim.maxsim_scores`` per backend and each public kernel of
:mod:`benchmarks.maxsim_anchors` (fast-maxsim on CPU; flash-maxsim and late-interaction-kernels on CUDA, and in
Triton's interpreter with ``--smoke`` only), on the same inputs; ``score_err`` is the largest absolute difference from
stock's scores. ``--maxsim-anchors`` picks the public kernels (default: all;
one that cannot run on the device or dtype is a row with the reason in ``note``). The public kernels that have a
backward are also timed in the ``loss`` stage (their scores into the same cross-entropy). Anchor rows: ``impl``
``anchor``, ``note`` the package version and its products' precision, ``math`` how the benchmark's masks reach it
(all compute the same sums; see :mod:`benchmarks.maxsim_anchors`). Peak memory of fast-maxsim (Rust buffers, not
torch tensors) is the growth of the process's peak RSS (``memory_by``), which the profiler's number of the other rows
does not compare exactly with.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import torch

from benchmarks import maxsim_anchors as public
from benchmarks.common import (
    DTYPES,
    add_loss_options,
    dtype_name,
    error_line,
    free_memory,
    is_oom,
    measure,
    measure_each,
    model_stand_in,
    op_seconds,
    peak_mb,
    result_columns,
    row_threads,
    rss_peak_mb,
    run_cases,
    timed_runs,
)

TITLE = "MaxSim (MultiVectorEncoder): stock vs st_fast vs public kernels: scores, non-cached loss, cached loss stage"
STAGES = ("scores", "loss", "cached")
COLUMNS = ("time_ms", "peak_mb", "x_vs_stock", "gemm_ms", "x_gemm", "score_err", "loss_err", "grad_err", "memory_by",
           "runs", "threads", "impl", "math", "note")  # fmt: skip


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
    group.add_argument("--maxsim-stages", nargs="+", choices=STAGES, default=None,
                       help="what to time (default: all with --smoke / --gpu; loss cached on CPU, where the scores "
                            "stage would add about 45%%)")  # fmt: skip
    group.add_argument("--maxsim-mini-batch-size", type=int, default=None,
                       help="cached stage: mini_batch_size = score_mini_batch_size (default 32; smoke 4)")  # fmt: skip
    group.add_argument("--maxsim-anchors", nargs="+", choices=public.ANCHOR_NAMES, default=None,
                       help="public MaxSim kernels of the scores (and loss) stage (default: all; one that cannot run "
                            "is a row with its reason)")  # fmt: skip


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


def stages_of(args: argparse.Namespace) -> list[str]:
    """``--maxsim-stages``, else all of them with ``--smoke`` / ``--gpu`` and ``loss``, ``cached`` on CPU (stock's
    forward and fast-maxsim at B = 256 would add about 70 s to the default run's 150-170 s)."""
    if args.maxsim_stages:
        return list(args.maxsim_stages)
    return list(STAGES) if args.smoke or args.gpu else ["loss", "cached"]


def anchor_reason(args: argparse.Namespace, anchor: public.MaxSimAnchor, device: torch.device, dtype: torch.dtype,
                  stage: str) -> str | None:  # fmt: skip
    """Why ``anchor`` is not timed in ``stage`` here, or None: its own reason, no backward (``loss``), or Triton's
    CPU interpreter outside ``--smoke`` (interpreted times mean nothing)."""
    reason = anchor.unavailable(device, dtype) if stage == "scores" else anchor.gradients_unavailable(device, dtype)
    if reason is None and anchor.triton and device.type != "cuda" and not args.smoke:
        reason = "Triton's CPU interpreter: run only with --smoke (not timed)"
    return reason


def scores_calls(args, batch, backends, anchors):
    """{name: (impl, call or reason, anchor or None)} of the ``scores`` stage: the (B, B·k) scores without
    gradients, stock first (the reference of ``score_err``)."""
    from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

    from st_fast.ops.maxsim import maxsim_scores

    queries, documents, query_mask, document_mask = batch
    flat_documents, flat_mask = documents.flatten(0, 1), document_mask.flatten(0, 1)
    calls: dict[str, tuple[str, Any, Any]] = {}
    if not args.maxsim_no_stock:
        calls["stock"] = ("stock", lambda: colbert_scores(queries, documents, query_mask, document_mask), None)
    for name in backends:
        call = functools.partial(maxsim_scores, queries, documents, query_mask, document_mask, backend=name)
        calls[name] = ("st_fast", call, None)
    for anchor in anchors:
        reason = anchor_reason(args, anchor, queries.device, queries.dtype, "scores")
        call = functools.partial(anchor.scores, queries, query_mask, flat_documents, flat_mask)
        calls[anchor.name] = ("anchor", reason or call, anchor)
    return calls


def measure_scores(fn, device: torch.device, repeats: int, budget_s: float, torch_memory: bool) -> dict[str, Any]:
    """One memory-measured warm-up call of ``fn() -> scores`` (kept for ``score_err``), then :func:`timed_runs`, all
    without gradients; peak memory by the profiler (or CUDA), or by RSS for a kernel whose buffers are not torch
    tensors. ``{"oom": True}`` or ``{"error": message}`` when it fails (an anchor's failure is a row)."""
    holder: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            if torch_memory or device.type == "cuda":
                peak, memory_by = peak_mb(lambda: holder.append(fn()), device)
            else:
                peak, memory_by = rss_peak_mb(lambda: holder.append(fn()))
            seconds, runs = timed_runs(fn, repeats, device, budget_s)
        result = {"peak": peak, "memory_by": memory_by, "scores": holder[0].float(), "seconds": seconds, "runs": runs}
    except Exception as exc:
        result = {"oom": True} if is_oom(exc) else {"error": error_line(exc)}
    free_memory(device)
    return result


def scores_results(args, batch, backends, anchors, device, repeats) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(name, impl, anchor, result) of the ``scores`` stage; a result with ``score_err`` against stock's scores."""
    out = []
    stock_scores = None
    for name, (impl, call, anchor) in scores_calls(args, batch, backends, anchors).items():
        if isinstance(call, str):
            out.append((name, impl, anchor, {"reason": call}))
            continue
        torch_memory = anchor is None or anchor.torch_memory
        result = measure_scores(call, device, repeats, args.maxsim_time_budget, torch_memory)
        if impl != "anchor" and "error" in result:
            raise RuntimeError(f"{name}: {result['error']}")
        if name == "stock" and "scores" in result:
            stock_scores = result["scores"]
        elif stock_scores is not None and "scores" in result:
            result["score_err"] = float((result["scores"].double() - stock_scores.double()).abs().max())
        out.append((name, impl, anchor, result))
    return out


def loss_results(args, batch, per_group, backends, anchors, device, repeats):
    """(name, impl, anchor, result) of the ``loss`` stage: stock, the st_fast backends, then each anchor that has a
    backward (its scores into the same cross-entropy)."""
    calls, grads, leaves = loss_calls(args, batch, per_group, backends)
    results = measure_each(calls, grads, leaves, device, repeats, args.maxsim_time_budget)
    out = [(name, "stock" if name == "stock" else "st_fast", None, result) for name, result in results.items()]
    queries, documents, query_mask, document_mask = batch
    labels = torch.arange(queries.shape[0], device=queries.device) * per_group
    for anchor in anchors:
        reason = anchor_reason(args, anchor, device, queries.dtype, "loss")
        if reason is not None:
            out.append((anchor.name, "anchor", anchor, {"reason": reason}))
            continue

        def anchor_loss(anchor=anchor) -> torch.Tensor:
            queries.grad = documents.grad = None
            scores = anchor.scores(queries, query_mask, documents.flatten(0, 1), document_mask.flatten(0, 1))
            loss = torch.nn.functional.cross_entropy(scores, labels)
            loss.backward()
            return loss.detach()

        try:
            result = measure(anchor_loss, grads, device, repeats, args.maxsim_time_budget)
        except Exception as exc:
            result = {"error": error_line(exc)}
        for leaf in leaves:
            leaf.grad = None
        out.append((anchor.name, "anchor", anchor, result))
    return out


def case_rows(args: argparse.Namespace, case: tuple[int, int, int, torch.dtype], device: torch.device, repeats: int,
              backends: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one case: per stage, stock, each backend and (scores, loss) each anchor on the same embeddings."""
    batch_size, per_group, dim, dtype = case
    from st_fast._native_maxsim import native_maxsim_available

    if not native_maxsim_available(device, dtype):  # the row kernels may be built while the MaxSim ones are not
        backends = [name for name in backends if name != "native"]
    anchors = public.select(args.maxsim_anchors)
    query_tokens, document_tokens = token_sizes(args)
    gemm = gemm_seconds(batch_size, per_group, query_tokens, document_tokens, dim, device)
    rows: list[dict[str, Any]] = []
    for stage in stages_of(args):
        free_memory(device)
        batch = make_batch(batch_size, per_group, query_tokens, document_tokens, dim, dtype, device)
        if stage == "scores":
            results = scores_results(args, batch, backends, anchors, device, repeats)
        elif stage == "loss":
            results = loss_results(args, batch, per_group, backends, anchors, device, repeats)
        else:
            calls, grads, leaves = cached_calls(args, batch, per_group, backends)
            results = [(name, "stock" if name == "stock" else "st_fast", None, result)
                       for name, result in measure_each(calls, grads, leaves, device, repeats,
                                                        args.maxsim_time_budget).items()]  # fmt: skip
        stock = next((result for name, _, _, result in results if name == "stock" and "seconds" in result), None)
        for name, impl, anchor, result in results:
            row: dict[str, Any] = {"stage": stage, "backend": name, "B": batch_size, "k": per_group}
            row.update({"Lq": query_tokens, "Ld": document_tokens, "D": dim, "dtype": dtype_name(dtype)})
            row.update(dict.fromkeys(COLUMNS))
            row["threads"] = row_threads(device)
            row["gemm_ms"] = gemm * 1e3
            row["impl"] = impl
            if anchor is not None:
                row["math"] = anchor.adaptation
                row["note"] = f"{anchor.package} {anchor.version()}, {anchor.precision}"
            if "reason" in result or "error" in result:
                row["note"] = result.get("reason") or result["error"]
                rows.append(row)
                continue
            if "scores" in result:  # the scores stage: no loss, no gradients
                row.update(result_columns(name, {**result, "loss": 0.0, "grads": []}, None, "x_vs_stock"))
                if stock is not None and not result.get("oom"):
                    row["x_vs_stock"] = stock["seconds"] / result["seconds"]
                row["score_err"] = result.get("score_err")
            else:
                row.update(result_columns(name, result, stock, "x_vs_stock"))
            if not result.get("oom"):
                row["x_gemm"] = result["seconds"] / gemm
            rows.append(row)
    return rows
