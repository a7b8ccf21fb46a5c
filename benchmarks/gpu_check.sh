#!/usr/bin/env bash
# The GPU check: everything a session lent a GPU measures, in one command that fits a 15-minute lease.
#
#   bash benchmarks/gpu_check.sh [--smoke] [--budget SECONDS] OUT_DIR
#
# From a development machine (the GPU machine has no network, so the anchors' and `datasets`' wheels travel along):
#   bash scripts/gpu_wheels.sh            # once: downloads them into .whl/ (git-ignored through .git/info/exclude)
#   device run: command 'bash benchmarks/gpu_check.sh "$OUT"', carry ['.whl'], timeout_s 600
#
# Steps, in order, with their time limits at the default budget of 500 s (a fresh H200: 16 cores, no warm caches):
#   machine       30 s  GPU, driver, nvcc, python, torch, triton, sentence-transformers
#   wheels        45 s  pip install .whl/*.whl into a private --target folder (only when .whl/ holds wheels)
#   build        150 s  ST_FAST_CUDA=1 ST_FAST_CUDA_ARCHS=<this GPU's> pip install -e . (both extensions)
#   native_info   20 s  both extensions import
#   fused         *90 s python -m benchmarks fused_loss --gpu --anchors: stock, st_fast backends, public anchors,
#                       float64 reference (B 1024..65536, D 384/768/1024, fp32/bf16)
#   gpu_tests    110 s  pytest -m gpu (CUDA parity tests)
#   training      *80 s python -m benchmarks training --gpu: stock vs st_fast trainer end to end
#   cached        *30 s python -m benchmarks cached_loss --gpu
#   gist          *20 s python -m benchmarks gist --gpu
#   maxsim        *90 s python -m benchmarks maxsim --gpu: the MaxSim scores, loss and cached stages (multi-vector:
#                       stock, st_fast's torch / native (CUDA) / triton backends and the public MaxSim kernels
#                       flash-maxsim and late-interaction-kernels, which autotune on first use; their wheels come
#                       from scripts/gpu_wheels.sh)
#   sampler       *15 s python -m benchmarks sampler (CPU work, 100k rows)
# The limits are maxima: every step also ends by the total deadline (--budget SECONDS, default 500, so the script
# ends inside 9 minutes), and one with under 15 s left is skipped. Typical times are far below the maxima (the build
# about 60-90 s for one architecture on 16 cores). The starred steps are benchmarks: the budget scales their limits
# (by budget / 500), and each part gets --budget-s = its limit - 25 s, so that it runs its cases smallest first and
# drops the largest ones that would not fit instead of being killed. Every step runs under `timeout` and is recorded
# as PASS / FAIL (rc) / TIMEOUT / SKIP; a failed step never stops the later ones.
#
# --smoke: the same steps on a CPU machine at the parts' --smoke sizes (Triton in the interpreter, anchors reported
# as unavailable), the build skipped (the caller's environment has st_fast installed; GPU_CHECK_BUILD=1 builds
# anyway), each step's limit tripled (it checks that the steps work, not their speed, on a shared CPU where the
# imports alone take 15-20 s). CI runs it (tests/bench/test_gpu_check.py) so that this script cannot rot.
#
# Results in OUT_DIR (at most three files, so that all of them come back from the device tool):
#   summary.md     machine, versions, date, the step table, every benchmark table, GPU test counts and failures
#   summary.json   the same as data: {"machine", "steps", "parts": {part: rows}, "gpu_tests", ...}
#   details.tar.gz logs/<step>.log, bench/<part>.{md,json,png}, junit_gpu.xml
# The working files stay in GPU_CHECK_WORK (default: a temporary folder). PYTHON picks the interpreter (default
# python3, the one that holds the CUDA torch on the GPU machine).
set -uo pipefail

SMOKE=0
BUDGET=${GPU_CHECK_BUDGET_S:-500}
while (($#)); do
    case $1 in
        --smoke) SMOKE=1 ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        --budget=*) BUDGET=${1#--budget=} ;;
        -h | --help) sed -n '2,36p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
    shift
done
OUT=${1:?usage: bash benchmarks/gpu_check.sh [--smoke] [--budget SECONDS] OUT_DIR}
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || ((BUDGET < 60)); then
    echo "gpu_check.sh: --budget must be a whole number of seconds >= 60 (got $BUDGET)" >&2
    exit 2
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${GPU_CHECK_WORK:-$(mktemp -d -t st_fast_gpu_check.XXXXXX)}
mkdir -p "$WORK/logs" "$WORK/bench"
WORK=$(cd "$WORK" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
DEADLINE=$((SECONDS + BUDGET))
STATUS="$WORK/status.tsv"
: >"$STATUS"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg
if ((SMOKE)); then
    SIZE=--smoke
    export TRITON_INTERPRET=1
else
    SIZE=--gpu
    export TRITON_INTERPRET=0 # Triton compiles for the GPU here (tests/conftest.py only sets it when unset)
fi

# bench_limit MAX: a benchmark step's limit at this budget (MAX at the default 500 s)
bench_limit() { echo $(($1 * BUDGET / 500)); }

# step NAME MAX_SECONDS COMMAND: run COMMAND (a bash string; $LIMIT holds its limit) under timeout
step() {
    local name=$1 max=$2 cmd=$3 left limit rc start verdict
    if ((SMOKE)); then max=$((max * 3)); fi # a shared CPU (load 5-8) imports torch alone in 15-20 s: limits x3
    left=$((DEADLINE - SECONDS - 10))
    limit=$((max < left ? max : left))
    if ((limit < 15)); then
        printf '%s\tSKIP (under 15 s for it in the %s s budget)\t0\n' "$name" "$BUDGET" >>"$STATUS"
        echo "--- [$name] skipped: under 15 s for it in the budget"
        return 0
    fi
    echo ">>> [$name] (limit ${limit}s)"
    start=$SECONDS
    LIMIT=$limit timeout -k 10 "$limit" bash -c "$cmd" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    case $rc in
        0) verdict=PASS ;;
        124 | 137) verdict="TIMEOUT (${limit} s)" ;;
        *) verdict="FAIL (rc $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$verdict" "$((SECONDS - start))" >>"$STATUS"
    echo "    $verdict in $((SECONDS - start))s (logs/$name.log)"
    if ((rc != 0)); then tail -n 15 "$WORK/logs/$name.log" | sed 's/^/    /'; fi
    return 0
}
skip() { printf '%s\tSKIP (%s)\t0\n' "$1" "$2" >>"$STATUS"; echo "--- [$1] skipped: $2"; }

# bench NAME MAX PART ARGS...: one benchmark part in its own process, with --budget-s = limit - 25 s
bench() {
    local name=$1 max=$2
    shift 2
    step "$name" "$(bench_limit "$max")" "'$PY' -m benchmarks $* $SIZE --repeats 3 --out '$WORK/bench' \
        --budget-s \$((LIMIT > 50 ? LIMIT - 25 : LIMIT / 2))"
}

step machine 30 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo 'no nvidia-smi';
    nvcc --version 2>&1 | tail -n 2; uname -srm; nproc;
    '$PY' -c 'import sys, torch; print(sys.version.split()[0], \"torch\", torch.__version__, torch.version.cuda,
        torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")';
    '$PY' -c 'import triton; print(\"triton\", triton.__version__)';
    '$PY' -c 'import sentence_transformers as s, transformers as t; print(\"sentence-transformers\", s.__version__,
        \"transformers\", t.__version__)'"

# the wheels that travel with the working tree (scripts/gpu_wheels.sh): into a private folder ahead of the image's
if ((SMOKE)); then
    skip wheels "smoke: the environment's own packages"
elif compgen -G ".whl/*.whl" >/dev/null; then
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    step wheels 45 "'$PY' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target '$WORK/site' .whl/*.whl && ls '$WORK/site'"
else
    skip wheels "no .whl/*.whl: run scripts/gpu_wheels.sh and carry .whl for the anchors and datasets"
fi

if ((SMOKE)) && [ "${GPU_CHECK_BUILD:-0}" != 1 ]; then
    skip build "smoke: st_fast is already installed in this environment"
else
    ARCH=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>/dev/null || true)
    step build 150 "ST_FAST_CUDA=1 ST_FAST_CUDA_ARCHS='$ARCH' '$PY' -m pip install --no-build-isolation --no-deps -e . ||
        { echo '--- pip editable install failed: setup.py build_ext --inplace';
          ST_FAST_CUDA=1 ST_FAST_CUDA_ARCHS='$ARCH' '$PY' setup.py build_ext --inplace; }"
fi
step native_info 20 "'$PY' -c 'import json, st_fast; info = st_fast.native_info(); print(json.dumps(info, indent=1, \
default=str)); assert info[\"cpu_extension\"], \"no CPU extension\"; assert $SMOKE or info[\"cuda_extension\"], \"no CUDA extension\"'"

bench fused 90 fused_loss --anchors
step gpu_tests 110 "'$PY' -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors -rfEs \
    --junitxml='$WORK/junit_gpu.xml'"
bench training 80 training
bench cached 30 cached_loss
bench gist 20 gist
bench maxsim 90 maxsim
if ((SMOKE)); then
    bench sampler 15 sampler
elif "$PY" -c 'import datasets' >/dev/null 2>&1; then
    bench sampler 15 sampler --sampler-rows 100000 --sampler-batch-sizes 128 8192 --sampler-no-memory
else
    skip sampler "the datasets package is not importable: carry its wheels (scripts/gpu_wheels.sh)"
fi

"$PY" -m benchmarks.summarize "$WORK" "$OUT" --budget "$BUDGET" --elapsed "$SECONDS" --mode "${SIZE#--}" ||
    echo "!!! summarize failed: the raw results are in $WORK" >&2
tar -czf "$OUT/details.tar.gz" -C "$WORK" logs bench status.tsv $(cd "$WORK" && ls junit_gpu.xml 2>/dev/null)
echo
cat "$OUT/summary.md" 2>/dev/null
