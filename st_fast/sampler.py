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

Self-check: a version number cannot tell that a release changed how the stock sampler decides, so the first time a
configuration (the stock code as it is at call time, the sampler's arguments, the dataset) is iterated in a process,
the sampler proves itself on the user's own data: before its first batch it takes the first few batches of the
installed stock ``NoDuplicatesBatchSampler`` built from the same arguments, seed, epoch and generator (up to
:data:`_SELF_CHECK_BATCHES` batches, fewer when they would hold more than :data:`_SELF_CHECK_ROWS` rows, at least one;
always the stock *default* mode, which is incremental: a ``randperm`` plus the rows those batches read, never the
``precompute_hashes`` pass over the whole dataset), puts the generator (or the global RNG) back where it was, and
compares its own batches with them as it yields them. On a mismatch it yields stock's batches from the first
differing one on (continuing that stock iterator, so the epoch and the generator's later draws are stock's), and
every later epoch of that configuration comes from a stock sampler (``precompute_hashes`` as asked), with one warning
(logger ``st_fast.sampler``) naming the part, the configuration and the installed sentence-transformers version.
``self_check_result`` says what the check found; ``self_check=False`` turns it off. The check reads no other rank's
data and makes no collective call: every rank of a DDP run draws the same permutation, so every rank reaches the
same verdict on its own.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sentence_transformers.base import sampler as _stock

from st_fast import _compat
from st_fast._native import require_cpu_ext
from st_fast._native_sampler import add_arrow_chunks

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
# The self-check compares this many first batches with stock's, fewer when they would hold more than
# _SELF_CHECK_ROWS rows (stock's default mode reads each row it considers with dataset[i]), at least one.
_SELF_CHECK_BATCHES = 3
_SELF_CHECK_ROWS = 2048

logger = logging.getLogger("st_fast.sampler")


@dataclass(frozen=True)
class _Verdict:
    passed: bool
    detail: str


# configuration key (see NoDuplicatesBatchSampler._self_check_key) -> verdict, for this process
_CHECKED: dict[Hashable, _Verdict] = {}


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
        *,
        self_check: bool = True,
    ) -> None:
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise TypeError(
                "st_fast.NoDuplicatesBatchSampler needs a datasets.Dataset (as the stock sampler does), got "
                f"{type(dataset).__name__}. Convert it with datasets.Dataset.from_dict / from_list; an "
                "IterableDataset cannot use a batch sampler."
            )
        if not isinstance(self_check, bool):
            raise TypeError(f"self_check must be True or False, got {self_check!r}")
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
        self.self_check = self_check
        self._check_note: str | None = None
        self._stock_delegate: Any = None  # a stock sampler, once the self-check found a mismatch
        forward_set_epoch(self)

    @property
    def self_check_result(self) -> str:
        """What the self-check found, in a few words: ``"off"``, ``"not run yet"``, ``"checked: first 3 batches equal
        stock's"``, ``"mismatch: ...; now stock"``, or why nothing could be compared (an empty dataset)."""
        if self._stock_delegate is not None:
            return self._check_note or "mismatch: now stock"
        if not self.self_check:
            return "off"
        return self._check_note or "not run yet"

    def _get_core(self):
        if self._core is None or self._core_dataset is not self.dataset:
            self._core = _build_core(self.dataset)
            self._core_dataset = self.dataset
        return self._core

    def __iter__(self) -> Iterator[list[int]]:
        if self._stock_delegate is None and self.self_check:
            key = self._self_check_key()
            verdict = _CHECKED.get(key)
            if verdict is None:
                yield from self._checked_iter(key)
                return
            if verdict.passed:
                if not (self._check_note or "").startswith("checked"):  # this sampler's own check keeps its words
                    self._check_note = f"checked earlier in this process: {verdict.detail}"
            else:
                self._use_stock(f"mismatch found earlier in this process ({verdict.detail}); now stock")
        if self._stock_delegate is not None:
            yield from self._stock_iter()
            return
        yield from self._fast_iter()

    def _fast_iter(self) -> Iterator[list[int]]:
        """st_fast's batches of the current epoch (the native scan)."""
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

    # ----------------------------------------------------------------------------------------------------------------
    # The self-check against the installed stock sampler (see the module docstring)

    def _stock_sampler(self, precompute_hashes: bool) -> Any:
        """A stock sampler (the class as it is now) with this sampler's arguments, generator and epoch."""
        stock_class = _stock_class()
        arguments = {
            "batch_size": self.batch_size, "drop_last": self.drop_last, "valid_label_columns": self.valid_label_columns,
            "generator": self.generator, "seed": self.seed, "precompute_hashes": precompute_hashes,
            "precompute_num_proc": self.precompute_num_proc, "precompute_batch_size": self.precompute_batch_size,
        }  # fmt: skip
        accepted = inspect.signature(stock_class.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            arguments = {name: value for name, value in arguments.items() if name in accepted}
        stock = stock_class(self.dataset, **arguments)
        stock.set_epoch(self.epoch)
        return stock

    def _self_check_key(self) -> Hashable:
        """The configuration the verdict holds for: the stock code the stock sampler runs now, this sampler's
        arguments and the dataset (its rows, columns and format)."""
        stock_class = _stock_class()
        code = (stock_class, *(getattr(stock_class, name, None) for name in ("__init__", "__iter__", "_iter_one_pass")))
        dataset = self.dataset
        data = (len(dataset), tuple(dataset.column_names), _compat.dataset_fingerprint(dataset), repr(dataset.format))
        labels = tuple(self.valid_label_columns or ())
        arguments = (self.batch_size, self.drop_last, labels, bool(self.precompute_hashes))
        return (code, _compat.stock_sampler_state(), data, arguments)

    def _configuration(self) -> str:
        dataset = self.dataset
        return (
            f"batch_size={self.batch_size}, drop_last={self.drop_last}, seed={self.seed}, epoch={self.epoch}, "
            f"valid_label_columns={self.valid_label_columns}, precompute_hashes={bool(self.precompute_hashes)}, "
            f"generator={'given' if self.generator is not None else 'None (global RNG)'}, dataset of "
            f"{len(dataset)} rows with columns {dataset.column_names} (format {dataset.format['type']})"
        )

    def _self_check_batches(self) -> int:
        return max(1, min(_SELF_CHECK_BATCHES, _SELF_CHECK_ROWS // max(1, self.batch_size)))

    def _checked_iter(self, key: Hashable) -> Iterator[list[int]]:
        """This epoch's batches, the first ones compared with stock's (see the module docstring)."""
        count = self._self_check_batches()
        start = _rng_state(self.generator)
        stock_batches = iter(self._stock_sampler(precompute_hashes=False))
        expected = list(itertools.islice(stock_batches, count))
        after_stock = _rng_state(self.generator)
        _set_rng_state(self.generator, start)  # st_fast draws what stock drew, from the same state
        fast_batches = self._fast_iter()
        # one position past stock's batches when stock ended early: st_fast must end there too
        positions = len(expected) + (1 if len(expected) < count else 0)
        # compared before the first batch is yielded, so that the verdict is known from the first step on
        taken: list[list[int]] = []
        for position in range(positions):
            wanted = expected[position] if position < len(expected) else None
            try:
                batch = next(fast_batches, None)
                got = _describe(batch)
            except Exception as exc:  # noqa: BLE001 (an st_fast failure where stock yields: stock's batches, warned)
                batch, got = RuntimeError, f"st_fast raised {exc!r}"
            if batch != wanted:
                fast_batches.close()
                _set_rng_state(self.generator, after_stock)  # the state stock's own iteration left
                detail = f"batch {position} of epoch {self.epoch}: {got} vs stock's {_describe(wanted)}"
                self._record_mismatch(key, detail)
                yield from expected  # the batches before the mismatch are st_fast's and stock's alike
                yield from stock_batches
                return
            if batch is None:
                break
            taken.append(batch)
        stock_batches.close()
        if expected:
            compared = len(expected)
            detail = f"first {compared} batches equal stock's" if compared > 1 else "first batch equals stock's"
            if compared < count:
                detail += " (all the epoch has)"
            _CHECKED[key] = _Verdict(True, detail)
            self._check_note = f"checked: {detail}"
        elif len(self.dataset) == 0:
            self._check_note = "nothing compared yet: the dataset is empty (stock yields no batch either)"
        else:
            self._check_note = (
                f"nothing compared yet: no batch in epoch {self.epoch} ({len(self.dataset)} rows, batch_size "
                f"{self.batch_size}, drop_last={self.drop_last}; stock yields none either)"
            )
        yield from taken
        yield from fast_batches

    def _record_mismatch(self, key: Hashable, detail: str) -> None:
        _CHECKED[key] = _Verdict(False, detail)
        self._use_stock(f"mismatch: {detail}; now stock")
        logger.warning(
            "st_fast self-check: st_fast NoDuplicatesBatchSampler does not yield the batches of the installed "
            "sentence-transformers %s NoDuplicatesBatchSampler with %s (%s); this configuration is sampled by the "
            "stock sampler from now on (same batches as stock, no st_fast speed-up). Please report it to st_fast.",
            _compat.installed_version(), self._configuration(), detail,
        )  # fmt: skip

    def _use_stock(self, note: str) -> None:
        self._check_note = note
        self._stock_delegate = self._stock_sampler(precompute_hashes=self._stock_hashes())

    def _stock_hashes(self) -> bool:
        """The stock mode asked for: ``precompute_hashes`` where the stock sampler can run it (it needs xxhash)."""
        return bool(self.precompute_hashes) and getattr(_stock, "xxhash", None) is not None

    def _stock_iter(self) -> Iterator[list[int]]:
        """The stock sampler's batches of the current epoch (after a mismatch)."""
        delegate = self._stock_delegate
        if delegate.dataset is not self.dataset:
            delegate = self._stock_delegate = self._stock_sampler(precompute_hashes=self._stock_hashes())
        delegate.batch_size, delegate.drop_last = self.batch_size, self.drop_last
        delegate.generator, delegate.seed = self.generator, self.seed
        delegate.set_epoch(self.epoch)
        yield from delegate

    def _native_pass(self, core, num_rows: int) -> Iterator[list[list[int]]]:
        """One shuffled pass, in chunks of consecutive batches. Like upstream's ``_iter_one_pass``, the permutation is
        drawn when the first batch is requested (the generator may be shared with other samplers)."""
        index_dtype = torch.int32 if num_rows <= np.iinfo(np.int32).max else torch.int64
        perm = torch.randperm(num_rows, generator=self.generator, dtype=index_dtype).numpy()
        background = _BACKGROUND_MIN_ROWS is not None and num_rows >= _BACKGROUND_MIN_ROWS
        batches = core.one_pass(perm, self.batch_size, self.drop_last, background)
        while chunk := batches.take(_CHUNK_ROWS, _UNTRACK_BATCHES):
            yield chunk


def _stock_class() -> type:
    """The stock NoDuplicatesBatchSampler as the stock module has it now (a test or a patch may replace it); st_fast's
    own class (or a subclass) put there resolves to the sentence-transformers class it derives from."""
    stock_class = _stock.NoDuplicatesBatchSampler
    if isinstance(stock_class, type) and issubclass(stock_class, NoDuplicatesBatchSampler):
        bases = NoDuplicatesBatchSampler.__mro__[1:]
        stock_class = next(base for base in bases if base.__module__.startswith("sentence_transformers."))
    return stock_class


def _rng_state(generator: torch.Generator | None) -> torch.Tensor:
    return torch.get_rng_state() if generator is None else generator.get_state()


def _set_rng_state(generator: torch.Generator | None, state: torch.Tensor) -> None:
    if generator is None:
        torch.set_rng_state(state)
    else:
        generator.set_state(state)


def _describe(batch: list[int] | None) -> str:
    if batch is None:
        return "no batch"
    shown = ", ".join(map(str, batch[:6])) + (", ..." if len(batch) > 6 else "")
    return f"{len(batch)} rows [{shown}]"


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
