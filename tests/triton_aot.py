"""Ahead-of-time compilation of the Triton kernel family for sm_90 (H100 / H200) without a GPU, with the register and
spill counts of every compiled kernel.

Used by tests/ops/test_triton_lse.py and tests/ops/test_triton_guided.py in a subprocess without
``TRITON_INTERPRET`` (the interpreter runs kernels as Python and so accepts code that the compiler would reject):

    python -c "import sys; sys.path[:0] = ['.', 'tests']; import triton_aot; triton_aot.main('mnrl')"

prints one line per variant: ``compiled <kernel> <variant> regs=<n> spills=<stored>+<loaded bytes> shared=<bytes>``.
Triton reads the spill count only when it loads a cubin on a GPU (``CompiledKernel.n_spills``), so the counts are
read here from ``ptxas -v`` run on the kernel's PTX with the flags of Triton's own ptxas call
(triton/backends/nvidia/compiler.py ``make_cubin``).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

POINTERS = {"SHIFT", "THRESH", "LABELS", "LSE_PART", "LSE_REF", "W_NORM", "GRAD_FACTOR", "OUT_PART"}
SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CAPABILITY = 90
REPO = Path(__file__).resolve().parents[1]
M = 4096  # rows of the segment; N = k·M


def _signature(params, constexprs, dtype, guide_dtype) -> dict[str, str]:
    signature = {}
    for param in params:
        if param in constexprs:
            signature[param] = "constexpr"
        elif param in ("R", "C"):
            signature[param] = "*" + SHORT[dtype]
        elif param in ("GR", "GC"):
            signature[param] = "*" + SHORT[guide_dtype]
        elif param in POINTERS:
            signature[param] = "*fp32"
        else:
            signature[param] = "fp32" if param in ("scale", "alpha") else "i32"
    return signature


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) of the one kernel in ``ptx``, from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(CAPABILITY).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        arch = sm_arch_from_capability(CAPABILITY)
        command = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src), "-o",
                   str(Path(tmp) / "kernel.o")]  # fmt: skip
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_variant(name, dtype, d, own, *, k=1, guide_dtype=None, dg=0, kind=None, hardness=None):
    """Compile one kernel with the launchers' own constexprs and launch options for (M = 4096, N = k·4096, D);
    return (registers, spill stores, spill loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from st_fast.ops import triton_lse
    from st_fast.ops.layout import HardnessKind, SegmentKind

    kind = SegmentKind.OWN_POSITIVE if kind is None else kind
    hardness = HardnessKind.ALL if hardness is None else hardness
    kernel = getattr(triton_lse, name)
    params = list(inspect.signature(kernel.fn).parameters)
    rows = torch.empty(M, d, dtype=dtype, device="meta")
    guide = None
    if guide_dtype is not None:
        guide_rows = torch.empty(M, dg, dtype=guide_dtype, device="meta")
        guide = triton_lse.SegmentGuide(guide_rows, guide_rows, None, None, True)
    options = triton_lse._launch_options(rows, kind, hardness, guide)
    if name == "_segment_lse_forward_kernel":
        options |= triton_lse._blocks(M, k * M, d)
        num_warps, num_stages = 4, 3  # as segment_lse_forward launches it
    else:
        config = triton_lse._backward_config(M, k * M, d, "cuda", rows.element_size(), guide is not None)
        options |= config.blocks(own["COLUMNS"])
        num_warps, num_stages = config.num_warps, config.num_stages
    options |= own
    constexprs = {key: value for key, value in options.items() if key in params}
    signature = _signature(params, constexprs, dtype, guide_dtype or torch.float32)  # placeholders: fp32
    # Triton's runtime specializes 16-byte-aligned pointers and integers divisible by 16 (tt.divisibility = 16),
    # which is what lets it vectorize the loads: so do the same for the benchmark's shapes (M, N, D, D' all k·16).
    aligned = POINTERS | {"R", "C", "GR", "GC", "M", "N", "D", "DG", "stride_r", "stride_c", "stride_gr", "stride_gc",
                          "width"}  # fmt: skip
    attrs = {(i,): [["tt.divisibility", 16]] for i, param in enumerate(params) if param in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", CAPABILITY, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    assert compiled.asm["cubin"]
    return (*ptxas_usage(compiled.asm["ptx"]), compiled.metadata.shared)


# kernel, input dtype, D, its own constexprs, keyword arguments of compile_variant: every row of the backward's
# tile table (and D > 1024, windowed), both directions, fp32 with ieee and tf32 dots.
BACKWARD_SHAPES = [(torch.bfloat16, d) for d in (128, 256, 384, 512, 768, 1024, 2048)] + [
    (torch.float16, 384), (torch.float32, 128), (torch.float32, 256), (torch.float32, 384), (torch.float32, 768),
    (torch.float32, 1024),
]  # fmt: skip
MNRL_VARIANTS = [
    ("_segment_lse_forward_kernel", torch.bfloat16, 384, {}, {}),
    ("_segment_lse_forward_kernel", torch.float32, 1024, {}, {}),
    ("_segment_lse_forward_kernel", torch.float32, 1024, {"INPUT_PRECISION": "tf32"}, {}),
] + [
    ("_segment_lse_backward_kernel", dtype, d, {"COLUMNS": columns} | precision, {})
    for dtype, d in BACKWARD_SHAPES
    for columns in (False, True)
    for precision in ([{}, {"INPUT_PRECISION": "tf32"}] if dtype == torch.float32 else [{}])
]
GUIDED_VARIANTS = [  # M = 4096, N = 8192; guide dtype and D'
    ("_segment_lse_forward_kernel", torch.bfloat16, 1024, {}, {"k": 2, "guide_dtype": torch.bfloat16, "dg": 384}),
    ("_segment_lse_backward_kernel", torch.bfloat16, 1024, {"COLUMNS": False},
     {"k": 2, "guide_dtype": torch.bfloat16, "dg": 384}),
    ("_segment_lse_backward_kernel", torch.bfloat16, 1024, {"COLUMNS": True},
     {"k": 2, "guide_dtype": torch.float32, "dg": 768}),
    ("_segment_lse_backward_kernel", torch.bfloat16, 384, {"COLUMNS": False},
     {"k": 2, "guide_dtype": torch.float32, "dg": 1024}),
    ("_segment_lse_backward_kernel", torch.bfloat16, 384, {"COLUMNS": True},
     {"k": 2, "guide_dtype": torch.bfloat16, "dg": 384}),
    ("_segment_lse_backward_kernel", torch.float32, 384, {"COLUMNS": True},
     {"k": 2, "guide_dtype": torch.float32, "dg": 768}),
    ("_segment_lse_backward_kernel", torch.float32, 1024, {"COLUMNS": False},
     {"k": 2, "guide_dtype": torch.float32, "dg": 1024}),
]  # fmt: skip
VARIANTS = {"mnrl": MNRL_VARIANTS, "guided": GUIDED_VARIANTS}


def main(which: str) -> None:
    for name, dtype, d, own, kwargs in VARIANTS[which]:
        registers, stores, loads, shared = compile_variant(name, dtype, d, own, **kwargs)
        label = f"{SHORT[dtype]}-D{d}" + "".join(f"-{key}={value}" for key, value in own.items())
        if "guide_dtype" in kwargs:
            label += f"-guide{SHORT[kwargs['guide_dtype']]}-D'{kwargs['dg']}"
        print(f"compiled {name} {label} regs={registers} spills={stores}+{loads} shared={shared}", flush=True)


# Kernel variants allowed to spill registers, each with the measured reason it is kept: none.
DOCUMENTED_SPILLS: dict[str, str] = {}
SM90_SHARED_MEMORY = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)


def compile_in_subprocess(which: str) -> list[str]:
    """Compile the variants ``which`` in a process without the interpreter; their report lines (see :func:`main`)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import sys; sys.path[:0] = ['.', 'tests']; import triton_aot; triton_aot.main({which!r})"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return [line for line in out.stdout.splitlines() if line.startswith("compiled ")]


def assert_no_spills(lines: list[str], expected_count: int) -> None:
    """Every compiled variant: no register spills (unless documented) and shared memory within one sm_90 block."""
    assert len(lines) == expected_count, lines
    for line in lines:
        _, name, variant, regs, spills, shared = line.split()
        stores, loads = (int(x) for x in spills.removeprefix("spills=").split("+"))
        if stores or loads:
            assert f"{name} {variant}" in DOCUMENTED_SPILLS, f"register spills: {line}"
        assert int(shared.removeprefix("shared=")) <= SM90_SHARED_MEMORY, f"shared memory: {line}"


if __name__ == "__main__":
    main(sys.argv[1])
