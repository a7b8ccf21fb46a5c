"""Build of st_fast's compiled parts.

* ``st_fast._C``: C++17 + pybind11 extension from ``csrc/*.cpp``, always built (-O3, OpenMP where the compiler has it).
* ``st_fast._C_cuda``: optional CUDA extension. ``csrc/cuda/*.cu`` are compiled by nvcc (sm_80, sm_90 and PTX,
  no torch headers) and linked with ``csrc/cuda/module.cpp`` against the static CUDA runtime. Built when
  ``ST_FAST_CUDA=1``, or when nvcc is found and ``ST_FAST_CUDA`` is not ``0``; skipped with a message otherwise.
  ``ST_FAST_CUDA_ARCHS`` (e.g. ``90``, or ``80;90``) narrows the targets to those architectures plus PTX of the
  newest, for a quicker build on one known GPU (``benchmarks/gpu_check.sh`` builds for the GPU it runs on).
  A build with the CUDA extension says so in its version, a PEP 440 local label naming the toolkit and the SASS
  targets (``0.1.0+cu130.sm80.sm90``), and in ``st_fast.native_info()`` (``cuda_version``, ``cuda_archs``).
* ``st_fast._C_test``: test-only native code (``csrc/testing/*.cpp``: the CUDA build's lane algorithm emulated on the
  CPU, for tests/ops/test_emulated_lanes.py), built only when ``ST_FAST_TEST_EXTENSIONS=1`` (scripts/env.sh sets it
  for the test environment's editable install); never part of a wheel (``bdist_wheel`` ignores the switch).
* Extension binaries that this build did not make (a ``_C_cuda`` left in ``build/lib`` or in the source tree by an
  earlier CUDA build when this one has ``ST_FAST_CUDA=0``) are deleted, so a wheel carries exactly what was built.

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
TEST_EXTENSIONS_ENV = "ST_FAST_TEST_EXTENSIONS"


def cuda_archs(archs: str | None = None) -> list[str]:
    """The SASS targets, ascending: ``archs`` (``ST_FAST_CUDA_ARCHS``, separated by ``;``, ``,`` or spaces, e.g.
    ``90`` or ``8.0;9.0``; default 80 and 90) as compute capabilities without the dot (``["80", "90"]``)."""
    archs = os.environ.get("ST_FAST_CUDA_ARCHS", "") if archs is None else archs
    wanted = [a.replace(".", "") for a in re.split(r"[;, ]+", archs.strip()) if a] or list(DEFAULT_CUDA_ARCHS)
    if not all(a.isdigit() for a in wanted):
        raise ValueError(f"ST_FAST_CUDA_ARCHS={archs!r}: expected compute capabilities such as '90' or '8.0;9.0'")
    return sorted(set(wanted), key=int)


def cuda_arch_flags(archs: str | None = None) -> list[str]:
    """nvcc ``-gencode`` flags: SASS for each architecture of :func:`cuda_archs` and PTX for the newest of them."""
    wanted = cuda_archs(archs)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in wanted]
    return [*flags, f"-gencode=arch=compute_{wanted[-1]},code=compute_{wanted[-1]}"]


def nvcc_flags(archs: str | None = None) -> list[str]:
    """nvcc's flags for each ``csrc/cuda/*.cu`` source, besides ``-c``, the source and ``-o``: -O3, C++17, PIC, the
    algorithm headers (paths relative to the repository root) and the gencode flags of :func:`cuda_arch_flags`. No
    --use_fast_math: the row kernels' expf/logf must match the CPU build to the last few ulps. (Read by
    tests/test_cuda_registers.py, which compiles with these flags and ``-Xptxas -v``.)"""
    return ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-I", INCLUDE_DIR, *cuda_arch_flags(archs)]


def _build_jobs() -> int:
    return max(1, int(os.environ.get(BUILD_JOBS_ENV) or os.cpu_count() or 1))


def _log(message: str) -> None:
    print(f"[st_fast build] {message}", file=sys.stderr, flush=True)


def _openmp_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags for OpenMP (GCC/Clang ``-fopenmp``: the extension then needs ``libgomp.so.1``, which is
    the one torch has loaded by the time st_fast imports it), or empty lists when the C++ compiler cannot use it."""
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


def _nvcc_release(nvcc: str) -> str:
    """The toolkit release of ``nvcc`` (``"13.0"``), from ``nvcc --version``."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the CUDA release from `{nvcc} --version`:\n{out}")
    return f"{match[1]}.{match[2]}"


def _base_version() -> str:
    """``__version__`` of st_fast/__init__.py, the one place the version is written."""
    with open(os.path.join(ROOT, "st_fast", "__init__.py")) as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if match is None:
        raise RuntimeError("no __version__ in st_fast/__init__.py")
    return match[1]


def cuda_local_label(release: str, archs: list[str]) -> str:
    """The PEP 440 local version label of a build with the CUDA extension: ``cu130.sm80.sm90`` for CUDA 13.0 with
    SASS for sm_80 and sm_90 (the PTX of the newest is implied). torch labels its builds the same way (``+cu128``)."""
    return ".".join([f"cu{release.replace('.', '')}", *(f"sm{a}" for a in archs)])


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
    # the module names of st_fast's extensions (built or not by this build)
    EXTENSION_NAMES = ("st_fast._C", "st_fast._C_cuda", "st_fast._C_test")

    def run(self):
        super().run()
        self._remove_stale_extensions()

    def _remove_stale_extensions(self) -> None:
        """Delete the binaries of st_fast's extensions that this build did not make, where this build puts its own
        (``build/lib.*`` for a wheel, the source tree for ``--inplace`` / editable installs): a ``_C_cuda`` left there
        by an earlier CUDA build would otherwise be packed into a ``ST_FAST_CUDA=0`` wheel, or imported; a ``_C_test``
        left by a test build, into a plain one."""
        built = {ext.name for ext in self.extensions}
        for name in self.EXTENSION_NAMES:
            path = self.get_ext_fullpath(name)
            if name not in built and os.path.exists(path):
                _log(f"removing {path}: {name} is not part of this build")
                os.remove(path)

    def build_extension(self, ext):
        if isinstance(ext, CudaExtension):
            ext.depends = [*ext.depends, self._cuda_config_stamp(ext)]
            ext.extra_objects = self._compile_cuda(ext)
        super().build_extension(ext)

    def _cuda_config_stamp(self, ext: CudaExtension) -> str:
        """A file in build_temp holding the CUDA release and targets, rewritten when they change. It is one of the
        extension's depends, so a tree built before for other targets relinks (and reports the new targets)."""
        stamp = os.path.join(self.build_temp, "cuda", "config.txt")
        config = f"{ext.define_macros}\n"
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        if not os.path.exists(stamp) or open(stamp).read() != config:
            with open(stamp, "w") as f:
                f.write(config)
        return stamp

    def _compile_cuda(self, ext: CudaExtension) -> list[str]:
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        flags = nvcc_flags()

        def compile_one(source: str) -> str:
            obj = os.path.join(out_dir, os.path.basename(source) + ".o")
            cmd = [ext.nvcc, "-c", source, "-o", obj, *flags]
            _log(" ".join(cmd))
            subprocess.run(cmd, check=True, cwd=ROOT)
            return obj

        with ThreadPoolExecutor(max_workers=_build_jobs()) as pool:
            return list(pool.map(compile_one, ext.cuda_sources))


def _extensions() -> tuple[list[Pybind11Extension], str]:
    """(the extensions, the version: ``__version__``, plus the CUDA label when the CUDA extension is built)."""
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
    if os.environ.get(TEST_EXTENSIONS_ENV) == "1" and "bdist_wheel" in sys.argv:
        _log(f"{TEST_EXTENSIONS_ENV}=1 ignored: a wheel never carries the test-only extension st_fast._C_test")
    elif os.environ.get(TEST_EXTENSIONS_ENV) == "1":
        _log(f"{TEST_EXTENSIONS_ENV}=1: building the test-only extension st_fast._C_test")
        extensions.append(
            Pybind11Extension(
                "st_fast._C_test",
                sorted(glob.glob("csrc/testing/*.cpp")),
                depends=HEADERS,
                include_dirs=[INCLUDE_DIR],
                extra_compile_args=["-O3", "-pthread"],  # std::thread lanes
                extra_link_args=["-pthread"],
                cxx_std=17,
            )
        )
    nvcc = _want_cuda()
    if nvcc is not None:
        cuda_home = _find_cuda_home(nvcc)
        if cuda_home is None:
            raise RuntimeError(f"found nvcc at {nvcc} but no CUDA toolkit headers; set CUDA_HOME")
        lib_dir = next(
            (d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")) if os.path.isdir(d)),
            os.path.join(cuda_home, "lib64"),
        )
        release, archs = _nvcc_release(nvcc), cuda_archs()
        targets = [*(f"sm_{a}" for a in archs), f"compute_{archs[-1]}"]
        label = cuda_local_label(release, archs)
        _log(f"building the CUDA extension with {nvcc} (toolkit {cuda_home}, CUDA {release}, {' '.join(targets)})")
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
                # what native_info() reports (csrc/cuda/module.cpp: cuda_version, cuda_archs)
                define_macros=[
                    ("ST_FAST_CUDA_VERSION", f'"{release}"'),
                    ("ST_FAST_CUDA_ARCHS", f'"{" ".join(targets)}"'),
                ],
                extra_compile_args=["-O3"],
                cxx_std=17,
            )
        )
        return extensions, f"{_base_version()}+{label}"
    return extensions, _base_version()


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it; importing it only defines the above
    ParallelCompile(BUILD_JOBS_ENV, default=_build_jobs()).install()  # the C++ units of each extension in parallel
    EXTENSIONS, VERSION = _extensions()
    setup(version=VERSION, ext_modules=EXTENSIONS, cmdclass={"build_ext": BuildExt})
