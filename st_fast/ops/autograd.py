"""The one autograd.Function of both fused ops (MNRL and GIST): a backend computes the loss and the gradients of the
two trainable operands; this Function only switches autocast off, keeps the backend's state for the backward,
returns the gradients in the inputs' dtypes and derives the learnable scale's gradient from them.
"""

from __future__ import annotations

from typing import Any

import torch

from st_fast.ops.learnable_scale import as_scale_gradient, score_coefficient_sum


class FusedLoss(torch.autograd.Function):
    """anchors (W or B, D) and candidates (k·W, D) -> 0-dim loss (fp32, fp64 for fp64 operands).

    ``scale``: the loss's logit scale tensor (MNRL's ``scale``, GIST's ``temperature``) when it needs a gradient, else
    None; its gradient is ``problem.spec.scale_gradient(Σ C⊙S)`` with Σ C⊙S from the operand gradients (Euler's
    identity, see :mod:`st_fast.ops.learnable_scale`). ``problem``: everything else about the call that the backend
    needs (:class:`st_fast.ops.mnrl.spec.ContrastiveProblem`, :class:`st_fast.ops.gist.spec.GuidedProblem`); its
    constants get no gradient. ``backend``: a :class:`st_fast.ops.backends.Backend` of that op.
    """

    @staticmethod
    def forward(ctx, anchors, candidates, scale, problem: Any, backend: Any):
        need_grad = any(ctx.needs_input_grad[:3])
        with torch.autocast(anchors.device.type, enabled=False):  # fp32 math whatever the autocast context
            loss, state = backend.forward(anchors, candidates, problem, need_grad)
        ctx.backend, ctx.state, ctx.spec = backend, state if need_grad else None, problem.spec
        ctx.input_dtypes = (anchors.dtype, candidates.dtype)
        if ctx.needs_input_grad[2]:
            ctx.save_for_backward(anchors, candidates, scale)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.state is None:
            raise RuntimeError(f"st_fast {ctx.spec.loss_label}: backward called twice on the same graph")
        state, ctx.state = ctx.state, None  # a second backward through the same graph is an error, as in autograd
        with torch.autocast(grad_loss.device.type, enabled=False):
            grad_anchors, grad_candidates = ctx.backend.backward(state, grad_loss)
        grad_scale = None
        if ctx.needs_input_grad[2]:
            anchors, candidates, scale = ctx.saved_tensors
            total = score_coefficient_sum((anchors, candidates), (grad_anchors, grad_candidates))
            grad_scale = as_scale_gradient(ctx.spec.scale_gradient(total), scale)
        grads = grad_anchors.to(ctx.input_dtypes[0]), grad_candidates.to(ctx.input_dtypes[1])
        return *grads, grad_scale, None, None
