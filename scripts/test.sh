#!/usr/bin/env bash
# The full test suite on a CPU-only machine: set up .venv, build (with the CUDA extension whenever nvcc is present,
# so a broken .cu fails here), lint, then pytest with Triton kernels in the CPU interpreter; then, when called without
# pytest arguments, the version-sensitive tests again under the oldest supported sentence-transformers
# (scripts/test_stock_versions.sh; ST_FAST_OLD_ST=none skips it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${ST_FAST_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then export ST_FAST_CUDA=1; fi
source scripts/env.sh
python -m ruff check st_fast tests benchmarks examples scripts setup.py
TRITON_INTERPRET=1 python -m pytest -q tests "$@"
if [ $# -eq 0 ] && [ "${ST_FAST_OLD_ST:-}" != none ]; then bash scripts/test_stock_versions.sh; fi
