"""The operands of one chunked-driver call and the GEMMs on them: the score GEMMs of a segment and the two gradient
GEMMs of its coefficients, for every op family (:mod:`st_fast.ops.mnrl.chunked`, :mod:`st_fast.ops.gist.chunked`).

A driver names its two trainable operands (``"queries"`` / ``"docs"``, ``"anchors"`` / ``"candidates"``), each a
(rows, D) matrix whose row r is the global row ``first_row + r`` of the gathered batch (0 for operands that hold
every rank's rows; the row offset o for GIST's anchors, which hold the local rows only). A segment is the scores of
some global rows of one operand (a row chunk, :func:`st_fast.ops.chunked.row_chunks`) against the columns of
another, its column c being the column operand's global row c::

    S = rows @ columnsᵀ                     (fp32 output; fp64 for fp64 operands)
    d rows    += factor · C @ columns       (C = d loss / d S, the row kernel's coefficients)
    d columns += factor · Cᵀ @ rows

with γ (the coefficients' storage scale) and σ (the float16 copies' scale) divided out on the raw 16-bit path
(:mod:`st_fast.ops.raw_16bit`). The gradients are fp32 (fp64 for fp64 operands), zero-initialized, O((rows) · D)
per operand; the score and coefficient buffers come from the call's scratch arena (:mod:`st_fast.ops.workspace`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from st_fast.ops.chunked import LossAndGrad
from st_fast.ops.mixed_matmul import accumulate_product, compute_dtype, matmul_fp32
from st_fast.ops.normalization import add_normalization_term
from st_fast.ops.row_kernel import SegmentScales
from st_fast.ops.workspace import Arena

ColumnRanges = list[tuple[int, int]]  # (lo, hi) ranges of global column indices


@dataclass
class Operands:
    """The operands of one call as the driver's passes use them (build with :meth:`prepare`).

    ``scores``: the operands of the score GEMMs, by name (the anchors' first, then the candidates'); ``scales``: their
    inverse norms (raw operands with cosine similarity, :func:`st_fast.ops.normalization.inverse_norm`) or None;
    ``gradient``: the operands of the gradient GEMMs (float16 copies times σ on the raw 16-bit path, else
    ``scores``); ``sigma``: their σ; ``grads``: the gradients (empty without ``need_grad``); ``unscale``: 1 / (γ·σ)
    per operand, the power of two the gradient GEMMs with it as the column operand divide out. σ and γ are numbers,
    or 0-dim tensors on the device on the 16-bit path (never read on the host).
    """

    scores: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor | None]
    gradient: dict[str, torch.Tensor]
    sigma: dict[str, float | torch.Tensor]
    grads: dict[str, torch.Tensor]
    first_row: dict[str, int]
    math_dtype: torch.dtype
    coefficient_dtype: torch.dtype
    arena: Arena
    unscale: dict[str, float | torch.Tensor] = field(default_factory=dict)

    @classmethod
    def prepare(
        cls,
        operands: dict[str, torch.Tensor],
        arena: Arena,
        *,
        need_grad: bool,
        scales: dict[str, torch.Tensor] | None = None,
        float16: dict[str, tuple[torch.Tensor, float | torch.Tensor]] | None = None,
        first_row: dict[str, int] | None = None,
    ) -> Operands:
        """The operands (name -> (rows, D), one floating dtype and device) of a call that takes its buffers from
        ``arena``. ``scales``: the raw operands' inverse norms (cosine similarity applied by the row kernel);
        ``float16``: (float16 copy, σ) per operand for the gradient GEMMs, on the raw 16-bit path (the coefficients
        are then stored in float16, :func:`st_fast.ops.raw_16bit.stores_float16_coefficients`, whose caller makes
        the copies with :func:`st_fast.ops.raw_16bit.as_float16_operand`); ``first_row``: the global index of an
        operand's first row (default 0). γ is 1 until :meth:`set_coefficient_scale`."""
        math_dtype = compute_dtype(next(iter(operands.values())).dtype)
        gradient, sigma = operands, {name: 1.0 for name in operands}
        if float16 is not None:
            gradient = {name: x16 for name, (x16, _) in float16.items()}
            sigma = {name: factor for name, (_, factor) in float16.items()}
        grads = {}
        if need_grad:
            grads = {name: torch.zeros(x.shape, dtype=math_dtype, device=x.device) for name, x in operands.items()}
        ops = cls(
            dict(operands), dict(scales or dict.fromkeys(operands)), gradient, sigma, grads,
            {name: (first_row or {}).get(name, 0) for name in operands}, math_dtype,
            torch.float16 if float16 is not None else math_dtype, arena,
        )  # fmt: skip
        ops.set_coefficient_scale(1.0)
        return ops

    def set_coefficient_scale(self, gamma: float | torch.Tensor) -> None:
        """Take the coefficients as stored times ``gamma`` (:func:`st_fast.ops.raw_16bit.coefficient_scale`)."""
        self.unscale = {name: 1.0 / (gamma * sigma) for name, sigma in self.sigma.items()}

    @property
    def separate_coefficients(self) -> bool:
        """The coefficients have buffers of their own (float16), not written over the fp32 scores."""
        return self.coefficient_dtype != self.math_dtype

    @property
    def bytes_per_score(self) -> int:
        """Bytes of chunk buffers per score entry: the fp32 score, and its float16 coefficient when stored apart."""
        return 4 + (2 if self.separate_coefficients else 0)

    def rows(self, name: str) -> int:
        """The row count of operand ``name``: the column count of a segment over all its columns."""
        return self.scores[name].shape[0]

    def buffers(self, rows: int, lengths: list[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """Uninitialized (rows, length) buffers of the call's scratch memory (:mod:`st_fast.ops.workspace`)."""
        return [self.arena.take((rows, length), dtype) for length in lengths]

    def coefficient_buffers(
        self, rows: int, lengths: list[int], score_buffers: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """The buffers the row kernel writes the coefficients to: float16 ones of their own when
        :attr:`separate_coefficients`, else ``score_buffers`` (written over the scores)."""
        if not self.separate_coefficients:
            return score_buffers
        return self.buffers(rows, lengths, self.coefficient_dtype)

    def own(self, name: str, global_rows: slice) -> slice:
        """The rows of operand ``name`` (its own indices) of the global rows ``global_rows`` (start, stop given)."""
        first = self.first_row[name]
        return slice(global_rows.start - first, global_rows.stop - first)

    def _column_ranges(self, name: str, column_ranges: ColumnRanges | None) -> ColumnRanges:
        first = self.first_row[name]
        return column_ranges or [(first, first + self.rows(name))]

    def segment_scales(self, rows: str, columns: str, global_rows: slice) -> SegmentScales:
        """The row kernel's row and column scales of a segment (raw operands with cosine similarity)."""
        return SegmentScales(self.scales[rows][self.own(rows, global_rows)], self.scales[columns])

    def scores_into(
        self, rows: str, columns: str, global_rows: slice, out: torch.Tensor, column_ranges: ColumnRanges | None = None
    ) -> torch.Tensor:
        """Raw scores of the rows ``global_rows`` of operand ``rows`` against the columns of operand ``columns``
        into ``out`` (n, L): column c of ``out`` is the column operand's global row c. With ``column_ranges`` (or
        where the column operand does not cover 0 .. L exactly) only those columns, -inf in the others."""
        row_block = self.scores[rows][self.own(rows, global_rows)]
        first, column_operand = self.first_row[columns], self.scores[columns]
        ranges = self._column_ranges(columns, column_ranges)
        if ranges == [(0, out.shape[1])]:
            return matmul_fp32(row_block, column_operand[: out.shape[1]].T, out=out)
        out.fill_(float("-inf"))
        for lo, hi in ranges:
            out[:, lo:hi] = matmul_fp32(row_block, column_operand[lo - first : hi - first].T)
        return out

    def accumulate(self, rows: str, columns: str, global_rows: slice, coefficient: torch.Tensor, factor: float,
                   column_ranges: ColumnRanges | None = None) -> None:  # fmt: skip
        """The two gradient GEMMs of one segment's coefficients (n, L) (its columns ``column_ranges`` only, when
        given; the columns the column operand holds otherwise): d rows += factor · C @ columns, d columns +=
        factor · Cᵀ @ rows (γ and σ divided out, on the device)."""
        local = self.own(rows, global_rows)
        row_block, column_operand = self.gradient[rows][local], self.gradient[columns]
        first = self.first_row[columns]
        for lo, hi in self._column_ranges(columns, column_ranges):
            part, own = coefficient[:, lo:hi], slice(lo - first, hi - first)
            accumulate_product(self.grads[rows][local], part, column_operand[own], factor, self.unscale[columns])
            accumulate_product(self.grads[columns][own], part.T, row_block, factor, self.unscale[rows])

    def result(self, loss: torch.Tensor) -> LossAndGrad:
        """The driver's result: ``loss`` with the gradients of the two operands (None without ``need_grad``), the
        cosine normalization's own term added for raw operands (:func:`add_normalization_term`)."""
        for name, scale in self.scales.items():
            if self.grads and scale is not None:
                add_normalization_term(self.grads[name], self.scores[name], scale)
        anchors, candidates = (self.grads.get(name) for name in self.scores)
        return LossAndGrad(loss, anchors, candidates)
