#!/usr/bin/env bash
# Sourced by the other scripts: create or reuse ./.venv, install torch==2.13.0 only when no torch is importable
# (a bare `torch` requirement would pull a multi-GB CUDA build), then build and install st_fast (editable) with the
# extras given in ST_FAST_EXTRAS (default: test). Set ST_FAST_CUDA=0/1 to skip/force the CUDA extension.
# Whenever the extras include `test`, the install is constrained by scripts/test-constraints.txt (the test
# environment's pinned sentence-transformers release; user installs keep pyproject.toml's range) and also builds the
# test-only extension st_fast._C_test (ST_FAST_TEST_EXTENSIONS=1 for setup.py; set ST_FAST_TEST_EXTENSIONS=0/1 to
# override; it is passed to this install only, so a wheel built later from this shell never carries it).
#
# The build is skipped when the installed one is current: .venv/st_fast-build.stamp holds the stamp of the last
# successful install (st_fast_build_stamp below: a hash of setup.py, pyproject.toml, the test constraints, every
# file under csrc/, the extras, the CUDA settings and the test-extension switch), st_fast (with st_fast._C, and
# st_fast._C_cuda / st_fast._C_test when they are built) imports from this checkout, and every `name==version` pin
# of the constraints in use is the installed version (so a .venv holding another sentence-transformers is moved to the pinned one). Python changes need no
# rebuild (editable install); a change to csrc/, the packaging or the pins does. A fresh clone has no .venv, so it
# always builds (CI). ST_FAST_REBUILD=1 forces the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
ST_FAST_STAMP_FILE=".venv/st_fast-build.stamp"
ST_FAST_TEST_CONSTRAINTS="scripts/test-constraints.txt"

# The constraints file of this install: scripts/test-constraints.txt when the extras include `test`, else nothing.
st_fast_constraints() {
  case ",${ST_FAST_EXTRAS:-test}," in
    *,test,*) if [ -f "$ST_FAST_TEST_CONSTRAINTS" ]; then echo "$ST_FAST_TEST_CONSTRAINTS"; fi ;;
  esac
}

# nvcc as setup.py finds it ($CUDA_HOME/bin, $CUDA_PATH/bin, then PATH), or nothing.
st_fast_nvcc() {
  local home
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}"; do
    if [ -n "$home" ] && [ -e "$home/bin/nvcc" ]; then echo "$home/bin/nvcc"; return; fi
  done
  command -v nvcc || true
}

# 1 when the build will include the CUDA extension (ST_FAST_CUDA=1, or unset with nvcc found), else 0: unset and 1
# give the same build where nvcc exists, so scripts/test.sh (which sets 1 there) and scripts/demo.sh share a stamp.
st_fast_cuda_wanted() {
  if [ "${ST_FAST_CUDA:-}" = "0" ] || { [ "${ST_FAST_CUDA:-}" != "1" ] && [ -z "$(st_fast_nvcc)" ]; }; then
    echo 0
  else
    echo 1
  fi
}

# 1 when the install builds the test-only extension st_fast._C_test (ST_FAST_TEST_EXTENSIONS, default: 1 when the
# extras include `test`), else 0.
st_fast_test_extensions() {
  if [ -n "${ST_FAST_TEST_EXTENSIONS:-}" ]; then
    [ "$ST_FAST_TEST_EXTENSIONS" = "1" ] && echo 1 || echo 0
    return
  fi
  case ",${ST_FAST_EXTRAS:-test}," in
    *,test,*) echo 1 ;;
    *) echo 0 ;;
  esac
}

# Prints the stamp of what an install from the current directory would build: sha256 over the build settings and
# the path and content of every build input.
st_fast_build_stamp() {
  {
    echo "extras=${ST_FAST_EXTRAS:-test} cuda=$(st_fast_cuda_wanted) nvcc=$(st_fast_nvcc) test_ext=$(st_fast_test_extensions)"
    echo "ST_FAST_CUDA_ARCHS=${ST_FAST_CUDA_ARCHS:-} CUDA_HOME=${CUDA_HOME:-} CUDA_PATH=${CUDA_PATH:-}"
    echo "constraints=$(st_fast_constraints)"
    local path
    for path in setup.py setup.cfg pyproject.toml MANIFEST.in "$ST_FAST_TEST_CONSTRAINTS" csrc; do
      if [ -e "$path" ]; then find "$path" -type f -print0; fi
    done | LC_ALL=C sort -z | xargs -0 -r sha256sum
  } | sha256sum | cut -d' ' -f1
}

# True when the installed st_fast is this checkout's, its compiled parts import, every `name==version` pin of the
# constraints file in use (argument 3, may be empty) is the installed version, and the stamp matches.
st_fast_build_current() {
  [ "${ST_FAST_REBUILD:-0}" != "1" ] && [ -f "$ST_FAST_STAMP_FILE" ] \
    && [ "$(cat "$ST_FAST_STAMP_FILE")" = "$1" ] \
    && "$VENV_PY" - "$PWD" "$(st_fast_cuda_wanted)" "$(st_fast_constraints)" "$(st_fast_test_extensions)" \
      >/dev/null 2>&1 <<'EOF'
import importlib.metadata, importlib.util, os, re, sys
from packaging.version import Version
if sys.argv[3]:  # the pins first: a moved pin fails without importing st_fast
    with open(os.path.join(sys.argv[1], sys.argv[3])) as constraints:
        for line in constraints:
            pin = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*==\s*([^\s;#]+)\s*(#.*)?", line.rstrip("\n"))
            if pin:
                try:
                    installed = importlib.metadata.version(pin[1])
                except importlib.metadata.PackageNotFoundError:
                    sys.exit(1)
                if Version(installed) != Version(pin[2]):
                    sys.exit(1)
import st_fast, st_fast._C
inside = os.path.realpath(st_fast.__file__).startswith(os.path.join(os.path.realpath(sys.argv[1]), ""))
cuda_ok = sys.argv[2] != "1" or importlib.util.find_spec("st_fast._C_cuda")
test_ok = sys.argv[4] != "1" or importlib.util.find_spec("st_fast._C_test")
sys.exit(0 if inside and cuda_ok and test_ok else 1)
EOF
}

if [ ! -x .venv/bin/python ]; then
  echo "[st_fast] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
VENV_PY="$PWD/.venv/bin/python"
if ! "$VENV_PY" -c "import torch" >/dev/null 2>&1; then
  echo "[st_fast] no torch in .venv: installing torch==2.13.0 (CPU build)"
  "$VENV_PY" -m pip install --quiet --upgrade pip
  "$VENV_PY" -m pip install --quiet torch==2.13.0
fi
ST_FAST_STAMP="$(st_fast_build_stamp)"
if st_fast_build_current "$ST_FAST_STAMP"; then
  echo "[st_fast] st_fast[${ST_FAST_EXTRAS:-test}] is installed and current (build stamp ${ST_FAST_STAMP:0:12}): not rebuilding"
else
  rm -f "$ST_FAST_STAMP_FILE"
  "$VENV_PY" -m pip install --quiet "setuptools>=77" wheel "pybind11>=2.12"
  ST_FAST_CONSTRAINTS="$(st_fast_constraints)"
  echo "[st_fast] building and installing st_fast[${ST_FAST_EXTRAS:-test}]${ST_FAST_CONSTRAINTS:+ (pip -c $ST_FAST_CONSTRAINTS)}"
  ST_FAST_TEST_EXTENSIONS="$(st_fast_test_extensions)" \
    "$VENV_PY" -m pip install --quiet --no-build-isolation -e ".[${ST_FAST_EXTRAS:-test}]" \
    ${ST_FAST_CONSTRAINTS:+-c "$ST_FAST_CONSTRAINTS"}
  echo "$ST_FAST_STAMP" > "$ST_FAST_STAMP_FILE"
fi
export PATH="$PWD/.venv/bin:$PATH"
