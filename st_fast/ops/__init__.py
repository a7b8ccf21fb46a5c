"""Functional ops, one package each with the same modules (:mod:`st_fast.ops.mnrl`, :mod:`st_fast.ops.gist`), one
autograd.Function for both (:mod:`st_fast.ops.autograd`), backends behind one dispatch point
(:func:`st_fast.ops.backends.resolve_backend`) and the shared pieces: the chunked backends (``chunked``), the row
kernels (``row_kernel*``), the Triton kernel family (``triton_kernels``, launched by ``triton_lse``)."""

from st_fast.ops.backends import BACKENDS, resolve_backend
from st_fast.ops.gist.functional import fused_gist_loss
from st_fast.ops.gist.spec import GuidedSpec
from st_fast.ops.maxsim import fused_maxsim_loss, maxsim_scores
from st_fast.ops.mnrl.functional import fused_mnrl_loss
from st_fast.ops.mnrl.spec import ContrastiveSpec

__all__ = [
    "BACKENDS",
    "ContrastiveSpec",
    "GuidedSpec",
    "fused_gist_loss",
    "fused_maxsim_loss",
    "fused_mnrl_loss",
    "maxsim_scores",
    "resolve_backend",
]
