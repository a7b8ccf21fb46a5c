"""The gradient of a learnable logit scale (MNRL's ``scale``, GIST's ``temperature``) from the operand gradients.

Every score S of the fused ops is a dot product of two rows of the operands (queries / docs, anchors / candidates),
so at fixed softmax coefficients C = dL/dS the sum Σ C⊙S is homogeneous of degree 2 in the operands, and Euler's
theorem gives it from the operand gradients the backends already compute::

    Σ_entries C ⊙ S = ½ (<queries, dL/dqueries> + <docs, dL/ddocs>)

With logits = scale · S (+ a hardness penalty α · stopgrad(S), which carries no gradient to S): dL/dscale =
Σ (dL/dlogit) ⊙ S = Σ C⊙S / scale. With logits = S / T (GIST): dL/dT = -Σ C⊙S / T. No extra pass over the scores.
The identity needs scores bilinear in the operands the gradients are taken for: normalized operands, not raw ones
with the cosine norms applied inside the backend (see ``fused_mnrl_loss``).
"""

from __future__ import annotations

import torch


def score_coefficient_sum(operands: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Σ C⊙S = ½ Σ_x <x, dL/dx> over the operands x (0-dim, in the gradients' dtype: fp32, fp64 for fp64)."""
    total = sum((x.to(g.dtype) * g).sum() for x, g in zip(operands, grads, strict=True))
    return 0.5 * total


def as_scale_gradient(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``value`` shaped, typed and placed like the scale tensor it is the gradient of."""
    return value.to(dtype=scale.dtype, device=scale.device).expand(scale.shape).clone()


def scalar_value(value: float | torch.Tensor) -> float:
    """A number or one-element tensor as a Python float (no autograd warning for a tensor that requires grad)."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def learnable(value: object) -> bool:
    """True when ``value`` is a tensor autograd must give a gradient to in this call."""
    return isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled()
