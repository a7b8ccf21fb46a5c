#!/usr/bin/env bash
# The tests where supported sentence-transformers versions differ, again under older supported releases (the main
# pass of scripts/test.sh runs under the pinned newest one, scripts/test-constraints.txt): 6.2.0, then 6.0.1 (the
# oldest supported; what the GPU machine has). Run after scripts/test.sh set up .venv. Each version is installed
# without its dependencies (the rest of .venv serves all of them) into .venv/st-<version>, put first on PYTHONPATH;
# tests/test_compat.py checks that the tests really imported it (ST_FAST_EXPECT_ST_VERSION).
#
# ST_FAST_OLD_ST: the versions, space-separated (default "6.2.0 6.0.1"), or `none` to run nothing. Extra arguments
# go to pytest. Every version runs even when an earlier one fails; the exit status is 1 if any failed. pytest runs
# as in scripts/test.sh: ST_FAST_TEST_WORKERS pytest-xdist workers (default 2; 0: one process; one process too when
# .venv has no pytest-xdist), OMP_WAIT_POLICY=PASSIVE unless set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The version-sensitive test files: the one list to extend. A listed file that does not exist (yet) is skipped.
VERSION_SENSITIVE_TESTS=(
  tests/test_compat.py
  tests/test_sampler.py
  tests/test_trainer.py
  tests/test_drop_in_contract.py
  tests/losses/test_self_check.py
  tests/test_stock_6_3.py
  tests/losses/test_gist_embed.py
  tests/losses/test_cached_gist_embed.py
  tests/losses/test_gist_self_negatives.py
  tests/losses/test_mask_duplicates_losses.py
  tests/losses/test_mask_duplicates_ddp.py
  tests/ops/test_maxsim.py
  tests/losses/test_multi_vector_losses.py
)

versions="${ST_FAST_OLD_ST:-6.2.0 6.0.1}"
if [ "$versions" = none ]; then
  echo "[st_fast] ST_FAST_OLD_ST=none: no tests under older sentence-transformers"
  exit 0
fi
files=()
for file in "${VERSION_SENSITIVE_TESTS[@]}"; do
  if [ -e "$file" ]; then files+=("$file"); else echo "[st_fast] $file does not exist: not run"; fi
done
if [ ${#files[@]} -eq 0 ]; then  # pytest without files would run the whole suite
  echo "[st_fast] none of the version-sensitive test files exists" >&2
  exit 1
fi

export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
xdist=()
if [ "${ST_FAST_TEST_WORKERS:-2}" != 0 ] && .venv/bin/python -c "import xdist" >/dev/null 2>&1; then
  xdist=(-n "${ST_FAST_TEST_WORKERS:-2}" --dist loadfile)
fi
failed=()
for version in $versions; do
  target=".venv/st-$version"
  if [ ! -d "$target/sentence_transformers" ]; then
    .venv/bin/python -m pip install --quiet --no-deps --target "$target" "sentence-transformers==$version"
  fi
  echo "[st_fast] version-sensitive tests under sentence-transformers $version (${#files[@]} files)"
  start=$SECONDS
  if PYTHONPATH="$PWD/$target" ST_FAST_EXPECT_ST_VERSION="$version" TRITON_INTERPRET=1 \
    .venv/bin/python -m pytest -q ${xdist[@]+"${xdist[@]}"} "${files[@]}" "$@"; then
    echo "[st_fast] sentence-transformers $version: passed in $((SECONDS - start)) s"
  else
    echo "[st_fast] sentence-transformers $version: FAILED after $((SECONDS - start)) s"
    failed+=("$version")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "[st_fast] version-sensitive tests failed under sentence-transformers ${failed[*]}"
  exit 1
fi
