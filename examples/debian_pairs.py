"""The Debian pairs: 4000 real (anchor, positive, package) text rows for the demo, tests and benchmarks (offline).

``debian_pairs.tsv.gz`` next to this file holds rows built from Debian bookworm package descriptions (synopsis ->
cleaned long description). See ``README.md`` next to this file for source, licence and regeneration. Part of the
source checkout, not of the installed package.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets

__all__ = ["debian_pairs_path", "load_debian_pairs", "read_debian_pairs"]

_DEBIAN_PAIRS = "debian_pairs.tsv.gz"
_COLUMNS = ("anchor", "positive", "package")


def debian_pairs_path() -> Path:
    """Filesystem path of ``debian_pairs.tsv.gz`` (next to this module, in the source checkout's ``examples/``)."""
    path = Path(__file__).with_name(_DEBIAN_PAIRS)
    if not path.is_file():
        raise FileNotFoundError(f"{_DEBIAN_PAIRS} is missing next to {__file__}")
    return path


def read_debian_pairs(limit: int | None = None) -> dict[str, list[str]]:
    """The rows as a column dict (no ``datasets`` import); the first ``limit`` rows in file order if given."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    columns: dict[str, list[str]] = {name: [] for name in _COLUMNS}
    with gzip.open(debian_pairs_path(), "rt", encoding="utf-8", newline="\n") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if tuple(header) != _COLUMNS:
            raise ValueError(f"unexpected header in {_DEBIAN_PAIRS}: {header}")
        for i, line in enumerate(fh):
            if limit is not None and i >= limit:
                break
            fields = line.rstrip("\n").split("\t")
            if len(fields) != len(_COLUMNS):
                raise ValueError(f"{_DEBIAN_PAIRS} line {i + 2}: expected {len(_COLUMNS)} fields, got {len(fields)}")
            for name, value in zip(_COLUMNS, fields, strict=True):
                columns[name].append(value)
    return columns


def load_debian_pairs(limit: int | None = None) -> datasets.Dataset:
    """Debian (synopsis, long description, package) pairs as a ``datasets.Dataset`` with columns
    ``anchor``, ``positive``, ``package``; the first ``limit`` rows (file order, sorted by package) if given.

    Natural near-duplicates are kept: a few percent of rows repeat another row's anchor or positive
    (e.g. sibling packages such as ``-dev``/``-doc`` or compiler versions sharing a description).
    """
    import datasets

    return datasets.Dataset.from_dict(read_debian_pairs(limit))
