// The contrastive row kernel's passes and their lane algorithm: all that the CUDA build compiles (WarpLanes, one warp
// per row; BlockLanes, one block per row) and that the CPU tests emulate (ThreadLanes, thread_lanes.h). A row is
// processed by lanes.count() cooperating lanes, lane lanes.id() visiting columns id, id + count, ...: each segment's
// LSE by an online max / sum of exp (one exp per entry) and a reduction across the lanes, then the coefficients, one
// per entry (they may alias the fp32 scores: every entry is read and then written by the same lane).
//
// The passes (the math: row_kernel_args.h):
//   contrastive_row               the one-pass kernel: each row's loss and, with grad_scale >= 0, its coefficients;
// and the symmetric path's two passes over the row chunks of one tile:
//   contrastive_row_statistics    per row of the row segments (Q2D, Q2Q, D2D, and a W-wide D2Q segment for the
//                                 other ranks' queries whose local columns o .. o+B hold -inf): each segment's LSE
//                                 and the positive logit (no loss, no coefficients);
//   contrastive_column_statistics per column j of the positive block (Q2D columns block.begin + j): the online
//                                 max / sum of exp(scale·s) over the chunk's rows, continued across the chunks in
//                                 row order (fp32, one thread per column or column block: a deterministic order);
// then the caller forms each row's log-partition from both (joint: log-add-exp; per_direction: mean) and its
// references (row_ref: per row and segment, log_z or the direction's LSE; col_ref: per column, log_z or the D2Q LSE
// of row j), and
//   contrastive_row_coefficients  writes one coefficient per entry: the row-softmax term w·exp(l - row_ref) plus, on
//                                 the positive block, the column-softmax term w·exp(scale·s - col_ref[j]), minus the
//                                 positive's one-hot shares at the diagonal (Q2D's, and D2Q's in per_direction), so
//                                 that the caller's two gradient GEMMs per segment cover both directions.
// A D2Q row segment in the coefficient pass holds no share of the one-hot term (its positive is the diagonal).
//
// Each pass calls its per-segment steps (segment_lse, store_row_coefficients, store_symmetric_coefficients) with the
// row's lanes: the templates here serve interleaved lanes; the CPU build's SerialLanes takes the overloads of
// row_kernel_ranges.h (its vectorizable range loops), which a CPU build must include.
#pragma once

#include "st_fast/row_kernel_args.h"

namespace st_fast {

// Calls f(c, v[c]) for this lane's columns c in [begin, end); four loads are issued before their first use so that
// a warp keeps several memory requests in flight.
template <class Lanes, class F>
ST_FAST_HD void for_each_lane_column(const float* v, int64_t begin, int64_t end, const Lanes& lanes, F&& f) {
  const int64_t step = lanes.count();
  int64_t c = begin + lanes.id();
  for (; c + 3 * step < end; c += 4 * step) {
    const float v0 = v[c], v1 = v[c + step], v2 = v[c + 2 * step], v3 = v[c + 3 * step];
    f(c, v0);
    f(c + step, v1);
    f(c + 2 * step, v2);
    f(c + 3 * step, v3);
  }
  for (; c < end; c += step) f(c, v[c]);
}

// Calls bulk(c, v) for every column of the row but its own ones (c % W == g, visited by lane 0 only as
// own(c, j, v) with j = c / W), block by block.
template <class Lanes, class Bulk, class Own>
ST_FAST_HD void for_each_segment_column(const float* v, int64_t n, int64_t width, int64_t g, const Lanes& lanes,
                                        Bulk&& bulk, Own&& own) {
  for (int64_t block = 0; block < n; block += width) {
    const int64_t own_column = block + g;
    for_each_lane_column(v, block, own_column, lanes, bulk);
    for_each_lane_column(v, own_column + 1, block + width, lanes, bulk);
    if (lanes.id() == 0) own(own_column, block / width, v[own_column]);
  }
}

// The LSE of segment x of row r (all lanes get it); lane 0's `positive` receives the positive logit for Q2D. Args:
// any pass's arguments with seg, rule and scales.
template <class Args, class Lanes>
ST_FAST_HD float segment_lse(const Args& a, int64_t r, int x, const Lanes& lanes, float& positive) {
  static_assert(!Lanes::kContiguous, "SerialLanes take row_kernel_ranges.h's segment_lse: include it");
  const int64_t g = a.seg.row_start + r;
  const float* v = a.seg.scores[x] + r * a.seg.lengths[x];
  const int kind = a.seg.kinds[x];
  const float row_scale = row_scale_of(a.scales, x, r);
  const float bulk = bulk_multiplier(a.rule, kind);
  OnlineLogSumExp acc;
  for_each_segment_column(
      v, a.seg.lengths[x], a.seg.width, g, lanes,
      [&](int64_t c, float value) {
        if (!duplicate(a.seg, x, c, g)) acc.add(scaled(a.scales, x, row_scale, c, value) * bulk);
      },
      [&](int64_t c, int64_t j, float value) {
        const float mult = own_column_multiplier(a.rule, kind, j);
        if (mult == 0.0f || duplicate(a.seg, x, c, g)) return;
        const float logit = scaled(a.scales, x, row_scale, c, value) * mult;
        if (kind == kOwnPositive && j == 0) positive = logit;
        acc.add(logit);
      });
  return acc.reduce(lanes);
}

// Row r of segment x as the coefficient steps of every form read it.
struct SegmentRow {
  int64_t n;           // the segment's length
  int64_t g;           // the global row
  int64_t out_offset;  // the row's offset in the segment's scores and coefficients
  const float* v;      // the row's scores
  void* out;           // the segment's coefficients
  float row_scale;
  float bulk;  // the bulk entries' multiplier
  template <class Args>
  ST_FAST_HD SegmentRow(const Args& a, int64_t r, int x)
      : n(a.seg.lengths[x]),
        g(a.seg.row_start + r),
        out_offset(r * n),
        v(a.seg.scores[x] + out_offset),
        out(a.out.segments[x]),
        row_scale(row_scale_of(a.scales, x, r)),
        bulk(bulk_multiplier(a.rule, a.seg.kinds[x])) {}
};

// ---- The one-pass kernel.

// One segment x of row r in the one-pass kernel's coefficient step: the row's softmax reference and weights, and the
// own columns' coefficient, which its lane and range forms share.
struct RowSegmentTerms {
  const RowArgs& a;
  int64_t r;
  int x;
  float ref, weight, positive_share;

  // An own column's coefficient (the positive's one-hot term folded in), stored.
  template <class Out>
  ST_FAST_HD void own(int64_t c, int64_t j, float value) const {
    const int kind = a.seg.kinds[x];
    const float mult = own_column_multiplier(a.rule, kind, j);
    const float scales = scales_at(a.scales.columns[x], row_scale_of(a.scales, x, r), c);
    const bool masked = mult == 0.0f || duplicate(a.seg, x, c, a.seg.row_start + r);
    float coefficient = masked ? 0.0f : weight * row_expf(value * scales * mult - ref);
    if (holds_positive(a.joint, kind) && j == 0) coefficient -= positive_share;  // the positive's one-hot term
    Out::put(a.out.segments[x], r * a.seg.lengths[x] + c, coefficient * scales);
  }
};

template <class Out, class Lanes>
ST_FAST_HD void store_row_coefficients(const RowSegmentTerms& t, const Lanes& lanes) {
  const RowArgs& a = t.a;
  const int x = t.x;
  const SegmentRow row(a, t.r, x);
  const float* col_scale = a.scales.columns[x];
  const float ref = t.ref, weight = t.weight;
  for_each_segment_column(
      row.v, row.n, a.seg.width, row.g, lanes,
      [&](int64_t c, float value) {
        const float scales = scales_at(col_scale, row.row_scale, c);
        const float coefficient = weight * row_expf(value * scales * row.bulk - ref) * scales;
        Out::put(row.out, row.out_offset + c, duplicate(a.seg, x, c, row.g) ? 0.0f : coefficient);
      },
      [&](int64_t c, int64_t j, float value) { t.own<Out>(c, j, value); });
}

template <class Out, class Lanes>
ST_FAST_HD void contrastive_row(const RowArgs& a, int64_t r, const Lanes& lanes) {
  float seg_lse[kMaxSegments];
  float positive = 0.0f;  // lane 0's
  for (int x = 0; x < a.seg.num_segments; ++x) seg_lse[x] = segment_lse(a, r, x, lanes, positive);
  const float log_z = log_partition(seg_lse, a.seg.num_segments, a.joint);
  if (lanes.id() == 0) a.row_loss[r] = log_z - positive;
  if (a.out.grad_scale < 0.0f) return;
  const float base = coefficient_base(a.out, a.rule.scale);
  // the one-hot term's share per holder; with every segment a holder (per_direction) the same expression as the
  // weight, so that weight·1 - share is exactly 0
  int holders = 0;
  for (int x = 0; x < a.seg.num_segments; ++x) holders += holds_positive(a.joint, a.seg.kinds[x]) ? 1 : 0;
  const float positive_share = base / static_cast<float>(holders);
  for (int x = 0; x < a.seg.num_segments; ++x) {
    const float ref = a.joint ? log_z : seg_lse[x];
    const float weight = a.joint ? base : base / static_cast<float>(a.seg.num_segments);
    store_row_coefficients<Out>(RowSegmentTerms{a, r, x, ref, weight, positive_share}, lanes);
  }
}

// ---- The symmetric statistics pass.

// Each row segment's LSE of row r into stats.row_lse, the positive logit into stats.row_positive. The D2Q direction
// of the positive block's columns is contrastive_column_statistics'.
template <class Lanes>
ST_FAST_HD void contrastive_row_statistics(const StatisticsArgs& a, int64_t r, const Lanes& lanes) {
  float positive = 0.0f;  // lane 0's
  for (int x = 0; x < a.seg.num_segments; ++x) {
    const float lse = segment_lse(a, r, x, lanes, positive);
    if (lanes.id() == 0) a.stats.row_lse[r * a.seg.num_segments + x] = lse;
  }
  if (lanes.id() == 0) a.stats.row_positive[r] = positive;
}

// The D2Q logit scale·s of the positive block's column j at tile row r (segment 0, Q2D).
ST_FAST_HD float column_logit(const StatisticsArgs& a, int64_t r, int64_t j) {
  const int64_t c = a.block.begin + j;
  const float row_scale = row_scale_of(a.scales, 0, r);
  return scaled(a.scales, 0, row_scale, c, a.seg.scores[0][r * a.seg.lengths[0] + c]) * a.rule.scale;
}

// Continues the online max / sum of the D2Q logits of columns j_begin .. j_end of the positive block over the
// chunk's rows, in row order (deterministic: one worker per column range, the rows of each column in order).
ST_FAST_HD void contrastive_column_statistics(const StatisticsArgs& a, int64_t j_begin, int64_t j_end) {
  for (int64_t r = 0; r < a.seg.rows; ++r) {
    for (int64_t j = j_begin; j < j_end; ++j) {
      OnlineLogSumExp acc;
      acc.max = a.stats.col_max[j];
      acc.sum = a.stats.col_sum[j];
      acc.add(column_duplicate(a.block, a.block.begin + j, a.seg.row_start + r) ? -INFINITY : column_logit(a, r, j));
      a.stats.col_max[j] = acc.max;
      a.stats.col_sum[j] = acc.sum;
    }
  }
}

// ---- The symmetric coefficient pass.

// One segment x of row r in the coefficient pass: its row softmax's reference, the row factor, the weights, and the
// column term and own columns' coefficient, which its lane and range forms share.
struct SymmetricSegmentTerms {
  const CoefficientsArgs& a;
  int64_t r;
  int x;
  float ref;
  float row_factor;  // exp(row_ref[r, Q2D] - K) (Q2D with factors), else 0
  SymmetricWeights w;

  // The column-softmax term of entry c of the Q2D row (0 outside the positive block), given the row term's
  // exp(l - ref) for the logit l = mult·s. Where the logit is unpenalized (mult == scale) and both factors exist,
  // exp(scale·s - col_ref[j]) = exp(l - ref) · exp(ref - K) · exp(K - col_ref[j]): one exp per entry instead of
  // two (a relative error of a few fp32 roundings; with both factors within e^±8, an exp(l - ref) that underflows
  // leaves out a column term below e^-87).
  ST_FAST_HD float column_term(int64_t c, float s, float mult, float row_exp) const {
    const int64_t block_end = a.block.begin + a.block.count;
    if (a.seg.kinds[x] != kOwnPositive || c < a.block.begin || c >= block_end ||
        column_duplicate(a.block, c, a.seg.row_start + r))
      return 0.0f;
    const int64_t j = c - a.block.begin;
    const float col_factor = a.col_factor ? a.col_factor[j] : 0.0f;
    if (mult == a.rule.scale && row_factor > 0.0f && col_factor > 0.0f)
      return w.weight * (row_exp * (row_factor * col_factor));
    return w.weight * row_expf(s * a.rule.scale - a.col_ref[j]);
  }

  // An own column's coefficient (at the diagonal, the one-hot shares folded in), stored.
  template <class Out>
  ST_FAST_HD void own(int64_t c, int64_t j, float value) const {
    const int kind = a.seg.kinds[x];
    const float mult = own_column_multiplier(a.rule, kind, j);
    const float scales = scales_at(a.scales.columns[x], row_scale_of(a.scales, x, r), c);
    const float s = value * scales;
    // (a duplicate own column is a hard negative of the row, outside the positive block: no column term)
    const bool masked = mult == 0.0f || duplicate(a.seg, x, c, a.seg.row_start + r);
    const float row_exp = masked ? 0.0f : row_expf(s * mult - ref);
    const float coefficient = w.weight * row_exp;
    const float column = column_term(c, s, mult, row_exp);
    const bool diagonal = kind == kOwnPositive && j == 0;
    const float total = diagonal ? diagonal_coefficient(coefficient, column, w) : coefficient + column;
    Out::put(a.out.segments[x], r * a.seg.lengths[x] + c, total * scales);
  }
};

template <class Out, class Lanes>
ST_FAST_HD void store_symmetric_coefficients(const SymmetricSegmentTerms& t, const Lanes& lanes) {
  const CoefficientsArgs& a = t.a;
  const int x = t.x;
  const SegmentRow row(a, t.r, x);
  const float ref = t.ref, weight = t.w.weight;
  for_each_segment_column(
      row.v, row.n, a.seg.width, row.g, lanes,
      [&](int64_t c, float value) {
        const float scales = scales_at(a.scales.columns[x], row.row_scale, c);
        const float s = value * scales;
        const float row_exp = row_expf(s * row.bulk - ref);
        const float row_term = duplicate(a.seg, x, c, row.g) ? 0.0f : weight * row_exp;
        Out::put(row.out, row.out_offset + c, (row_term + t.column_term(c, s, row.bulk, row_exp)) * scales);
      },
      [&](int64_t c, int64_t j, float value) { t.own<Out>(c, j, value); });
}

// The coefficients of row r from the references row_ref (per row and segment) and col_ref (per column of the
// positive block).
template <class Out, class Lanes>
ST_FAST_HD void contrastive_row_coefficients(const CoefficientsArgs& a, int64_t r, const Lanes& lanes) {
  const SymmetricWeights w = symmetric_weights(coefficient_base(a.out, a.rule.scale), a.joint, a.directions);
  for (int x = 0; x < a.seg.num_segments; ++x) {
    const float ref = a.row_ref[r * a.seg.num_segments + x];
    const float row_factor = a.seg.kinds[x] == kOwnPositive && a.row_factor ? a.row_factor[r] : 0.0f;
    store_symmetric_coefficients<Out>(SymmetricSegmentTerms{a, r, x, ref, row_factor, w}, lanes);
  }
}

}  // namespace st_fast
