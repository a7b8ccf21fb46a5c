#!/usr/bin/env bash
# The full test suite on a CPU-only machine: set up .venv (scripts/env.sh: sentence-transformers pinned by
# scripts/test-constraints.txt), build (with the CUDA extension whenever nvcc is present, so a broken .cu fails
# here), lint, then pytest with Triton kernels in the CPU interpreter; then, when called without pytest arguments,
# the version-sensitive tests again under older supported sentence-transformers releases
# (scripts/test_stock_versions.sh; ST_FAST_OLD_ST=none skips it). Ends with its wall time, each phase's, and the
# load average at the start and the end, whether it passes or fails.
#
# pytest runs in ST_FAST_TEST_WORKERS pytest-xdist workers (default 2; 0 runs it in one process), a test file per
# worker at a time (--dist loadfile: a file's module fixtures are built once), and with OMP_WAIT_POLICY=PASSIVE
# (unless set): OpenMP threads that wait sleep instead of spinning, which on a busy 2-core machine made torch's
# two-thread steps several times slower (a real-model training test: 54 s spinning, 22 s passive).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
st_fast_load() {
  if [ -r /proc/loadavg ]; then cut -d' ' -f1-3 /proc/loadavg; else uptime | sed 's/.*load averages*: *//'; fi
}
st_fast_cores() { nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?'; }
ST_FAST_TEST_LOAD_START="$(st_fast_load)"
ST_FAST_TEST_PHASE=""
ST_FAST_TEST_PHASES=""
echo "[st_fast] test.sh: started $(date '+%Y-%m-%d %H:%M:%S'), load average $ST_FAST_TEST_LOAD_START on $(st_fast_cores) cores"
st_fast_phase() {  # ends the current phase (its duration goes into the summary) and starts the one named $1
  if [ -n "$ST_FAST_TEST_PHASE" ]; then
    ST_FAST_TEST_PHASES="$ST_FAST_TEST_PHASES${ST_FAST_TEST_PHASES:+, }$ST_FAST_TEST_PHASE $((SECONDS - ST_FAST_TEST_PHASE_START)) s"
  fi
  ST_FAST_TEST_PHASE="$1"
  ST_FAST_TEST_PHASE_START=$SECONDS
}
st_fast_test_end() {
  local status=$? result=passed
  if [ "$status" -ne 0 ]; then result="FAILED in $ST_FAST_TEST_PHASE (exit status $status)"; fi
  st_fast_phase ""
  echo "[st_fast] test.sh: $result; wall time $((SECONDS / 60)) min $((SECONDS % 60)) s ($ST_FAST_TEST_PHASES);" \
    "load average $ST_FAST_TEST_LOAD_START at the start, $(st_fast_load) at the end"
}
trap st_fast_test_end EXIT

st_fast_phase set-up
if [ -z "${ST_FAST_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then export ST_FAST_CUDA=1; fi
source scripts/env.sh
st_fast_phase lint
python -m ruff check st_fast tests benchmarks examples scripts setup.py
st_fast_phase pytest
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
ST_FAST_XDIST=()
if [ "${ST_FAST_TEST_WORKERS:-2}" != 0 ]; then ST_FAST_XDIST=(-n "${ST_FAST_TEST_WORKERS:-2}" --dist loadfile); fi
TRITON_INTERPRET=1 python -m pytest -q ${ST_FAST_XDIST[@]+"${ST_FAST_XDIST[@]}"} tests "$@"
if [ $# -eq 0 ] && [ "${ST_FAST_OLD_ST:-}" != none ]; then
  st_fast_phase "older sentence-transformers"
  bash scripts/test_stock_versions.sh
fi
