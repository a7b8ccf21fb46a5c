"""What the chunked backends (``torch`` and ``native``) of every op share: the row-chunk size, the chunk loop, the
result of a chunked driver and the backend object around a driver and a row kernel.

Each op has its own driver (:func:`st_fast.ops.mnrl.chunked.loss_and_grad`, :func:`st_fast.ops.gist.chunked.
loss_and_grad`), built from the shared pieces: for each chunk of local rows (:func:`row_chunks`, sized by
:func:`chunk_rows_for_budget`) it computes the score GEMMs (:class:`st_fast.ops.operands.Operands`, into buffers of
the scratch arena, :mod:`st_fast.ops.workspace`), lets the row kernel (:mod:`st_fast.ops.row_kernel`) turn the
scores into per-row losses and gradient coefficients, and accumulates the gradient GEMMs, so that no B x N score
matrix exists at once (the MNRL op's symmetric path keeps the B x N tile when it fits :data:`DEFAULT_KEEP_BYTES`,
see :mod:`st_fast.ops.mnrl.chunked`). The gradients are computed during the forward pass and scaled by the incoming
gradient in the backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from st_fast.ops.mixed_matmul import compute_dtype
from st_fast.ops.row_kernel import RowKernel

# Measured on 2 CPU cores (B = 4096, k = 2, D = 384): 8 MiB chunks 1.60 s, 32 MiB 1.12 s, 128 MiB 1.06 s per
# forward + backward; 32 MiB keeps most of the gain at a quarter of that score matrix.
# On an H200 (benchmarks/gpu_profile.py, B = N = 16384, D = 1024, bf16): 256 MiB 7.17 ms, 512 MiB 6.83 ms, 1 GiB
# 5.87 ms, 2 GiB 5.51 ms (one chunk; peak 1984 MiB, stock 4353 MiB): few large chunks keep the row kernel's waves
# full and the launches and syncs per chunk few.
DEFAULT_CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 2048 * 2**20}

# The symmetric path of the MNRL op (query_to_doc with doc_to_query, st_fast.ops.mnrl.chunked) needs every row's
# statistics before any coefficient: it keeps the whole score tile when it fits this budget (one score GEMM instead
# of two), else it recomputes each chunk (of DEFAULT_CHUNK_BYTES) in the coefficient pass. Measured on 1 CPU thread
# (B = 4096, k = 1, D = 384, a 64 MiB tile): see benchmarks/fused_loss.py --symmetric.
DEFAULT_KEEP_BYTES = {"cpu": 128 * 2**20, "cuda": 2048 * 2**20}

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def chunk_rows_for_budget(
    batch_size: int, total_columns: int, device: torch.device, budget: int | None, bytes_per_score: int = 4
) -> int:
    """Rows per chunk so that one chunk of scores (``bytes_per_score`` per entry: the fp32 score and its
    coefficient when that is stored apart) fits ``budget`` bytes (default: :data:`DEFAULT_CHUNK_BYTES` of the
    device), balanced over the chunks the batch needs (no short last chunk of a few rows), a multiple of 8 rows when
    that stays within the budget."""
    if budget is None:
        budget = DEFAULT_CHUNK_BYTES.get(device.type, DEFAULT_CHUNK_BYTES["cpu"])
    most = max(1, budget // (bytes_per_score * max(1, total_columns)))
    chunks = -(-batch_size // most)
    rows = -(-batch_size // chunks)
    aligned = -(-rows // 8) * 8
    return min(batch_size, aligned if aligned <= most else rows)


class RowChunk(NamedTuple):
    """One chunk of local rows: local rows ``begin .. begin + size`` (indices into per-local-row arrays), which are the
    global rows ``row_offset + begin ..`` of the gathered batch (row g of this rank's chunk is global row g)."""

    begin: int
    size: int
    row_offset: int

    @property
    def local(self) -> slice:
        """The chunk's rows among the B local rows."""
        return slice(self.begin, self.begin + self.size)

    @property
    def start(self) -> int:
        """The global index of the chunk's first row (the row kernels' ``row_start``)."""
        return self.row_offset + self.begin

    @property
    def global_rows(self) -> slice:
        """The chunk's rows among the W gathered rows."""
        return slice(self.start, self.start + self.size)


def row_chunks(batch_size: int, chunk_rows: int, row_offset: int = 0) -> Iterator[RowChunk]:
    """The B = ``batch_size`` local rows in order, ``chunk_rows`` at a time (the last chunk may be shorter), the
    local rows being global rows ``row_offset .. row_offset + B``: the chunk loop of every chunked driver."""
    for begin in range(0, batch_size, chunk_rows):
        yield RowChunk(begin, min(chunk_rows, batch_size - begin), row_offset)


@dataclass
class LossAndGrad:
    """Mean loss over the local rows (0-dim) and, when requested, the gradients of the two trainable operands (the
    anchors / queries and the candidate columns; fp32, fp64 for fp64 inputs)."""

    loss: torch.Tensor
    grad_anchors: torch.Tensor | None
    grad_candidates: torch.Tensor | None


# (anchors, candidates, problem, row_kernel, *, need_grad) -> LossAndGrad
Driver = Callable[..., LossAndGrad]


class ChunkedBackend:
    """A chunked driver with a row kernel behind the :class:`st_fast.ops.backends.Backend` protocol. Gradients are
    computed in the forward pass (3 GEMMs per chunk and segment; the MNRL op's symmetric path: a statistics pass, then
    the coefficients on the kept tile or recomputed chunks) and scaled by the incoming gradient later.

    ``raw_16bit``: the op's driver can take fp16 / bf16 embeddings raw (16-bit GEMMs with fp32 output, the cosine
    normalization applied by the row kernel, see :mod:`st_fast.ops.raw_16bit`); it does so on CUDA only, where
    16-bit GEMMs are fast (tests/ops/test_raw_16bit.py patches :meth:`takes_raw_operands` to run that path on the
    CPU)."""

    def __init__(self, name: str, row_kernel: RowKernel, driver: Driver, *, raw_16bit: bool) -> None:
        self.name = name
        self.row_kernel = row_kernel
        self.driver = driver
        self.raw_16bit = raw_16bit

    def takes_raw_operands(self, dtype: torch.dtype, device: torch.device) -> bool:
        return self.raw_16bit and device.type == "cuda" and dtype in _HALF_DTYPES

    def operand_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return compute_dtype(dtype)

    def forward(
        self, anchors: torch.Tensor, candidates: torch.Tensor, problem: Any, need_grad: bool
    ) -> tuple[torch.Tensor, LossAndGrad]:
        result = self.driver(anchors, candidates, problem, self.row_kernel, need_grad=need_grad)
        return result.loss, result

    def backward(self, state: LossAndGrad, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return state.grad_anchors * grad_loss, state.grad_candidates * grad_loss
