"""Public MaxSim (late interaction) kernels ("anchors") for the ``maxsim`` benchmark part, behind one adapter each.

The math every row of the part computes (sentence-transformers' ``colbert_scores``): for queries (B, Lq, D) with
``query_mask`` (B, Lq) and documents (M, Ld, D) with ``document_mask`` (M, Ld),

    scores[i, m] = Σ_{s: query_mask[i, s]} max_{t: document_mask[m, t]} <q_is, d_mt>

(-1e9, stock's sentinel, for a document with no unmasked token), (B, M) float32. The benchmark's document masks have
trailing padding and a few holes (skiplist words). An anchor is ``scores(queries, query_mask, documents,
document_mask) -> (B, M) float32`` plus ``unavailable(device, dtype) -> reason | None``. The adapters compute that
same math: the max over a document's tokens and the sum over a query's tokens do not depend on the tokens' order, so
a kernel that only takes lengths (trailing padding) gets each row's unmasked tokens moved to the front (a stable
``argsort`` of the mask and a ``gather``, differentiable, so gradients land on the original positions) and the
counts as lengths; holes are then no different from padding. The sentinel of empty documents is set after the call
(not math: a convention of stock's). The adapter's own work (the packing, the conversions) is part of the timed call.
Targeted versions (their sources were read for the exact APIs):

* ``fast_maxsim`` (PyPI ``fast-maxsim`` 0.2.0, Rust + libxsmm, CPU only; a fork of mixedbread's ``maxsim-cpu``):
  ``maxsim_scores_variable(query (Lq_i, D), [doc (L_m, D) ...]) -> (M,)`` on float32 C-contiguous numpy arrays, one
  query per call (B calls), forward only. The documents are the unmasked token rows of each document (``d[m][mask]``,
  copies), each query its unmasked tokens. Its README says it "expects normalized vectors"; its results do not need
  them (checked: raw Gaussian vectors, all-negative dots and a 1-token document next to 40-token ones score exactly
  as the float32 formula), the benchmark's vectors are unit anyway. Its threads are rayon's global pool, sized once
  per process from ``RAYON_NUM_THREADS``: the adapter sets it to torch's thread count before the first call, and a
  later call under another thread count is reported unavailable (the pool cannot be resized).
* ``flash_maxsim`` (PyPI ``flash-maxsim`` 0.3.0, Triton): ``flash_maxsim_batched(Q, D, doc_lengths, shared_docs=True,
  query_lengths)`` (no autograd) for the scores, ``flash_maxsim_batched_train`` (same arguments, a Triton backward
  from the saved arg-max) when a gradient is needed; lengths only, so the packing above. Its kernels convert fp32
  and fp16 tiles to fp16 (bf16 to bf16) as they load them: fp16-rounded products, fp32 sums.
* ``late_interaction_kernels`` (PyPI ``late-interaction-kernels`` 0.4.5, Triton): ``maxsim(Q, D, q_mask, d_mask)``,
  any boolean mask pattern (holes included: no packing), autograd (its default ``backward="auto"``, which may pick
  its ``lowmem`` backward: fp16 ``grad_D`` for fp32 inputs); dots in fp16 for fp32 inputs (bf16 for bf16).

The two Triton kernels need CUDA; under ``TRITON_INTERPRET=1`` their forwards also run on CPU, which the tests use at
tiny shapes and the part allows only with ``--smoke`` (interpreted times mean nothing); their backwards autotune with
Triton's GPU benchmarker, which the interpreter lacks (:meth:`MaxSimAnchor.gradients_unavailable`). Peak memory: a
kernel whose buffers are not torch tensors (fast-maxsim) is measured by :func:`benchmarks.common.rss_peak_mb`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.anchors import does_not_import, first_reason, needs_cuda_or_interpreter, not_installed

EMPTY_DOCUMENT_SCORE = -1e9  # stock's _EMPTY_DOCUMENT_SCORE
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# rayon's global pool size, once fast-maxsim was first called in this process (None before)
_rayon_threads: list[int] = []


@dataclass(frozen=True)
class MaxSimAnchor:
    """One public MaxSim kernel: ``scores(queries, query_mask, documents, document_mask) -> (B, M) float32``
    (differentiable when ``backward``), ``unavailable(device, dtype) -> reason | None``; ``package`` its PyPI name,
    ``computes`` what it offers, ``adaptation`` how the benchmark's masks reach it, ``precision`` its products."""

    name: str
    package: str
    computes: str
    adaptation: str
    precision: str
    backward: bool
    triton: bool
    torch_memory: bool  # whether its allocations are torch tensors (the CPU profiler sees them)
    scores: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    unavailable: Callable[[torch.device, torch.dtype], str | None]

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None

    def gradients_unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why its scores cannot be differentiated there (the ``loss`` stage), or None."""
        if not self.backward:
            return f"{self.computes}: no backward"
        reason = self.unavailable(device, dtype)
        if reason is None and self.triton and device.type != "cuda":
            reason = "its backward autotunes with Triton's GPU benchmarker: needs a CUDA device (not the interpreter)"
        return reason

    def tolerance(self, query_tokens: int, dtype: torch.dtype) -> float:
        """Largest |score − stock's| expected from its products' rounding, for unit vectors: float32 rounding of a sum
        of ``query_tokens`` maxima, or that many fp16 / bf16 roundings of the operands (each up to 2⁻¹¹ / 2⁻⁸
        relative on both factors, so about twice that per product)."""
        if self.precision == "fp32" and dtype == torch.float32:
            return 1e-5 * max(1, query_tokens)
        unit = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        return unit * max(1, query_tokens)


def sentinel(scores: torch.Tensor, document_mask: torch.Tensor) -> torch.Tensor:
    """Stock's score of a document with no unmasked token."""
    return scores.masked_fill(~document_mask.any(dim=-1), EMPTY_DOCUMENT_SCORE)


def packed(embeddings: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings with each row's unmasked tokens first, in order; their counts int32): a stable sort of the mask
    and a differentiable ``gather``. The tokens after a row's count are its masked ones (ignored by the kernels)."""
    order = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)
    index = order.unsqueeze(-1).expand(-1, -1, embeddings.shape[-1])
    return embeddings.gather(1, index), mask.sum(dim=1, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------------------------
# fast-maxsim (CPU)
# ---------------------------------------------------------------------------------------------------------------


def rayon_threads() -> int:
    """Size rayon's pool (fast-maxsim's threads) to torch's thread count, before fast-maxsim's first call."""
    if not _rayon_threads:
        os.environ["RAYON_NUM_THREADS"] = str(torch.get_num_threads())
        _rayon_threads.append(torch.get_num_threads())
    return _rayon_threads[0]


def fast_maxsim_scores(queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor,
                       document_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    import fast_maxsim

    rayon_threads()
    documents_np = documents.detach().numpy()
    mask_np = document_mask.numpy()
    # an empty document gets a dummy token (its score is the sentinel below)
    docs = [documents_np[m][mask_np[m]] if mask_np[m].any() else documents_np[m, :1] for m in range(len(mask_np))]
    rows = []
    for query, mask in zip(queries.detach().numpy(), query_mask.numpy(), strict=True):
        if not mask.any():
            rows.append(torch.zeros(len(docs)))
            continue
        rows.append(torch.from_numpy(fast_maxsim.maxsim_scores_variable(query[mask], docs)))
    return sentinel(torch.stack(rows), document_mask)


def fast_maxsim_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    def pool() -> str | None:
        if _rayon_threads and _rayon_threads[0] != torch.get_num_threads():
            return (f"its rayon pool was started with {_rayon_threads[0]} threads in this process, torch has "
                    f"{torch.get_num_threads()}: run this thread count in another process")  # fmt: skip
        return None

    return first_reason(
        lambda: not_installed("fast-maxsim", "fast_maxsim"),
        lambda: None if device.type == "cpu" else "a CPU kernel (numpy arrays)",
        lambda: None if dtype == torch.float32 else f"{dtype}: it takes float32 arrays only",
        lambda: does_not_import("fast-maxsim", "fast_maxsim"),
        pool,
    )


# ---------------------------------------------------------------------------------------------------------------
# flash-maxsim and late-interaction-kernels (Triton)
# ---------------------------------------------------------------------------------------------------------------


def flash_maxsim_scores(queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor,
                        document_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    import flash_maxsim

    # masked query tokens zeroed as well: its small-batch forward kernel (B·M < 500) ignores query_lengths
    q, query_lengths = packed(queries * query_mask.unsqueeze(-1).to(queries.dtype), query_mask)
    d, document_lengths = packed(documents, document_mask)
    options = dict(shared_docs=True, doc_lengths=document_lengths, query_lengths=query_lengths)
    if torch.is_grad_enabled() and (queries.requires_grad or documents.requires_grad):
        scores = flash_maxsim.flash_maxsim_batched_train(q, d, **options)
    else:
        scores = flash_maxsim.flash_maxsim_batched(q, d, **options)
    return sentinel(scores, document_mask)


def late_interaction_scores(queries: torch.Tensor, query_mask: torch.Tensor, documents: torch.Tensor,
                            document_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    from late_interaction_kernels import maxsim

    return sentinel(maxsim(queries, documents, query_mask, document_mask), document_mask)


def triton_unavailable(package: str, module: str, device: torch.device, dtype: torch.dtype) -> str | None:
    return first_reason(
        lambda: not_installed(package, module),
        lambda: needs_cuda_or_interpreter(device),
        lambda: None if dtype in TRITON_DTYPES else f"{dtype} not supported (fp32 / fp16 / bf16)",
        lambda: does_not_import(package, module),
    )


ANCHORS: tuple[MaxSimAnchor, ...] = (
    MaxSimAnchor(
        "fast_maxsim", "fast-maxsim", "scores only", "same: unmasked tokens as arrays",
        "fp32", backward=False, triton=False, torch_memory=False, scores=fast_maxsim_scores,
        unavailable=fast_maxsim_unavailable,
    ),
    MaxSimAnchor(
        "flash_maxsim", "flash-maxsim", "scores + gradients",
        "same: unmasked tokens packed first + lengths (no masks)", "fp16 products (bf16 for bf16)",
        backward=True, triton=True, torch_memory=True, scores=flash_maxsim_scores,
        unavailable=functools.partial(triton_unavailable, "flash-maxsim", "flash_maxsim"),
    ),
    MaxSimAnchor(
        "late_interaction_kernels", "late-interaction-kernels", "scores + gradients", "same: its boolean masks",
        "fp16 products (bf16 for bf16)", backward=True, triton=True, torch_memory=True,
        scores=late_interaction_scores,
        unavailable=functools.partial(triton_unavailable, "late-interaction-kernels", "late_interaction_kernels"),
    ),
)  # fmt: skip
ANCHOR_NAMES = tuple(anchor.name for anchor in ANCHORS)


def select(names: list[str] | None) -> list[MaxSimAnchor]:
    """The anchors named in ``names`` (all of them when None or empty), in :data:`ANCHORS` order."""
    return [anchor for anchor in ANCHORS if not names or anchor.name in names]
