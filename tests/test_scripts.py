"""scripts/env.sh's build stamp: the install is skipped when the installed build is current, redone when it is not.

Each case copies scripts/env.sh into a scratch checkout (setup.py, pyproject.toml, csrc/) whose ``.venv/bin/python``
is a stand-in: it logs every ``pip`` call, "imports" torch, and answers env.sh's import check (st_fast from this
checkout, with ``st_fast._C``) with the exit status kept in ``.venv/import_ok``. So every decision of the real script
is exercised in a few milliseconds, with no build.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
here="$(cd "$(dirname "$0")/.." && pwd)"
case "$1" in
  -m) echo "$*" >> "$here/pip.log" ;;
  -c) exit 0 ;;  # import torch
  -) cat > /dev/null; exit "$(cat "$here/import_ok")" ;;  # env.sh's import check (script on stdin)
  *) exit 3 ;;
esac
"""


@pytest.fixture
def checkout(tmp_path):
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "env.sh", root / "scripts" / "env.sh")
    (root / "setup.py").write_text("# setup\n")
    (root / "pyproject.toml").write_text("[project]\n")
    (root / "csrc" / "include").mkdir(parents=True)
    (root / "csrc" / "ops.cpp").write_text("int f();\n")
    (root / "csrc" / "include" / "ops.h").write_text("#pragma once\n")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    (root / ".venv" / "import_ok").write_text("0")
    (tmp_path / "bin").mkdir()
    return root


def source_env(root: Path, **env: str) -> tuple[bool, str]:
    """Source env.sh in ``root``; (whether it ran ``pip install -e``, the build stamp it left)."""
    log = root / ".venv" / "pip.log"
    log.unlink(missing_ok=True)
    base = {"PATH": f"{root.parent / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}  # no nvcc
    done = subprocess.run(
        ["bash", "-c", "source scripts/env.sh"], cwd=root, env={**base, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    built = log.exists() and " -e " in log.read_text()
    return built, (root / ".venv" / "st_fast-build.stamp").read_text().strip()


def test_builds_once_then_skips_until_an_input_changes(checkout):
    built, stamp = source_env(checkout)
    assert built and len(stamp) == 64
    assert source_env(checkout) == (False, stamp)  # current: no pip call at all

    (checkout / "csrc" / "include" / "ops.h").write_text("#pragma once\nint g();\n")  # a C++ change
    built, changed = source_env(checkout)
    assert built and changed != stamp
    assert source_env(checkout) == (False, changed)

    (checkout / "csrc" / "new.cu").write_text("// new\n")  # a new source file
    assert source_env(checkout)[0]
    (checkout / "csrc" / "new.cu").rename(checkout / "csrc" / "renamed.cu")  # same content, another path
    assert source_env(checkout)[0]
    for name in ("setup.py", "pyproject.toml"):
        (checkout / name).write_text((checkout / name).read_text() + "# changed\n")
        assert source_env(checkout)[0], name
        assert not source_env(checkout)[0], name


def test_rebuilds_when_the_settings_change(checkout):
    built, default = source_env(checkout)
    assert built
    built, bench = source_env(checkout, ST_FAST_EXTRAS="test,bench")
    assert built and bench != default
    assert source_env(checkout, ST_FAST_EXTRAS="test,bench") == (False, bench)
    assert source_env(checkout)[0]  # back to the default extras
    assert source_env(checkout, ST_FAST_CUDA="1")[0]  # no nvcc here: ST_FAST_CUDA=1 is another build
    assert source_env(checkout, ST_FAST_REBUILD="1")[0]  # forced


def test_cuda_unset_and_one_share_a_stamp_where_nvcc_exists(checkout):
    nvcc = checkout.parent / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    built, unset = source_env(checkout)  # scripts/demo.sh: ST_FAST_CUDA unset, nvcc found -> CUDA extension built
    assert built
    assert source_env(checkout, ST_FAST_CUDA="1") == (False, unset)  # scripts/test.sh sets 1 where nvcc exists
    assert source_env(checkout, ST_FAST_CUDA="0")[0]


def test_rebuilds_when_the_installed_build_does_not_import(checkout):
    built, stamp = source_env(checkout)
    assert built
    (checkout / ".venv" / "import_ok").write_text("1")  # e.g. st_fast/_C*.so deleted, or .venv from elsewhere
    assert source_env(checkout) == (True, stamp)


def test_a_failed_build_leaves_no_stamp(checkout):
    assert source_env(checkout)[0]
    fake = checkout / ".venv" / "bin" / "python"
    failing_install = '-m) case "$*" in *" -e "*) exit 1 ;; esac ;;'  # the editable install fails
    fake.write_text(FAKE_PYTHON.replace('-m) echo "$*" >> "$here/pip.log" ;;', failing_install))
    (checkout / "csrc" / "ops.cpp").write_text("int f(int);\n")
    done = subprocess.run(["bash", "-c", "source scripts/env.sh"], cwd=checkout, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode != 0
    assert not (checkout / ".venv" / "st_fast-build.stamp").exists()


def import_check() -> str:
    """env.sh's import check (the Python script it runs with .venv's interpreter)."""
    script = (ROOT / "scripts" / "env.sh").read_text()
    return script.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]


def test_the_import_check_accepts_this_checkout_only(tmp_path):
    """The real check, with the real interpreter: st_fast must import from the checkout env.sh runs in (and the
    pinned versions must be the installed ones)."""
    import sentence_transformers

    import st_fast

    pins = tmp_path / "constraints.txt"  # as pip reads them: a comment, names and versions compared normalized
    pins.write_text(f"# pins\nsentence_transformers == {sentence_transformers.__version__}  # the pin\ntorch>=2\n")

    def run(checkout: Path, constraints: str = "", test_extensions: str = "0") -> int:
        command = [sys.executable, "-", str(checkout), "0", constraints, test_extensions]
        return subprocess.run(command, input=import_check(), text=True).returncode

    here = Path(st_fast.__file__).resolve().parents[1]
    assert run(here, str(pins)) == 0
    assert run(here, str(pins), "1") == (0 if importlib.util.find_spec("st_fast._C_test") else 1)
    assert run(tmp_path) == 1


def test_the_import_check_wants_the_pinned_versions_installed(tmp_path):
    """A .venv whose sentence-transformers is not the pinned one is not current: env.sh reinstalls it with the
    constraints, which moves it to the pin."""
    import sentence_transformers

    import st_fast

    checkout = str(Path(st_fast.__file__).resolve().parents[1])

    def run(constraints: str) -> int:
        path = tmp_path / "constraints.txt"
        path.write_text(constraints)
        command = [sys.executable, "-", checkout, "0", str(path)]
        return subprocess.run(command, input=import_check(), text=True).returncode

    assert run("sentence-transformers==5.9.0\n") == 1
    assert run(f"sentence-transformers=={sentence_transformers.__version__}\nno-such-package-st-fast==1.0\n") == 1


# --------------------------------------------------------------------------------------------------------------------
# The test environment's pins (scripts/test-constraints.txt)
# --------------------------------------------------------------------------------------------------------------------


def pip_calls(root: Path) -> list[str]:
    log = root / ".venv" / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def test_the_test_constraints_are_passed_to_pip_and_are_part_of_the_stamp(checkout):
    constraints = checkout / "scripts" / "test-constraints.txt"
    constraints.write_text("sentence-transformers==6.3.0\n")
    built, stamp = source_env(checkout)
    assert built
    (install,) = [call for call in pip_calls(checkout) if " -e " in call]
    assert install.endswith(" -e .[test] -c scripts/test-constraints.txt"), install
    assert source_env(checkout) == (False, stamp)

    constraints.write_text("sentence-transformers==6.2.0\n")  # the pin moved: reinstall
    built, moved = source_env(checkout)
    assert built and moved != stamp
    assert source_env(checkout) == (False, moved)

    built, bench = source_env(checkout, ST_FAST_EXTRAS="bench")  # not the test environment: no pins
    (install,) = [call for call in pip_calls(checkout) if " -e " in call]
    assert built and install.endswith(" -e .[bench]"), install
    source_env(checkout, ST_FAST_EXTRAS="test,bench")
    (install,) = [call for call in pip_calls(checkout) if " -e " in call]
    assert install.endswith(" -e .[test,bench] -c scripts/test-constraints.txt"), install


def test_the_pinned_sentence_transformers_is_a_supported_release():
    from packaging.requirements import Requirement
    from packaging.version import Version

    lines = (ROOT / "scripts" / "test-constraints.txt").read_text().splitlines()
    pins = [Requirement(line.split("#", 1)[0]) for line in lines if line.split("#", 1)[0].strip()]
    (pin,) = [pin for pin in pins if pin.name == "sentence-transformers"]
    (version,) = [Version(spec.version) for spec in pin.specifier if spec.operator == "=="]
    dependency = re.search(r'"sentence-transformers(>=[^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    assert version in Requirement(f"sentence-transformers{dependency}").specifier  # users get a range, CI the pin


# --------------------------------------------------------------------------------------------------------------------
# scripts/test.sh and scripts/test_stock_versions.sh, with a stand-in interpreter
# --------------------------------------------------------------------------------------------------------------------

SCRIPT_PYTHON = """#!/usr/bin/env bash
here="$(cd "$(dirname "$0")/.." && pwd)"
case "$1 $2" in
  "-m pytest") echo "pytest ST=${ST_FAST_EXPECT_ST_VERSION:-} OMP=${OMP_WAIT_POLICY:-}" \
                 "PYTHONPATH=${PYTHONPATH:-} ${*:3}" >> "$here/pip.log"
               exit "$(cat "$here/pytest_status" 2>/dev/null || echo 0)" ;;
  "-m pip") echo "$*" >> "$here/pip.log"  # an install --target DIR leaves DIR/sentence_transformers
            target=""
            for arg in "$@"; do [ "$target" = next ] && target="$arg"; [ "$arg" = --target ] && target=next; done
            if [ -n "$target" ]; then mkdir -p "$target/sentence_transformers"; fi ;;
  "-m "*) echo "$*" >> "$here/pip.log" ;;
  "-c "*) exit 0 ;;
  "- "*) cat > /dev/null; exit "$(cat "$here/import_ok")" ;;
  *) exit 3 ;;
esac
"""


GPU_CHECK_TESTS = "tests/bench/test_gpu_check.py"  # wall-time limits: run alone after the workers


@pytest.fixture(params=["st_fast", "a b/st-fast"])
def script_checkout(request, checkout, tmp_path):
    """The scratch checkout, in a folder named like the real one or in a path with a space, with the test scripts."""
    root = tmp_path / request.param
    root.parent.mkdir(parents=True, exist_ok=True)
    checkout.rename(root)
    for name in ("test.sh", "test_stock_versions.sh", "test-constraints.txt"):
        shutil.copy(ROOT / "scripts" / name, root / "scripts" / name)
    (root / ".venv" / "bin" / "python").write_text(SCRIPT_PYTHON)
    for name in ("tests/test_compat.py", "tests/test_sampler.py", "tests/losses/test_gist_embed.py", GPU_CHECK_TESTS):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    return root


def run_script(root: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": f"{root.parent / 'bin'}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["bash", f"scripts/{script}", *args], cwd=root, env={**base, **env}, capture_output=True, text=True
    )


def test_the_old_versions_run_the_listed_files_that_exist(script_checkout):
    done = run_script(script_checkout, "test_stock_versions.sh", "-k", "x y")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [call for call in pip_calls(script_checkout) if call.startswith("pytest ")]
    files = "-n 2 --dist loadfile tests/test_compat.py tests/test_sampler.py tests/losses/test_gist_embed.py -k x y"
    assert runs == [
        f"pytest ST=6.2.0 OMP=PASSIVE PYTHONPATH={script_checkout}/.venv/st-6.2.0 -q {files}",
        f"pytest ST=6.0.1 OMP=PASSIVE PYTHONPATH={script_checkout}/.venv/st-6.0.1 -q {files}",
    ]
    installs = [call for call in pip_calls(script_checkout) if " --target " in call]
    assert installs == [
        "-m pip install --quiet --no-deps --target .venv/st-6.2.0 sentence-transformers==6.2.0",
        "-m pip install --quiet --no-deps --target .venv/st-6.0.1 sentence-transformers==6.0.1",
    ]
    assert "tests/losses/test_self_check.py does not exist: not run" in done.stdout  # listed already, not written yet

    (script_checkout / ".venv" / "pip.log").unlink()
    done = run_script(script_checkout, "test_stock_versions.sh", ST_FAST_OLD_ST="6.0.1", ST_FAST_TEST_WORKERS="0")
    assert done.returncode == 0
    calls = pip_calls(script_checkout)
    assert len(calls) == 1 and calls[0].startswith("pytest ST=6.0.1 "), calls  # installed already: reused
    assert calls[0].endswith("/st-6.0.1 -q tests/test_compat.py tests/test_sampler.py tests/losses/test_gist_embed.py")

    assert run_script(script_checkout, "test_stock_versions.sh", ST_FAST_OLD_ST="none").returncode == 0
    assert len(pip_calls(script_checkout)) == 1


def test_a_failing_old_version_fails_the_script_after_running_the_others(script_checkout):
    (script_checkout / ".venv" / "pytest_status").write_text("1")
    done = run_script(script_checkout, "test_stock_versions.sh")
    assert done.returncode == 1
    assert len([call for call in pip_calls(script_checkout) if call.startswith("pytest ")]) == 2
    assert "failed under sentence-transformers 6.2.0 6.0.1" in done.stdout


@pytest.mark.parametrize("pytest_status", [0, 1])
def test_test_sh_ends_with_its_wall_time_and_the_load(script_checkout, pytest_status):
    (script_checkout / ".venv" / "pytest_status").write_text(str(pytest_status))
    done = run_script(script_checkout, "test.sh")
    assert done.returncode == pytest_status, done.stdout + done.stderr  # every test pass ran, failed or not
    first, last = done.stdout.splitlines()[0], done.stdout.splitlines()[-1]
    load = r"\d+\.\d+ \d+\.\d+ \d+\.\d+"
    assert re.fullmatch(rf"\[st_fast\] test\.sh: started .*, load average {load} on \d+ cores", first), first
    result = "passed" if pytest_status == 0 else "FAILED in pytest, pytest alone, older sentence-transformers"
    phases = r"set-up \d+ s, lint \d+ s, pytest \d+ s, pytest alone \d+ s, older sentence-transformers \d+ s"
    assert re.fullmatch(
        rf"\[st_fast\] test\.sh: {result}; wall time \d+ min \d+ s \({phases}\); "
        rf"load average {load} at the start, {load} at the end",
        last,
    ), last
    runs = [call for call in pip_calls(script_checkout) if call.startswith("pytest ")]
    assert runs[0] == f"pytest ST= OMP=PASSIVE PYTHONPATH= -q -n 2 --dist loadfile --ignore={GPU_CHECK_TESTS} tests"
    assert runs[1] == f"pytest ST= OMP=PASSIVE PYTHONPATH= -q {GPU_CHECK_TESTS}"  # wall-time limits: alone
    assert [run.split(" OMP=")[0] for run in runs[2:]] == ["pytest ST=6.2.0", "pytest ST=6.0.1"]


def test_test_sh_stops_when_the_lint_fails(script_checkout):
    fake = script_checkout / ".venv" / "bin" / "python"
    fake.write_text(SCRIPT_PYTHON.replace('"-m "*) echo', '"-m ruff") exit 1 ;;\n  "-m "*) echo'))
    done = run_script(script_checkout, "test.sh")
    assert done.returncode == 1
    assert not [call for call in pip_calls(script_checkout) if call.startswith("pytest ")]
    summary = r"test\.sh: FAILED in lint \(exit status 1\); wall time \d+ min \d+ s \(set-up \d+ s, lint \d+ s\);"
    assert re.search(summary, done.stdout), done.stdout


def test_test_sh_passes_its_arguments_to_pytest_and_then_skips_the_old_versions(script_checkout):
    done = run_script(script_checkout, "test.sh", "-k", "sampler", ST_FAST_TEST_WORKERS="0", OMP_WAIT_POLICY="ACTIVE")
    assert done.returncode == 0, done.stdout + done.stderr
    runs = [call for call in pip_calls(script_checkout) if call.startswith("pytest ")]
    assert runs == ["pytest ST= OMP=ACTIVE PYTHONPATH= -q tests -k sampler"]  # one process, every file, the args
    (script_checkout / ".venv" / "pip.log").unlink()
    assert run_script(script_checkout, "test.sh", "-x").returncode == 0
    runs = [call for call in pip_calls(script_checkout) if call.startswith("pytest ")]
    assert runs == ["pytest ST= OMP=PASSIVE PYTHONPATH= -q -n 2 --dist loadfile tests -x"]
    assert re.search(r"passed; wall time \d+ min \d+ s \(set-up \d+ s, lint \d+ s, pytest \d+ s\);", done.stdout)
