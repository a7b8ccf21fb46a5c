"""The CUDA kernels compile for sm_80 and sm_90 without register spills (issue 16), read from ptxas' ``-v`` report.

Compiles every ``csrc/cuda/*.cu`` with setup.py's own nvcc and flags (``nvcc_flags`` for targets 80 and 90: SASS for
both, as the shipped build) plus ``-Xptxas -v``, and checks each kernel's line of the report: 0 bytes of spill stores
and loads. Prints registers, stack frame and spills per kernel and target (``pytest -s`` shows them; the Triton
kernels' equivalent is tests/triton_aot.py). Skipped where setup.py finds no nvcc (it builds no CUDA extension there
either). About 5 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGETS = "80;90"


def _setup_py():
    """setup.py as a module: its functions, without building (setup() runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("st_fast_setup_py", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = _setup_py()
NVCC = SETUP._find_nvcc()

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def ptxas_report(log: str) -> list[dict]:
    """One entry per (kernel, target) of an ``nvcc -Xptxas -v`` log: name, target, registers, stack frame, spill
    stores and loads (bytes)."""
    kernels, current = [], None
    for line in log.splitlines():
        if match := ENTRY.search(line):
            current = {"kernel": match[1], "target": match[2]}
            kernels.append(current)
        elif current is not None and (match := FRAME.search(line)):
            current.update(stack=int(match[1]), spill_stores=int(match[2]), spill_loads=int(match[3]))
        elif current is not None and (match := REGISTERS.search(line)):
            current["registers"] = int(match[1])
    return kernels


def _demangled(names: list[str]) -> list[str]:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if filt is None:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return [re.sub(r"\(st_fast::\w+Args\)$", "", name) for name in out.splitlines()]


def test_the_report_parser_reads_spills():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 696 bytes cmem[0]"""
    assert ptxas_report(log) == [
        {"kernel": "_Z1kv", "target": "sm_90", "stack": 8, "spill_stores": 12, "spill_loads": 4, "registers": 255}
    ]


@pytest.mark.skipif(NVCC is None, reason="no nvcc where setup.py looks (CUDA_HOME, CUDA_PATH, PATH)")
def test_cuda_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    sources = sorted((REPO / "csrc" / "cuda").glob("*.cu"))
    flags = SETUP.nvcc_flags(TARGETS)

    def compile_one(source: Path) -> str:
        command = [NVCC, "-c", str(source.relative_to(REPO)), "-o", str(tmp_path / f"{source.name}.o"), *flags,
                   "-Xptxas", "-v"]  # fmt: skip
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True).stderr

    with ThreadPoolExecutor(max_workers=2) as pool:
        kernels = [k for log in pool.map(compile_one, sources) for k in ptxas_report(log)]
    names = _demangled([k["kernel"] for k in kernels])
    table = "\n".join(
        f"{k['target']}  regs={k['registers']:3d}  stack={k['stack']:3d}  spills={k['spill_stores']}+"
        f"{k['spill_loads']}  {name}"
        for k, name in zip(kernels, names, strict=True)
    )
    print(f"\nptxas -v, {len(kernels)} kernels:\n{table}")
    assert {k["target"] for k in kernels} == {"sm_80", "sm_90"}, table
    # per target: 3 one-pass + 3 coefficient (a dtype each) + 2 statistics kernels, and the block-per-row variants
    assert len(kernels) >= 2 * 8, table
    assert all("registers" in k and "stack" in k for k in kernels), table
    spilling = [
        line for k, line in zip(kernels, table.splitlines(), strict=True) if k["spill_stores"] or k["spill_loads"]
    ]
    assert not spilling, "kernels that spill registers:\n" + "\n".join(spilling)
