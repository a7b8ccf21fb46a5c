"""The test-only native extension ``st_fast._C_test`` (csrc/testing/): built only for the test environment
(``ST_FAST_TEST_EXTENSIONS=1``, which scripts/env.sh sets for the `test` extras), never shipped. Not a test module."""

from __future__ import annotations

from types import ModuleType

from st_fast import _native

TEST_EXTENSION = "st_fast._C_test"


def load_test_extension() -> ModuleType:
    """``st_fast._C_test``, checked like the shipped extensions (its boundary codes agree with st_fast._native);
    a missing build is an error, not a skip: the tests that use it are the only CPU coverage of the CUDA build's lane
    algorithm."""
    ext, error = _native._try_import(TEST_EXTENSION)
    if ext is None:
        raise RuntimeError(
            f"{TEST_EXTENSION} is not available ({error}). It is built for the tests only: "
            "`ST_FAST_TEST_EXTENSIONS=1 pip install --no-build-isolation -e .`, or `source scripts/env.sh` (which does "
            "that for the `test` extras)."
        )
    return ext
