"""Build of st_fast's compiled parts.

* ``st_fast._C``: C++17 + pybind11 extension from ``csrc/*.cpp``, always built (-O3, OpenMP where the compiler has it).
* ``st_fast._C_cuda``: optional CUDA extension. ``csrc/cuda/*.cu`` are compiled by nvcc (sm_80, sm_90 and PTX,
  no torch headers) and linked with ``csrc/cuda/module.cpp`` against the static CUDA runtime. Built when
  ``ST_FAST_CUDA=1``, or when nvcc is found and ``ST_FAST_CUDA`` is not ``0``; skipped with a message otherwise.
  ``ST_FAST_CUDA_ARCHS`` (e.g. ``90``, or ``80;90``) narrows the targets to those architectures plus PTX of the
  newest, for a quicker build on one known GPU (``benchmarks/gpu_check.sh`` builds for the GPU it runs on).

The C++ and CUDA translation units compile in parallel (``ST_FAST_BUILD_JOBS`` jobs, default: the CPU count).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE_DIR = os.path.join("csrc", "include")
HEADERS = sorted(glob.glob("csrc/include/st_fast/*.h") + glob.glob("csrc/cuda/*.cuh"))
DEFAULT_CUDA_ARCHS = ("80", "90")  # A100, H100/H200; PTX of the last one for newer GPUs
BUILD_JOBS_ENV = "ST_FAST_BUILD_JOBS"


def cuda_arch_flags(archs: str | None = None) -> list[str]:
    """nvcc ``-gencode`` flags: SASS for each architecture in ``archs`` (``ST_FAST_CUDA_ARCHS``, separated by ``;``,
    ``,`` or spaces, e.g. ``90`` or ``8.0;9.0``; default 80 and 90) and PTX for the newest of them."""
    archs = os.environ.get("ST_FAST_CUDA_ARCHS", "") if archs is None else archs
    wanted = [a.replace(".", "") for a in re.split(r"[;, ]+", archs.strip()) if a] or list(DEFAULT_CUDA_ARCHS)
    if not all(a.isdigit() for a in wanted):
        raise ValueError(f"ST_FAST_CUDA_ARCHS={archs!r}: expected compute capabilities such as '90' or '8.0;9.0'")
    wanted = sorted(set(wanted), key=int)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in wanted]
    return [*flags, f"-gencode=arch=compute_{wanted[-1]},code=compute_{wanted[-1]}"]


def _build_jobs() -> int:
    return max(1, int(os.environ.get(BUILD_JOBS_ENV) or os.cpu_count() or 1))


def _log(message: str) -> None:
    print(f"[st_fast build] {message}", file=sys.stderr, flush=True)


def _openmp_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP, or empty lists when the C++ compiler cannot use it."""
    if sys.platform == "win32":
        return ["/openmp"], []
    compiler = sysconfig.get_config_var("CXX") or "c++"
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        cmd = compiler.split() + ["-fopenmp", source, "-o", os.path.join(tmp, "omp")]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return ["-fopenmp"], ["-fopenmp"]
    _log("OpenMP not available: CPU kernels will run single-threaded")
    return [], []


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _find_cuda_home(nvcc: str) -> str | None:
    """The toolkit root holding include/cuda_runtime.h (nvcc may be a wrapper script elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _want_cuda() -> str | None:
    """Path to nvcc when the CUDA extension should be built, else None (with the reason logged)."""
    setting = os.environ.get("ST_FAST_CUDA", "")
    if setting == "0":
        _log("ST_FAST_CUDA=0: skipping the CUDA extension")
        return None
    nvcc = _find_nvcc()
    if nvcc is None:
        if setting == "1":
            raise RuntimeError("ST_FAST_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        _log("nvcc not found: skipping the CUDA extension (the CPU extension and Triton paths still work)")
        return None
    return nvcc


class CudaExtension(Pybind11Extension):
    """A pybind11 extension whose ``cuda_sources`` are compiled by nvcc before the C++ sources are linked."""

    def __init__(self, name: str, sources: list[str], cuda_sources: list[str], nvcc: str, cuda_home: str, **kw):
        super().__init__(name, sources, **kw)
        self.cuda_sources = cuda_sources
        self.nvcc = nvcc
        self.cuda_home = cuda_home


class BuildExt(build_ext):
    def build_extension(self, ext):
        if isinstance(ext, CudaExtension):
            ext.extra_objects = self._compile_cuda(ext)
        super().build_extension(ext)

    def _compile_cuda(self, ext: CudaExtension) -> list[str]:
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        arch_flags = cuda_arch_flags()

        def compile_one(source: str) -> str:
            obj = os.path.join(out_dir, os.path.basename(source) + ".o")
            # no --use_fast_math: the row kernels' expf/logf must match the CPU build to the last few ulps
            cmd = [
                ext.nvcc, "-c", source, "-o", obj, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                "-I", INCLUDE_DIR, *arch_flags,
            ]  # fmt: skip
            _log(" ".join(cmd))
            subprocess.run(cmd, check=True, cwd=ROOT)
            return obj

        with ThreadPoolExecutor(max_workers=_build_jobs()) as pool:
            return list(pool.map(compile_one, ext.cuda_sources))


def _extensions() -> list[Pybind11Extension]:
    omp_compile, omp_link = _openmp_flags()
    cpu = Pybind11Extension(
        "st_fast._C",
        sorted(glob.glob("csrc/*.cpp")),
        depends=HEADERS,  # rebuild when an algorithm header changes
        include_dirs=[INCLUDE_DIR],
        extra_compile_args=["-O3", *omp_compile],
        extra_link_args=omp_link,
        cxx_std=17,
    )
    extensions = [cpu]
    nvcc = _want_cuda()
    if nvcc is not None:
        cuda_home = _find_cuda_home(nvcc)
        if cuda_home is None:
            raise RuntimeError(f"found nvcc at {nvcc} but no CUDA toolkit headers; set CUDA_HOME")
        lib_dir = next(
            (d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)),
            os.path.join(cuda_home, "lib64"),
        )
        _log(f"building the CUDA extension with {nvcc} (toolkit {cuda_home})")
        extensions.append(
            CudaExtension(
                "st_fast._C_cuda",
                ["csrc/cuda/module.cpp"],
                depends=HEADERS,
                cuda_sources=sorted(glob.glob("csrc/cuda/*.cu")),
                nvcc=nvcc,
                cuda_home=cuda_home,
                include_dirs=[INCLUDE_DIR, os.path.join(cuda_home, "include")],
                library_dirs=[lib_dir],
                libraries=["cudart_static", "rt", "pthread", "dl"],
                extra_compile_args=["-O3"],
                cxx_std=17,
            )
        )
    return extensions


ParallelCompile(BUILD_JOBS_ENV, default=_build_jobs()).install()  # the C++ units of each extension in parallel
setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
