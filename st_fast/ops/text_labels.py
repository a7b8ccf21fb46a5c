"""Exact duplicate labels of tokenized texts, for ``mask_duplicates`` (see :mod:`st_fast.ops.layout`).

A text is the sequence of its non-padding token ids (``input_ids`` where ``attention_mask`` is 1, in order; left or
right padding alike). :func:`text_labels` gives each text one int64 label, equal for two texts iff their id sequences
are equal:

1. :func:`token_rows`: the texts as one (M, L) int64 matrix, the ids left-aligned and -1 after the text's end;
2. :func:`text_keys`: a 64-bit key per row, computed with torch ops on the rows' device: a polynomial hash of the ids
   (Σ_p (id_p + 2) · P^(p+1) with int64 wraparound, P = 0x9E3779B97F4A7C15, the 64-bit golden-ratio constant of
   Knuth's multiplicative hashing), plus the length times a second odd constant, then a xor-shift-multiply finalizer
   (the 64-bit mixer of SplitMix64, Steele, Lea & Flood 2014, with arithmetic shifts);
3. :func:`exact_labels`: texts with equal keys are confirmed equal on their ids (length and every id, one
   comparison per text with the first text of its key); if any key holds two distinct texts (a collision), every
   label is recomputed from the ids themselves (``torch.unique(rows, dim=0)``), so a collision never gives two
   distinct texts one label. The key only makes the common case cheap (a sort of M keys instead of M rows of L ids).

Cost: O(M·L) elementwise work, one sort of M keys and one host sync (torch.unique's output size) per call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import torch

_MASK64 = (1 << 64) - 1
KEY_MULTIPLIER = 0x9E3779B97F4A7C15  # Knuth's multiplicative constant, 2^64 / golden ratio (odd)
LENGTH_MULTIPLIER = 0xC2B2AE3D27D4EB4F  # an odd 64-bit constant (xxHash64's PRIME64_2)
MIX_MULTIPLIERS = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # SplitMix64's finalizer


def _signed(value: int) -> int:
    """The int64 (two's complement) with the low 64 bits of ``value``."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


@lru_cache(maxsize=64)
def _powers(length: int) -> tuple[int, ...]:
    """P^1 .. P^length mod 2^64, as int64 values."""
    out, power = [], 1
    for _ in range(length):
        power = (power * KEY_MULTIPLIER) & _MASK64
        out.append(_signed(power))
    return tuple(out)


def token_rows(features: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """The texts of every feature dict (the loss's input columns, in order) as one (M, L) int64 matrix: row i holds
    text i's non-padding ids left-aligned, then -1; M = the sum of the columns' batch sizes, L = the longest text.

    Raises:
        ValueError: a feature dict without ``input_ids`` (e.g. an image model's), or ``input_ids`` that are not 2-D.
    """
    rows = []
    for column, feature in enumerate(features):
        ids = feature.get("input_ids") if isinstance(feature, Mapping) else None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(
                "mask_duplicates compares the texts' token ids, but input column "
                f"{column} has no 2-D 'input_ids' feature (a model without a tokenizer, e.g. an image model, "
                "cannot use mask_duplicates)"
            )
        mask = feature.get("attention_mask")
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(ids.device).bool()
        # the kept ids first, in order (a stable sort of the padding flags), then -1
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        compact = ids.long().gather(1, order)
        length = keep.sum(dim=1)
        positions = torch.arange(ids.shape[1], device=ids.device)
        rows.append(compact.masked_fill(positions[None, :] >= length[:, None], -1))
    width = max(1, max(r.shape[1] for r in rows))
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=-1) for r in rows])


def text_keys(rows: torch.Tensor, key_bits: int = 64) -> torch.Tensor:
    """A key (M,) int64 per row of :func:`token_rows` (see the module docstring); ``key_bits`` < 64 keeps the low
    bits only (a test hook: a few bits force collisions)."""
    device = rows.device
    powers = torch.tensor(_powers(rows.shape[1]), dtype=torch.int64, device=device)
    valid = rows >= 0
    key = torch.where(valid, (rows + 2) * powers, 0).sum(dim=1)
    key = key + valid.sum(dim=1) * _signed(LENGTH_MULTIPLIER)
    for multiplier, shift in zip(MIX_MULTIPLIERS, (30, 27), strict=True):
        key = (key ^ (key >> shift)) * _signed(multiplier)
    key = key ^ (key >> 31)
    if key_bits < 64:
        key = key & ((1 << key_bits) - 1)
    return key


def _first_of_group(inverse: torch.Tensor, groups: int) -> torch.Tensor:
    """For each element, the smallest index with its group (inverse: (M,) group ids in [0, groups))."""
    count = inverse.shape[0]
    index = torch.arange(count, device=inverse.device)
    first = torch.full((groups,), count, dtype=torch.int64, device=inverse.device)
    return first.scatter_reduce(0, inverse, index, reduce="amin")[inverse]


def exact_labels(rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Labels (M,) int64 of the rows: the index of the first row equal to it, so equal iff the rows are equal,
    whatever the keys (see the module docstring)."""
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    labels = _first_of_group(inverse, unique_keys.shape[0])
    if bool((rows == rows[labels]).all()):
        return labels
    unique_rows, inverse = torch.unique(rows, dim=0, return_inverse=True)  # a key held two distinct texts
    return _first_of_group(inverse, unique_rows.shape[0])


def text_labels(features: Sequence[Mapping[str, torch.Tensor]], *, key_bits: int = 64) -> torch.Tensor:
    """Labels (M,) int64 of every text of ``features`` (the columns in order, M = their total batch size), equal
    iff the token ids are equal. Raises ValueError for features without ``input_ids`` (:func:`token_rows`)."""
    rows = token_rows(features)
    return exact_labels(rows, text_keys(rows, key_bits))
