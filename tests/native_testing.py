"""The test-only native extension ``st_fast._C_test`` (csrc/testing/): built only for the test environment
(``ST_FAST_TEST_EXTENSIONS=1``, which scripts/env.sh sets for the `test` extras), never shipped. Not a test module."""

from __future__ import annotations

import contextlib
from types import ModuleType

import pytest

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


@contextlib.contextmanager
def emulated_lanes(lanes: int):
    """Within the block, st_fast._native's CPU row-kernel entry points run the emulated CUDA build with ``lanes``
    threads per row (the validated wrappers unchanged), and the chunked driver takes the CUDA path: not the CPU
    build's fixed-shift form of the symmetric passes (st_fast.ops.mnrl.chunked.fixed_shift, CPU only)."""
    from st_fast.ops.mnrl import chunked as mnrl_chunked

    emulated = getattr(load_test_extension(), f"emulated_lanes_{lanes}")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_native, "require_cpu_ext", lambda: emulated)
        patch.setattr(mnrl_chunked, "fixed_shift", lambda ops, problem, row_kernel: None)
        yield
