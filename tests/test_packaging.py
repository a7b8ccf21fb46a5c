"""Packaging: the wheels of scripts/build_wheels.sh, what a user installing one gets, and one OpenMP runtime.

The slow tests run scripts/build_wheels.sh once (on a copy of this checkout into which stale CUDA binaries were
planted; the CUDA wheel too where nvcc is found), then install the repaired CPU wheel into a fresh venv that has no
compiler on its PATH and run a fused loss and the sampler there. That venv gets the wheel's runtime dependencies
(its Requires-Dist closure, no extras) from this environment as links rather than downloads: the test needs no
network and takes seconds, and the closure is what pip would install for the same versions (so `pip list` there
answers whether a CPU-only install pulls triton).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")

PROBE = Path(__file__).with_name("wheel_probe.py")  # run in a separate process: a native op, the loss, the sampler


def check_one_openmp_runtime(runtimes: list[str], torch_lib: str) -> None:
    assert len(runtimes) == 1, f"{len(runtimes)} OpenMP runtimes mapped: {runtimes}"
    if any(name.startswith("libgomp") for name in os.listdir(torch_lib)):  # the pip wheels of torch ship one
        mapped = os.path.dirname(runtimes[0])
        assert os.path.samefile(mapped, torch_lib), f"st_fast's OpenMP runtime is not torch's: {runtimes}"


def test_a_native_op_runs_on_torchs_openmp_runtime():
    """The extension links libgomp.so.1 by name and so shares the runtime torch loaded: one OpenMP thread pool.
    (In a fresh process: sentence-transformers' import of scikit-learn maps scikit-learn's own libgomp copy.)"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, PROBE, "openmp"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.splitlines()[-1])
    assert Path(os.path.realpath(report["st_fast"])).is_relative_to(ROOT)
    check_one_openmp_runtime(report["openmp"], report["torch_lib"])


# --------------------------------------------------------------------------------------------------------------------
# The CPU wheel


def copy_checkout(dest: Path) -> None:
    """The files of this checkout that git tracks or would track (as a fresh clone with local changes has them), in
    a new git repository at ``dest`` so that scripts/build_wheels.sh takes its usual path."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True
    )
    if listed.returncode != 0:  # not a git checkout: everything but build outputs
        ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__")
        shutil.copytree(ROOT, dest, ignore=ignore)
    else:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def plant_stale_binaries(src: Path) -> list[Path]:
    """What an earlier CUDA build leaves behind: an in-place _C_cuda (build_ext --inplace, editable installs) and
    one in build/lib.*; neither may reach a ST_FAST_CUDA=0 wheel. Likewise the test-only _C_test of a test build
    (ST_FAST_TEST_EXTENSIONS=1, scripts/env.sh), which no wheel may carry. Returns [in place, in build/lib] of
    _C_cuda, then of _C_test."""
    build_lib = src / "build" / f"lib.{sysconfig.get_platform()}-{sys.implementation.cache_tag}" / "st_fast"
    stale = [where / f"{name}{EXT_SUFFIX}" for name in ("_C_cuda", "_C_test") for where in (src / "st_fast", build_lib)]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"stale binary of an earlier CUDA build")
    return stale


def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return zf.read(name).decode()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    """The repaired wheels of scripts/build_wheels.sh, built from a copy of this checkout that also holds stale CUDA
    and test-only binaries, with ST_FAST_TEST_EXTENSIONS=1 (which a wheel build ignores): {"cpu": the CPU wheel,
    "cuda": the CUDA wheel where nvcc is found, for sm_80 only (a quicker build)}."""
    tmp = tmp_path_factory.mktemp("wheels")
    src = tmp / "src"
    copy_checkout(src)
    plant_stale_binaries(src)
    done = subprocess.run(
        ["bash", str(src / "scripts" / "build_wheels.sh"), "--out", str(tmp / "dist")],
        env={**os.environ, "PYTHON": sys.executable, "ST_FAST_CUDA_ARCHS": "80", "ST_FAST_TEST_EXTENSIONS": "1"},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, f"build_wheels.sh failed:\n{done.stderr[-6000:]}"
    for banner in ("BuildBackendWarning", "SetuptoolsDeprecationWarning"):  # e.g. on a `project.license` table
        assert banner not in done.stderr, done.stderr
    made = [Path(line) for line in done.stdout.splitlines() if line.endswith(".whl")]
    cpu = [w for w in made if "+cu" not in w.name]
    cuda = [w for w in made if "+cu" in w.name]
    assert len(cpu) == 1 and len(cuda) == (shutil.which("nvcc") is not None), made
    return {"cpu": cpu[0], **({"cuda": cuda[0]} if cuda else {})}


@pytest.fixture(scope="module")
def cpu_wheel(wheels) -> Path:
    return wheels["cpu"]


@pytest.mark.slow
def test_the_cpu_wheel_is_manylinux_without_an_openmp_runtime_or_cuda(cpu_wheel):
    pattern = r"st_fast-(?P<version>[^-]+)-cp\d+-cp\d+-(?P<plat>manylinux_\d+_\d+_x86_64)\.whl"
    tag = re.fullmatch(pattern, cpu_wheel.name)
    assert tag, cpu_wheel.name
    assert "+" not in tag["version"]  # the local label (+cuXY.smNN) marks CUDA wheels only
    show = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", "--json", str(cpu_wheel)], capture_output=True, text=True
    )
    assert show.returncode == 0, show.stderr
    show = json.loads(show.stdout)
    # auditwheel's verdict from symbol versions; libgomp.so.1 is deliberately external (torch provides it)
    assert show["sym_tag"] == tag["plat"]
    assert set(show["external_libs"]) <= {"libgomp.so.1"}, show["external_libs"]

    names = wheel_names(cpu_wheel)
    assert not [n for n in names if "libgomp" in n]  # no st_fast.libs/libgomp-<hash>.so.1: one OpenMP runtime
    assert f"st_fast/_C{EXT_SUFFIX}" in names
    assert not [n for n in names if "_C_cuda" in n or "_C_test" in n]  # no stale binary was packed
    tops = {n.split("/")[0] for n in names}
    assert tops == {"st_fast", f"st_fast-{tag['version']}.dist-info"}, tops  # no tests/, examples/, benchmarks/
    assert not [n for n in names if re.search(r"(^|/)(tests?|examples?|conftest)(/|\.py$)|/test_[^/]*\.py$", n)]
    assert f"st_fast-{tag['version']}.dist-info/licenses/LICENSE" in names


@pytest.mark.slow
def test_the_wheel_declares_the_spdx_license_and_triton_only_as_an_extra(cpu_wheel):
    meta = wheel_metadata(cpu_wheel)
    assert "License-Expression: Apache-2.0" in meta.splitlines()
    assert "License-File: LICENSE" in meta.splitlines()
    triton = [Requirement(line.split(":", 1)[1]) for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    triton = [req for req in triton if req.name == "triton"]
    assert triton, "no extra brings triton"
    linux = {"platform_system": "Linux", "platform_machine": "x86_64"}
    assert not [req for req in triton if req.marker is None or req.marker.evaluate({**linux, "extra": ""})], triton
    assert [req for req in triton if req.marker.evaluate({**linux, "extra": "triton"})], triton


@pytest.mark.slow
def test_setup_py_drops_stale_extension_binaries(tmp_path):
    """A plain `pip wheel .` (no build_wheels.sh) in a tree with stale CUDA and test-only binaries: ST_FAST_CUDA=0
    packs no _C_cuda, and no wheel packs _C_test, even with ST_FAST_TEST_EXTENSIONS=1 (setup.py ignores it for a
    wheel). build/lib holds a current _C (this checkout's), so nothing is recompiled."""
    from st_fast import _native

    src = tmp_path / "src"
    copy_checkout(src)
    _, in_build_lib, _, test_in_build_lib = plant_stale_binaries(src)
    current = in_build_lib.parent / f"_C{EXT_SUFFIX}"
    shutil.copy(_native.require_cpu_ext().__file__, current)  # newer than the sources: build_ext skips it
    env = {**os.environ, "ST_FAST_CUDA": "0", "ST_FAST_TEST_EXTENSIONS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=src, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-6000:]
    (wheel,) = tmp_path.glob("st_fast-*.whl")
    names = wheel_names(wheel)
    assert f"st_fast/_C{EXT_SUFFIX}" in names
    assert not [n for n in names if "_C_cuda" in n or "_C_test" in n], names
    assert not in_build_lib.exists() and not test_in_build_lib.exists()
    with zipfile.ZipFile(wheel) as zf:  # the build/lib the stale binary sat in is the one that was packed
        assert zf.read(f"st_fast/_C{EXT_SUFFIX}") == current.read_bytes()


def nvcc_release() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    return ".".join(re.search(r"release (\d+)\.(\d+)", out).groups())


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH: no CUDA wheel")
def test_the_cuda_wheel_names_its_cuda_release_and_architectures(wheels, tmp_path):
    """The local version label and native_info() both say which CUDA release and targets the wheel carries (sm_80
    here, and the PTX of it); nothing of CUDA or OpenMP is bundled."""
    wheel = wheels["cuda"]
    release = nvcc_release()
    label = f"+cu{release.replace('.', '')}.sm80"
    assert re.fullmatch(rf"st_fast-0\.1\.0{re.escape(label)}-cp\d+-cp\d+-manylinux_\d+_\d+_x86_64\.whl", wheel.name)
    names = wheel_names(wheel)
    assert f"st_fast/_C_cuda{EXT_SUFFIX}" in names and f"st_fast/_C{EXT_SUFFIX}" in names
    assert not [n for n in names if "_C_test" in n], names
    assert not [n for n in names if n.startswith("st_fast.libs/")], names  # static cudart, torch's libgomp
    assert f"Version: 0.1.0{label}" in wheel_metadata(wheel).splitlines()
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path / "unpacked")
    script = "import json, st_fast; print(json.dumps(st_fast.native_info()))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "unpacked")}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.splitlines()[-1])
    assert info["cuda_extension"], info["cuda_extension_error"]
    assert info["cuda_version"] == release and info["cuda_archs"] == ["sm_80", "compute_80"], info


# --------------------------------------------------------------------------------------------------------------------
# The wheel in a fresh venv with torch and no compiler


def runtime_closure(requirements: list[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions that ``requirements`` need at run time (markers evaluated, extras followed), by
    canonical name."""
    found: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(line, "") for line in requirements]  # (requirement, the extra its marker is evaluated for)
    while todo:
        line, extra = todo.pop()
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        dist = found.setdefault(name, metadata.distribution(req.name))
        assert req.specifier.contains(dist.version, prereleases=True), f"{req}, but {dist.version} is installed"
        for wanted in ("", *req.extras):
            if (name, wanted) not in done:
                done.add((name, wanted))
                todo.extend((sub, wanted) for sub in dist.requires or [])
    return found


def link_distributions(dists: dict[str, metadata.Distribution], dest: Path) -> None:
    """Link the top-level entries (packages, modules, .dist-info folders) of ``dists`` into ``dest``."""
    dest.mkdir()
    for dist in dists.values():
        assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD"
        tops = {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}
        for top in tops:
            target = Path(dist.locate_file(top))
            if target.exists() and not (dest / top).exists():
                (dest / top).symlink_to(target)


@pytest.fixture(scope="module")
def fresh_venv(cpu_wheel, tmp_path_factory) -> dict:
    """A venv with the wheel installed and its runtime dependencies importable, run with no compiler on PATH."""
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], capture_output=True, text=True
    ).stdout.strip()
    requires = [line.split(":", 1)[1].strip() for line in wheel_metadata(cpu_wheel).splitlines()
                if line.startswith("Requires-Dist:")]  # fmt: skip
    deps = runtime_closure(requires)
    # inside the venv's prefix, as installed packages are (dill, which datasets hashes with, pickles modules from
    # elsewhere by value)
    link_distributions(deps, venv / "deps")
    Path(site, "st_fast_test_deps.pth").write_text(f"{venv / 'deps'}\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    out = subprocess.run([*pip, "install", "--no-deps", "--no-index", str(cpu_wheel)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "TRITON"))}
    env.update(PATH=str(venv / "bin"), CC="/bin/false", CXX="/bin/false", HOME=str(tmp), HF_HUB_OFFLINE="1")
    # torch's CUDA builds depend on triton themselves; the CPU build (this project's dev and CI installs) does not
    needs_triton = "triton" in runtime_closure(["torch"])
    return {"python": python, "pip": pip, "env": env, "cwd": tmp, "site": site, "torch_needs_triton": needs_triton}


@pytest.mark.slow
def test_the_wheel_runs_in_a_fresh_venv_without_a_compiler(fresh_venv):
    out = subprocess.run(
        [fresh_venv["python"], "-I", PROBE, "all"],
        cwd=fresh_venv["cwd"], env=fresh_venv["env"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-6000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert report["st_fast"].startswith(fresh_venv["site"]), report["st_fast"]  # the wheel's, not this checkout's
    assert report["compiler"] is None
    info = report["info"]
    assert info["cpu_extension"] and info["openmp"], info
    assert not info["cuda_extension"] and info["cuda_version"] is None and info["cuda_archs"] == [], info
    if not fresh_venv["torch_needs_triton"]:
        assert not info["triton"] and "st-fast[triton]" in info["triton_error"], info
        error = report["triton_backend_error"]  # the message of backend="triton" without triton
        assert "needs triton" in error and "not importable" in error and 'backend="torch"' in error, error
    loss = report["loss"]
    for value in (report["native_loss"], loss["fast"]):
        assert abs(value - loss["stock"]) <= 1e-5 * abs(loss["stock"]), (report["native_loss"], loss)
    assert loss["grad_error"] < 1e-5, loss
    assert report["sampler"]["same"] and report["sampler"]["batches"] > 0, report["sampler"]
    check_one_openmp_runtime(report["openmp"], report["torch_lib"])
    # whatever else maps its own libgomp later (scikit-learn), st_fast brings none: no runtime from the installed
    # package's folder or its auditwheel libs folder (st_fast.libs), nor from this checkout's package (folders, not
    # substrings of the path: the checkout, and so the linked dependencies, may live in a folder named st_fast)
    package = Path(os.path.realpath(report["st_fast"])).parent
    own = [package, package.with_name("st_fast.libs"), ROOT / "st_fast"]
    brought = [r for r in report["openmp_after_all"] if any(Path(os.path.realpath(r)).is_relative_to(d) for d in own)]
    assert not brought, report["openmp_after_all"]


@pytest.mark.slow
def test_a_cpu_only_install_has_no_triton(fresh_venv):
    if fresh_venv["torch_needs_triton"]:
        pytest.skip("this torch build depends on triton itself (the wheel's own metadata is checked above)")
    out = subprocess.run([*fresh_venv["pip"], "list", "--format=json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    installed = {p["name"].lower(): p["version"] for p in json.loads(out.stdout)}
    assert "st-fast" in installed and "torch" in installed
    assert "triton" not in installed
    check = subprocess.run([*fresh_venv["pip"], "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr  # every runtime requirement is met without triton
