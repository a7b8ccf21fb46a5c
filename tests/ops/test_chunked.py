"""The chunk loop of the chunked drivers (st_fast/ops/chunked.py): chunk sizes within the memory budget and the row
chunks that cover the local rows in order."""

from __future__ import annotations

import pytest
import torch

from st_fast.ops.chunked import RowChunk, chunk_rows_for_budget, row_chunks


@pytest.mark.parametrize(
    "batch, budget_rows, expected",
    [(32768, 10922, 8192), (16384, 21845, 16384), (100, 7, 7), (20, 9, 8), (1, 5, 1), (24, 24, 24), (25, 24, 16)],
)
def test_chunks_are_balanced_within_the_budget(batch, budget_rows, expected):
    columns = 1000
    rows = chunk_rows_for_budget(batch, columns, torch.device("cpu"), budget_rows * 6 * columns, bytes_per_score=6)
    assert rows == expected
    assert rows <= budget_rows and -(-batch // rows) == -(-batch // budget_rows)  # as few chunks as the budget allows


@pytest.mark.parametrize("batch, chunk, offset", [(1, 1, 0), (10, 4, 0), (10, 4, 7), (8, 8, 3), (8, 100, 2)])
def test_row_chunks_cover_the_local_rows_in_order(batch, chunk, offset):
    chunks = list(row_chunks(batch, chunk, offset))
    local = [row for c in chunks for row in range(batch)[c.local]]
    global_rows = [row for c in chunks for row in range(offset + batch)[c.global_rows]]
    assert local == list(range(batch))
    assert global_rows == list(range(offset, offset + batch))
    assert [c.start for c in chunks] == [offset + c.begin for c in chunks]
    assert all(1 <= c.size <= chunk for c in chunks) and all(c.size == chunk for c in chunks[:-1])


def test_a_row_chunk_names_its_rows():
    rows = RowChunk(begin=4, size=3, row_offset=10)
    assert (rows.local, rows.global_rows, rows.start) == (slice(4, 7), slice(14, 17), 14)
