#!/usr/bin/env bash
# Sourced by the other scripts: create or reuse ./.venv, install torch==2.13.0 only when no torch is importable
# (a bare `torch` requirement would pull a multi-GB CUDA build), then build and install st_fast (editable) with the
# extras given in ST_FAST_EXTRAS (default: test). Set ST_FAST_CUDA=0/1 to skip/force the CUDA extension.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
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
"$VENV_PY" -m pip install --quiet "setuptools>=69" wheel "pybind11>=2.12"
echo "[st_fast] building and installing st_fast[${ST_FAST_EXTRAS:-test}]"
"$VENV_PY" -m pip install --quiet --no-build-isolation -e ".[${ST_FAST_EXTRAS:-test}]"
export PATH="$PWD/.venv/bin:$PATH"
