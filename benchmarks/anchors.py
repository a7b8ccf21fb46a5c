"""Public fused cross-entropy kernels ("anchors") on the one-direction contrastive loss, and its float64 reference.

The loss (MultipleNegativesRankingLoss, query-to-doc, cosine, k candidate columns): with q (B, D) the query
embeddings and d (N, D) the candidates (row i the positive of query i, N = k·B), q̂ and d̂ their rows divided by
their L2 norms, logits = scale·q̂·d̂ᵀ (B, N) and

    loss = (1/B) Σ_i [logsumexp_j logits_ij − logits_ii].

Every anchor below is one adapter ``(q, d, scale) -> scalar mean loss`` that takes the RAW embeddings (leaves that
require grad, any float dtype) and normalizes them with ``torch.nn.functional.normalize`` inside autograd, so that
its gradients are with respect to the raw embeddings, like stock sentence-transformers' and st_fast's. Each anchor
also has ``unavailable(device, dtype, D) -> str | None``: why it cannot run there (package not installed, needs
CUDA, dtype or shape unsupported), or None. Targeted versions (their sources were read for the exact APIs):

* ``inf_cl`` (PyPI ``inf-cl`` 1.2.1, ``cal_inf_loss``): without torch.distributed its single-GPU "flash" path. Its
  ``scale=`` argument all-reduces the scale's gradient in backward, so the scale is folded into the queries
  (``q = scale·q̂``) instead. ``head_dim`` must be 16/32/64/128/256 and divide D (the largest is taken); it asserts
  CUDA tensors, casts to fp32 and runs its dots in TF32 (fp32 inputs rounded to TF32 by PTX inline asm in backward).
* ``cce`` / ``cce_exact`` (PyPI ``cut-cross-entropy`` 25.1.1, ``linear_cross_entropy(e = scale·q̂, c = d̂)``):
  ``impl="cce"`` with its default gradient filter (``filter_eps="high"``: logit-gradient blocks below eps/32 of the
  dtype are skipped), and the same without the filter (``filter_eps=None``; versions that offer an impl named
  ``cce_exact`` get that instead). Its backward asserts bf16/fp16 embeddings: no fp32 row.
* ``liger`` (PyPI ``liger-kernel`` 0.8.5, ``liger_fused_linear_cross_entropy(input = scale·q̂, weight = d̂)``):
  rows in chunks of about D, the logits of a chunk materialized in the input dtype by cuBLAS, a Triton row kernel
  for the softmax and its gradient, and the two gradient GEMMs by cuBLAS, all in the forward.
* ``liger_scaled_sm90`` (the same package, ``LigerFusedLinearScaledCrossEntropyFunction`` with
  ``temperature = 1/scale`` on q̂, d̂): its Hopper CuTe-DSL kernel, BF16 only; it needs the ``nvidia-cutlass-dsl``
  package (``import cutlass.cute``) and a capability (9, 0) device, and is reported unavailable otherwise.

On CPU only Liger runs, and only with ``TRITON_INTERPRET=1`` (Triton's interpreter); Inf-CL asserts CUDA tensors and
CCE's kernels call libdevice's log1p, which the interpreter does not run.

:func:`reference_loss_and_grads` is the float64 reference, independent of st_fast and of the anchors: an exact
row-chunked evaluation of the loss and its analytic gradient (so that B = 65536 fits: a dense 65536² float64 matrix
is 34 GB), then the normalization's backward through autograd.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common import triton_interpreted

# float64 elements of one row chunk of the reference's logits: 2**27 = 1 GiB (2048 rows at N = 65536)
REFERENCE_CHUNK_ELEMENTS = 2**27
INF_CL_HEAD_DIMS = (256, 128, 64, 32, 16)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Anchor:
    """One public kernel: ``loss(q (B, D), d (N, D), scale) -> scalar`` on raw embeddings, and
    ``unavailable(device, dtype, D) -> reason | None``; ``package`` is its PyPI distribution name."""

    name: str
    package: str
    loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    unavailable: Callable[[torch.device, torch.dtype, int], str | None]

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None


# ---------------------------------------------------------------------------------------------------------------
# float64 reference
# ---------------------------------------------------------------------------------------------------------------


def reference_loss_and_grads(
    embeddings: list[torch.Tensor], scale: float, chunk_elements: int = REFERENCE_CHUNK_ELEMENTS
) -> tuple[float, list[torch.Tensor]]:
    """Float64 loss and gradients of the one-direction loss for ``embeddings`` = [q (B, D), d_1 (B, D), ...,
    d_k (B, D)] (candidates d = their concatenation, N = k·B), on the embeddings' device.

    Returns the loss (a Python float) and one float64 gradient per embedding, of its shape. The logits part is
    :func:`chunked_cross_entropy` (exact, analytic); the normalization's backward is autograd's on float64 copies."""
    leaves = [x.detach().to(torch.float64).requires_grad_() for x in embeddings]
    queries = F.normalize(leaves[0], dim=-1)
    candidates = F.normalize(torch.cat(leaves[1:]) if len(leaves) > 2 else leaves[1], dim=-1)
    with torch.no_grad():
        loss, grad_queries, grad_candidates = chunked_cross_entropy(queries, candidates, scale, chunk_elements)
    torch.autograd.backward([queries, candidates], [grad_queries, grad_candidates])
    return float(loss), [x.grad for x in leaves]


def chunked_cross_entropy(queries: torch.Tensor, candidates: torch.Tensor, scale: float,
                          chunk_elements: int = REFERENCE_CHUNK_ELEMENTS) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Mean cross-entropy over logits = scale·queries·candidatesᵀ with label i for row i, and its gradients, one
    chunk of rows at a time (at most ``chunk_elements`` logits live at once).

    ``queries`` (B, D) and ``candidates`` (N, D), N ≥ B, any float dtype (the reference passes the normalized float64
    embeddings). With p = softmax(logits_r) for a chunk r of rows: loss_i = logsumexp_j logits_ij − logits_ii, and
    d mean / d logits = (p − onehot) / B, so d mean / d queries_r = (scale/B)·(p − onehot)·candidates and
    d mean / d candidates = Σ_r (scale/B)·(p − onehot)ᵀ·queries_r. Returns (loss (0-dim), grad_queries (B, D),
    grad_candidates (N, D))."""
    batch, total = queries.shape[0], candidates.shape[0]
    rows = max(1, min(batch, chunk_elements // total))
    grad_queries = torch.empty_like(queries)
    grad_candidates = torch.zeros_like(candidates)
    loss = queries.new_zeros(())
    for start in range(0, batch, rows):
        stop = min(batch, start + rows)
        local = torch.arange(stop - start, device=queries.device)
        logits = torch.matmul(queries[start:stop], candidates.T).mul_(scale)
        lse = torch.logsumexp(logits, dim=1)
        loss += (lse - logits[local, local + start]).sum()
        grad_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
        grad_logits[local, local + start] -= 1.0
        grad_logits.mul_(scale / batch)
        grad_queries[start:stop] = grad_logits @ candidates
        grad_candidates.addmm_(grad_logits.T, queries[start:stop])
    return loss / batch, grad_queries, grad_candidates


def relative_errors(loss: float, grads: list[torch.Tensor], ref_loss: float,
                    ref_grads: list[torch.Tensor]) -> tuple[float, float]:  # fmt: skip
    """(|loss − ref| / |ref|, max |g − g_ref| / max |g_ref| over all the embedding gradients together)."""
    diff = max(float((g.to(r.dtype) - r).abs().max()) for g, r in zip(grads, ref_grads, strict=True))
    size = max(float(r.abs().max()) for r in ref_grads)
    return abs(loss - ref_loss) / abs(ref_loss), diff / size


# ---------------------------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def import_error(module: str) -> str | None:
    """None when ``module`` imports, else the reason (first line of the error)."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # an installed package can fail to import for many reasons (its triton, its torch)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
    return None


def not_installed(package: str, module: str) -> str | None:
    """Why ``package`` (top-level ``module``) is absent, or None; looks it up without importing it."""
    if importlib.util.find_spec(module) is not None:
        return None
    return f"package {package} not installed (pip install {package}, or st-fast's 'anchors' extra)"


def does_not_import(package: str, module: str) -> str | None:
    """Why ``module`` of an installed ``package`` fails to import, or None (imports it, once)."""
    error = import_error(module)
    return None if error is None else f"package {package} does not import ({error})"


def dtype_unsupported(dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"{dtype} not supported (its kernels take fp32 / bf16 / fp16)"
    return None


def needs_cuda(device: torch.device, why: str) -> str | None:
    return None if device.type == "cuda" else f"needs a CUDA device: {why}"


def needs_cuda_or_interpreter(device: torch.device) -> str | None:
    if device.type == "cuda" or triton_interpreted():
        return None
    return "needs a CUDA device (or TRITON_INTERPRET=1 to run its Triton kernels on CPU)"


def needs_sm90(device: torch.device) -> str | None:
    major, minor = torch.cuda.get_device_capability(device)
    return None if (major, minor) == (9, 0) else f"an SM90 (Hopper) kernel; this device is sm_{major}{minor}"


def needs_cutlass_dsl() -> str | None:
    error = import_error("cutlass.cute")
    return None if error is None else f"needs the nvidia-cutlass-dsl package (import cutlass.cute: {error})"


def first_reason(*checks: Callable[[], str | None]) -> str | None:
    """The first non-None reason of ``checks`` (called in order, so later ones may assume the earlier passed)."""
    for check in checks:
        reason = check()
        if reason is not None:
            return reason
    return None


# ---------------------------------------------------------------------------------------------------------------
# the adapters
# ---------------------------------------------------------------------------------------------------------------


def normalized(q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.normalize(q, dim=-1), F.normalize(d, dim=-1)


def labels_of(q: torch.Tensor) -> torch.Tensor:
    """Targets arange(B) (int64): query i's positive is candidate row i."""
    return torch.arange(q.shape[0], device=q.device)


def inf_cl_head_dim(dim: int) -> int | None:
    return next((h for h in INF_CL_HEAD_DIMS if dim % h == 0), None)


def inf_cl_loss(q: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    from inf_cl import cal_inf_loss

    q_hat, d_hat = normalized(q, d)
    return cal_inf_loss(scale * q_hat, d_hat, head_dim=inf_cl_head_dim(q.shape[1]))


def inf_cl_unavailable(device: torch.device, dtype: torch.dtype, dim: int) -> str | None:
    return first_reason(
        lambda: not_installed("inf-cl", "inf_cl"),
        lambda: needs_cuda(device, "Inf-CL asserts CUDA tensors (and its PTX inline asm cannot be interpreted)"),
        lambda: dtype_unsupported(dtype),
        lambda: None if inf_cl_head_dim(dim) else f"D = {dim} is not a multiple of a head_dim in {INF_CL_HEAD_DIMS}",
        lambda: does_not_import("inf-cl", "inf_cl"),
    )


def cce_loss(q: torch.Tensor, d: torch.Tensor, scale: float, *, exact: bool = False) -> torch.Tensor:
    from cut_cross_entropy import LinearCrossEntropyImpl, linear_cross_entropy

    if not exact:
        options: dict = {"impl": "cce"}
    elif "CCE_EXACT" in LinearCrossEntropyImpl.__members__:
        options = {"impl": "cce_exact"}
    else:
        options = {"impl": "cce", "filter_eps": None}
    q_hat, d_hat = normalized(q, d)
    return linear_cross_entropy(scale * q_hat, d_hat, labels_of(q), **options)


def cce_unavailable(device: torch.device, dtype: torch.dtype, dim: int) -> str | None:
    return first_reason(
        lambda: not_installed("cut-cross-entropy", "cut_cross_entropy"),
        lambda: needs_cuda(device, "CCE's kernels call libdevice (log1p), which Triton's CPU interpreter cannot run"),
        lambda: None if dtype in (torch.bfloat16, torch.float16) else f"{dtype}: CCE's backward asserts bf16/fp16",
        lambda: does_not_import("cut-cross-entropy", "cut_cross_entropy"),
    )


def liger_loss(q: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    q_hat, d_hat = normalized(q, d)
    return liger_fused_linear_cross_entropy(scale * q_hat, d_hat, labels_of(q))


def liger_unavailable(device: torch.device, dtype: torch.dtype, dim: int) -> str | None:
    return first_reason(
        lambda: not_installed("liger-kernel", "liger_kernel"),
        lambda: needs_cuda_or_interpreter(device),
        lambda: dtype_unsupported(dtype),
        lambda: does_not_import("liger-kernel", "liger_kernel.transformers.functional"),
    )


def liger_scaled_sm90_loss(q: torch.Tensor, d: torch.Tensor, scale: float) -> torch.Tensor:
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    q_hat, d_hat = normalized(q, d)
    nll = LigerFusedLinearScaledCrossEntropyFunction.apply(q_hat, d_hat, labels_of(q), 1.0 / scale)
    return nll.mean()


def liger_scaled_sm90_unavailable(device: torch.device, dtype: torch.dtype, dim: int) -> str | None:
    return first_reason(
        lambda: not_installed("liger-kernel", "liger_kernel"),
        lambda: needs_cuda(device, "Liger's CuTe-DSL scaled cross-entropy is an SM90 (Hopper) kernel"),
        lambda: needs_sm90(device),
        lambda: None if dtype == torch.bfloat16 else f"{dtype}: its SM90 kernel takes bf16 only",
        lambda: needs_cutlass_dsl(),
        lambda: does_not_import("liger-kernel", "liger_kernel.ops.fused_linear_scaled_cross_entropy"),
    )


ANCHORS: tuple[Anchor, ...] = (
    Anchor("inf_cl", "inf-cl", inf_cl_loss, inf_cl_unavailable),
    Anchor("cce", "cut-cross-entropy", cce_loss, cce_unavailable),
    Anchor("cce_exact", "cut-cross-entropy", functools.partial(cce_loss, exact=True), cce_unavailable),
    Anchor("liger", "liger-kernel", liger_loss, liger_unavailable),
    Anchor("liger_scaled_sm90", "liger-kernel", liger_scaled_sm90_loss, liger_scaled_sm90_unavailable),
)
ANCHOR_NAMES = tuple(anchor.name for anchor in ANCHORS)


def select(names: list[str] | None) -> list[Anchor]:
    """The anchors named in ``names`` (all of them when None or empty), in :data:`ANCHORS` order."""
    return [anchor for anchor in ANCHORS if not names or anchor.name in names]
