// The contrastive row kernel: one row of a chunk of raw similarity scores -> the row's loss and the gradient
// coefficients of its raw scores. One algorithm source compiled for the CPU (SerialLanes, OpenMP over rows) and for
// CUDA (WarpLanes, one warp per row). Segment kinds, masks and the hardness penalty follow st_fast/ops/layout.py; the
// codes of SegmentKind and HardnessKind are exported by name (boundary_codes.h) and checked against st_fast/_native.py:
//
//   Q2D  columns k·W  positive at c == g; hardness multiplier on the penalized entries
//   Q2Q  columns W    c == g masked
//   D2Q  columns W    nothing masked
//   D2D  columns k·W  c % W == g masked
//
// Scores may come unnormalized, with per-row and per-column scales (the inverse norms of cosine similarity):
// s_x[c] = v_x[c] · (row_scale_x · col_scale_x[c])  (a missing scale is 1). Per row (g = row_start + r):
// l_x = scale·s_x (+ alpha·s_x where penalized, -inf where masked), lse_x = logsumexp(l_x),
// log_z = logsumexp_x(lse_x) (joint) or mean_x(lse_x), loss = log_z - scale·s_q2d[g].
// With grad_scale >= 0 the coefficients of the raw scores v are written (in the coefficients' dtype):
//   grad_scale·scale·(w_x·exp(l_x - ref_x) - p_x·[c == g])·row_scale_x·col_scale_x[c],   0 where masked,
// with ref_x = log_z, w_x = 1 (joint) or ref_x = lse_x, w_x = 1/#segments (per_direction). The positive's one-hot
// term (-scale·s_q2d[g] of the loss) is spread evenly, p_x = 1/#holders, over the segments whose own column g holds
// the positive pair's score: Q2D, and in per_direction also D2Q (s_d2q[g] = s(d_g, q_g) is the same function of the
// embeddings, so the split is exact). Stock's per_direction requires every direction to hold the positive, so there
// p_x = w_x and each direction's coefficients are its own softmax minus one-hot, as in a per-direction cross-entropy:
// a coefficient that is 0 in exact math (a single-column softmax, e.g. B = 1, whose loss is 0 for any embeddings) is
// computed as w·1 - w = 0, not as -w/2 in Q2D and +w/2 in D2Q, whose products with the embeddings, added up by the
// gradient GEMMs, would leave a rounding residue. The one-hot term is folded in before the (16-bit) store, so that
// a confident row (softmax weight ~1 at the positive) keeps a coefficient accurate relative to its small value.
//
// Two passes over each segment's row: an online max / sum of exp (one exp per entry), then the coefficients. The
// coefficients may alias the fp32 scores: every entry is read and then written by the same lane. The CPU build
// (SerialLanes::kContiguous) runs the same math as branch-free loops over the contiguous column ranges between a
// row's own columns, which GCC -O3 vectorizes: the row max, then the sum of exp (still one exp per entry), and the
// coefficients through a local tile; exp is row_expf (portability.h: a vectorizable polynomial on the CPU, expf on
// CUDA).
//
// Symmetric directions from one score tile (query_to_doc with doc_to_query, see st_fast/ops/mnrl/chunked.py): the
// D2Q segment of local row j (global o + j) is column o + j of the Q2D tile's positive block, over the rows of the
// tile (this rank's queries), so the caller computes no D2Q GEMM for those columns and calls the kernel in two
// passes over the row chunks of one tile:
//   contrastive_row_statistics    per row of the row segments (Q2D, Q2Q, D2D, and a W-wide D2Q segment for the
//                                 other ranks' queries whose local columns o .. o+B hold -inf): each segment's LSE
//                                 and the positive logit (no loss, no coefficients);
//   contrastive_column_statistics per column j of the positive block (Q2D columns block_begin + j): the online
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
// Duplicate masking (mask_duplicates, optional; st_fast/ops/layout.py): with labels[x] (one Label per column of
// segment x, equal iff the texts are equal), column c of segment x is masked for row g (as -inf, coefficient 0) when
// labels[x][c] == labels[x][g] and c != g (the target is never masked). On the symmetric path the column softmax of
// the positive block takes its own mask from query_labels: entry (r, c) as D2Q row c, column g, is masked when
// query_labels[c] == query_labels[g] and c != g; the row and column terms of an entry are masked independently.
// The CPU range loops test a column's label with a branch-free select (template kLabels: no cost without labels).
#pragma once

#include "st_fast/half_store.h"
#include "st_fast/portability.h"

#include <type_traits>

namespace st_fast {

constexpr int kMaxSegments = 4;
enum SegmentKind : int { kQ2D = 0, kQ2Q = 1, kD2Q = 2, kD2D = 3 };
enum HardnessKind : int { kHardnessNone = 0, kInBatch = 1, kHard = 2, kAll = 3 };

// mask_duplicates' text labels: dense int32 (the op renumbers any int64 labels to 0 .. texts - 1), so that the CPU
// range loops compare them in the floats' lane width (SSE2 has no 64-bit integer compare).
using Label = int32_t;

struct ContrastiveRowArgs {
  int num_segments;
  const float* scores[kMaxSegments];     // (rows, lengths[x]) row-major raw scores v
  const float* row_scale[kMaxSegments];  // (rows,) or null
  const float* col_scale[kMaxSegments];  // (lengths[x],) or null
  void* coefficients[kMaxSegments];      // (rows, lengths[x]) of coefficient_dtype (may alias scores); null: loss only
  int coefficient_dtype;                 // StoreDtype
  int64_t lengths[kMaxSegments];
  int kinds[kMaxSegments];  // kinds[0] must be kQ2D
  int64_t rows;
  int64_t row_start;
  int64_t width;
  float scale;
  float alpha;
  int hardness;
  int joint;
  float grad_scale;  // < 0: loss only
  float* row_loss;   // (rows,)
  // optional (null: none): a device-side factor of grad_scale, read by the kernel (the coefficients' power-of-two
  // scale γ, st_fast/ops/mnrl/chunked.py, kept on the device so that the caller needs no host sync)
  const float* grad_scale_factor;  // (1,)
  // The two-pass (symmetric) entry points only; null / 0 in the one-pass kernel.
  float* row_lse;          // (rows, num_segments) statistics: each row segment's LSE
  float* row_positive;     // (rows,) statistics: the positive logit scale·s_q2d[g]
  const float* row_ref;    // (rows, num_segments) coefficients: the reference of each row segment's softmax
  int64_t block_begin;     // the Q2D positive-block columns block_begin .. block_begin + block_count, whose columns
  int64_t block_count;     //   are the D2Q rows block_begin + j
  float* col_max;          // (block_count,) statistics: running max of the column's D2Q logits, updated
  float* col_sum;          // (block_count,) statistics: running sum of exp(logit - col_max), updated
  const float* col_ref;    // (block_count,) coefficients: the reference of column j's D2Q softmax
  // coefficients, optional (null: none): exp(row_ref[r, Q2D] - K) per row and exp(K - col_ref[j]) per column for a
  // shift K, 0 where that factor is not within e^±8 (see contrastive_row_coefficients)
  const float* row_factor;  // (rows,)
  const float* col_factor;  // (block_count,)
  int directions;          // coefficients: the loss's number of directions (per_direction weight 1 / directions)
  // mask_duplicates, optional (null: none): (lengths[x],) the labels of segment x's columns; (width,) the query
  // labels of the positive block's column softmax (two-pass entry points); equal iff the texts are equal
  const Label* labels[kMaxSegments];
  const Label* query_labels;
};

// grad_scale times the optional device-side factor (grad_scale 1 with factor γ: exactly the coefficients of
// grad_scale γ).
ST_FAST_HD float effective_grad_scale(const ContrastiveRowArgs& a) {
  return a.grad_scale_factor ? a.grad_scale * a.grad_scale_factor[0] : a.grad_scale;
}

// Multiplier of the similarity for the bulk of a segment's entries.
ST_FAST_HD float bulk_multiplier(const ContrastiveRowArgs& a, int kind) {
  const bool penalize_bulk = kind == kQ2D && (a.hardness == kInBatch || a.hardness == kAll);
  return penalize_bulk ? a.scale + a.alpha : a.scale;
}

// Multiplier for the row's own column j·W + g of a segment (the positive for j == 0 in Q2D); 0 means masked.
ST_FAST_HD float own_column_multiplier(const ContrastiveRowArgs& a, int kind, int64_t j) {
  if (kind == kQ2Q || kind == kD2D) return 0.0f;
  if (kind == kD2Q || j == 0) return a.scale;  // D2Q has no own-column rule; the positive is never penalized
  const bool penalized = a.hardness == kHard || a.hardness == kAll;
  return penalized ? a.scale + a.alpha : a.scale;
}

// Whether the segment's own column g (block 0) holds the positive pair's score and so takes a share of the one-hot
// term: Q2D always, D2Q in per_direction (in joint it is one more entry of the single softmax).
ST_FAST_HD bool holds_positive(const ContrastiveRowArgs& a, int kind) {
  return kind == kQ2D || (!a.joint && kind == kD2Q);
}

// Whether column c of segment x is a duplicate of row g's reference text (mask_duplicates; never the target c == g).
ST_FAST_HD bool duplicate(const ContrastiveRowArgs& a, int x, int64_t c, int64_t g) {
  return a.labels[x] != nullptr && c != g && a.labels[x][c] == a.labels[x][g];
}

// Whether the positive block's column c leaves the D2Q (column) softmax at row g (mask_duplicates).
ST_FAST_HD bool column_duplicate(const ContrastiveRowArgs& a, int64_t c, int64_t g) {
  return a.query_labels != nullptr && c != g && a.query_labels[c] == a.query_labels[g];
}

// Running (max, sum of exp(l - max)) of one lane's logits; -inf logits (zero weight) are skipped, NaN propagates.
struct OnlineLogSumExp {
  float max = -INFINITY;
  float sum = 0.0f;
  ST_FAST_HD void add(float logit) {
    if (logit == -INFINITY) return;
    if (logit > max) {
      sum = sum * row_expf(max - logit) + 1.0f;
      max = logit;
    } else {
      sum += row_expf(logit - max);
    }
  }
  template <class Lanes>
  ST_FAST_HD float reduce(const Lanes& lanes) const {
    const float top = lanes.max(max);
    const float total = lanes.sum(max == -INFINITY ? 0.0f : sum * row_expf(max - top));
    return top == -INFINITY ? -INFINITY : top + logf(total);
  }
};

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

// s = v · (row_scale · col_scale): the scale product commutes, so s_q2d[i, g] and s_d2q[i, g] agree to the bit.
ST_FAST_HD float scaled(const ContrastiveRowArgs& a, int x, float row_scale, int64_t c, float value) {
  return value * (row_scale * (a.col_scale[x] ? a.col_scale[x][c] : 1.0f));
}

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

// A finite shift for exp(l - shift): the max itself, or 0 where it is ±inf (all entries -inf: the sum is 0 and the
// LSE -inf; a +inf logit: the sum and the LSE +inf).
ST_FAST_HD float finite_shift(float m) { return m - m == 0.0f ? m : 0.0f; }

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

// segment_lse of the serial build: two passes over the row's ranges.
template <bool kColScale, bool kLabels>
ST_FAST_HD float segment_lse_ranges(const ContrastiveRowArgs& a, int64_t r, int x, float& positive) {
  const int64_t g = a.row_start + r;
  const Label* labels = a.labels[x];
  const Label ref_label = kLabels ? labels[g] : 0;
  const float* v = a.scores[x] + r * a.lengths[x];
  const float* col_scale = a.col_scale[x];
  const int kind = a.kinds[x];
  const float row_scale = a.row_scale[x] ? a.row_scale[x][r] : 1.0f;
  const float bulk = bulk_multiplier(a, kind);
  auto own_logit = [&](int64_t c, int64_t j, float& logit) {
    const float mult = own_column_multiplier(a, kind, j);
    if (mult == 0.0f || duplicate(a, x, c, g)) return false;
    logit = scaled(a, x, row_scale, c, v[c]) * mult;
    return true;
  };
  float m = -INFINITY;
  for_each_segment_range(
      a.lengths[x], a.width, g,
      [&](int64_t begin, int64_t end) {
        m = range_max<kColScale, kLabels>(v, col_scale, row_scale, bulk, begin, end, m, labels, ref_label);
      },
      [&](int64_t c, int64_t j) {
        float logit;
        if (!own_logit(c, j, logit)) return;
        if (kind == kQ2D && j == 0) positive = logit;
        m = logit > m ? logit : m;
      });
  const float shift = finite_shift(m);
  float total = 0.0f;
  for_each_segment_range(
      a.lengths[x], a.width, g,
      [&](int64_t begin, int64_t end) {
        total += range_sum_exp<kColScale, kLabels>(v, col_scale, row_scale, bulk, begin, end, shift, labels, ref_label);
      },
      [&](int64_t c, int64_t j) {
        float logit;
        if (own_logit(c, j, logit)) total += row_expf(logit - shift);
      });
  return shift + logf(total);
}

// The LSE of segment x of row r (all lanes get it); lane 0's `positive` receives the positive logit for Q2D.
template <class Lanes>
ST_FAST_HD float segment_lse(const ContrastiveRowArgs& a, int64_t r, int x, const Lanes& lanes, float& positive) {
  if constexpr (Lanes::kContiguous) {
    float lse = 0.0f;
    dispatch_range_flags(a.col_scale[x] != nullptr, a.labels[x] != nullptr, [&](auto col_scaled, auto labelled) {
      lse = segment_lse_ranges<decltype(col_scaled)::value, decltype(labelled)::value>(a, r, x, positive);
    });
    return lse;
  } else {
  const int64_t g = a.row_start + r;
  const float* v = a.scores[x] + r * a.lengths[x];
  const int kind = a.kinds[x];
  const float row_scale = a.row_scale[x] ? a.row_scale[x][r] : 1.0f;
  const float bulk = bulk_multiplier(a, kind);
  OnlineLogSumExp acc;
  for_each_segment_column(
      v, a.lengths[x], a.width, g, lanes,
      [&](int64_t c, float value) {
        if (!duplicate(a, x, c, g)) acc.add(scaled(a, x, row_scale, c, value) * bulk);
      },
      [&](int64_t c, int64_t j, float value) {
        const float mult = own_column_multiplier(a, kind, j);
        if (mult == 0.0f || duplicate(a, x, c, g)) return;
        const float logit = scaled(a, x, row_scale, c, value) * mult;
        if (kind == kQ2D && j == 0) positive = logit;
        acc.add(logit);
      });
  return acc.reduce(lanes);
  }
}

template <class Out, class Lanes>
ST_FAST_HD void contrastive_row(const ContrastiveRowArgs& a, int64_t r, const Lanes& lanes) {
  const int64_t g = a.row_start + r;
  float seg_lse[kMaxSegments];
  float positive = 0.0f;  // lane 0's
  for (int x = 0; x < a.num_segments; ++x) seg_lse[x] = segment_lse(a, r, x, lanes, positive);
  float log_z;
  if (a.joint) {
    float top = -INFINITY;
    for (int x = 0; x < a.num_segments; ++x) top = fmaxf(top, seg_lse[x]);
    float total = 0.0f;
    for (int x = 0; x < a.num_segments; ++x) total += seg_lse[x] == -INFINITY ? 0.0f : row_expf(seg_lse[x] - top);
    log_z = top == -INFINITY ? -INFINITY : top + logf(total);
  } else {
    log_z = 0.0f;
    for (int x = 0; x < a.num_segments; ++x) log_z += seg_lse[x];
    log_z /= static_cast<float>(a.num_segments);
  }
  if (lanes.id() == 0) a.row_loss[r] = log_z - positive;
  if (a.grad_scale < 0.0f) return;
  const float base = effective_grad_scale(a) * a.scale;
  // the one-hot term's share per holder; with every segment a holder (per_direction) the same expression as the
  // weight, so that weight·1 - share is exactly 0
  int holders = 0;
  for (int x = 0; x < a.num_segments; ++x) holders += holds_positive(a, a.kinds[x]) ? 1 : 0;
  const float positive_share = base / static_cast<float>(holders);
  for (int x = 0; x < a.num_segments; ++x) {
    const int64_t n = a.lengths[x];
    const float* v = a.scores[x] + r * n;
    void* out = a.coefficients[x];
    const int64_t out_offset = r * n;
    const float* col_scale = a.col_scale[x];
    const int kind = a.kinds[x];
    const float row_scale = a.row_scale[x] ? a.row_scale[x][r] : 1.0f;
    const float bulk = bulk_multiplier(a, kind);
    const float ref = a.joint ? log_z : seg_lse[x];
    const float weight = a.joint ? base : base / static_cast<float>(a.num_segments);
    const bool holder = holds_positive(a, kind);
    const Label* labels = a.labels[x];
    auto own = [&](int64_t c, int64_t j, float value) {
      const float mult = own_column_multiplier(a, kind, j);
      const float scales = row_scale * (col_scale ? col_scale[c] : 1.0f);
      const bool masked = mult == 0.0f || duplicate(a, x, c, g);
      float coefficient = masked ? 0.0f : weight * row_expf(value * scales * mult - ref);
      if (holder && j == 0) coefficient -= positive_share;  // the positive's one-hot term
      Out::put(out, out_offset + c, coefficient * scales);
    };
    if constexpr (Lanes::kContiguous) {
      const Label ref_label = labels ? labels[g] : 0;
      auto store_rows = [&](auto has_col_scale, auto has_labels) {
        constexpr bool kColScale = decltype(has_col_scale)::value;
        constexpr bool kLabels = decltype(has_labels)::value;
        for_each_segment_range(
            n, a.width, g,
            [&](int64_t begin, int64_t end) {
              range_store<Out>(out, out_offset, begin, end, [&](int64_t c) {
                const float scales = row_scale * (kColScale ? col_scale[c] : 1.0f);
                const float coefficient = weight * row_expf(v[c] * scales * bulk - ref) * scales;
                return unless_duplicate<kLabels>(labels, ref_label, c, coefficient, 0.0f);
              });
            },
            [&](int64_t c, int64_t j) { own(c, j, v[c]); });
      };
      dispatch_range_flags(col_scale != nullptr, labels != nullptr, store_rows);
    } else {
      for_each_segment_column(
          v, n, a.width, g, lanes,
          [&](int64_t c, float value) {
            const float scales = row_scale * (col_scale ? col_scale[c] : 1.0f);
            const float coefficient = weight * row_expf(value * scales * bulk - ref) * scales;
            Out::put(out, out_offset + c, duplicate(a, x, c, g) ? 0.0f : coefficient);
          },
          own);
    }
  }
}

// Two-pass (symmetric) statistics of row r: each row segment's LSE into row_lse, the positive logit into
// row_positive. The D2Q direction of the positive block's columns is contrastive_column_statistics'.
template <class Lanes>
ST_FAST_HD void contrastive_row_statistics(const ContrastiveRowArgs& a, int64_t r, const Lanes& lanes) {
  float positive = 0.0f;  // lane 0's
  for (int x = 0; x < a.num_segments; ++x) {
    const float lse = segment_lse(a, r, x, lanes, positive);
    if (lanes.id() == 0) a.row_lse[r * a.num_segments + x] = lse;
  }
  if (lanes.id() == 0) a.row_positive[r] = positive;
}

// The D2Q logit scale·s of the positive block's column j at tile row r (segment 0, Q2D).
ST_FAST_HD float column_logit(const ContrastiveRowArgs& a, int64_t r, int64_t j) {
  const int64_t c = a.block_begin + j;
  const float row_scale = a.row_scale[0] ? a.row_scale[0][r] : 1.0f;
  return scaled(a, 0, row_scale, c, a.scores[0][r * a.lengths[0] + c]) * a.scale;
}

// Continues the online max / sum of the D2Q logits of columns j_begin .. j_end of the positive block over the
// chunk's rows, in row order (deterministic: one worker per column range, the rows of each column in order).
ST_FAST_HD void contrastive_column_statistics(const ContrastiveRowArgs& a, int64_t j_begin, int64_t j_end) {
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int64_t j = j_begin; j < j_end; ++j) {
      OnlineLogSumExp acc;
      acc.max = a.col_max[j];
      acc.sum = a.col_sum[j];
      acc.add(column_duplicate(a, a.block_begin + j, a.row_start + r) ? -INFINITY : column_logit(a, r, j));
      a.col_max[j] = acc.max;
      a.col_sum[j] = acc.sum;
    }
  }
}

// contrastive_column_statistics of the serial (CPU) build, for at most kColumnTile columns [j_begin, j_end): the
// chunk's column max over its rows, then the sum of exp(logit - shift) with the running sum rescaled once, each a
// loop over the contiguous columns of a row (vectorized; one exp per entry, as the online form). Deterministic:
// the rows of each column in order.
constexpr int64_t kColumnTile = 64;
template <bool kColScale, bool kLabels = false>
ST_FAST_HD void contrastive_column_statistics_tile(const ContrastiveRowArgs& a, int64_t j_begin, int64_t j_end) {
  const int64_t count = j_end - j_begin;
  const float* col_scale = a.col_scale[0] ? a.col_scale[0] + a.block_begin + j_begin : nullptr;
  // mask_duplicates: the block columns' query labels; entry (r, j) is masked when its label equals row r's and j is
  // not row r's own column (the diagonal, the positive pair): the loops mask every equal label, and row r's diagonal
  // entry (when in the tile) is then added on its own, at the same point of the column's row order
  const Label* labels = kLabels ? a.query_labels + a.block_begin + j_begin : nullptr;
  auto row_label = [&](int64_t r) { return kLabels ? a.query_labels[a.row_start + r] : Label{0}; };
  auto diagonal_of = [&](int64_t r) {
    const int64_t d = a.row_start + r - a.block_begin - j_begin;
    return kLabels && d >= 0 && d < count ? d : -1;
  };
  float top[kColumnTile], shift[kColumnTile], total[kColumnTile];
  for (int64_t j = 0; j < count; ++j) top[j] = a.col_max[j_begin + j];
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* v = a.scores[0] + r * a.lengths[0] + a.block_begin + j_begin;
    const float row_scale = a.row_scale[0] ? a.row_scale[0][r] : 1.0f;
    const Label ref = row_label(r);
    for (int64_t j = 0; j < count; ++j) {
      const float x = range_logit<kColScale, kLabels>(v, col_scale, row_scale, a.scale, j, labels, ref);
      top[j] = x > top[j] ? x : top[j];
    }
    const int64_t d = diagonal_of(r);
    if (d >= 0) {
      const float x = range_logit<kColScale>(v, col_scale, row_scale, a.scale, d);
      top[d] = x > top[d] ? x : top[d];
    }
  }
  for (int64_t j = 0; j < count; ++j) {
    shift[j] = finite_shift(top[j]);
    const float sum = a.col_sum[j_begin + j];
    // the running sum, rescaled to the new shift (0 while the column has no entries: col_max -inf)
    total[j] = sum == 0.0f ? 0.0f : sum * row_expf(a.col_max[j_begin + j] - shift[j]);
  }
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* v = a.scores[0] + r * a.lengths[0] + a.block_begin + j_begin;
    const float row_scale = a.row_scale[0] ? a.row_scale[0][r] : 1.0f;
    const Label ref = row_label(r);
    for (int64_t j = 0; j < count; ++j)
      total[j] += row_expf(range_logit<kColScale, kLabels>(v, col_scale, row_scale, a.scale, j, labels, ref) - shift[j]);
    const int64_t d = diagonal_of(r);
    if (d >= 0) total[d] += row_expf(range_logit<kColScale>(v, col_scale, row_scale, a.scale, d) - shift[d]);
  }
  for (int64_t j = 0; j < count; ++j) {
    a.col_max[j_begin + j] = top[j];
    a.col_sum[j_begin + j] = total[j];
  }
}

// Two-pass (symmetric) coefficients of row r from the references row_ref (per row and segment) and col_ref (per
// column of the positive block): see the top of this file.
template <class Out, class Lanes>
ST_FAST_HD void contrastive_row_coefficients(const ContrastiveRowArgs& a, int64_t r, const Lanes& lanes) {
  const int64_t g = a.row_start + r;
  const float base = effective_grad_scale(a) * a.scale;
  const float weight = a.joint ? base : base / static_cast<float>(a.directions);
  // the one-hot shares: Q2D's, and D2Q's (the column term's) in per_direction, each the same expression as the
  // weight there, so that a single-column softmax gives weight·1 - share = 0 exactly
  const bool d2q_holds = !a.joint;
  const float positive_share = base / (d2q_holds ? 2.0f : 1.0f);
  const int64_t block_end = a.block_begin + a.block_count;
  for (int x = 0; x < a.num_segments; ++x) {
    const int64_t n = a.lengths[x];
    const float* v = a.scores[x] + r * n;
    void* out = a.coefficients[x];
    const int64_t out_offset = r * n;
    const int kind = a.kinds[x];
    const float row_scale = a.row_scale[x] ? a.row_scale[x][r] : 1.0f;
    const float bulk = bulk_multiplier(a, kind);
    const float ref = a.row_ref[r * a.num_segments + x];
    const bool q2d = kind == kQ2D;
    // The column-softmax term of entry c of the Q2D row (0 outside the positive block), given the row term's
    // exp(l - ref) for the logit l = mult·s. Where the logit is unpenalized (mult == scale) and both factors exist,
    // exp(scale·s - col_ref[j]) = exp(l - ref) · exp(ref - K) · exp(K - col_ref[j]): one exp per entry instead of
    // two (a relative error of a few fp32 roundings; with both factors within e^±8, an exp(l - ref) that underflows
    // leaves out a column term below e^-87).
    const float row_factor = q2d && a.row_factor ? a.row_factor[r] : 0.0f;
    const Label* labels = a.labels[x];
    auto column_term = [&](int64_t c, float s, float mult, float row_exp) {
      if (!q2d || c < a.block_begin || c >= block_end || column_duplicate(a, c, g)) return 0.0f;
      const int64_t j = c - a.block_begin;
      const float col_factor = a.col_factor ? a.col_factor[j] : 0.0f;
      if (mult == a.scale && row_factor > 0.0f && col_factor > 0.0f)
        return weight * (row_exp * (row_factor * col_factor));
      return weight * row_expf(s * a.scale - a.col_ref[j]);
    };
    auto own = [&](int64_t c, int64_t j, float value) {
      const float mult = own_column_multiplier(a, kind, j);
      const float scales = row_scale * (a.col_scale[x] ? a.col_scale[x][c] : 1.0f);
      const float s = value * scales;
      // (a duplicate own column is a hard negative of the row, outside the positive block: no column term)
      const float row_exp = mult == 0.0f || duplicate(a, x, c, g) ? 0.0f : row_expf(s * mult - ref);
      float coefficient = weight * row_exp;
      float column = column_term(c, s, mult, row_exp);
      if (q2d && j == 0) {  // the diagonal: the positive of row g in both directions
        coefficient -= positive_share;
        if (d2q_holds) column -= positive_share;
      }
      Out::put(out, out_offset + c, (coefficient + column) * scales);
    };
    if constexpr (Lanes::kContiguous) {
      const float* col_scale = a.col_scale[x];
      // mask_duplicates: the row term's labels (the segment's) and the column term's (the query labels)
      const Label ref_label = labels ? labels[g] : 0;
      const Label* query_labels = a.query_labels;
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
        // the row and column terms of the positive block's columns [begin, end): column_term's two forms, the
        // one-exp (factor) form for a tile whose column factors are all positive, else the column's own exp
        auto with_column = [&](int64_t begin, int64_t end) {
          const bool factor_form = bulk == a.scale && row_factor > 0.0f && a.col_factor;
          range_store_tiles<Out>(out, out_offset, begin, end, [&](int64_t c0, int64_t count, float* tile) {
            const float* col_factor = a.col_factor ? a.col_factor + (c0 - a.block_begin) : nullptr;
            const float* col_ref = a.col_ref + (c0 - a.block_begin);
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
                                                               weight * row_expf(s * a.scale - col_ref[i]), 0.0f);
                tile[i] = (row_term + column) * scales;
              }
            }
          });
        };
        for_each_segment_range(
            n, a.width, g,
            [&](int64_t begin, int64_t end) {
              if (!q2d || end <= a.block_begin || begin >= block_end) return row_only(begin, end);
              const int64_t inner_begin = begin > a.block_begin ? begin : a.block_begin;
              const int64_t inner_end = end < block_end ? end : block_end;
              row_only(begin, inner_begin);
              with_column(inner_begin, inner_end);
              row_only(inner_end, end);
            },
            [&](int64_t c, int64_t j) { own(c, j, v[c]); });
      };
      dispatch_range_flags(col_scale != nullptr, labels != nullptr, store_rows);
    } else {
      for_each_segment_column(
          v, n, a.width, g, lanes,
          [&](int64_t c, float value) {
            const float scales = row_scale * (a.col_scale[x] ? a.col_scale[x][c] : 1.0f);
            const float s = value * scales;
            const float row_exp = row_expf(s * bulk - ref);
            const float row_term = duplicate(a, x, c, g) ? 0.0f : weight * row_exp;
            Out::put(out, out_offset + c, (row_term + column_term(c, s, bulk, row_exp)) * scales);
          },
          own);
    }
  }
}

// ---- The symmetric path's fixed-shift form (CPU build; st_fast/ops/mnrl/chunked.py decides when it applies).
// When every logit of the tile lies within [-K, K] (K = scale · the largest operand norm squared, by
// Cauchy-Schwarz) with 2K <= 80 and nothing is penalized, one shift K serves every row and every column:
// e = exp(l - K) is a normal float (e^-80 > FLT_MIN = e^-87.3) accurate to the exp's rounding, each row segment's
// LSE is K + log Σ_row e, each positive-block column's D2Q LSE is K + log Σ_column e, and the coefficients are
// e · (exp(K - row_ref) + exp(K - col_ref)), both factors <= e^2K <= e^80 < FLT_MAX = e^88.7. One exp per entry for
// the whole loss instead of three (row statistics, column statistics, coefficients), and no max pass:
//   contrastive_row_exp_statistics   row r: e of every entry of its row segments, written over the scores (0 where
//                                    masked), each row segment's LSE into row_lse, the positive logit;
//   contrastive_column_exp_sums_tile columns [j_begin, j_end) of the positive block: the sum of e over the chunk's
//                                    rows (in order), merged into (col_max, col_sum) at shift K (col_max <= K);
//   contrastive_row_exp_coefficients row r from e (the kept tile): weight·e·(row_factor[r, x] (+ col_factor[j] on
//                                    the positive block)), minus the one-hot shares on the diagonal, where the
//                                    caller passes row_factor = exp(K - row_ref) (rows, num_segments) and
//                                    col_factor = exp(K - col_ref) (block_count,).
// With mask_duplicates' labels the tile keeps every entry's e (an entry may be masked in its row softmax and not in
// its column one): each sum and each coefficient term leaves out the entries its own softmax masks, by a
// branch-free select (template kLabels).

// e = row_expf(v[c]·mult - shift) written over v[c] for c in [begin, end); returns Σ e (without the duplicates of
// the row's reference label `ref`, kLabels).
template <bool kLabels = false>
ST_FAST_HD float range_exp_store(float* v, float mult, float shift, int64_t begin, int64_t end,
                                 const Label* labels = nullptr, Label ref = 0) {
  float lane[kVectorLanes];
  for (int l = 0; l < kVectorLanes; ++l) lane[l] = 0.0f;
  int64_t c = begin;
  for (; c + kVectorLanes <= end; c += kVectorLanes) {
    for (int l = 0; l < kVectorLanes; ++l) {
      const float e = row_expf(v[c + l] * mult - shift);
      v[c + l] = e;
      lane[l] += unless_duplicate<kLabels>(labels, ref, c + l, e, 0.0f);
    }
  }
  float total = 0.0f;
  for (; c < end; ++c) {
    const float e = row_expf(v[c] * mult - shift);
    v[c] = e;
    total += unless_duplicate<kLabels>(labels, ref, c, e, 0.0f);
  }
  for (int l = 0; l < kVectorLanes; ++l) total += lane[l];
  return total;
}

ST_FAST_HD void contrastive_row_exp_statistics(const ContrastiveRowArgs& a, int64_t r, float shift) {
  const int64_t g = a.row_start + r;
  float positive = 0.0f;
  for (int x = 0; x < a.num_segments; ++x) {
    const int64_t n = a.lengths[x];
    float* v = const_cast<float*>(a.scores[x]) + r * n;  // the scores are replaced by their e
    const int kind = a.kinds[x];
    const Label* labels = a.labels[x];
    float total = 0.0f;
    for_each_segment_range(
        n, a.width, g,
        [&](int64_t begin, int64_t end) {
          if (labels)
            total += range_exp_store<true>(v, a.scale, shift, begin, end, labels, labels[g]);
          else
            total += range_exp_store(v, a.scale, shift, begin, end);
        },
        [&](int64_t c, int64_t j) {
          const float mult = own_column_multiplier(a, kind, j);  // unpenalized: scale, or 0 where masked
          if (mult == 0.0f) {
            v[c] = 0.0f;
            return;
          }
          const float logit = v[c] * mult;
          if (kind == kQ2D && j == 0) positive = logit;
          v[c] = row_expf(logit - shift);
          if (!duplicate(a, x, c, g)) total += v[c];  // (a duplicate own column is outside the positive block)
        });
    a.row_lse[r * a.num_segments + x] = shift + logf(total);
  }
  a.row_positive[r] = positive;
}

template <bool kLabels = false>
ST_FAST_HD void contrastive_column_exp_sums_tile(const ContrastiveRowArgs& a, int64_t j_begin, int64_t j_end,
                                                 float shift) {
  const int64_t count = j_end - j_begin;
  const Label* labels = kLabels ? a.query_labels + a.block_begin + j_begin : nullptr;  // as the general tile
  float total[kColumnTile];
  for (int64_t j = 0; j < count; ++j) total[j] = 0.0f;
  for (int64_t r = 0; r < a.rows; ++r) {
    const float* e = a.scores[0] + r * a.lengths[0] + a.block_begin + j_begin;
    const Label ref = kLabels ? a.query_labels[a.row_start + r] : Label{0};
    for (int64_t j = 0; j < count; ++j) total[j] += unless_duplicate<kLabels>(labels, ref, j, e[j], 0.0f);
    const int64_t d = a.row_start + r - a.block_begin - j_begin;  // row r's own column: never masked
    if (kLabels && d >= 0 && d < count) total[d] += e[d];
  }
  for (int64_t j = 0; j < count; ++j) {
    const float sum = a.col_sum[j_begin + j];
    a.col_sum[j_begin + j] = (sum == 0.0f ? 0.0f : sum * row_expf(a.col_max[j_begin + j] - shift)) + total[j];
    a.col_max[j_begin + j] = shift;
  }
}

template <class Out, bool kLabels = false>
ST_FAST_HD void contrastive_row_exp_coefficients(const ContrastiveRowArgs& a, int64_t r) {
  const int64_t g = a.row_start + r;
  const float base = a.grad_scale * a.scale;
  const float weight = a.joint ? base : base / static_cast<float>(a.directions);
  const bool d2q_holds = !a.joint;  // as in contrastive_row_coefficients
  const float positive_share = base / (d2q_holds ? 2.0f : 1.0f);
  const int64_t block_end = a.block_begin + a.block_count;
  for (int x = 0; x < a.num_segments; ++x) {
    const int64_t n = a.lengths[x];
    const float* e = a.scores[x] + r * n;
    void* out = a.coefficients[x];
    const int64_t out_offset = r * n;
    const float row_term = weight * a.row_factor[r * a.num_segments + x];
    const Label* labels = a.labels[x];
    const Label ref = kLabels ? labels[g] : Label{0};
    const Label query_ref = kLabels ? a.query_labels[g] : Label{0};
    auto row_only = [&](int64_t begin, int64_t end) {
      range_store<Out>(out, out_offset, begin, end,
                       [&](int64_t c) { return unless_duplicate<kLabels>(labels, ref, c, e[c] * row_term, 0.0f); });
    };
    // (row_only's label test also takes a non-Q2D segment's own column c == g, whose e is 0: masked, or -inf in
    // the other ranks' D2Q segment)
    if (a.kinds[x] != kQ2D) {
      row_only(0, n);
      continue;
    }
    const float* col_factor = a.col_factor - a.block_begin;  // indexed by the column c
    auto with_column = [&](int64_t begin, int64_t end) {
      range_store<Out>(out, out_offset, begin, end, [&](int64_t c) {
        const float row = unless_duplicate<kLabels>(labels, ref, c, e[c] * row_term, 0.0f);
        return row + unless_duplicate<kLabels>(a.query_labels, query_ref, c, e[c] * (weight * col_factor[c]), 0.0f);
      });
    };
    row_only(0, a.block_begin);
    with_column(a.block_begin, g);
    // the diagonal: the positive of row g in both directions
    const float coefficient = e[g] * row_term - positive_share;
    const float column = e[g] * (weight * col_factor[g]) - (d2q_holds ? positive_share : 0.0f);
    Out::put(out, out_offset + g, coefficient + column);
    with_column(g + 1, block_end);
    row_only(block_end, n);
  }
}

}  // namespace st_fast
