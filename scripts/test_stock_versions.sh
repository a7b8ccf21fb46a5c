#!/usr/bin/env bash
# The tests where supported sentence-transformers versions differ, again under the oldest supported one (6.0.1: what
# the GPU machine has), after scripts/test.sh set up .venv. That version is installed without its dependencies
# (the rest of .venv serves both) into .venv/st-<version>, put first on PYTHONPATH; test_compat checks that the
# tests really imported it. ST_FAST_OLD_ST overrides the version; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="${ST_FAST_OLD_ST:-6.0.1}"
target=".venv/st-$version"
if [ ! -d "$target/sentence_transformers" ]; then
  .venv/bin/python -m pip install --quiet --no-deps --target "$target" "sentence-transformers==$version"
fi
echo "[st_fast] version-sensitive tests under sentence-transformers $version"
PYTHONPATH="$PWD/$target" ST_FAST_EXPECT_ST_VERSION="$version" TRITON_INTERPRET=1 .venv/bin/python -m pytest -q \
  tests/test_compat.py tests/test_sampler.py tests/test_trainer.py tests/test_drop_in_contract.py \
  tests/losses/test_gist_embed.py tests/losses/test_cached_gist_embed.py \
  tests/losses/test_mask_duplicates_losses.py tests/losses/test_mask_duplicates_ddp.py "$@"
