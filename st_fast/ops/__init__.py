"""Functional ops: one autograd.Function per op, backends behind one dispatch point (``backends.resolve_backend``)."""

from st_fast.ops.backends import BACKENDS, resolve_backend
from st_fast.ops.fused_contrastive import fused_mnrl_loss
from st_fast.ops.spec import ContrastiveSpec

__all__ = ["BACKENDS", "ContrastiveSpec", "fused_mnrl_loss", "resolve_backend"]
