"""The shipped Debian description pairs load offline, are non-trivial and contain natural duplicates."""

from __future__ import annotations

import gzip
import hashlib
from collections import Counter

import pytest

from examples.debian_pairs import debian_pairs_path, load_debian_pairs, read_debian_pairs


@pytest.fixture(scope="module")
def ds():
    return load_debian_pairs()


def test_path_is_shipped_file():
    path = debian_pairs_path()
    assert path.is_file() and path.name == "debian_pairs.tsv.gz"
    assert path.stat().st_size < 1_000_000
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        assert fh.readline() == "anchor\tpositive\tpackage\n"


def test_rows_and_columns(ds):
    assert ds.column_names == ["anchor", "positive", "package"]
    assert len(ds) >= 3000
    for col in ds.column_names:
        values = ds[col]
        assert all(isinstance(v, str) and v.strip() == v and v for v in values), col
        assert not any("\t" in v or "\n" in v for v in values), col
    assert len(set(ds["package"])) == len(ds), "one row per package"
    assert all(a != p for a, p in zip(ds["anchor"], ds["positive"], strict=True))
    assert max(len(p) for p in ds["positive"]) <= 400


def test_has_natural_duplicates(ds):
    anchors = Counter(ds["anchor"])
    positives = Counter(ds["positive"])
    repeated = sum(1 for a, p in zip(ds["anchor"], ds["positive"], strict=True) if anchors[a] > 1 or positives[p] > 1)
    # A few percent of rows share an anchor or a positive with another row, but most rows are unique.
    assert 0.01 * len(ds) <= repeated <= 0.25 * len(ds)
    assert any(n > 1 for n in anchors.values())
    assert any(n > 1 for n in positives.values())


def test_limit_and_determinism(ds):
    small = load_debian_pairs(limit=100)
    assert len(small) == 100
    assert small["package"] == ds["package"][:100]
    assert len(load_debian_pairs(limit=0)) == 0

    def digest(cols):
        h = hashlib.sha256()
        for row in zip(cols["anchor"], cols["positive"], cols["package"], strict=True):
            h.update("\t".join(row).encode() + b"\n")
        return h.hexdigest()

    assert digest(read_debian_pairs()) == digest(ds.to_dict())
    assert ds["package"] == sorted(ds["package"])
