"""GISTEmbedLoss forward + backward: stock sentence-transformers vs st_fast's guided fused op, per backend.

Inputs: random (B, D) anchors and k random (B, D) candidate columns (positives, then negatives) that require
gradients, and random guide embeddings of the same shapes (no gradient); N = k·B candidates per anchor, temperature
0.01, absolute margin 0, anchor-anchor and positive-positive blocks on (the stock defaults). Model and guide are
stand-ins returning those embeddings, so one call is ``loss = loss_module(features, None); loss.backward()``:

* ``stock``: ``sentence_transformers...GISTEmbedLoss``, whose broadcast ``nn.CosineSimilarity(a[:, None], b[None])``
  materializes (B, N, D) tensors for every block, trainable and guide, and saves the trainable ones for backward;
* ``torch`` / ``native`` (/ ``triton`` on CUDA when named in ``--gist-backends``):
  ``st_fast.losses.GISTEmbedLoss(backend=...)``.

Columns as in the ``fused_loss`` part: median time (``runs`` calls), peak memory of one call (CUDA max allocated,
or the CPU profiler's peak of live tensor bytes), speed-up and memory ratio against stock, and the largest absolute
differences of the loss and the embedding gradients from stock's (``OOM`` where stock does not fit).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DTYPES,
    add_loss_options,
    dtype_name,
    measure_each,
    result_columns,
    row_threads,
    run_cases,
)

TITLE = "GISTEmbedLoss forward + backward: stock vs st_fast guided fused op (random embeddings and guide)"
TEMPERATURE = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_loss_options(
        parser, "gist", "gist",
        sizes="B values (default: 256; smoke: 32; gpu: 4096)",
        k="candidate columns (positive + negatives), N = k·B (default 2)",
        dtypes="embedding dtypes (default fp32; gpu bf16)",
        backends="st_fast backends to time (default: torch and native, where they run; triton on CUDA only when "
                 "named here)",
        threads="torch CPU threads for this part", no_stock="skip the stock loss",
    )  # fmt: skip


def gist_cases(args: argparse.Namespace) -> list[tuple[int, int, int, torch.dtype]]:
    if args.smoke:
        batch_sizes, k, dim, dtypes = [32], 2, 32, ["fp32"]
    elif args.gpu:
        batch_sizes, k, dim, dtypes = [4096], 2, 1024, ["bf16"]
    else:
        batch_sizes, k, dim, dtypes = [256], 2, 384, ["fp32"]
    batch_sizes = args.gist_batch_sizes or batch_sizes
    return [
        (b, args.gist_k or k, args.gist_dim or dim, DTYPES[d]) for b in batch_sizes for d in args.gist_dtypes or dtypes
    ]


class PrecomputedEncoder(torch.nn.Module):
    """Stand-in for model / guide: ``features["column"]`` selects a precomputed embedding; has the tokenizer and
    ``max_seq_length`` that the GIST constructors check (one tiny WordPiece tokenizer, built offline)."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.max_seq_length = 128
        self.columns: list[torch.Tensor] = []

    def forward(self, features: dict) -> dict:
        features["sentence_embedding"] = self.columns[int(features["column"])]
        return features


def tiny_tokenizer():
    from transformers import BertTokenizer

    folder = Path(tempfile.mkdtemp(prefix="st_fast_bench_vocab_"))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"]) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def make_losses(backends: list[str], with_stock: bool) -> dict[str, torch.nn.Module]:
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as StockGIST

    from st_fast.losses import GISTEmbedLoss as FastGIST

    tokenizer = tiny_tokenizer()
    model, guide = PrecomputedEncoder(tokenizer), PrecomputedEncoder(tokenizer)
    losses: dict[str, torch.nn.Module] = {}
    if with_stock:
        losses["stock"] = StockGIST(model, guide, temperature=TEMPERATURE)
    for backend in backends:
        losses[backend] = FastGIST(model, guide, temperature=TEMPERATURE, backend=backend)
    return losses


def make_inputs(batch: int, k: int, dim: int, dtype: torch.dtype, device: torch.device):
    """(trainable columns, guide columns): the guide's positives correlate with its anchors (a realistic mix of
    masked and kept in-batch entries), everything else is independent noise."""
    generator = torch.Generator(device="cpu").manual_seed(batch * 31 + k * 7 + dim)
    columns = [torch.randn(batch, dim, generator=generator) for _ in range(1 + k)]
    guide = [torch.randn(batch, dim, generator=generator) for _ in range(1 + k)]
    guide[1] = 0.5 * guide[0] + guide[1]
    trainable = [x.to(device=device, dtype=dtype).requires_grad_() for x in columns]
    return trainable, [x.to(device=device, dtype=dtype) for x in guide]


def _forward_backward(loss_module, columns, guide_columns) -> torch.Tensor:
    for x in columns:
        x.grad = None
    loss_module.model.columns, loss_module.guide.columns = columns, guide_columns
    loss = loss_module([{"column": torch.tensor(j)} for j in range(len(columns))], None)
    loss.backward()
    return loss.detach()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    return run_cases(args, "gist", gist_cases(args), functools.partial(case_rows, args), "gist")


def case_rows(args: argparse.Namespace, case: tuple[int, int, int, torch.dtype], device: torch.device, repeats: int,
              backends: list[str]) -> list[dict[str, Any]]:  # fmt: skip
    """The rows of one case: stock and each backend on the same embeddings and guide."""
    batch, k, dim, dtype = case
    rows: list[dict[str, Any]] = []
    if not args.gist_backends:  # the guided triton kernels are opt-in until checked on a GPU
        backends = [b for b in backends if b != "triton"]
    losses = make_losses(backends, with_stock=not args.gist_no_stock)
    columns, guide_columns = make_inputs(batch, k, dim, dtype, device)
    # stock first: the reference of the error columns
    calls = {name: functools.partial(_forward_backward, loss, columns, guide_columns) for name, loss in losses.items()}
    grads = lambda: [x.grad for x in columns]  # noqa: B023, E731
    results = measure_each(calls, grads, columns, device, repeats, args.gist_time_budget)
    stock = results.get("stock")
    stock_ok = stock is not None and not stock.get("oom")
    for name, result in results.items():
        row: dict[str, Any] = {"backend": name, "B": batch, "k": k, "N": k * batch, "D": dim}
        row["dtype"] = dtype_name(dtype)
        row.update(dict.fromkeys(["time_ms", "peak_mb", "speedup_vs_stock", "memory_vs_stock", "loss_err"]))
        row.update(dict.fromkeys(["grad_err", "memory_by", "runs", "threads"]))
        row["threads"] = row_threads(device)
        row.update(result_columns(name, result, stock, "speedup_vs_stock"))
        if stock_ok and not result.get("oom"):
            row["memory_vs_stock"] = stock["peak"] / max(result["peak"], 1e-9)
        rows.append(row)
    return rows
