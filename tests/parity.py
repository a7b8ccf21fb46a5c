"""Helpers of the parity tests: fresh random embeddings and comparisons against a float64 stock reference."""

from __future__ import annotations

import itertools

import torch

ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


class EmbeddingsOnlyModel(torch.nn.Module):
    """What the MNRL-family constructors need of a model, for losses called on embeddings only (a first module)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Identity()

    def __getitem__(self, index: int) -> torch.nn.Module:
        return self.first


def direction_partition_grid() -> list[tuple[tuple[str, ...], str]]:
    """Every directions subset that contains query_to_doc, with every partition mode the stock class accepts."""
    grid = []
    for extra_count in range(4):
        for extra in itertools.combinations(ALL_DIRECTIONS[1:], extra_count):
            directions = ("query_to_doc", *extra)
            grid.append((directions, "joint"))
            if not {"query_to_query", "doc_to_doc"} & set(extra):
                grid.append((directions, "per_direction"))
    return grid


def random_columns(batch: int, dim: int, columns: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """``columns`` leaf tensors (batch, dim) requiring grad, with some positive correlation to the anchors so that
    the loss is neither trivial nor saturated."""
    generator = torch.Generator().manual_seed(seed)
    anchor = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
    out = [anchor]
    for _ in range(columns - 1):
        out.append(0.6 * anchor + torch.randn(batch, dim, generator=generator, dtype=torch.float64))
    return [x.to(dtype).requires_grad_() for x in out]


def loss_and_grads(loss_fn, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = loss_fn(embeddings)
    grads = torch.autograd.grad(loss, embeddings)
    return loss.detach(), [g.detach() for g in grads]


def float64_copies(embeddings: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x.detach().double().requires_grad_() for x in embeddings]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||actual - expected|| / ||expected|| (inf when expected is 0 and actual is not)."""
    actual, expected = actual.double(), expected.double()
    diff = float((actual - expected).norm())
    return diff / float(expected.norm()) if diff else 0.0


def assert_close_to_reference(actual, expected, baseline, *, rtol: float, what: str) -> None:
    """||actual - expected|| <= rtol·||expected|| + 2·||baseline - expected||.

    ``expected`` is the float64 stock result, ``baseline`` the stock result on the same float32 inputs (the rule of
    Cut Cross-Entropy's tests: never worse than stock itself). The baseline term only matters where the reference
    is ~0 by cancellation (e.g. B=1 pairs, whose loss is LSE([s]) - s = 0 for any embeddings): there float32 leaves
    a residue of ~scale·1e-7 that no relative bound can judge.
    """
    actual, expected, baseline = actual.double(), expected.double(), baseline.double()
    error = float((actual - expected).norm())
    allowed = rtol * float(expected.norm()) + 2 * float((baseline - expected).norm())
    assert error <= allowed, f"{what}: error {error:.3g} > allowed {allowed:.3g} (reference norm {expected.norm():.3g})"


def assert_parity(actual, expected, baseline, *, rtol: float) -> None:
    """Loss and every gradient of ``actual`` close to ``expected`` (see assert_close_to_reference)."""
    (loss, grads), (ref_loss, ref_grads), (base_loss, base_grads) = actual, expected, baseline
    assert torch.isfinite(loss), loss
    assert_close_to_reference(loss, ref_loss, base_loss, rtol=rtol, what="loss")
    for column, (grad, ref_grad, base_grad) in enumerate(zip(grads, ref_grads, base_grads, strict=True)):
        assert torch.isfinite(grad).all(), f"column {column}: non-finite gradient"
        assert_close_to_reference(grad, ref_grad, base_grad, rtol=rtol, what=f"gradient of column {column}")


def train_step(model, loss, features, *, seed: int = 0, grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One seeded forward + backward of ``loss`` on ``features``: (detached loss, all parameter gradients flattened).
    A dict of loss components (SpladeLoss) is summed, as the trainer does."""
    model.zero_grad()
    torch.manual_seed(seed)
    value = loss(features, None)
    if isinstance(value, dict):
        value = torch.stack(list(value.values())).sum()
    (value * grad_scale).backward()
    return value.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def assert_coefficients_close(actual_out, expected_out, scales, grad_scale, scale, coefficient_dtype):
    """Coefficients within the dtype's rounding (relative), and within 16 fp32 roundings of the largest term
    (grad_scale · scale · r_max²) absolutely: the positive's coefficient is (softmax weight - 1) · that term, which
    cancels to ~1e-5 when its weight is ~1 (B = 1)."""
    r_max = max(float(s.max()) for pair in scales for s in pair)
    atol = 16 * 2.0**-24 * grad_scale * scale * r_max * r_max
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[coefficient_dtype]
    for got, want in zip(actual_out, expected_out, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
