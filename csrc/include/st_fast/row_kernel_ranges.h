// The contrastive row kernel's CPU range loops: the serial build's (SerialLanes) per-segment steps of the passes of
// row_kernel_lanes.h, the same math as the lane algorithm over the contiguous column ranges between a row's own
// columns, as branch-free loops that GCC -O3 vectorizes: the row max, then the sum of exp (still one exp per entry),
// and the coefficients through a local tile; exp is row_expf (portability.h: a vectorizable polynomial on the CPU).
// mask_duplicates' labels are tested by a branch-free select (template kLabels: no cost without labels). The CUDA
// build never includes this header; a CPU build must (the lane templates refuse SerialLanes).
#pragma once

#include <type_traits>

#include "st_fast/row_kernel_lanes.h"

namespace st_fast {

// ---- The serial (CPU) build's range loops (Lanes::kContiguous). A row's bulk entries form contiguous column
// ranges between its own columns; these loops over one range have no per-element branches and keep their
// reductions in kVectorLanes independent accumulators, so that GCC -O3 vectorizes them (without -ffast-math, a
// single running max / sum would be a serial dependence). The online max / sum of the warp build becomes two
// passes here: the range's max, then the sum of row_expf(l - max) (one exp per entry either way).
constexpr int kVectorLanes = 16;
constexpr int64_t kRangeTile = 256;  // coefficients are staged per tile in a local buffer: the output may alias v

// mask_duplicates in the range loops (kLabels): `masked` where column c's label equals the row's reference label
// `ref` (a bulk column is never the row's target), else value; a branch-free select, so that the loops vectorize.
template <bool kLabels>
ST_FAST_HD_VEC float unless_duplicate(const Label* labels, Label ref, int64_t c, float value, float masked) {
  return kLabels ? select_float(labels[c] == ref, masked, value) : value;
}

// The logit v[c]·(row_scale·col_scale[c])·mult of a bulk entry (the same expression as scaled(...)·mult); -inf for
// a duplicate (kLabels).
template <bool kColScale, bool kLabels = false>
ST_FAST_HD_VEC float range_logit(const float* v, const float* col_scale, float row_scale, float mult, int64_t c,
                                 const Label* labels = nullptr, Label ref = 0) {
  const float logit = v[c] * (row_scale * (kColScale ? col_scale[c] : 1.0f)) * mult;
  return unless_duplicate<kLabels>(labels, ref, c, logit, -INFINITY);
}

// max(m, the logits of columns [begin, end)); NaN logits are skipped (their exp in range_sum_exp propagates). The
// running max is elementwise over kMaxLanes accumulators, tile by tile (GCC vectorizes this form of a max, not a
// fixed 16-lane reduction, whose unrolled selects it leaves scalar), then reduced.
constexpr int64_t kMaxLanes = 64;
template <bool kColScale, bool kLabels>
ST_FAST_HD float range_max(const float* v, const float* col_scale, float row_scale, float mult, int64_t begin,
                           int64_t end, float m, const Label* labels, Label ref) {
  float lane[kMaxLanes];
  for (int64_t l = 0; l < kMaxLanes; ++l) lane[l] = -INFINITY;
  for (int64_t c0 = begin; c0 < end; c0 += kMaxLanes) {
    const int64_t count = end - c0 < kMaxLanes ? end - c0 : kMaxLanes;
    for (int64_t l = 0; l < count; ++l) {
      const float x = range_logit<kColScale, kLabels>(v, col_scale, row_scale, mult, c0 + l, labels, ref);
      lane[l] = x > lane[l] ? x : lane[l];
    }
  }
  for (int64_t l = 0; l < kMaxLanes; ++l) m = lane[l] > m ? lane[l] : m;
  return m;
}

// The sum of row_expf(l - shift) over the logits of columns [begin, end) (row_expf(-inf) = 0: duplicates add 0).
template <bool kColScale, bool kLabels>
ST_FAST_HD float range_sum_exp(const float* v, const float* col_scale, float row_scale, float mult, int64_t begin,
                               int64_t end, float shift, const Label* labels, Label ref) {
  float lane[kVectorLanes];
  for (int l = 0; l < kVectorLanes; ++l) lane[l] = 0.0f;
  int64_t c = begin;
  for (; c + kVectorLanes <= end; c += kVectorLanes)
    for (int l = 0; l < kVectorLanes; ++l)
      lane[l] += row_expf(range_logit<kColScale, kLabels>(v, col_scale, row_scale, mult, c + l, labels, ref) - shift);
  float total = 0.0f;
  for (; c < end; ++c)
    total += row_expf(range_logit<kColScale, kLabels>(v, col_scale, row_scale, mult, c, labels, ref) - shift);
  for (int l = 0; l < kVectorLanes; ++l) total += lane[l];
  return total;
}

// Writes Out(tile values) for the columns [begin, end) (at out_offset + c), tile by tile: fill(c0, count, tile)
// computes the values of columns c0 .. c0 + count into a local buffer first, so that its loop vectorizes even where
// the output aliases the scores.
template <class Out, class Fill>
ST_FAST_HD void range_store_tiles(void* out, int64_t out_offset, int64_t begin, int64_t end, Fill&& fill) {
  float tile[kRangeTile];
  for (int64_t c0 = begin; c0 < end; c0 += kRangeTile) {
    const int64_t count = end - c0 < kRangeTile ? end - c0 : kRangeTile;
    fill(c0, count, tile);
    for (int64_t i = 0; i < count; ++i) Out::put(out, out_offset + c0 + i, tile[i]);
  }
}

// range_store_tiles with a value term(c) per column.
template <class Out, class Term>
ST_FAST_HD void range_store(void* out, int64_t out_offset, int64_t begin, int64_t end, Term&& term) {
  range_store_tiles<Out>(out, out_offset, begin, end, [&](int64_t c0, int64_t count, float* tile) {
    for (int64_t i = 0; i < count; ++i) tile[i] = term(c0 + i);
  });
}

// Calls range(begin, end) for the bulk column ranges of a row and own(c, j) for its own columns (c % W == g,
// j = c / W), in column order.
template <class Range, class Own>
ST_FAST_HD void for_each_segment_range(int64_t n, int64_t width, int64_t g, Range&& range, Own&& own) {
  for (int64_t block = 0; block < n; block += width) {
    const int64_t own_column = block + g;
    range(block, own_column);
    range(own_column + 1, block + width);
    own(own_column, block / width);
  }
}

// f(std::bool_constant<first>{}, std::bool_constant<second>{}): the range loops' template flags (column scales,
// labels) from their runtime values.
template <class F>
ST_FAST_HD void dispatch_range_flags(bool first, bool second, F&& f) {
  if (first) {
    if (second) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (second) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}


// ---- segment_lse of the serial build: two passes over the row's ranges.
template <bool kColScale, bool kLabels, class Args>
ST_FAST_HD float segment_lse_ranges(const Args& a, int64_t r, int x, float& positive) {
  const int64_t g = a.seg.row_start + r;
  const Label* labels = a.seg.labels[x];
  const Label ref_label = kLabels ? labels[g] : 0;
  const float* v = a.seg.scores[x] + r * a.seg.lengths[x];
  const float* col_scale = a.scales.columns[x];
  const int kind = a.seg.kinds[x];
  const float row_scale = row_scale_of(a.scales, x, r);
  const float bulk = bulk_multiplier(a.rule, kind);
  auto own_logit = [&](int64_t c, int64_t j, float& logit) {
    const float mult = own_column_multiplier(a.rule, kind, j);
    if (mult == 0.0f || duplicate(a.seg, x, c, g)) return false;
    logit = scaled(a.scales, x, row_scale, c, v[c]) * mult;
    return true;
  };
  float m = -INFINITY;
  for_each_segment_range(
      a.seg.lengths[x], a.seg.width, g,
      [&](int64_t begin, int64_t end) {
        m = range_max<kColScale, kLabels>(v, col_scale, row_scale, bulk, begin, end, m, labels, ref_label);
      },
      [&](int64_t c, int64_t j) {
        float logit;
        if (!own_logit(c, j, logit)) return;
        if (kind == kOwnPositive && j == 0) positive = logit;
        m = logit > m ? logit : m;
      });
  const float shift = finite_shift(m);
  float total = 0.0f;
  for_each_segment_range(
      a.seg.lengths[x], a.seg.width, g,
      [&](int64_t begin, int64_t end) {
        total += range_sum_exp<kColScale, kLabels>(v, col_scale, row_scale, bulk, begin, end, shift, labels, ref_label);
      },
      [&](int64_t c, int64_t j) {
        float logit;
        if (own_logit(c, j, logit)) total += row_expf(logit - shift);
      });
  return shift + logf(total);
}

template <class Args>
ST_FAST_HD float segment_lse(const Args& a, int64_t r, int x, const SerialLanes&, float& positive) {
  float lse = 0.0f;
  dispatch_range_flags(a.scales.columns[x] != nullptr, a.seg.labels[x] != nullptr, [&](auto col_scaled, auto labelled) {
    lse = segment_lse_ranges<decltype(col_scaled)::value, decltype(labelled)::value>(a, r, x, positive);
  });
  return lse;
}

// ---- The one-pass kernel's coefficients of one segment.
template <class Out>
ST_FAST_HD void store_row_coefficients(const RowSegmentTerms& t, const SerialLanes&) {
  const RowArgs& a = t.a;
  const int x = t.x;
  const SegmentRow row(a, t.r, x);
  const int64_t n = row.n, width = a.seg.width, g = row.g, out_offset = row.out_offset;
  const float* v = row.v;
  void* out = row.out;
  const float* col_scale = a.scales.columns[x];
  const float row_scale = row.row_scale, bulk = row.bulk, ref = t.ref, weight = t.weight;
  const Label* labels = a.seg.labels[x];
  const Label ref_label = labels ? labels[g] : 0;
  auto store_rows = [&](auto has_col_scale, auto has_labels) {
    constexpr bool kColScale = decltype(has_col_scale)::value;
    constexpr bool kLabels = decltype(has_labels)::value;
    for_each_segment_range(
        n, width, g,
        [&](int64_t begin, int64_t end) {
          range_store<Out>(out, out_offset, begin, end, [&](int64_t c) {
            const float scales = row_scale * (kColScale ? col_scale[c] : 1.0f);
            const float coefficient = weight * row_expf(v[c] * scales * bulk - ref) * scales;
            return unless_duplicate<kLabels>(labels, ref_label, c, coefficient, 0.0f);
          });
        },
        [&](int64_t c, int64_t j) { t.own<Out>(c, j, v[c]); });
  };
  dispatch_range_flags(col_scale != nullptr, labels != nullptr, store_rows);
}

// ---- The symmetric coefficient pass's coefficients of one segment.
template <class Out>
ST_FAST_HD void store_symmetric_coefficients(const SymmetricSegmentTerms& t, const SerialLanes&) {
  const CoefficientsArgs& a = t.a;
  const int x = t.x;
  const SegmentRow row(a, t.r, x);
  const int64_t n = row.n, g = row.g, out_offset = row.out_offset, block_end = a.block.begin + a.block.count;
  const float* v = row.v;
  void* out = row.out;
  const float row_scale = row.row_scale, bulk = row.bulk, ref = t.ref, row_factor = t.row_factor, weight = t.w.weight;
  const bool q2d = a.seg.kinds[x] == kOwnPositive;
  const float* col_scale = a.scales.columns[x];
  // mask_duplicates: the row term's labels (the segment's) and the column term's (the query labels)
  const Label* labels = a.seg.labels[x];
  const Label ref_label = labels ? labels[g] : 0;
  const Label* query_labels = a.block.query_labels;
  const Label query_ref = query_labels ? query_labels[g] : 0;
  auto store_rows = [&](auto has_col_scale, auto has_labels) {
    constexpr bool kColScale = decltype(has_col_scale)::value;
    constexpr bool kLabels = decltype(has_labels)::value;
    // the row term alone (outside the positive block, and every non-Q2D segment)
    auto row_only = [&](int64_t begin, int64_t end) {
      range_store<Out>(out, out_offset, begin, end, [&](int64_t c) {
        const float scales = row_scale * (kColScale ? col_scale[c] : 1.0f);
        const float coefficient = weight * row_expf(v[c] * scales * bulk - ref) * scales;
        return unless_duplicate<kLabels>(labels, ref_label, c, coefficient, 0.0f);
      });
    };
    // the row and column terms of the positive block's columns [begin, end): SymmetricSegmentTerms::column_term's
    // two forms, the one-exp (factor) form for a tile whose column factors are all positive, else the column's own
    // exp
    auto with_column = [&](int64_t begin, int64_t end) {
      const bool factor_form = bulk == a.rule.scale && row_factor > 0.0f && a.col_factor;
      range_store_tiles<Out>(out, out_offset, begin, end, [&](int64_t c0, int64_t count, float* tile) {
        const float* col_factor = a.col_factor ? a.col_factor + (c0 - a.block.begin) : nullptr;
        const float* col_ref = a.col_ref + (c0 - a.block.begin);
        int unusable = factor_form ? 0 : 1;
        if (factor_form)
          for (int64_t i = 0; i < count; ++i) unusable |= col_factor[i] > 0.0f ? 0 : 1;
        if (!unusable) {
          for (int64_t i = 0; i < count; ++i) {
            const float scales = row_scale * (kColScale ? col_scale[c0 + i] : 1.0f);
            const float row_exp = row_expf(v[c0 + i] * scales * bulk - ref);
            const float row_term = unless_duplicate<kLabels>(labels, ref_label, c0 + i, weight * row_exp, 0.0f);
            const float column = unless_duplicate<kLabels>(query_labels, query_ref, c0 + i,
                                                           weight * (row_exp * (row_factor * col_factor[i])), 0.0f);
            tile[i] = (row_term + column) * scales;
          }
        } else {
          for (int64_t i = 0; i < count; ++i) {
            const float scales = row_scale * (kColScale ? col_scale[c0 + i] : 1.0f);
            const float s = v[c0 + i] * scales;
            const float row_term = unless_duplicate<kLabels>(labels, ref_label, c0 + i,
                                                             weight * row_expf(s * bulk - ref), 0.0f);
            const float column = unless_duplicate<kLabels>(query_labels, query_ref, c0 + i,
                                                           weight * row_expf(s * a.rule.scale - col_ref[i]), 0.0f);
            tile[i] = (row_term + column) * scales;
          }
        }
      });
    };
    for_each_segment_range(
        n, a.seg.width, g,
        [&](int64_t begin, int64_t end) {
          if (!q2d || end <= a.block.begin || begin >= block_end) return row_only(begin, end);
          const int64_t inner_begin = begin > a.block.begin ? begin : a.block.begin;
          const int64_t inner_end = end < block_end ? end : block_end;
          row_only(begin, inner_begin);
          with_column(inner_begin, inner_end);
          row_only(inner_end, end);
        },
        [&](int64_t c, int64_t j) { t.own<Out>(c, j, v[c]); });
  };
  dispatch_range_flags(col_scale != nullptr, labels != nullptr, store_rows);
}

// ---- contrastive_column_statistics of the serial build, for at most kColumnTile columns [j_begin, j_end): the
// chunk's column max over its rows, then the sum of exp(logit - shift) with the running sum rescaled once, each a
// loop over the contiguous columns of a row (vectorized; one exp per entry, as the online form). Deterministic:
// the rows of each column in order.
constexpr int64_t kColumnTile = 64;
template <bool kColScale, bool kLabels = false>
ST_FAST_HD void contrastive_column_statistics_tile(const StatisticsArgs& a, int64_t j_begin, int64_t j_end) {
  const int64_t count = j_end - j_begin;
  const float* col_scale = a.scales.columns[0] ? a.scales.columns[0] + a.block.begin + j_begin : nullptr;
  // mask_duplicates: the block columns' query labels; entry (r, j) is masked when its label equals row r's and j is
  // not row r's own column (the diagonal, the positive pair): the loops mask every equal label, and row r's diagonal
  // entry (when in the tile) is then added on its own, at the same point of the column's row order
  const Label* labels = kLabels ? a.block.query_labels + a.block.begin + j_begin : nullptr;
  auto row_label = [&](int64_t r) { return kLabels ? a.block.query_labels[a.seg.row_start + r] : Label{0}; };
  auto diagonal_of = [&](int64_t r) {
    const int64_t d = a.seg.row_start + r - a.block.begin - j_begin;
    return kLabels && d >= 0 && d < count ? d : -1;
  };
  float* col_max = a.stats.col_max;
  float* col_sum = a.stats.col_sum;
  float top[kColumnTile], shift[kColumnTile], total[kColumnTile];
  for (int64_t j = 0; j < count; ++j) top[j] = col_max[j_begin + j];
  for (int64_t r = 0; r < a.seg.rows; ++r) {
    const float* v = a.seg.scores[0] + r * a.seg.lengths[0] + a.block.begin + j_begin;
    const float row_scale = row_scale_of(a.scales, 0, r);
    const Label ref = row_label(r);
    for (int64_t j = 0; j < count; ++j) {
      const float x = range_logit<kColScale, kLabels>(v, col_scale, row_scale, a.rule.scale, j, labels, ref);
      top[j] = x > top[j] ? x : top[j];
    }
    const int64_t d = diagonal_of(r);
    if (d >= 0) {
      const float x = range_logit<kColScale>(v, col_scale, row_scale, a.rule.scale, d);
      top[d] = x > top[d] ? x : top[d];
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    shift[j] = finite_shift(top[j]);
    const float sum = col_sum[j_begin + j];
    // the running sum, rescaled to the new shift (0 while the column has no entries: col_max -inf)
    total[j] = sum == 0.0f ? 0.0f : sum * row_expf(col_max[j_begin + j] - shift[j]);
  }
  for (int64_t r = 0; r < a.seg.rows; ++r) {
    const float* v = a.seg.scores[0] + r * a.seg.lengths[0] + a.block.begin + j_begin;
    const float row_scale = row_scale_of(a.scales, 0, r);
    const Label ref = row_label(r);
    for (int64_t j = 0; j < count; ++j)
      total[j] += row_expf(range_logit<kColScale, kLabels>(v, col_scale, row_scale, a.rule.scale, j, labels, ref) -
                           shift[j]);
    const int64_t d = diagonal_of(r);
    if (d >= 0) total[d] += row_expf(range_logit<kColScale>(v, col_scale, row_scale, a.rule.scale, d) - shift[d]);
  }
  for (int64_t j = 0; j < count; ++j) {
    col_max[j_begin + j] = top[j];
    col_sum[j_begin + j] = total[j];
  }
}

}  // namespace st_fast
