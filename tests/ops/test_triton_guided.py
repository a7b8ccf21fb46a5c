"""The Triton kernel family with the guide flag on (st_fast.ops.triton_kernels, GUIDED=True) through
``fused_gist_loss(backend="triton")``: against the torch backend in the Triton interpreter, and compiled ahead of time
for sm_90 without a GPU."""

from __future__ import annotations

import pytest
import torch
from gist_cases import gist_columns
from parity import relative_error

from st_fast.ops import fused_gist_loss

pytest.importorskip("triton")


def _loss_and_grads(columns, guide_columns, backend, **config):
    loss = fused_gist_loss(columns[0], columns[1:], guide_columns[0], guide_columns[1:], backend=backend, **config)
    return loss.detach(), torch.autograd.grad(loss, columns)


@pytest.mark.parametrize(
    "num_columns, contrast, margin_strategy, rank1",
    [(2, (True, True), "absolute", False), (4, (False, True), "relative", True), (3, (True, False), "relative", True)],
)
def test_interpreter_matches_torch_backend(num_columns, contrast, margin_strategy, rank1):
    """Row tiles with a tail (B = 19 < 2 x 16), column tails, the protected target at offset + i (rank 1 of 2)."""
    batch = 19
    columns, guide_columns = gist_columns(2 * batch if rank1 else batch, 24, 20, num_columns, seed=num_columns)
    if rank1:  # local anchors are the second half; candidates are the gathered [rank 0, rank 1] columns
        columns = [columns[0][batch:].detach().requires_grad_()] + columns[1:]
        guide_columns = [guide_columns[0][batch:]] + guide_columns[1:]
    config = dict(row_offset=batch if rank1 else 0, temperature=0.05, margin_strategy=margin_strategy, margin=0.1,
                  contrast_anchors=contrast[0], contrast_positives=contrast[1])  # fmt: skip
    loss, grads = _loss_and_grads(columns, guide_columns, "triton", **config)
    ref_loss, ref_grads = _loss_and_grads(columns, guide_columns, "torch", **config)
    assert relative_error(loss, ref_loss) < 1e-5
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert relative_error(grad, ref) < 1e-5


def test_float64_is_rejected():
    columns, guide_columns = gist_columns(4, 8, 8, 2, seed=0)
    with pytest.raises(TypeError, match="float64"):
        fused_gist_loss(columns[0].double(), [columns[1].double()], guide_columns[0], [guide_columns[1]],
                        backend="triton")  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled by running them")
def test_guided_kernels_compile_for_sm90_without_spills():
    """Ahead-of-time compilation to H100 cubins, outside the interpreter (which accepts code the compiler rejects),
    with no register spills (read from ptxas -v, tests/triton_aot.py)."""
    pytest.importorskip("triton.backends.nvidia")
    import triton_aot

    triton_aot.assert_no_spills(triton_aot.compile_in_subprocess("guided"), len(triton_aot.GUIDED_VARIANTS))
