"""st_fast._compat against the installed sentence-transformers and datasets: each private name it reads exists and
means what st_fast assumes. Run it under every supported sentence-transformers (6.0.x, 6.2.x and 6.3.x were checked)."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import sentence_transformers
from datasets import Dataset
from packaging.version import Version
from sentence_transformers.base import sampler as stock_sampler

from st_fast import _compat

ST_VERSION = Version(sentence_transformers.__version__)


def test_the_installed_sentence_transformers_is_supported():
    assert Version("6.0") <= ST_VERSION < Version("7"), ST_VERSION
    expected = os.environ.get("ST_FAST_EXPECT_ST_VERSION")  # set by scripts/test_stock_versions.sh
    if expected:
        assert ST_VERSION == Version(expected), (sentence_transformers.__file__, ST_VERSION)


def test_sample_value_str_is_the_stock_canonical_string():
    assert _compat.sample_value_str is stock_sampler._sample_value_str
    assert _compat.sample_value_str(1) == _compat.sample_value_str("1") == "1"
    assert _compat.sample_value_str(None) == "None"
    assert _compat.sample_value_str([1, "a"]) == str([1, "a"])
    assert _compat.sample_value_str("ünï") == "ünï"


def test_excluded_dataset_columns():
    assert hasattr(stock_sampler, "_EXCLUDE_DATASET_COLUMNS")
    assert _compat.excluded_dataset_columns() == frozenset(stock_sampler._EXCLUDE_DATASET_COLUMNS) == {"dataset_name"}


def test_resample_passes_follows_the_stock_sampler():
    passes = _compat.resample_passes()
    if ST_VERSION < Version("6.1"):  # 6.0.x: one pass, no resampling
        assert passes is None
        assert not hasattr(stock_sampler, "_MAX_RESAMPLE_PASSES")
    else:
        assert passes == stock_sampler._MAX_RESAMPLE_PASSES
    if ST_VERSION >= Version("6.2"):
        assert passes == 2


def test_resample_passes_is_read_at_each_call(monkeypatch):
    monkeypatch.setattr(stock_sampler, "_MAX_RESAMPLE_PASSES", 5, raising=False)
    assert _compat.resample_passes() == 5


def test_dataset_indices():
    dataset = Dataset.from_dict({"a": ["x", "y", "z", "w"]})
    assert hasattr(dataset, "_indices")
    assert _compat.dataset_indices(dataset) is None
    for derived, expected in [
        (dataset.select([3, 0, 2]), [3, 0, 2]),
        (dataset.filter(lambda row: row["a"] != "y"), [0, 2, 3]),
        (dataset.select([3, 0, 2]).select([2, 0]), [2, 3]),
        (dataset.shuffle(seed=0), None),
    ]:
        indices = _compat.dataset_indices(derived)
        assert indices.dtype == np.int64 and indices.shape == (len(derived),)
        if expected is not None:
            assert indices.tolist() == expected
        assert [derived[i]["a"] for i in range(len(derived))] == [dataset[int(j)]["a"] for j in indices]
    assert _compat.dataset_indices(dataset.select([3, 0, 2]).flatten_indices()) is None


def test_the_public_dataset_format_reports_what_the_sampler_reads():
    """The sampler decides between reading Arrow buffers and reading rows from ``Dataset.format`` (public)."""
    dataset = Dataset.from_dict({"a": ["x"], "b": ["y"]})
    assert dataset.format == {"type": None, "format_kwargs": {}, "columns": ["a", "b"], "output_all_columns": False}
    assert dataset.with_format("numpy").format["type"] == "numpy"
    assert dataset.with_format(None, columns=["a"]).format["columns"] == ["a"]
    assert dataset.with_format(None, columns=["a"], output_all_columns=True).format["output_all_columns"]
    transform = functools.partial(lambda batch, name: batch, name="x")
    dataset.set_transform(transform)
    assert dataset.format["type"] == "custom"
    assert dataset.format["format_kwargs"] == {"transform": transform}


@pytest.mark.parametrize("name", ["add_dataset_name_transform"])
def test_the_trainer_transform_the_sampler_recognizes_exists(name):
    from sentence_transformers import SentenceTransformerTrainer

    method = getattr(SentenceTransformerTrainer, name)
    assert method.__name__ == name and method.__module__.startswith("sentence_transformers.")


def test_stock_sampler_state_is_what_the_stock_sampler_reads_now(monkeypatch):
    """The key part of the sampler self-check: each name the stock sampler reads at call time, as it is now."""
    state = _compat.stock_sampler_state()
    assert state[0] is stock_sampler._sample_value_str
    assert state[1] == frozenset(stock_sampler._EXCLUDE_DATASET_COLUMNS)
    assert state[2] == getattr(stock_sampler, "_MAX_RESAMPLE_PASSES", None)
    assert hash(state) == hash(_compat.stock_sampler_state())
    monkeypatch.setattr(stock_sampler, "_sample_value_str", lambda value: str(value))
    assert _compat.stock_sampler_state() != state


def test_dataset_fingerprint():
    dataset = Dataset.from_dict({"a": ["x", "y", "z"]})
    assert hasattr(dataset, "_fingerprint")
    fingerprint = _compat.dataset_fingerprint(dataset)
    assert isinstance(fingerprint, str) and fingerprint == dataset._fingerprint
    assert _compat.dataset_fingerprint(dataset) == fingerprint  # stable for one dataset
    derived = [dataset.select([2, 0]), dataset.map(lambda row: {"a": row["a"] + "!"}), dataset.shuffle(seed=1)]
    assert len({fingerprint, *(_compat.dataset_fingerprint(d) for d in derived)}) == 4


def test_installed_version():
    assert _compat.installed_version() == sentence_transformers.__version__
