"""The CUDA build's lane algorithm, run on the CPU.

The CUDA row kernels (csrc/cuda/contrastive_row.cu) run csrc/include/st_fast/row_kernel_lanes.h with WarpLanes: 32
lanes per row, the online max / sum and the interleaved column loops, butterfly reductions. The CPU build takes the
contiguous range loops instead (SerialLanes, row_kernel_ranges.h), so the CPU tests of the row kernel never reach
that code. The test-only extension st_fast._C_test (csrc/testing/emulated_lanes.cpp, tests/native_testing.py; never
shipped) has submodules ``emulated_lanes_<N>`` that run exactly that template code on the CPU with ThreadLanes
(csrc/include/st_fast/thread_lanes.h: one thread per lane, the CUDA build's reduction order through shared slots and
a barrier) and the CUDA build's column statistics (one worker per column): 32 lanes as a warp (WarpLanes), 4 lanes
for more columns per lane (the unrolled four-load loop at these widths), 64 and 256 lanes as a block per row
(BlockLanes, csrc/cuda/block_lanes.cuh: warps combined through shared memory; 256 is the CUDA block, 8x slower to
emulate than 64, so it runs a subset of the cases).

Each test here re-runs a shared case of the SerialLanes build's tests (tests/row_kernel_cases.py: same cases, same
tolerances, same references: the PyTorch row kernel in float64 or stock) with the native entry points swapped for an
emulated build (:func:`emulated_lanes`): the one-pass kernel, the symmetric path's statistics and coefficient
passes, and the chunked driver end to end. exp differs from the GPU's (row_expf is the CPU polynomial here, expf on
CUDA: both within 2 ulp, tests/test_row_expf.py); everything else is the CUDA build's arithmetic in its order.
"""

from __future__ import annotations

import contextlib

import pytest
import row_kernel_cases as shared
import torch
from native_testing import emulated_lanes
from row_kernel_cases import cases

from st_fast.ops.backends import ChunkedBackend

LANES = [32, 4, 64]  # every case
BLOCK_LANES = 256  # the CUDA build's block per row: the cases marked below


def test_the_emulation_runs_the_lane_algorithm():
    """The emulated builds are other code than the shipped one: with more than one lane per row the online max / sum
    and the butterfly reductions add up in another order than SerialLanes' range loops, so over 64 rows of 2000
    columns some row's loss differs in its last bits (seeded: the same rows every run), while all agree to 1e-6."""
    from st_fast.ops.mnrl.spec import ContrastiveSpec
    from st_fast.ops.row_kernel_native import native_row_kernel

    spec = ContrastiveSpec.from_loss_config(scale=20.0)
    scores = [torch.rand(64, 2000, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    losses = {}
    for build in ("serial", *LANES):
        with contextlib.nullcontext() if build == "serial" else emulated_lanes(build):
            losses[build] = native_row_kernel(scores, spec, 0, 2000, None)
    for lanes in LANES:
        torch.testing.assert_close(losses[lanes], losses["serial"], rtol=1e-6, atol=1e-6)
        assert not torch.equal(losses[lanes], losses["serial"])


@pytest.mark.parametrize("lanes", LANES)
@cases(shared.ONE_PASS_GRID)
def test_one_pass_kernel_matches_the_torch_row_kernel(lanes, coefficient_dtype, hardness, rows, width, layout):
    with emulated_lanes(lanes):
        shared.one_pass_kernel_matches_the_torch_row_kernel(coefficient_dtype, hardness, rows, width, layout)


@pytest.mark.parametrize("lanes", [*LANES, BLOCK_LANES])
@pytest.mark.parametrize("layout", shared.ROW_KERNEL_LAYOUTS)
def test_one_pass_kernel_on_rows_wider_than_four_loads_per_lane(lanes, layout):
    """Rows of 3·131 columns: 32 lanes take the unrolled four-load loop too; 256 lanes, some idle."""
    with emulated_lanes(lanes):
        shared.one_pass_kernel_matches_the_torch_row_kernel(torch.float16, "hard_negatives", 3, 131, layout)


@pytest.mark.parametrize("lanes", [*LANES, BLOCK_LANES])
@cases(shared.SINGLE_COLUMN_GRID)
def test_single_column_coefficients_are_exactly_zero(lanes, coefficient_dtype, with_scales, directions):
    with emulated_lanes(lanes):
        shared.single_column_coefficients_are_exactly_zero("native", coefficient_dtype, with_scales, directions)


@pytest.mark.parametrize("lanes", LANES)
@cases(shared.TWO_PASS_GRID)
def test_two_passes_match_the_torch_reference(lanes, directions, partition, hardness, with_scales):
    with emulated_lanes(lanes):
        shared.two_passes_match_the_torch_reference("cpu", directions, partition, hardness, with_scales)


@pytest.mark.parametrize("lanes", LANES)
@cases(shared.DRIVER_GRID)
def test_symmetric_driver_matches_the_one_pass_driver(monkeypatch, lanes, directions, partition, hardness, offset,
                                                      batch, width):  # fmt: skip
    with emulated_lanes(lanes):
        shared.kept_and_recomputed_tiles_match_the_one_pass_driver(
            monkeypatch, "native", directions, partition, hardness, offset, batch, width
        )


@pytest.mark.parametrize("lanes", [32])
@cases(shared.STOCK_16BIT_GRID)
def test_16bit_path_matches_stock(monkeypatch, lanes, dtype, similarity, config, batch, dim, columns):
    """The CUDA default end to end (raw 16-bit operands, float16 coefficients) against stock."""
    monkeypatch.setattr(ChunkedBackend, "takes_raw_operands", lambda self, dtype, device: dtype in shared.HALF_DTYPES)
    with emulated_lanes(lanes):
        shared.sixteen_bit_path_matches_stock("native", dtype, similarity, config, batch, dim, columns)


@pytest.mark.parametrize("partition, hardness", [("per_direction", None), ("joint", "all_negatives")])
def test_block_lanes_two_passes_and_driver(monkeypatch, partition, hardness):
    """256 lanes (the CUDA block per row): the symmetric path's two passes and the driver, on a subset of the cases
    above (its emulation is 8x slower than 64 lanes')."""
    directions = shared.SYMMETRIC if partition == "per_direction" else shared.ALL_FOUR
    with emulated_lanes(BLOCK_LANES):
        shared.two_passes_match_the_torch_reference("cpu", directions, partition, hardness, True)
        shared.kept_and_recomputed_tiles_match_the_one_pass_driver(
            monkeypatch, "native", directions, partition, hardness, 5, 9, 19
        )
