"""A duplicate-free batch sampler that yields exactly the batches of sentence-transformers' NoDuplicatesBatchSampler.

``st_fast.NoDuplicatesBatchSampler`` subclasses the stock class: same constructor, ``__len__``, ``set_epoch``,
generator handling (``seed + epoch`` reseeding, ``torch.randperm`` drawn at the same moments with the same dtype) and
resampling passes. Only the scan moves to C++ (``st_fast._C.NoDupSamplerCore``):

* every cell is keyed once per sampler (reused across epochs) by a 64-bit (wyhash-style) hash of its canonical string,
  and a hash match is always confirmed on the bytes, so a collision can never change a batch;
* ``string`` / ``large_string`` columns are read zero-copy from the dataset's Arrow buffers (every chunk; an indices
  mapping left by ``select``/``shuffle``/``filter`` is applied in C++); any other column goes through the stock
  ``_sample_value_str`` in Python (once, in blocks of rows) and its canonical strings are stored as an Arrow
  ``large_binary`` column, so that values compare across columns exactly as upstream (``1`` equals ``"1"``);
* datasets with a format or transform (other than the trainer's own ``dataset_name`` transform) are read row by row
  with ``dataset[i]``, exactly like the stock default mode, once per sampler.

Decisions follow the stock default mode (``set`` of canonical strings per row). The stock ``precompute_hashes=True``
mode makes the same decisions except on a true 64-bit XXH64 collision between different values, which it treats as
a duplicate; ``precompute_*`` arguments are accepted and ignored here.

Distributed training: accelerate wraps the batch sampler in ``BatchSamplerShard``, which has no ``set_epoch``, and its
``DataLoaderShard.set_epoch`` only reaches ``batch_sampler.batch_sampler.sampler``: for the stock sampler that is the
HF dataset (no ``set_epoch``), so under DDP every epoch repeats the batches of epoch 0. This sampler therefore sets its
``sampler`` attribute (unused by the stock code beyond torch's default ``BatchSampler`` methods, which are overridden)
to a small relay whose ``set_epoch`` forwards to the sampler. :func:`forward_set_epoch` applies the same relay to any
other sampler, e.g. the multi-dataset round-robin / proportional samplers, which have the same problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from sentence_transformers.base import sampler as _stock

from st_fast import _compat
from st_fast._native import add_arrow_chunks, require_cpu_ext

__all__ = ["NoDuplicatesBatchSampler", "forward_set_epoch"]

# Test hook: keep only this many low bits of every key, to force hash collisions (they must not change batches).
_HASH_BITS = 64
# Rows per block when canonicalizing non-string columns in Python.
_PY_BLOCK_ROWS = 4096
_STRING_DTYPES = ("string", "large_string")
# Batches are handed from C++ to Python in chunks of up to this many rows (at least one batch per chunk): large enough
# to amortize the call, small enough that the first batches of a pass come out early.
_CHUNK_ROWS = 1 << 14
# Yielded batch lists are left out of the cyclic garbage collector. They hold ints only, so they cannot be part of a
# reference cycle (unless a caller puts a container into one: such a cycle would then never be collected), and a
# caller that keeps an epoch's batches (``list(sampler)``) otherwise pays for every collection of the young generation
# that visits their million ints: about 20 of the 55 ms of a 1M-row, batch-128 epoch on the 2-core build machine.
# CPython untracks tuples and dicts of atomic values for the same reason.
_UNTRACK_BATCHES = True
# Passes over at least this many rows run on a background thread, so that the first batches are handed out while
# later ones are still being formed (the decisions are the same either way). 0 = always, None = never. It pays when
# a core is free (about -15 % per epoch at 1M rows on 2 cores), not on a saturated machine.
_BACKGROUND_MIN_ROWS: int | None = 1 << 16


class _EpochRelay:
    """Stands in for ``BatchSampler.sampler`` so that accelerate's ``DataLoaderShard.set_epoch`` reaches the sampler
    through ``BatchSamplerShard.batch_sampler.sampler``. Iterates like a SequentialSampler over the dataset."""

    def __init__(self, owner: Any, data_source: Any) -> None:
        self.owner = owner
        self.data_source = data_source

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.data_source)))


def forward_set_epoch(batch_sampler: Any) -> Any:
    """Make ``batch_sampler.set_epoch`` reachable under accelerate's batch-sampler sharding (see the module doc).

    Replaces ``batch_sampler.sampler`` (for ST samplers: the dataset, only used by torch's default BatchSampler
    iteration) with a relay that forwards ``set_epoch``. Returns the sampler; a no-op for objects without
    ``set_epoch`` or whose ``sampler`` already has one.
    """
    if not hasattr(batch_sampler, "set_epoch"):
        return batch_sampler
    current = getattr(batch_sampler, "sampler", None)
    if current is not None and hasattr(current, "set_epoch"):
        return batch_sampler
    batch_sampler.sampler = _EpochRelay(batch_sampler, current)
    return batch_sampler


class NoDuplicatesBatchSampler(_stock.NoDuplicatesBatchSampler):
    """Drop-in for :class:`sentence_transformers.base.sampler.NoDuplicatesBatchSampler` with a C++ scan.

    Same arguments; ``precompute_hashes``, ``precompute_num_proc`` and ``precompute_batch_size`` are accepted and
    ignored (keys are always computed once, natively). ``dataset`` must be a ``datasets.Dataset``. Use it as
    ``SentenceTransformerTrainingArguments(batch_sampler=st_fast.NoDuplicatesBatchSampler)``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
        precompute_hashes: bool = False,
        precompute_num_proc: int | None = None,
        precompute_batch_size: int = 1000,
    ) -> None:
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise TypeError(
                "st_fast.NoDuplicatesBatchSampler needs a datasets.Dataset (as the stock sampler does), got "
                f"{type(dataset).__name__}. Convert it with datasets.Dataset.from_dict / from_list; an "
                "IterableDataset cannot use a batch sampler."
            )
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
            precompute_hashes=False,
        )
        self.precompute_hashes = precompute_hashes  # accepted for compatibility; keys are always precomputed
        self.precompute_num_proc = precompute_num_proc
        self.precompute_batch_size = precompute_batch_size
        self._core = None
        self._core_dataset = None
        forward_set_epoch(self)

    def _get_core(self):
        if self._core is None or self._core_dataset is not self.dataset:
            self._core = _build_core(self.dataset)
            self._core_dataset = self.dataset
        return self._core

    def __iter__(self) -> Iterator[list[int]]:
        if self.generator and self.seed is not None:
            self.generator.manual_seed(self.seed + self.epoch)

        num_rows = len(self.dataset)
        if num_rows == 0:
            return
        core = self._get_core()

        expected_num_batches = len(self)
        num_yielded = 0

        # Never truncate the first pass, as drop_last=False may legitimately yield more batches than __len__.
        for chunk in self._native_pass(core, num_rows):
            yield from chunk
            num_yielded += len(chunk)

        passes = _compat.resample_passes()
        if num_yielded >= expected_num_batches or passes is None:  # None: the stock sampler makes one pass only
            return

        if num_yielded > 0:
            shortfall = expected_num_batches - num_yielded
            _stock.logger.warning_once(
                f"NoDuplicatesBatchSampler produced only {num_yielded} of the expected "
                f"{expected_num_batches} batches in a full pass over the dataset. The remaining "
                f"{shortfall} batches are resampled, so at most {shortfall / expected_num_batches:.1%} "
                "of this epoch's samples are repeats from earlier batches."
            )
            for _ in range(passes):
                for chunk in self._native_pass(core, num_rows):
                    missing = expected_num_batches - num_yielded
                    if len(chunk) >= missing:
                        yield from chunk[:missing]
                        return
                    yield from chunk
                    num_yielded += len(chunk)

        _stock.logger.warning_once(
            f"NoDuplicatesBatchSampler yielded only {num_yielded} of the expected "
            f"{expected_num_batches} batches. The dataset has too few distinct values for this "
            "batch size. Consider lowering it."
        )

    def _native_pass(self, core, num_rows: int) -> Iterator[list[list[int]]]:
        """One shuffled pass, in chunks of consecutive batches. Like upstream's ``_iter_one_pass``, the permutation is
        drawn when the first batch is requested (the generator may be shared with other samplers)."""
        index_dtype = torch.int32 if num_rows <= np.iinfo(np.int32).max else torch.int64
        perm = torch.randperm(num_rows, generator=self.generator, dtype=index_dtype).numpy()
        background = _BACKGROUND_MIN_ROWS is not None and num_rows >= _BACKGROUND_MIN_ROWS
        batches = core.one_pass(perm, self.batch_size, self.drop_last, background)
        while chunk := batches.take(_CHUNK_ROWS, _UNTRACK_BATCHES):
            yield chunk


# --------------------------------------------------------------------------------------------------------------------
# Building the native core from a datasets.Dataset


def _is_trainer_dataset_name_transform(dataset_format: dict) -> bool:
    """The trainer's ``set_transform(partial(add_dataset_name_transform, dataset_name=...))`` only adds the excluded
    ``dataset_name`` column, so the Arrow data can be read directly."""
    if dataset_format["type"] != "custom" or set(dataset_format["format_kwargs"]) != {"transform"}:
        return False
    transform = dataset_format["format_kwargs"]["transform"]
    func = getattr(transform, "func", None)
    keywords = getattr(transform, "keywords", None) or {}
    return (
        getattr(func, "__name__", "") == "add_dataset_name_transform"
        and getattr(func, "__module__", "").startswith("sentence_transformers.")
        and not getattr(transform, "args", ())
        and set(keywords) <= {"dataset_name", "transform"}
        and keywords.get("transform") is None
    )


def _reads_raw_arrow(dataset) -> bool:
    dataset_format = dataset.format
    # "columns" is column_names unless set_format chose columns: choosing all of them, in order, reads the same rows
    if list(dataset_format["columns"]) != dataset.column_names or dataset_format["output_all_columns"]:
        return False
    if dataset_format["type"] is None and not dataset_format["format_kwargs"]:
        return True
    return _is_trainer_dataset_name_transform(dataset_format)


def _canonical_binary(strings: list[str]):
    import pyarrow as pa

    # surrogatepass keeps the str -> bytes map injective for the rare str that is not valid Unicode
    return pa.array([s.encode("utf-8", "surrogatepass") for s in strings], type=pa.large_binary())


def _build_core(dataset):
    """A built ``NoDupSamplerCore`` holding one key per (row, value) of ``dataset`` (see the module doc)."""
    import pyarrow as pa
    from datasets import Value

    ext = require_cpu_ext()
    num_rows = len(dataset)
    exclude = _compat.excluded_dataset_columns()

    if not _reads_raw_arrow(dataset):
        return _build_core_row_by_row(dataset, ext)

    names = [name for name in dataset.column_names if name not in exclude]
    table = dataset.data.table
    features = dataset.features
    arrow_cols = []
    python_cols = []
    for name in names:
        feature = features.get(name) if features is not None else None
        column_type = table.schema.field(name).type
        is_text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
        if is_text and isinstance(feature, Value) and feature.dtype in _STRING_DTYPES:
            arrow_cols.append(name)
        else:
            python_cols.append(name)

    core = ext.NoDupSamplerCore(num_rows, len(names), _HASH_BITS)
    col = 0
    indices = _compat.dataset_indices(dataset) if arrow_cols else None
    if indices is not None:
        core.set_indices(np.ascontiguousarray(indices))
    for name in arrow_cols:
        core.set_column(col, indices is not None, False)
        add_arrow_chunks(core, col, table.column(name))
        col += 1
    if python_cols:
        # Same values as dataset[i] (decoded features, indices mapping applied), read in blocks of rows.
        plain = dataset if dataset.format["type"] is None else dataset.with_format(None)
        selected = plain.select_columns(python_cols)
        first = col
        for offset in range(len(python_cols)):
            core.set_column(first + offset, False, False)
        for start in range(0, num_rows, _PY_BLOCK_ROWS):
            block = selected[start : start + _PY_BLOCK_ROWS]
            for offset, name in enumerate(python_cols):
                array = _canonical_binary([_compat.sample_value_str(value) for value in block[name]])
                add_arrow_chunks(core, first + offset, pa.chunked_array([array]))
    core.build(0)
    return core


def _build_core_row_by_row(dataset, ext):
    """Formatted/transformed datasets: each row's values exactly as the stock default mode reads them
    (``dataset[i]``), padded with absent cells to the widest row."""
    import pyarrow as pa

    exclude = _compat.excluded_dataset_columns()
    num_rows = len(dataset)
    blocks: list[list[list[str]]] = []
    width = 0
    for start in range(0, num_rows, _PY_BLOCK_ROWS):
        rows = []
        for index in range(start, min(start + _PY_BLOCK_ROWS, num_rows)):
            values = {_compat.sample_value_str(v) for k, v in dataset[index].items() if k not in exclude}
            rows.append(sorted(values))
            width = max(width, len(values))
        blocks.append(rows)
    core = ext.NoDupSamplerCore(num_rows, width, _HASH_BITS)
    for col in range(width):
        core.set_column(col, False, True)
    for rows in blocks:
        for col in range(width):
            cells = [row[col].encode("utf-8", "surrogatepass") if col < len(row) else None for row in rows]
            array = pa.array(cells, type=pa.large_binary())
            add_arrow_chunks(core, col, pa.chunked_array([array]))
    core.build(0)
    return core
