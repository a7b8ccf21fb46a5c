"""scripts/env.sh's build stamp: the install is skipped when the installed build is current, redone when it is not.

Each case copies scripts/env.sh into a scratch checkout (setup.py, pyproject.toml, csrc/) whose ``.venv/bin/python``
is a stand-in: it logs every ``pip`` call, "imports" torch, and answers env.sh's import check (st_fast from this
checkout, with ``st_fast._C``) with the exit status kept in ``.venv/import_ok``. So every decision of the real script
is exercised in a few milliseconds, with no build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
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


def test_the_import_check_accepts_this_checkout_only(tmp_path):
    """The real check, with the real interpreter: st_fast must import from the checkout env.sh runs in."""
    script = (ROOT / "scripts" / "env.sh").read_text()
    check = script.split("<<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    import sys

    def run(checkout: Path) -> int:
        return subprocess.run([sys.executable, "-", str(checkout), "0"], input=check, text=True).returncode

    import st_fast

    assert run(Path(st_fast.__file__).resolve().parents[1]) == 0
    assert run(tmp_path) == 1
