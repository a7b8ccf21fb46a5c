"""The sampler core's native boundary (csrc/sampler.cpp): its cells are read zero-copy from Arrow buffers, whose raw
addresses :func:`add_arrow_chunks` hands to ``NoDupSamplerCore.add_chunk``."""

from __future__ import annotations

from typing import Any


def add_arrow_chunks(core: Any, column: int, chunked: Any) -> None:
    """Append every chunk of the pyarrow ChunkedArray ``chunked`` (string, large_string, binary or large_binary) to
    column ``column`` of a ``NoDupSamplerCore``: raw buffer addresses, with each chunk handed to the core as the owner
    that keeps its buffers alive."""
    import pyarrow as pa

    for chunk in chunked.chunks:
        if len(chunk) == 0:
            continue
        large = pa.types.is_large_string(chunk.type) or pa.types.is_large_binary(chunk.type)
        if not (large or pa.types.is_string(chunk.type) or pa.types.is_binary(chunk.type)):
            raise TypeError(f"unsupported Arrow type {chunk.type}")
        validity, offsets, data = chunk.buffers()
        all_null = chunk.null_count == len(chunk)
        core.add_chunk(
            column,
            validity.address if (validity is not None and chunk.null_count > 0) else 0,
            offsets.address if offsets is not None else 0,
            data.address if data is not None else 0,
            chunk.offset,
            len(chunk),
            large,
            all_null,
            chunk,
        )
