#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh needs on the GPU machine and that its image lacks, into the
# folder .whl/ (git-ignored through .git/info/exclude): the public anchors of the fused-loss benchmark and the
# public MaxSim kernels of the maxsim benchmark (py3-none-any Triton wheels, about 0.2 MB), `datasets`
# with the two packages of it that the image does not hold, and a setuptools new enough to build st_fast. The GPU
# machine has Python 3.12 and no network; the device tool carries .whl (64 MiB at most: these are about 3 MB).
#
#   bash scripts/gpu_wheels.sh            # then: device run 'bash benchmarks/gpu_check.sh "$OUT"', carry ['.whl']
#
# Not carried: nvidia-cutlass-dsl (Liger's SM90 fused scaled cross-entropy needs it; its CUDA 13 libraries are
# a 92 MB wheel, over the carry limit), so that anchor reports itself unavailable there; fast-maxsim (a CPU
# kernel: the --gpu run has no CPU case for it; its cp312 wheel is manylinux_2_34).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
# name==version pins checked against the GPU image (Python 3.12, torch 2.11, Triton 3.6, pyarrow/pandas/xxhash there)
WHEELS=(
    inf-cl==1.2.1
    cut-cross-entropy==25.1.1
    liger-kernel==0.8.5
    flash-maxsim==0.3.0              # needs torch>=2.0, triton>=3.4 (the image has 3.6)
    late-interaction-kernels==0.4.5  # needs torch>=2.5, triton>=3.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    setuptools==80.9.0  # pyproject's SPDX license string needs setuptools>=77 to build; the image's may be older
)
EXCLUDE=.git/info/exclude
if [ -d .git ] && ! grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null; then
    mkdir -p "$(dirname "$EXCLUDE")"
    echo '/.whl/' >>"$EXCLUDE"
fi
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "${WHEELS[@]}"
ls -la .whl
du -sh .whl
