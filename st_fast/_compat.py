"""Every private name of sentence-transformers and datasets that st_fast reads, each behind one small accessor here
with the upstream versions it was checked against; everything else comes through public APIs (``Dataset.format``,
``Dataset.data``, ...). tests/test_compat.py checks each accessor, and that each private name exists, against the
installed versions (run it under sentence-transformers 6.0.x and 6.2.x).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from sentence_transformers.base import sampler as _st_sampler

# sentence_transformers.base.sampler._sample_value_str: the canonical string of one value of a row, what the stock
# NoDuplicatesBatchSampler compares (so 1 equals "1"). Same code in sentence-transformers 6.0.1 and 6.2.0.
sample_value_str: Callable[[Any], str] = _st_sampler._sample_value_str


def excluded_dataset_columns() -> frozenset[str]:
    """The columns the stock NoDuplicatesBatchSampler ignores (``sentence_transformers.base.sampler.
    _EXCLUDE_DATASET_COLUMNS``: {"dataset_name"} in sentence-transformers 6.0.1 and 6.2.0)."""
    return frozenset(_st_sampler._EXCLUDE_DATASET_COLUMNS)


def resample_passes() -> int | None:
    """How many extra shuffled passes the stock NoDuplicatesBatchSampler runs when a pass yields fewer batches than
    ``len()`` (logging a warning), or None where it runs only the one pass and logs nothing.

    ``sentence_transformers.base.sampler._MAX_RESAMPLE_PASSES``: 2 in sentence-transformers 6.2.0; 6.0.1 has neither
    the name nor the resampling. Read at each call, as the stock ``__iter__`` does.
    """
    return getattr(_st_sampler, "_MAX_RESAMPLE_PASSES", None)


def stock_sampler_state() -> tuple:
    """The module-level names the stock NoDuplicatesBatchSampler reads at call time (``_sample_value_str``,
    ``_EXCLUDE_DATASET_COLUMNS``, ``_MAX_RESAMPLE_PASSES``; None where a version lacks one), as they are now: part of
    the key under which st_fast's sampler self-check remembers its verdict, so that a changed name is checked again."""
    excluded = getattr(_st_sampler, "_EXCLUDE_DATASET_COLUMNS", None)
    return (
        getattr(_st_sampler, "_sample_value_str", None),
        frozenset(excluded) if excluded is not None else None,
        getattr(_st_sampler, "_MAX_RESAMPLE_PASSES", None),
    )


def installed_version() -> str:
    """The installed sentence-transformers version (``sentence_transformers.__version__``)."""
    import sentence_transformers

    return str(getattr(sentence_transformers, "__version__", "unknown"))


def dataset_fingerprint(dataset: Any) -> str | None:
    """The fingerprint ``datasets`` keeps for a ``Dataset``'s content and the transforms that made it (``Dataset.
    _fingerprint``: datasets 5.2.0; None where absent). Part of the sampler self-check's key."""
    return getattr(dataset, "_fingerprint", None)


def dataset_indices(dataset: Any) -> np.ndarray | None:
    """The logical -> physical row mapping of a ``datasets.Dataset`` left by ``select`` / ``shuffle`` / ``filter``
    (int64, one entry per row; a view of the Arrow buffer where possible), or None when rows are physical.

    ``Dataset._indices`` (a one-column Arrow table of uint64, or None): datasets 5.2.0. No public API exposes the
    mapping without copying the dataset (``flatten_indices``).
    """
    indices = dataset._indices
    if indices is None:
        return None
    return indices.column(0).to_numpy().astype(np.int64, copy=False)
