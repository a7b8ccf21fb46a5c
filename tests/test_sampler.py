"""st_fast.NoDuplicatesBatchSampler yields exactly the batches of the stock sentence-transformers sampler."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from datasets import Dataset, concatenate_datasets
from sentence_transformers.base import sampler as stock_module
from sentence_transformers.base.sampler import NoDuplicatesBatchSampler as StockSampler
from sentence_transformers.base.sampler import ProportionalBatchSampler, RoundRobinBatchSampler
from stock_behaviour import multi_sampler_forwards_set_epoch
from torch.utils.data import ConcatDataset

import st_fast
import st_fast.sampler as fast_module
from st_fast import _compat
from st_fast.sampler import NoDuplicatesBatchSampler

pytest.importorskip("xxhash")  # the stock hashed mode needs it


@pytest.fixture(autouse=True)
def _quiet_stock_warnings():
    # the resampling / too-few-values warnings are logged once per message; keep test output readable
    logger = logging.getLogger(stock_module.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


class _SelfCheckWarnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self.expected = False

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def self_check_warnings():
    """The st_fast.sampler warnings of a test. A test that builds st_fast samplers with the self-check on (the
    default) and compares them with stock would pass even with a broken native scan, since the check then yields
    stock's batches: so a self-check mismatch fails every test that does not say it expects one (``.expected``)."""
    handler = _SelfCheckWarnings()
    logger = logging.getLogger("st_fast.sampler")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    if not handler.expected:
        assert not handler.records, [record.getMessage() for record in handler.records]


@pytest.fixture
def fresh_self_check(monkeypatch):
    """No verdict of an earlier test: every configuration is checked again."""
    monkeypatch.setattr(fast_module, "_CHECKED", {})


def epoch_batches(cls, dataset, *, epochs=(0,), shared_generator=True, **kwargs):
    """[batches of each epoch] for a sampler class; the generator is seeded like the trainer's. st_fast's sampler
    runs with its self-check off, so that these comparisons test its native scan, not its fallback to stock."""
    generator = torch.Generator().manual_seed(1234) if shared_generator else None
    if issubclass(cls, NoDuplicatesBatchSampler):
        kwargs = {"self_check": False, **kwargs}
    sampler = cls(dataset, generator=generator, **kwargs)
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def assert_parity(dataset, *, epochs=(0, 1), modes=("default", "hashed"), **kwargs):
    fast = epoch_batches(NoDuplicatesBatchSampler, dataset, epochs=epochs, **kwargs)
    for mode in modes:
        extra = {"precompute_hashes": True, "precompute_num_proc": 1} if mode == "hashed" else {}
        stock = epoch_batches(StockSampler, dataset, epochs=epochs, **kwargs, **extra)
        assert fast == stock, f"batches differ from the stock sampler ({mode} mode)"
    return fast


def triplets(num_rows: int, *, anchors: int, positives: int, negatives: int, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset.from_dict(
        {
            "anchor": [f"q{i % anchors}" for i in range(num_rows)],
            "positive": [f"p{rng.integers(positives)}" for _ in range(num_rows)],
            # negatives share their vocabulary with the anchors: cross-column duplicates
            "negative": [f"q{rng.integers(negatives)}" for _ in range(num_rows)],
        }
    )


HEAVY = triplets(300, anchors=120, positives=7, negatives=200)


@pytest.mark.parametrize("batch_size", [1, 2, 10, 128])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("seed", [0, 17])
def test_heavy_duplication_matches_stock(batch_size, drop_last, seed):
    assert_parity(HEAVY, batch_size=batch_size, drop_last=drop_last, seed=seed, epochs=(0, 1, 2))


@pytest.mark.parametrize("batch_size", [2, 10, 128])
def test_unique_rows_and_background_thread_match_stock(batch_size, monkeypatch):
    dataset = triplets(2000, anchors=2000, positives=1500, negatives=1800, seed=3)
    assert_parity(dataset, batch_size=batch_size, drop_last=False, modes=("hashed",))
    monkeypatch.setattr(fast_module, "_BACKGROUND_MIN_ROWS", 0)  # the pass runs on its own thread
    assert_parity(dataset, batch_size=batch_size, drop_last=True, modes=("hashed",))


def test_abandoned_background_pass_does_not_hang(monkeypatch):
    monkeypatch.setattr(fast_module, "_BACKGROUND_MIN_ROWS", 0)
    dataset = triplets(5000, anchors=5000, positives=3000, negatives=4000)
    sampler = NoDuplicatesBatchSampler(dataset, batch_size=3, drop_last=False)
    for _ in range(3):
        iterator = iter(sampler)
        first = list(itertools.islice(iterator, 2))
        assert len(first) == 2
        del iterator


def test_cross_column_duplicates_conflict():
    # row 1's negative is row 0's anchor: they can never share a batch
    dataset = Dataset.from_dict({"anchor": ["a", "b", "c", "d"], "positive": ["x", "y", "z", "w"],
                                 "negative": ["n1", "a", "n3", "n4"]})  # fmt: skip
    batches = assert_parity(dataset, batch_size=4, drop_last=False, epochs=range(4))
    for epoch in batches:
        assert not any({0, 1} <= set(batch) for batch in epoch)


def test_all_identical_rows():
    dataset = Dataset.from_dict({"anchor": ["same"] * 12, "positive": ["same"] * 12})
    assert_parity(dataset, batch_size=4, drop_last=False)
    assert assert_parity(dataset, batch_size=4, drop_last=True) == [[], []]


@pytest.mark.parametrize("num_rows", [0, 1])
@pytest.mark.parametrize("drop_last", [False, True])
def test_empty_and_one_row(num_rows, drop_last):
    dataset = Dataset.from_dict({"anchor": ["a"] * num_rows, "positive": ["b"] * num_rows})
    assert_parity(dataset, batch_size=3, drop_last=drop_last, modes=("default",))


@pytest.mark.parametrize("chunk_rows", [1, 3, 1 << 14])
def test_resampling_fills_len_like_stock(chunk_rows, monkeypatch):
    # 20 rows, 2 distinct pairs, batch 2: the first pass yields fewer than len() batches, the rest is resampled; the
    # last resampled chunk is cut short wherever it ends (one batch per chunk, a few, or the whole pass)
    monkeypatch.setattr(fast_module, "_CHUNK_ROWS", chunk_rows)
    dataset = Dataset.from_dict({"anchor": ["a", "b"] * 10, "positive": ["c", "d"] * 10})
    batches = assert_parity(dataset, batch_size=2, drop_last=True, epochs=(0, 1, 2))
    assert [len(epoch) for epoch in batches] == [10, 10, 10]


@pytest.mark.parametrize("chunk_rows", [1, 25, 1 << 14])
@pytest.mark.parametrize("background", [False, True])
def test_chunked_hand_over_matches_stock(chunk_rows, background, monkeypatch):
    monkeypatch.setattr(fast_module, "_CHUNK_ROWS", chunk_rows)
    monkeypatch.setattr(fast_module, "_BACKGROUND_MIN_ROWS", 0 if background else None)
    assert_parity(HEAVY, batch_size=10, drop_last=False, modes=("hashed",))
    assert_parity(HEAVY, batch_size=7, drop_last=True, modes=("hashed",))


@pytest.mark.parametrize("background", [False, True])
def test_take_hands_out_consecutive_batches(background):
    core = NoDuplicatesBatchSampler(HEAVY, batch_size=10, drop_last=False)._get_core()
    perm = np.random.default_rng(0).permutation(300).astype(np.int32)
    expected = list(core.one_pass(perm, 10, False, background))
    batches = core.one_pass(perm, 10, False, background)
    chunks = []
    while chunk := batches.take(25):
        chunks.append(chunk)
    assert [batch for chunk in chunks for batch in chunk] == expected
    assert all(len(chunk) == 1 or sum(map(len, chunk)) <= 25 for chunk in chunks)
    assert batches.take(25) == [] and len(batches) == len(expected)


@pytest.mark.parametrize("untrack", [False, True])
def test_batches_are_plain_lists_left_out_of_the_collector(untrack, monkeypatch):
    import gc

    monkeypatch.setattr(fast_module, "_UNTRACK_BATCHES", untrack)
    batches = assert_parity(HEAVY, batch_size=10, drop_last=False, modes=("hashed",))
    for batch in batches[0]:
        assert type(batch) is list and all(type(index) is int for index in batch)
        assert gc.is_tracked(batch) is not untrack


def test_resampling_with_generator_shared_by_several_samplers():
    # two samplers on one generator, consumed interleaved: the extra passes draw from the shared state, as upstream
    dataset = Dataset.from_dict({"anchor": ["a", "b", "c"] * 8, "positive": ["c", "d", "e"] * 8})

    def interleaved(cls):
        generator = torch.Generator().manual_seed(5)
        samplers = [cls(dataset, batch_size=2, drop_last=True, generator=generator, seed=s) for s in (1, 2)]
        return [list(pair) for pair in zip(*samplers, strict=False)]

    assert interleaved(NoDuplicatesBatchSampler) == interleaved(StockSampler)


def test_no_generator_uses_the_global_rng():
    torch.manual_seed(99)
    fast = list(NoDuplicatesBatchSampler(HEAVY, batch_size=10, drop_last=False))
    torch.manual_seed(99)
    stock = list(StockSampler(HEAVY, batch_size=10, drop_last=False))
    assert fast == stock


def test_list_valued_cells_are_one_value():
    dataset = Dataset.from_dict(
        {"anchor": [["a", "b"], ["a"], ["b", "a"], ["a", "b"], ["c"], ["a"]], "positive": list("xyzwvu")}
    )
    assert_parity(dataset, batch_size=3, drop_last=False, epochs=range(4))


def test_int_float_bool_none_cells_compare_as_strings():
    # 1 == "1", None == "None", 2.0 == "2.0", True == "True": upstream compares str() of each value
    dataset = Dataset.from_dict(
        {
            "text": ["1", "None", "2.0", "True", "x", None, "y", "z"],
            "number": [1, 5, None, 7, 1, 8, 9, 10],
            "real": [2.0, 0.5, 0.25, 1e16, None, float("nan"), 3.0, 2.0],
            "flag": [True, False, None, True, False, True, False, None],
        }
    )
    for batch_size in (2, 3, 8):
        assert_parity(dataset, batch_size=batch_size, drop_last=False, epochs=range(3))


def test_label_columns_are_excluded():
    # the labels equal the anchors: if they were compared, every row would conflict with another one
    dataset = Dataset.from_dict({"anchor": [f"a{i}" for i in range(16)], "positive": [f"p{i}" for i in range(16)],
                                 "label": [f"a{(i + 1) % 16}" for i in range(16)],
                                 "score": [float(i % 3) for i in range(16)]})  # fmt: skip
    batches = assert_parity(dataset, batch_size=4, drop_last=True, valid_label_columns=["label", "score"])
    assert [len(epoch) for epoch in batches] == [4, 4]


def test_dataset_name_column_is_excluded():
    dataset = Dataset.from_dict({"anchor": [f"a{i}" for i in range(10)], "dataset_name": ["d"] * 10})
    assert [len(e) for e in assert_parity(dataset, batch_size=5, drop_last=True)] == [2, 2]


def test_indices_mapping_and_several_chunks():
    base = triplets(400, anchors=150, positives=40, negatives=300, seed=1)
    chunked = concatenate_datasets([base.select(range(0, 130)), base.select(range(130, 400))].copy())
    assert len(chunked.data.column("anchor").chunks) >= 1
    for dataset in (
        base.shuffle(seed=3),  # indices mapping
        base.select([5, 3, 3, 99, 7, 200, 5] * 20),  # repeated physical rows
        base.filter(lambda row: row["positive"] != "p3"),
        chunked,
        concatenate_datasets([base.select(range(0, 200)), base.select(range(200, 400))]).shuffle(seed=4),
        base.select(range(10, 300)).flatten_indices(),  # sliced Arrow arrays (non-zero offsets)
    ):
        assert_parity(dataset, batch_size=16, drop_last=False, epochs=(0, 1))


def test_null_strings_equal_the_string_none():
    dataset = Dataset.from_dict({"anchor": ["None", "a", None, "b", None, "c"], "positive": list("pqrstu")})
    assert_parity(dataset, batch_size=3, drop_last=False, epochs=range(4))


def test_struct_and_nested_cells_use_the_stock_canonicalization():
    dataset = Dataset.from_dict(
        {
            "meta": [{"k": 1, "v": "a"}, {"k": 2, "v": "b"}, {"k": 1, "v": "a"}, {"k": 3, "v": None}] * 3,
            "grid": [[[1, 2], [3]], [[1]], [[1, 2], [3]], []] * 3,
            "text": [f"t{i % 5}" for i in range(12)],
        }
    )
    assert_parity(dataset, batch_size=3, drop_last=False, epochs=range(3))


def test_formatted_and_transformed_datasets_read_rows_like_stock():
    base = triplets(60, anchors=25, positives=9, negatives=40)
    numbers = base.add_column("n", [i % 7 for i in range(60)])

    def to_arrays(batch):  # objects without a plain str(): digested from their pickles
        return {"anchor": batch["anchor"], "vec": [np.array([len(a), 1]) for a in batch["anchor"]]}

    transformed = base.with_transform(to_arrays)
    # (not the torch format: a tensor's pickle embeds a storage address, so the stock keys are not reproducible)
    for dataset in (numbers.with_format("numpy"), numbers.with_format("numpy", columns=["n", "anchor"]), transformed):
        assert_parity(dataset, batch_size=4, drop_last=False, modes=("default",))


def test_trainer_dataset_name_transform_reads_arrow_directly():
    from sentence_transformers import SentenceTransformerTrainer

    dataset = triplets(80, anchors=30, positives=10, negatives=60)
    dataset.set_transform(
        __import__("functools").partial(SentenceTransformerTrainer.add_dataset_name_transform, dataset_name="x")
    )
    assert "dataset_name" in dataset[0]
    assert fast_module._reads_raw_arrow(dataset)
    assert_parity(dataset, batch_size=8, drop_last=False)


def test_forced_hash_collisions_never_change_batches(monkeypatch):
    monkeypatch.setattr(fast_module, "_HASH_BITS", 2)  # 4 possible keys: nearly every probe is a collision
    sampler = NoDuplicatesBatchSampler(HEAVY, batch_size=10, drop_last=False)
    list(sampler)
    assert int(sampler._get_core().keys().max()) < 4
    for batch_size, drop_last in [(1, False), (2, True), (10, False), (128, True)]:
        assert_parity(HEAVY, batch_size=batch_size, drop_last=drop_last)
    numbers = Dataset.from_dict({"a": [1, 2, 3, 1, 2, 3, 4, 5], "b": ["1", "x", "y", "z", "w", "v", "u", "4"]})
    assert_parity(numbers, batch_size=3, drop_last=False, epochs=range(3))


def test_distinct_values_get_distinct_keys():
    # the key hash only has to spread values (matches are confirmed on the bytes): a collision among these would
    # mean a broken hash, not bad luck. Lengths 0-200 cover every branch of it; near-identical strings too.
    rng = np.random.default_rng(0)
    values = [f"q{i}" for i in range(20_000)] + ["", "a", "ab", "abc"]
    values += [f"passage {i}: " + "x" * int(rng.integers(200)) for i in range(20_000)]
    values += ["y" * n for n in range(1, 300)] + ["y" * 100 + chr(65 + i % 26) + "y" * 99 for i in range(26)]
    values = sorted(set(values))
    dataset = Dataset.from_dict({"text": values})
    keys = NoDuplicatesBatchSampler(dataset, batch_size=8, drop_last=False)._get_core().keys()[:, 0]
    assert len(np.unique(keys)) == len(values)


_MASK64 = (1 << 64) - 1
_WY_SECRETS = (0x2D358DCCAA6C78A5, 0x8BB84B93962EACC9, 0x4B33A62ED433D4A3, 0x4D5A2DA51DE1AA47)


def wyhash64_reference(data: bytes) -> int:
    """Python reference of the sampler's cell keys (csrc/include/st_fast/wyhash64.h), written from its description:
    16 bytes per 64 x 64 -> 128-bit multiply whose halves are xor-folded, three lanes over 48-byte blocks."""
    s0, s1, s2, s3 = _WY_SECRETS

    def mix(a: int, b: int) -> int:
        product = a * b
        return (product & _MASK64) ^ (product >> 64)

    def read64(i: int) -> int:
        return int.from_bytes(data[i : i + 8], "little")

    def read32(i: int) -> int:
        return int.from_bytes(data[i : i + 4], "little")

    n, p = len(data), 0
    seed = mix(s0, s1)  # seed 0
    if n <= 16:
        if n >= 4:
            step = (n >> 3) << 2
            a = (read32(0) << 32) | read32(step)
            b = (read32(n - 4) << 32) | read32(n - 4 - step)
        elif n > 0:
            a, b = (data[0] << 16) | (data[n >> 1] << 8) | data[n - 1], 0
        else:
            a = b = 0
    else:
        i = n
        if i > 48:
            lane1 = lane2 = seed
            while i > 48:
                seed = mix(read64(p) ^ s1, read64(p + 8) ^ seed)
                lane1 = mix(read64(p + 16) ^ s2, read64(p + 24) ^ lane1)
                lane2 = mix(read64(p + 32) ^ s3, read64(p + 40) ^ lane2)
                p, i = p + 48, i - 48
            seed ^= lane1 ^ lane2
        while i > 16:
            seed = mix(read64(p) ^ s1, read64(p + 8) ^ seed)
            p, i = p + 16, i - 16
        a, b = read64(p + i - 16), read64(p + i - 8)
    product = (a ^ s1) * (b ^ seed)
    return mix((product & _MASK64) ^ s0 ^ n, (product >> 64) ^ s1)


def test_keys_are_the_reference_hash_of_the_canonical_bytes():
    """Every cell's key is wyhash64 of its canonical string's UTF-8 bytes ("None" for a null string), whichever way
    the core reads it: zero-copy Arrow strings (with an indices mapping), Python-canonicalized values, or rows of a
    formatted dataset; lengths 0-130 cover every branch of the hash."""
    rng = np.random.default_rng(3)
    texts = ["", "a", "ab", "abc", "ünï", "ünïcödé " * 17] + ["".join(rng.choice(list("xyzé€"), n)) for n in range(131)]
    dataset = Dataset.from_dict({"text": texts + [None], "n": list(range(len(texts))) + [7]})
    for data in (dataset, dataset.select(range(len(dataset) - 1, -1, -2)), dataset.with_format("numpy")):
        core = NoDuplicatesBatchSampler(data, batch_size=4, drop_last=False)._get_core()
        keys = core.keys()
        rows = [data.with_format(None)[i] for i in range(len(data))]
        if fast_module._reads_raw_arrow(data):  # one column per dataset column: the strings, then the Python values
            expected = [[_compat.sample_value_str(row[name]) for name in ("text", "n")] for row in rows]
        else:  # one column per distinct value of the row, in sorted order
            expected = [sorted({_compat.sample_value_str(v) for v in data[i].values()}) for i in range(len(data))]
        assert keys.shape == (len(data), max(len(row) for row in expected))
        for row_keys, row_values in zip(keys.tolist(), expected, strict=True):
            assert row_keys[: len(row_values)] == [wyhash64_reference(v.encode("utf-8")) for v in row_values]


def test_int64_permutation(monkeypatch):
    real_iinfo = np.iinfo

    class SmallInt32:
        max = 5

    monkeypatch.setattr(np, "iinfo", lambda dtype: SmallInt32 if dtype is np.int32 else real_iinfo(dtype))
    assert_parity(HEAVY, batch_size=10, drop_last=False, modes=("default",))


def test_same_len_set_epoch_and_attributes():
    stock = StockSampler(HEAVY, batch_size=7, drop_last=True, seed=3)
    fast = NoDuplicatesBatchSampler(HEAVY, batch_size=7, drop_last=True, seed=3, precompute_hashes=True)
    assert isinstance(fast, StockSampler)
    assert len(fast) == len(stock) == 300 // 7
    fast.set_epoch(4)
    assert fast.epoch == 4 and fast.seed == 3 and fast.batch_size == 7 and fast.drop_last
    assert st_fast.NoDuplicatesBatchSampler is NoDuplicatesBatchSampler


def test_state_is_eight_bytes_per_cell():
    sampler = NoDuplicatesBatchSampler(HEAVY, batch_size=10, drop_last=False)
    list(sampler)
    core = sampler._get_core()
    assert core.state_bytes() < 300 * 3 * 8 + 4096
    assert core.keys().shape == (300, 3)


@pytest.mark.parametrize("batch_size", [0, -3])
def test_bad_batch_size(batch_size):
    with pytest.raises(ValueError):
        NoDuplicatesBatchSampler(HEAVY, batch_size=batch_size, drop_last=False)


@pytest.mark.parametrize("data", [[{"anchor": "a"}], torch.arange(4)])
def test_non_hf_dataset_is_a_clear_error(data):
    with pytest.raises(TypeError, match="datasets.Dataset"):
        NoDuplicatesBatchSampler(data, batch_size=2, drop_last=False)


def test_core_rejects_bad_permutations():
    sampler = NoDuplicatesBatchSampler(HEAVY, batch_size=10, drop_last=False)
    core = sampler._get_core()
    with pytest.raises(ValueError):
        core.one_pass(np.full(300, 300, dtype=np.int32), 10, False)
    with pytest.raises(ValueError):
        core.one_pass(np.arange(5, dtype=np.int32), 10, False)
    with pytest.raises((ValueError, TypeError)):
        core.one_pass(np.arange(300, dtype=np.float32), 10, False)


@pytest.mark.parametrize("multi_cls", [RoundRobinBatchSampler, ProportionalBatchSampler])
@pytest.mark.parametrize("drop_last", [False, True])
def test_inside_multi_dataset_samplers(multi_cls, drop_last):
    first = triplets(60, anchors=20, positives=6, negatives=40, seed=1)
    second = triplets(45, anchors=45, positives=30, negatives=45, seed=2)

    def run(cls):
        generator = torch.Generator().manual_seed(42)
        children = [cls(d, batch_size=4, drop_last=drop_last, generator=generator, seed=42) for d in (first, second)]
        multi = multi_cls(ConcatDataset([first, second]), batch_samplers=children, generator=generator, seed=42)
        out = []
        for epoch in range(3):
            multi.set_epoch(epoch)
            out.append(list(multi))
        return out

    fast, stock = run(NoDuplicatesBatchSampler), run(StockSampler)
    assert fast == stock
    if multi_sampler_forwards_set_epoch(multi_cls) or multi_cls is ProportionalBatchSampler:
        assert fast[0] != fast[1]  # the epoch reached the samplers (6.0.x round robin: each epoch is the same)


def _shard_epochs(sampler_cls, dataset, rank, epochs=3, *, tell_sampler=False):
    """Each epoch's batches of rank ``rank`` of 2 under accelerate's batch-sampler sharding, which calls
    ``set_epoch`` on the loader only. ``tell_sampler``: also call the batch sampler's ``set_epoch`` (the reference:
    what a sampler that sees its epoch yields there)."""
    from accelerate.data_loader import prepare_data_loader

    sampler = sampler_cls(dataset, batch_size=4, drop_last=True, generator=torch.Generator().manual_seed(0), seed=0)
    loader = torch.utils.data.DataLoader(range(len(dataset)), batch_sampler=sampler, collate_fn=list)
    sharded = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False, even_batches=False)
    out = []
    for epoch in range(epochs):
        sharded.set_epoch(epoch)  # what transformers' Trainer calls at each epoch
        if tell_sampler:
            sampler.set_epoch(epoch)
        out.append([list(batch) for batch in sharded])
    return sampler, out


def test_accelerate_sharding_reshuffles_every_epoch():
    dataset = triplets(64, anchors=64, positives=64, negatives=64)
    for rank in (0, 1):
        _, reference = _shard_epochs(StockSampler, dataset, rank, tell_sampler=True)
        sampler, per_epoch = _shard_epochs(NoDuplicatesBatchSampler, dataset, rank)
        assert sampler.epoch == 2
        assert per_epoch == reference
        assert per_epoch[0] != per_epoch[1]
        _, stock_alone = _shard_epochs(StockSampler, dataset, rank)
        assert stock_alone[0] == stock_alone[1]  # the stock sampler never learns the epoch there


def test_forward_set_epoch_helper_for_other_samplers():
    first, second = HEAVY.select(range(100)), HEAVY.select(range(100, 300))
    generator = torch.Generator()
    children = [NoDuplicatesBatchSampler(d, batch_size=4, drop_last=True, generator=generator) for d in (first, second)]
    multi = fast_module.forward_set_epoch(
        ProportionalBatchSampler(ConcatDataset([first, second]), batch_samplers=children, generator=generator)
    )
    multi.sampler.set_epoch(3)
    # the children get what the stock sampler's own set_epoch gives them (6.0.x: nothing)
    child_epoch = 3 if multi_sampler_forwards_set_epoch(ProportionalBatchSampler) else 0
    assert multi.epoch == 3 and [child.epoch for child in children] == [child_epoch, child_epoch]


def test_trainer_accepts_the_class(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    dataset = triplets(40, anchors=15, positives=8, negatives=30)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), batch_sampler=NoDuplicatesBatchSampler, per_device_train_batch_size=4,
        max_steps=2, seed=11, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(
        model=tiny_model, args=args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(tiny_model)
    )
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.batch_sampler, NoDuplicatesBatchSampler)
    fast = list(loader.batch_sampler)
    # the stock class given the same way gets the trainer's arguments (seed: args.seed from 6.1, 0 in 6.0.x)
    stock_args = SentenceTransformerTrainingArguments(**{**args.to_dict(), "batch_sampler": StockSampler})
    stock_trainer = SentenceTransformerTrainer(
        model=tiny_model, args=stock_args, train_dataset=dataset, loss=MultipleNegativesRankingLoss(tiny_model)
    )
    stock_sampler = stock_trainer.get_train_dataloader().batch_sampler
    assert type(stock_sampler) is StockSampler
    stock = list(stock_sampler)
    assert len(stock) >= 8 and fast == stock
    trainer.train()


def _build_in_child(queue):
    torch.set_num_threads(1)  # torch's own OpenMP pool hangs torch.randperm in a forked child otherwise
    dataset = triplets(40_000, anchors=30_000, positives=20_000, negatives=30_000, seed=9)
    queue.put(len(list(NoDuplicatesBatchSampler(dataset, batch_size=256, drop_last=False))))


def test_fork_after_building_keys_does_not_hang():
    # keys are built with threads (not OpenMP) in the parent: a forked child must be able to build them again
    import multiprocessing

    list(NoDuplicatesBatchSampler(triplets(40_000, anchors=30_000, positives=20_000, negatives=30_000), 256, False))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_build_in_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung while building sampler keys")
    assert queue.get(timeout=5) > 0


# ---------------------------------------------------------------------------------------------------------------------
# Label columns of formatted datasets (sentence-transformers 6.3 reads a label column through `_to_list`)
# ---------------------------------------------------------------------------------------------------------------------


def _labelled(num_rows: int = 60) -> Dataset:
    base = triplets(num_rows, anchors=25, positives=9, negatives=40)
    labelled = base.add_column("label", [i % 4 for i in range(num_rows)])
    return labelled.add_column("score", [i / 7 for i in range(num_rows)])


@pytest.mark.parametrize("dataset_format", [None, "numpy", "pandas", "torch"])
def test_label_columns_of_formatted_datasets_match_stock(dataset_format):
    """The label columns (numpy arrays, tensors, ... under a format, not lists) are left out exactly as stock leaves
    them out, and the remaining columns read as stock reads them."""
    dataset = _labelled().with_format(dataset_format)
    modes = ("default", "hashed") if dataset_format in (None, "numpy") else ("default",)
    # (a tensor left in a row is digested from its pickle, which embeds a storage address: stock's own keys are then
    # not reproducible, so under the torch format every numeric column is a label column)
    every = [["label"], ["score", "label"], ["absent"]] if dataset_format != "torch" else [["score", "label"]]
    for columns in every:
        assert_parity(dataset, batch_size=4, drop_last=False, valid_label_columns=columns, modes=modes)


def test_arrow_formatted_rows_fail_like_stock():
    # dataset[i] is a pyarrow Table under the arrow format: stock's default mode cannot read it, nor can st_fast
    dataset = _labelled().with_format("arrow")
    for cls in (StockSampler, NoDuplicatesBatchSampler):
        with pytest.raises(AttributeError):
            list(cls(dataset, batch_size=4, drop_last=False, valid_label_columns=["label"]))


# ---------------------------------------------------------------------------------------------------------------------
# The self-check against the installed stock sampler
# ---------------------------------------------------------------------------------------------------------------------


def _count_stock_batches(monkeypatch) -> list[int]:
    """Counts the batches the stock sampler yields (the stock code itself is unchanged)."""
    taken = [0]
    original = StockSampler.__iter__

    def counting(self):
        for batch in original(self):
            taken[0] += 1
            yield batch

    monkeypatch.setattr(StockSampler, "__iter__", counting)
    return taken


@pytest.mark.parametrize(("batch_size", "compared"), [(10, 3), (700, 2), (3000, 1)])
def test_self_check_compares_the_first_batches_with_stock(batch_size, compared, fresh_self_check, monkeypatch):
    dataset = triplets(6000, anchors=6000, positives=5000, negatives=6000, seed=4) if batch_size > 10 else HEAVY
    taken = _count_stock_batches(monkeypatch)
    sampler = NoDuplicatesBatchSampler(dataset, batch_size, False, generator=torch.Generator().manual_seed(7), seed=3)
    assert sampler.self_check_result == "not run yet"
    first = list(sampler)
    assert taken[0] == compared  # the check took stock's first batches (a few rows), not a whole stock epoch
    words = f"first {compared} batches equal stock's" if compared > 1 else "first batch equals stock's"
    assert sampler.self_check_result == f"checked: {words}"
    sampler.set_epoch(1)
    second = list(sampler)
    assert taken[0] == compared  # once per configuration
    assert sampler.self_check_result == f"checked: {words}"
    stock = StockSampler(dataset, batch_size, False, generator=torch.Generator().manual_seed(7), seed=3)
    stock_epochs = [list(stock)]
    stock.set_epoch(1)
    stock_epochs.append(list(stock))
    assert [first, second] == stock_epochs
    taken[0] = 0
    again = NoDuplicatesBatchSampler(dataset, batch_size, False, generator=torch.Generator(), seed=3)
    assert list(again) == first and taken[0] == 0  # another sampler of the same configuration: not checked again
    assert again.self_check_result == f"checked earlier in this process: {words}"


def test_self_check_off(fresh_self_check, monkeypatch):
    taken = _count_stock_batches(monkeypatch)
    sampler = NoDuplicatesBatchSampler(HEAVY, 10, False, generator=torch.Generator(), self_check=False)
    assert sampler.self_check_result == "off"
    list(sampler)
    assert taken[0] == 0 and sampler.self_check_result == "off" and not fast_module._CHECKED
    with pytest.raises(TypeError, match="self_check"):
        NoDuplicatesBatchSampler(HEAVY, 10, False, self_check="no")


def _change_stock_iter(monkeypatch, first_changed: int):
    """Stock's code changed (e.g. by a release): from batch ``first_changed`` of each epoch on, every batch is
    rotated by one row."""
    original = StockSampler.__iter__

    def changed(self):
        for index, batch in enumerate(original(self)):
            yield batch[1:] + batch[:1] if index >= first_changed and len(batch) > 1 else batch

    monkeypatch.setattr(StockSampler, "__iter__", changed)


def _change_stock_canonical_strings(monkeypatch):
    """Stock's canonical string of a value changed: "q5" and "p5" (and "n5") now count as the same value."""
    original = stock_module._sample_value_str
    monkeypatch.setattr(stock_module, "_sample_value_str", lambda value: original(value)[1:])


def _epochs(sampler, epochs=range(3)) -> list[list[list[int]]]:
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


# 12 rows, 10 of them equal, batch 2, drop_last: a pass yields at most 2 of the 6 batches, the rest is resampled, so
# the compared batches span several passes (several permutations drawn)
RESAMPLED = Dataset.from_dict({"text": ["a"] * 10 + ["b", "c"]})


@pytest.mark.parametrize(
    ("change", "data"),
    [("iter-from-batch-0", "heavy"), ("iter-from-batch-2", "heavy"), ("canonical-strings", "heavy"),
     ("iter-from-batch-0", "resampled")],
)  # fmt: skip
@pytest.mark.parametrize("generator", ["given", "global"])
def test_a_changed_stock_sampler_is_followed_with_one_warning(change, data, generator, fresh_self_check, monkeypatch,
                                                              self_check_warnings):  # fmt: skip
    import sentence_transformers

    self_check_warnings.expected = True
    dataset, batch_size, drop_last = (HEAVY, 10, False) if data == "heavy" else (RESAMPLED, 2, True)
    unchanged = epoch_batches(NoDuplicatesBatchSampler, dataset, epochs=range(3), batch_size=batch_size,
                              drop_last=drop_last)  # fmt: skip
    if change == "canonical-strings":
        _change_stock_canonical_strings(monkeypatch)
        first_changed = None
    else:
        first_changed = int(change.rsplit("-", 1)[1])
        _change_stock_iter(monkeypatch, first_changed)

    def run(cls):
        """Three epochs, then the next draw of the generator in use: the sampler must leave it as stock does."""
        if generator == "global":
            torch.manual_seed(99)
        gen = torch.Generator().manual_seed(1234) if generator == "given" else None
        sampler = cls(dataset, batch_size=batch_size, drop_last=drop_last, generator=gen)
        batches = _epochs(sampler)
        return sampler, batches, torch.rand(3, generator=gen)

    _, stock, stock_next = run(StockSampler)
    assert stock != unchanged  # the change changes stock's batches
    sampler, fast, fast_next = run(NoDuplicatesBatchSampler)
    assert fast == stock and torch.equal(fast_next, stock_next)
    assert len(self_check_warnings.records) == 1
    message = self_check_warnings.records[0].getMessage()
    assert "NoDuplicatesBatchSampler" in message and f"batch_size={batch_size}, drop_last={drop_last}" in message
    assert f"sentence-transformers {sentence_transformers.__version__} " in message
    result = sampler.self_check_result
    assert result.startswith("mismatch: batch ") and result.endswith("; now stock"), result
    if first_changed is not None:
        assert result.startswith(f"mismatch: batch {first_changed} of epoch 0:")

    # another sampler of this configuration in this process: stock's batches at once, no second warning
    again, batches, _ = run(NoDuplicatesBatchSampler)
    assert batches == stock and len(self_check_warnings.records) == 1
    assert again.self_check_result.startswith("mismatch found earlier in this process (")


def test_a_replaced_stock_class_is_the_one_checked(fresh_self_check, monkeypatch, self_check_warnings):
    """A release (or a patch) that replaces the class in sentence_transformers.base.sampler: the check runs that
    class as it is at call time."""
    self_check_warnings.expected = True

    class Reversed(StockSampler):
        def __iter__(self):
            for batch in super().__iter__():
                yield batch[::-1]

    monkeypatch.setattr(stock_module, "NoDuplicatesBatchSampler", Reversed)
    expected = epoch_batches(Reversed, HEAVY, epochs=range(2), batch_size=5, drop_last=True)
    fast = epoch_batches(NoDuplicatesBatchSampler, HEAVY, epochs=range(2), batch_size=5, drop_last=True,
                         self_check=True)  # fmt: skip
    assert expected[0] and fast == expected and len(self_check_warnings.records) == 1


def test_epoch_batches_runs_st_fast_with_the_check_off():
    # (the parity tests above compare the native scan itself; see epoch_batches)
    sampler = NoDuplicatesBatchSampler(HEAVY, 10, False, self_check=False)
    assert sampler.self_check_result == "off"


@pytest.mark.parametrize("stock_change", ["no-batches", "one-more-batch", "one-batch-fewer"])
def test_self_check_cannot_pass_vacuously(stock_change, fresh_self_check, monkeypatch, self_check_warnings):
    """Stock yielding nothing, or one batch more or fewer than st_fast within the compared ones, is a mismatch."""
    self_check_warnings.expected = True
    original = StockSampler.__iter__
    # two batches of 10 (fewer than the 3 compared): the end of the epoch is compared too
    dataset = Dataset.from_dict({"anchor": [f"a{i}" for i in range(15)], "positive": [f"p{i}" for i in range(15)]})

    def changed(self):
        batches = list(original(self))
        if stock_change == "no-batches":
            batches = []
        elif stock_change == "one-more-batch":
            batches.append(batches[-1])
        else:
            batches.pop()
        yield from batches

    monkeypatch.setattr(StockSampler, "__iter__", changed)
    expected = epoch_batches(StockSampler, dataset, epochs=range(2), batch_size=10, drop_last=False)
    sampler = NoDuplicatesBatchSampler(dataset, 10, False, generator=torch.Generator().manual_seed(1234))
    assert _epochs(sampler, range(2)) == expected
    assert sampler.self_check_result.startswith("mismatch: batch ")
    assert len(self_check_warnings.records) == 1


def test_self_check_of_a_short_epoch_and_of_an_empty_dataset(fresh_self_check):
    unique = Dataset.from_dict({"anchor": [f"a{i}" for i in range(15)], "positive": [f"p{i}" for i in range(15)]})
    short = NoDuplicatesBatchSampler(unique, 10, False, generator=torch.Generator())
    list(short)
    assert short.self_check_result == "checked: first 2 batches equal stock's (all the epoch has)"
    empty = NoDuplicatesBatchSampler(HEAVY.select([]), 10, False, generator=torch.Generator())
    assert list(empty) == [] and list(empty) == []
    assert empty.self_check_result == "nothing compared yet: the dataset is empty (stock yields no batch either)"
    none = NoDuplicatesBatchSampler(HEAVY.select(range(5)), 10, True, generator=torch.Generator())
    assert list(none) == []
    assert none.self_check_result.startswith("nothing compared yet: no batch in epoch 0 (5 rows, batch_size 10")
    assert len(fast_module._CHECKED) == 1  # only the configuration whose batches were compared has a verdict


def test_self_check_stays_cheap_in_hashed_mode(fresh_self_check, monkeypatch):
    """precompute_hashes=True: the check runs stock's incremental default mode (never its hashing pass over every
    row) and reads only the rows of the compared batches."""
    from datasets import Dataset as HFDataset

    dataset = triplets(20_000, anchors=20_000, positives=15_000, negatives=18_000, seed=5)

    def no_hashing(self):
        raise AssertionError("the self-check must not run stock's hashing pass")

    monkeypatch.setattr(StockSampler, "_build_hashes", no_hashing)
    reads = [0]
    original_getitem = HFDataset.__getitem__

    def counting_getitem(self, key):
        if isinstance(key, int):
            reads[0] += 1
        return original_getitem(self, key)

    monkeypatch.setattr(HFDataset, "__getitem__", counting_getitem)
    sampler = NoDuplicatesBatchSampler(dataset, 16, False, generator=torch.Generator(), precompute_hashes=True)
    batches = list(sampler)
    assert sampler.self_check_result == "checked: first 3 batches equal stock's"
    assert len(batches) == 1250 and reads[0] < 200  # 48 rows and the few deferred ones, of 20 000


def test_after_a_mismatch_later_epochs_use_the_stock_mode_asked_for(fresh_self_check, monkeypatch, self_check_warnings):
    self_check_warnings.expected = True
    _change_stock_iter(monkeypatch, 0)
    expected = epoch_batches(StockSampler, HEAVY, epochs=range(3), batch_size=10, drop_last=False,
                             precompute_hashes=True, precompute_num_proc=1)  # fmt: skip
    generator = torch.Generator().manual_seed(1234)
    sampler = NoDuplicatesBatchSampler(HEAVY, batch_size=10, drop_last=False, precompute_hashes=True,
                                       precompute_num_proc=1, generator=generator)  # fmt: skip
    assert _epochs(sampler) == expected
    assert sampler._stock_delegate.precompute_hashes is True and type(sampler._stock_delegate) is StockSampler


def test_self_check_under_accelerate_sharding_follows_stock_on_every_rank(monkeypatch, self_check_warnings):
    """Every rank checks on its own (no collective call; each draws the same permutation) and reaches the same
    verdict: each rank's shards are the shards of stock's (changed) batches."""
    self_check_warnings.expected = True
    _change_stock_iter(monkeypatch, 1)
    dataset = triplets(64, anchors=64, positives=64, negatives=64)
    for rank in (0, 1):
        monkeypatch.setattr(fast_module, "_CHECKED", {})  # a process of its own
        _, reference = _shard_epochs(StockSampler, dataset, rank, tell_sampler=True)
        sampler, per_epoch = _shard_epochs(NoDuplicatesBatchSampler, dataset, rank)
        assert per_epoch == reference and sampler.self_check_result.startswith("mismatch: batch 1 of epoch 0")
    assert len(self_check_warnings.records) == 2  # one per process


def test_an_st_fast_failure_where_stock_yields_is_a_mismatch(fresh_self_check, monkeypatch, self_check_warnings):
    self_check_warnings.expected = True

    def broken(dataset):
        raise RuntimeError("native core failed")

    monkeypatch.setattr(fast_module, "_build_core", broken)
    expected = epoch_batches(StockSampler, HEAVY, epochs=range(2), batch_size=10, drop_last=False)
    sampler = NoDuplicatesBatchSampler(HEAVY, 10, False, generator=torch.Generator().manual_seed(1234))
    assert _epochs(sampler, range(2)) == expected
    assert "st_fast raised RuntimeError('native core failed')" in sampler.self_check_result
    assert len(self_check_warnings.records) == 1
