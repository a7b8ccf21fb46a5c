#!/usr/bin/env bash
# One-shot check on a GPU machine (no network): build st_fast with its CUDA extension, run the GPU tests, run the
# loss benchmarks at --gpu sizes and a small sampler benchmark (GPU_CHECK_SAMPLER=0 skips it), then print one summary.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Every step runs under `timeout`, logs to OUT_DIR/logs/<step>.log and is recorded as PASS / FAIL(rc) / TIMEOUT /
# SKIP in OUT_DIR/status.txt; a failed step never stops the later ones. The step limits are cut to a total budget
# (GPU_CHECK_BUDGET_S, default 450 s) so that the whole script ends inside 8 minutes on an H100. Results:
# OUT_DIR/summary.md (also printed last), OUT_DIR/bench/*.{md,json}, OUT_DIR/junit_gpu.xml.
# PYTHON picks the interpreter (default: python3, the one that holds the CUDA torch).
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT/logs" "$OUT/bench"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
DEADLINE=$((SECONDS + BUDGET))
STATUS="$OUT/status.txt"
: >"$STATUS"

# Triton compiles for the GPU here: never the CPU interpreter (tests/conftest.py only sets it when unset)
export TRITON_INTERPRET=0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# step NAME MAX_SECONDS COMMAND: run COMMAND (a bash string) with a limit of min(MAX_SECONDS, time left - 20 s)
step() {
    local name=$1 max=$2 cmd=$3 left limit rc start verdict
    left=$((DEADLINE - SECONDS - 20))
    limit=$((max < left ? max : left))
    if ((limit < 15)); then
        printf '%-14s SKIP (no time left in the %ss budget)\n' "$name" "$BUDGET" | tee -a "$STATUS"
        return 0
    fi
    echo ">>> [$name] (limit ${limit}s) $cmd"
    start=$SECONDS
    timeout -k 10 "$limit" bash -c "$cmd" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) verdict=PASS ;;
        124 | 137) verdict="TIMEOUT (${limit}s)" ;;
        *) verdict="FAIL (rc $rc)" ;;
    esac
    printf '%-14s %-18s %4ss  logs/%s.log\n' "$name" "$verdict" "$((SECONDS - start))" "$name" | tee -a "$STATUS"
    if ((rc != 0)); then tail -n 15 "$OUT/logs/$name.log" | sed 's/^/    /'; fi
    return 0
}

# (0) the machine
step machine 30 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -n 2;
    $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())';
    $PY -c 'import triton; print(\"triton\", triton.__version__)'; $PY -c 'import sentence_transformers as s; print(\"sentence-transformers\", s.__version__)'"

# (a) build st_fast with the CUDA extension (editable; in-place build_ext as the fallback), then what it has
step build 200 "ST_FAST_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . ||
    { echo '--- pip editable install failed: python setup.py build_ext --inplace'; ST_FAST_CUDA=1 $PY setup.py build_ext --inplace; }"
step native_info 30 "$PY -c 'import json, st_fast; info = st_fast.native_info(); print(json.dumps(info, indent=1, default=str));
assert info[\"cpu_extension\"] and info[\"cuda_extension\"], \"an extension did not build/import\"'"

# (b) benchmarks at --gpu sizes (the fused MNRL table first: it is what a short budget must not lose), each part in
# its own process, so one failure or timeout keeps the others' tables
step bench_fused 110 "$PY -m benchmarks fused_loss --gpu --repeats 3 --out '$OUT/bench'"

# (c) the GPU tests (every test marked gpu, the CUDA parity tests included), with a JUnit report
step gpu_tests 150 "$PY -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors -rfEs \
    --junitxml='$OUT/junit_gpu.xml'"

step bench_cached 90 "$PY -m benchmarks cached_loss --gpu --repeats 3 --out '$OUT/bench'"
if [ "${GPU_CHECK_SAMPLER:-1}" = 0 ]; then
    printf '%-14s SKIP (GPU_CHECK_SAMPLER=0)\n' bench_sampler | tee -a "$STATUS"
elif $PY -c 'import datasets' >/dev/null 2>&1; then
    # CPU work: small sizes only
    step bench_sampler 60 "$PY -m benchmarks sampler --gpu --repeats 3 --sampler-rows 100000 \
        --sampler-batch-sizes 128 8192 --sampler-no-memory --out '$OUT/bench'"
else
    printf '%-14s SKIP (the datasets package is not installed here; carry its wheel to run it)\n' bench_sampler |
        tee -a "$STATUS"
fi

# (d) one summary: the benchmark tables, then the pass/fail lines
{
    echo "# st_fast GPU check ($(date -u +%Y-%m-%dT%H:%MZ), ${SECONDS}s)"
    echo
    for part in fused_loss cached_loss sampler; do
        if [ -f "$OUT/bench/$part.md" ]; then cat "$OUT/bench/$part.md"; else echo "## $part: no table (see status)"; fi
        echo
    done
    echo "## native_info"
    echo
    grep -E '"(cpu_extension|cuda_extension|triton|cuda_devices_seen_by_extension)' "$OUT/logs/native_info.log" 2>/dev/null |
        sed 's/^ */    /'
    echo
    echo "## GPU tests"
    echo
    grep -E '^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|error|skipped|deselected)' "$OUT/logs/gpu_tests.log" 2>/dev/null |
        tail -n 30 | sed 's/^/    /'
    echo
    echo "## Steps"
    echo
    sed 's/^/    /' "$STATUS"
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
