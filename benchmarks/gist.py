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
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DTYPES,
    available_backends,
    bench_device,
    cpu_threads,
    dtype_name,
    free_memory,
    measure,
    progress,
    result_columns,
    row_threads,
)

TITLE = "GISTEmbedLoss forward + backward: stock vs st_fast guided fused op (random embeddings and guide)"
TEMPERATURE = 0.01


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gist")
    group.add_argument("--gist-batch-sizes", type=int, nargs="+", default=None,
                       help="B values (default: 256; smoke: 32; gpu: 4096)")  # fmt: skip
    group.add_argument("--gist-k", type=int, default=None,
                       help="candidate columns (positive + negatives), N = k·B (default 2)")  # fmt: skip
    group.add_argument("--gist-dim", type=int, default=None, help="embedding size D (default 384; smoke 32; gpu 1024)")
    group.add_argument("--gist-dtypes", nargs="+", choices=list(DTYPES), default=None,
                       help="embedding dtypes (default fp32; gpu bf16)")  # fmt: skip
    group.add_argument("--gist-backends", nargs="+", choices=["torch", "native", "triton"], default=None,
                       help="st_fast backends to time (default: torch and native, where they run; triton on CUDA "
                            "only when named here)")  # fmt: skip
    group.add_argument("--gist-device", default=None, help="torch device (default: cuda with --gpu, else cpu)")
    group.add_argument("--gist-time-budget", type=float, default=6.0,
                       help="seconds of timed calls per case and implementation before repeats stop early")  # fmt: skip
    group.add_argument("--gist-threads", type=int, default=None, help="torch CPU threads for this part")
    group.add_argument("--gist-no-stock", action="store_true", help="skip the stock loss")


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
    with cpu_threads(args.gist_threads):
        return _run(args)


def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = bench_device(args, "gist_device")
    repeats = 1 if args.smoke else max(1, args.repeats)
    rows: list[dict[str, Any]] = []
    for batch, k, dim, dtype in progress(gist_cases(args), desc="gist"):
        backends = available_backends(device, dtype, args.gist_backends)
        if not args.gist_backends:  # the guided triton kernels are opt-in until checked on a GPU
            backends = [b for b in backends if b != "triton"]
        losses = make_losses(backends, with_stock=not args.gist_no_stock)
        columns, guide_columns = make_inputs(batch, k, dim, dtype, device)
        results: dict[str, dict[str, Any]] = {}
        for name in losses:  # stock first: the reference of the error columns
            results[name] = measure(
                lambda: _forward_backward(losses[name], columns, guide_columns),  # noqa: B023
                lambda: [x.grad for x in columns],  # noqa: B023
                device, repeats, args.gist_time_budget,
            )  # fmt: skip
            for x in columns:
                x.grad = None
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
        columns = guide_columns = losses = results = None
        free_memory(device)
    return rows
