// The contrastive row kernel's fixed-shift form of the symmetric passes (CPU build; st_fast/ops/mnrl/chunked.py
// decides when it applies). When every logit of the tile lies within [-K, K] (K = scale · the largest operand norm
// squared, by Cauchy-Schwarz) with 2K <= 80 and nothing is penalized, one shift K serves every row and every column:
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
//                                    col_factor = exp(K - col_ref) (block.count,).
// With mask_duplicates' labels the tile keeps every entry's e (an entry may be masked in its row softmax and not in
// its column one): each sum and each coefficient term leaves out the entries its own softmax masks, by a
// branch-free select (template kLabels).
#pragma once

#include "st_fast/row_kernel_ranges.h"

namespace st_fast {

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

ST_FAST_HD void contrastive_row_exp_statistics(const ExpStatisticsArgs& a, int64_t r) {
  const int64_t g = a.seg.row_start + r;
  const LogitRule rule = unpenalized(a.scale);
  const float shift = a.shift;
  float positive = 0.0f;
  for (int x = 0; x < a.seg.num_segments; ++x) {
    const int64_t n = a.seg.lengths[x];
    float* v = const_cast<float*>(a.seg.scores[x]) + r * n;  // the scores are replaced by their e
    const int kind = a.seg.kinds[x];
    const Label* labels = a.seg.labels[x];
    float total = 0.0f;
    for_each_segment_range(
        n, a.seg.width, g,
        [&](int64_t begin, int64_t end) {
          if (labels)
            total += range_exp_store<true>(v, a.scale, shift, begin, end, labels, labels[g]);
          else
            total += range_exp_store(v, a.scale, shift, begin, end);
        },
        [&](int64_t c, int64_t j) {
          const float mult = own_column_multiplier(rule, kind, j);  // unpenalized: scale, or 0 where masked
          if (mult == 0.0f) {
            v[c] = 0.0f;
            return;
          }
          const float logit = v[c] * mult;
          if (kind == kOwnPositive && j == 0) positive = logit;
          v[c] = row_expf(logit - shift);
          if (!duplicate(a.seg, x, c, g)) total += v[c];  // (a duplicate own column is outside the positive block)
        });
    a.stats.row_lse[r * a.seg.num_segments + x] = shift + logf(total);
  }
  a.stats.row_positive[r] = positive;
}

template <bool kLabels = false>
ST_FAST_HD void contrastive_column_exp_sums_tile(const ExpStatisticsArgs& a, int64_t j_begin, int64_t j_end) {
  const int64_t count = j_end - j_begin;
  const float shift = a.shift;
  const Label* labels = kLabels ? a.block.query_labels + a.block.begin + j_begin : nullptr;  // as the general tile
  float total[kColumnTile];
  for (int64_t j = 0; j < count; ++j) total[j] = 0.0f;
  for (int64_t r = 0; r < a.seg.rows; ++r) {
    const float* e = a.seg.scores[0] + r * a.seg.lengths[0] + a.block.begin + j_begin;
    const Label ref = kLabels ? a.block.query_labels[a.seg.row_start + r] : Label{0};
    for (int64_t j = 0; j < count; ++j) total[j] += unless_duplicate<kLabels>(labels, ref, j, e[j], 0.0f);
    const int64_t d = a.seg.row_start + r - a.block.begin - j_begin;  // row r's own column: never masked
    if (kLabels && d >= 0 && d < count) total[d] += e[d];
  }
  float* col_max = a.stats.col_max;
  float* col_sum = a.stats.col_sum;
  for (int64_t j = 0; j < count; ++j) {
    const float sum = col_sum[j_begin + j];
    col_sum[j_begin + j] = (sum == 0.0f ? 0.0f : sum * row_expf(col_max[j_begin + j] - shift)) + total[j];
    col_max[j_begin + j] = shift;
  }
}

template <class Out, bool kLabels = false>
ST_FAST_HD void contrastive_row_exp_coefficients(const ExpCoefficientsArgs& a, int64_t r) {
  const int64_t g = a.seg.row_start + r;
  const SymmetricWeights w = symmetric_weights(coefficient_base(a.out, a.scale), a.joint, a.directions);
  const float weight = w.weight;
  const int64_t block_begin = a.block.begin, block_end = a.block.begin + a.block.count;
  for (int x = 0; x < a.seg.num_segments; ++x) {
    const int64_t n = a.seg.lengths[x];
    const float* e = a.seg.scores[x] + r * n;
    void* out = a.out.segments[x];
    const int64_t out_offset = r * n;
    const float row_term = weight * a.row_factor[r * a.seg.num_segments + x];
    const Label* labels = a.seg.labels[x];
    const Label ref = kLabels ? labels[g] : Label{0};
    const Label* query_labels = a.block.query_labels;
    const Label query_ref = kLabels ? query_labels[g] : Label{0};
    auto row_only = [&](int64_t begin, int64_t end) {
      range_store<Out>(out, out_offset, begin, end,
                       [&](int64_t c) { return unless_duplicate<kLabels>(labels, ref, c, e[c] * row_term, 0.0f); });
    };
    // (row_only's label test also takes a non-Q2D segment's own column c == g, whose e is 0: masked, or -inf in
    // the other ranks' D2Q segment)
    if (a.seg.kinds[x] != kOwnPositive) {
      row_only(0, n);
      continue;
    }
    const float* col_factor = a.col_factor - block_begin;  // indexed by the column c
    auto with_column = [&](int64_t begin, int64_t end) {
      range_store<Out>(out, out_offset, begin, end, [&](int64_t c) {
        const float row = unless_duplicate<kLabels>(labels, ref, c, e[c] * row_term, 0.0f);
        return row + unless_duplicate<kLabels>(query_labels, query_ref, c, e[c] * (weight * col_factor[c]), 0.0f);
      });
    };
    row_only(0, block_begin);
    with_column(block_begin, g);
    // the diagonal: the positive of row g in both directions
    Out::put(out, out_offset + g, diagonal_coefficient(e[g] * row_term, e[g] * (weight * col_factor[g]), w));
    with_column(g + 1, block_end);
    row_only(block_end, n);
  }
}

}  // namespace st_fast
