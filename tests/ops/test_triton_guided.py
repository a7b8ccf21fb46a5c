"""The Triton kernel family with the guide flag on (st_fast.ops.triton_kernels, GUIDED=True) through
``fused_gist_loss(backend="triton")``: against the torch backend in the Triton interpreter, and compiled ahead of time
for sm_90 without a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gist_cases import gist_columns
from parity import relative_error

from st_fast.ops import fused_gist_loss

REPO = Path(__file__).resolve().parents[2]
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


AOT_COMPILE = """
import inspect, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from st_fast.ops import triton_lse
from st_fast.ops.layout import HardnessKind, SegmentKind

POINTERS = {"SHIFT", "THRESH", "LSE_PART", "LSE_REF", "W_NORM", "GRAD_FACTOR", "OUT_PART"}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
VARIANTS = [  # kernel, model dtype, guide dtype, D, D', its own constexprs (M = 4096, N = 8192)
    ("_segment_lse_forward_kernel", torch.bfloat16, torch.bfloat16, 1024, 384, {}),
    ("_segment_lse_backward_kernel", torch.bfloat16, torch.bfloat16, 1024, 384, {"COLUMNS": False}),
    ("_segment_lse_backward_kernel", torch.bfloat16, torch.float32, 1024, 768, {"COLUMNS": True}),
]
for name, dtype, guide_dtype, d, dg, own in VARIANTS:
    kernel = getattr(triton_lse, name)
    params = list(inspect.signature(kernel.fn).parameters)
    rows = torch.empty(4096, d, dtype=dtype, device="meta")
    guide_rows = torch.empty(4096, dg, dtype=guide_dtype, device="meta")
    guide = triton_lse.SegmentGuide(guide_rows, guide_rows, None, None, True)
    options = triton_lse._launch_options(rows, SegmentKind.Q2D, HardnessKind.NONE, guide)
    options |= triton_lse._blocks(4096, 8192, d) | own
    constexprs = {key: value for key, value in options.items() if key in params}
    signature = {}
    for param in params:
        if param in constexprs:
            signature[param] = "constexpr"
        elif param in ("R", "C"):
            signature[param] = "*" + SHORT[dtype]
        elif param in ("GR", "GC"):
            signature[param] = "*" + SHORT[guide_dtype]
        else:
            signature[param] = "*fp32" if param in POINTERS else "fp32" if param in ("scale", "alpha") else "i32"
    num_warps = 8 if constexprs.get("BLOCK_DO", 0) > 128 else 4
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"]
    print("compiled", name, SHORT[dtype], d)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels are compiled by running them")
def test_guided_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compilation to H100 cubins, outside the interpreter (which accepts code the compiler rejects)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", AOT_COMPILE], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.count("compiled") == 3, out.stdout + out.stderr[-3000:]
