"""The MaxSim (late interaction, ColBERT-style) op: scores and in-batch cross-entropy without the 4-D similarity
tensor. Modules: ``spec`` (what a call computes, input checks), ``torch_backend`` (the tiled reference and the shared
sparse backward), ``native_backend`` (the C++ kernels, CPU), ``triton_backend`` (the tile kernel), ``dispatch`` (the
backend choice), ``autograd`` (the one Function), ``functional`` (:func:`maxsim_scores`, :func:`fused_maxsim_loss`)."""

from st_fast.ops.maxsim.functional import fused_maxsim_loss, maxsim_scores

__all__ = ["fused_maxsim_loss", "maxsim_scores"]
