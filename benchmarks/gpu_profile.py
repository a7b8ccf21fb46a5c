"""Where the native fused MNRL time goes on a GPU: a chunk-budget sweep, the GEMMs and the row kernel alone, and a
torch.profiler table of one forward + backward (B = N = 16384, D = 1024, bf16).

    python -m benchmarks.gpu_profile        # on a CUDA machine, after building st_fast with its CUDA extension

Prints only; the comparison against stock is benchmarks/fused_loss.py (``python -m benchmarks fused_loss --gpu``).
Times are ``triton.testing.do_bench`` medians (:func:`benchmarks.common.op_seconds`), peaks CUDA max allocated.
"""

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import op_seconds, peak_memory_mb
from st_fast.ops import chunked, fused_mnrl_loss
from st_fast.ops.mnrl.spec import ContrastiveSpec
from st_fast.ops.row_kernel import SegmentScales
from st_fast.ops.row_kernel_native import native_row_kernel


def timed(fn) -> float:
    """Milliseconds of one ``fn()`` on the GPU (median)."""
    return op_seconds(fn, "cuda") * 1e3


def main() -> None:
    B, D = 16384, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, D, device="cuda", generator=g).bfloat16().requires_grad_()
    d = torch.randn(B, D, device="cuda", generator=g).bfloat16().requires_grad_()

    def step():
        q.grad = d.grad = None
        fused_mnrl_loss(q, [d], backend="native").backward()

    default_budget = chunked.DEFAULT_CHUNK_BYTES["cuda"]
    for budget_mib in (256, 512, 1024, 2048):
        chunked.DEFAULT_CHUNK_BYTES["cuda"] = budget_mib * 2**20
        ms, peak = timed(step), peak_memory_mb(step, device="cuda")
        print(f"chunk budget {budget_mib} MiB: {ms:.3f} ms, peak {peak:.0f} MiB")
    chunked.DEFAULT_CHUNK_BYTES["cuda"] = default_budget

    n = 5456
    a = torch.randn(n, D, device="cuda").bfloat16()
    b = torch.randn(B, D, device="cuda").bfloat16()
    out = torch.empty(n, B, device="cuda")
    flops = 2 * n * B * D
    for name, fn in {
        "mm bf16->bf16": lambda: torch.mm(a, b.T),
        "mm bf16->fp32 out_dtype": lambda: torch.mm(a, b.T, out_dtype=torch.float32, out=out),
        "mm fp32 (upcast)": lambda: torch.mm(a.float(), b.float().T),
    }.items():
        ms = timed(fn)
        print(f"{name}: {ms:.3f} ms = {flops / ms / 1e9:.0f} TFLOP/s")
    c16 = torch.rand(n, B, device="cuda").half()
    k16 = torch.randn(B, D, device="cuda").half()
    q16 = torch.randn(n, D, device="cuda").half()
    for name, fn in {
        "grad mm C@K fp16->fp32": lambda: torch.mm(c16, k16, out_dtype=torch.float32),
        "grad mm C^T@Q fp16->fp32": lambda: torch.mm(c16.T, q16, out_dtype=torch.float32),
        "grad mm C@K fp16->fp16": lambda: torch.mm(c16, k16),
    }.items():
        ms = timed(fn)
        print(f"{name}: {ms:.3f} ms = {flops / ms / 1e9:.0f} TFLOP/s")

    spec = ContrastiveSpec.from_loss_config(scale=20.0)
    scores = torch.rand(n, B, device="cuda") * 2 - 1
    coef = torch.empty(n, B, device="cuda", dtype=torch.float16)
    scales = [SegmentScales(torch.rand(n, device="cuda") + 0.5, torch.rand(B, device="cuda") + 0.5)]
    ms = timed(lambda: native_row_kernel([scores], spec, 0, B, 1.0, scales, [coef]))
    rate = n * B * 10 / ms / 1e6  # 10 bytes per entry: two fp32 reads, one fp16 write
    print(f"row kernel {n}x{B} fp32 -> fp16: {ms:.3f} ms, {rate:.0f} GB/s")
    ms = timed(lambda: native_row_kernel([scores], spec, 0, B, None, scales, [coef]))
    print(f"row kernel loss only: {ms:.3f} ms")

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
