#!/usr/bin/env bash
# The full test suite on a CPU-only machine: set up .venv (scripts/env.sh: sentence-transformers pinned by
# scripts/test-constraints.txt), build (with the CUDA extension whenever nvcc is present, so a broken .cu fails
# here), lint, then pytest with Triton kernels in the CPU interpreter; then, when called without pytest arguments,
# the version-sensitive tests again under older supported sentence-transformers releases
# (scripts/test_stock_versions.sh; ST_FAST_OLD_ST=none skips it). A failed test pass does not stop the later ones
# (the exit status is 1 if any failed); a failed set-up or lint stops the run. Ends with its wall time, each phase's,
# and the load average at the start and the end, whether it passes or fails.
#
# pytest runs in ST_FAST_TEST_WORKERS pytest-xdist workers (default 2; 0 runs it in one process), a test file per
# worker at a time (--dist loadfile: a file's module fixtures are built once), and with OMP_WAIT_POLICY=PASSIVE
# (unless set): OpenMP threads that wait sleep instead of spinning, which on a busy 2-core machine made torch's
# two-thread steps several times slower (a real-model training test: 54 s spinning, 22 s passive). The files in
# ALONE_TESTS hold wall-time limits (benchmarks/gpu_check.sh --smoke gives its steps 15-20 s each): when the whole
# suite runs in workers, they run after it, in one process, so that the other worker does not eat their time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ALONE_TESTS=(tests/bench/test_gpu_check.py)

load_average() {
  if [ -r /proc/loadavg ]; then cut -d' ' -f1-3 /proc/loadavg; else uptime | sed 's/.*load averages*: *//'; fi
}
load_at_start="$(load_average)"
echo "[st_fast] test.sh: started $(date '+%Y-%m-%d %H:%M:%S'), load average $load_at_start on" \
  "$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo '?') cores"
phase="" phase_start=0 phases="" failed=""
start_phase() {  # ends the current phase (its duration goes into the summary) and starts the one named $1
  if [ -n "$phase" ]; then phases="$phases${phases:+, }$phase $((SECONDS - phase_start)) s"; fi
  phase="$1" phase_start=$SECONDS
}
run_tests() {  # runs a test pass; a failure is recorded and the run goes on
  if ! "$@"; then failed="$failed${failed:+, }$phase"; fi
}
summary() {
  local status=$? result=passed
  if [ -n "$failed" ]; then
    result="FAILED in $failed"
  elif [ "$status" -ne 0 ]; then
    result="FAILED in $phase (exit status $status)"
  fi
  start_phase ""
  echo "[st_fast] test.sh: $result; wall time $((SECONDS / 60)) min $((SECONDS % 60)) s ($phases);" \
    "load average $load_at_start at the start, $(load_average) at the end"
}
trap summary EXIT

start_phase set-up
if [ -z "${ST_FAST_CUDA:-}" ] && command -v nvcc >/dev/null 2>&1; then export ST_FAST_CUDA=1; fi
source scripts/env.sh
start_phase lint
python -m ruff check st_fast tests benchmarks examples scripts setup.py

start_phase pytest
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
xdist=() alone=()
if [ "${ST_FAST_TEST_WORKERS:-2}" != 0 ]; then
  xdist=(-n "${ST_FAST_TEST_WORKERS:-2}" --dist loadfile)
  if [ $# -eq 0 ]; then
    for file in "${ALONE_TESTS[@]}"; do
      if [ -e "$file" ]; then xdist+=("--ignore=$file"); alone+=("$file"); fi
    done
  fi
fi
run_tests env TRITON_INTERPRET=1 python -m pytest -q ${xdist[@]+"${xdist[@]}"} tests "$@"
if [ ${#alone[@]} -gt 0 ]; then
  start_phase "pytest alone"
  run_tests env TRITON_INTERPRET=1 python -m pytest -q "${alone[@]}"
fi
if [ $# -eq 0 ] && [ "${ST_FAST_OLD_ST:-}" != none ]; then
  start_phase "older sentence-transformers"
  run_tests bash scripts/test_stock_versions.sh
fi
if [ -n "$failed" ]; then exit 1; fi
