// The contrastive row kernel's common part: the segment codes, one argument struct per pass, the formulas every form
// of the kernel shares (written once here), and the online log-sum-exp. The kernel maps one row of a chunk of raw
// similarity scores to the row's loss and the gradient coefficients of its raw scores, in three forms:
//   row_kernel_lanes.h        the lane algorithm: the passes' drivers and the online loops that CUDA compiles
//                             (WarpLanes / BlockLanes) and the CPU tests emulate (ThreadLanes, thread_lanes.h);
//   row_kernel_ranges.h       the CPU build's range loops (SerialLanes): the same math as vectorizable loops;
//   row_kernel_fixed_shift.h  the CPU build's fixed-shift form of the symmetric passes.
// Segment kinds, masks and the hardness penalty follow st_fast/ops/layout.py; the codes of SegmentKind and
// HardnessKind are exported by name (boundary_codes.h) and checked against st_fast/_native.py:
//
//   kind              rule for the row's own column(s) (g: the row's global index)     MNRL's direction / GIST's block
//   kOwnPositive      c == g holds the positive; hardness multiplier on penalized entries  Q2D / [AP | AN..]
//   kOwnMasked        c == g masked (the row vector itself)                                Q2Q / AA, PP (6.3)
//   kPlain            nothing masked (holds the positive in per_direction)                 D2Q / AA, PP (6.0-6.2)
//   kOwnGroupMasked   c % W == g masked (the row's positive and hard negatives)            D2D
//
// Below, Q2D / D2Q name MNRL's directions (query_to_doc, doc_to_query) where the symmetric path needs them.
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
// Symmetric directions from one score tile (query_to_doc with doc_to_query, see st_fast/ops/mnrl/chunked.py): the
// D2Q segment of local row j (global o + j) is column o + j of the Q2D tile's positive block, over the rows of the
// tile (this rank's queries), so the caller computes no D2Q GEMM for those columns and runs two passes over the row
// chunks of one tile (StatisticsArgs, then CoefficientsArgs; row_kernel_lanes.h describes them). Duplicate masking
// (mask_duplicates, optional; st_fast/ops/layout.py): with labels[x] (one Label per column of segment x, equal iff
// the texts are equal), column c of segment x is masked for row g (as -inf, coefficient 0) when
// labels[x][c] == labels[x][g] and c != g (the target is never masked). On the symmetric path the column softmax of
// the positive block takes its own mask from the query labels: entry (r, c) as D2Q row c, column g, is masked when
// query_labels[c] == query_labels[g] and c != g; the row and column terms of an entry are masked independently.
#pragma once

#include <type_traits>

#include "st_fast/half_store.h"
#include "st_fast/portability.h"

namespace st_fast {

constexpr int kMaxSegments = 4;
enum SegmentKind : int { kOwnPositive = 0, kOwnMasked = 1, kPlain = 2, kOwnGroupMasked = 3 };
enum HardnessKind : int { kHardnessNone = 0, kInBatch = 1, kHard = 2, kAll = 3 };

// mask_duplicates' text labels: dense int32 (the op renumbers any int64 labels to 0 .. texts - 1), so that the CPU
// range loops compare them in the floats' lane width (SSE2 has no 64-bit integer compare).
using Label = int32_t;

// ---- The parts of the passes' arguments.

// The score segments of a chunk's rows: what every pass reads.
struct RowSegments {
  int num_segments;
  const float* scores[kMaxSegments];  // (rows, lengths[x]) row-major raw scores v (fixed-shift statistics: e over v)
  int64_t lengths[kMaxSegments];
  int kinds[kMaxSegments];            // kinds[0] is kOwnPositive
  const Label* labels[kMaxSegments];  // mask_duplicates: (lengths[x],) the labels of segment x's columns, or null
  int64_t rows;
  int64_t row_start;  // the global row g of local row r is row_start + r
  int64_t width;
};

// The logits' rule: l = scale·s, plus alpha·s on the entries the hardness penalty takes.
struct LogitRule {
  float scale;
  float alpha;
  int hardness;  // HardnessKind
};

// The optional scales of the raw scores (null: none): s = v · (rows[x][r] · columns[x][c]).
struct SegmentScales {
  const float* rows[kMaxSegments];     // (rows,) or null
  const float* columns[kMaxSegments];  // (lengths[x],) or null
};

// The two-pass (symmetric) passes' positive block: the Q2D columns begin .. begin + count, whose column softmax is
// the D2Q direction of the rows begin + j.
struct PositiveBlock {
  int64_t begin;
  int64_t count;
  const Label* query_labels;  // mask_duplicates: (width,) the labels of the column softmax, or null
};

// Where and how the coefficients are written.
struct CoefficientOutput {
  void* segments[kMaxSegments];  // (rows, lengths[x]) of dtype (may alias the fp32 scores)
  int dtype;                     // StoreDtype
  float grad_scale;              // the one-pass kernel: < 0 for the loss only
  // optional (null: none): a device-side factor of grad_scale, read by the kernel (the coefficients' power-of-two
  // scale γ, st_fast/ops/mnrl/chunked.py, kept on the device so that the caller needs no host sync)
  const float* grad_scale_factor;  // (1,)
};

// The statistics passes' outputs.
struct StatisticsOutput {
  float* row_lse;       // (rows, num_segments) each row segment's LSE
  float* row_positive;  // (rows,) the positive logit scale·s_q2d[g]
  float* col_max;       // (block.count,) running max of the column's D2Q logits, updated
  float* col_sum;       // (block.count,) running sum of exp(logit - col_max), updated
};

// ---- One argument struct per pass.

// The one-pass kernel (contrastive_row): each row's loss, and its coefficients when out.grad_scale >= 0.
struct RowArgs {
  RowSegments seg;
  LogitRule rule;
  SegmentScales scales;
  CoefficientOutput out;  // segments null: loss only
  int joint;
  float* row_loss;  // (rows,)
};

// The symmetric statistics pass (contrastive_row_statistics, contrastive_column_statistics).
struct StatisticsArgs {
  RowSegments seg;
  LogitRule rule;
  SegmentScales scales;
  PositiveBlock block;
  StatisticsOutput stats;
};

// The symmetric coefficient pass (contrastive_row_coefficients).
struct CoefficientsArgs {
  RowSegments seg;
  LogitRule rule;
  SegmentScales scales;
  PositiveBlock block;
  CoefficientOutput out;
  int joint;
  int directions;        // the loss's number of directions (per_direction weight 1 / directions)
  const float* row_ref;  // (rows, num_segments) the reference of each row segment's softmax
  const float* col_ref;  // (block.count,) the reference of column j's D2Q softmax
  // optional (null: none): exp(row_ref[r, Q2D] - K) per row and exp(K - col_ref[j]) per column for a shift K, 0 where
  // that factor is not within e^±8 (see SymmetricSegment::column_term)
  const float* row_factor;  // (rows,)
  const float* col_factor;  // (block.count,)
};

// The fixed-shift statistics pass (row_kernel_fixed_shift.h): unscaled, unpenalized logits scale·v.
struct ExpStatisticsArgs {
  RowSegments seg;  // scores: replaced by e = exp(scale·v - shift)
  float scale;
  float shift;
  PositiveBlock block;
  StatisticsOutput stats;
};

// The fixed-shift coefficient pass, from e.
struct ExpCoefficientsArgs {
  RowSegments seg;  // scores: e
  float scale;
  PositiveBlock block;
  CoefficientOutput out;  // no grad_scale_factor
  int joint;
  int directions;
  const float* row_factor;  // (rows, num_segments) exp(shift - row_ref)
  const float* col_factor;  // (block.count,) exp(shift - col_ref)
};

// ---- The formulas, shared by every form.

// grad_scale times the optional device-side factor (grad_scale 1 with factor γ: exactly the coefficients of
// grad_scale γ).
ST_FAST_HD float effective_grad_scale(const CoefficientOutput& out) {
  return out.grad_scale_factor ? out.grad_scale * out.grad_scale_factor[0] : out.grad_scale;
}

// The coefficients' common factor grad_scale·scale.
ST_FAST_HD float coefficient_base(const CoefficientOutput& out, float scale) {
  return effective_grad_scale(out) * scale;
}

// Multiplier of the similarity for the bulk of a segment's entries.
ST_FAST_HD float bulk_multiplier(const LogitRule& rule, int kind) {
  const bool penalize_bulk = kind == kOwnPositive && (rule.hardness == kInBatch || rule.hardness == kAll);
  return penalize_bulk ? rule.scale + rule.alpha : rule.scale;
}

// Multiplier for the row's own column j·W + g of a segment (the positive for j == 0 in Q2D); 0 means masked.
ST_FAST_HD float own_column_multiplier(const LogitRule& rule, int kind, int64_t j) {
  if (kind == kOwnMasked || kind == kOwnGroupMasked) return 0.0f;
  if (kind == kPlain || j == 0) return rule.scale;  // D2Q has no own-column rule; the positive is never penalized
  const bool penalized = rule.hardness == kHard || rule.hardness == kAll;
  return penalized ? rule.scale + rule.alpha : rule.scale;
}

// The fixed-shift form's rule: nothing penalized.
ST_FAST_HD LogitRule unpenalized(float scale) { return LogitRule{scale, 0.0f, kHardnessNone}; }

// Whether the segment's own column g (block 0) holds the positive pair's score and so takes a share of the one-hot
// term: Q2D always, D2Q in per_direction (in joint it is one more entry of the single softmax).
ST_FAST_HD bool holds_positive(int joint, int kind) { return kind == kOwnPositive || (!joint && kind == kPlain); }

// Whether column c of segment x is a duplicate of row g's reference text (mask_duplicates; never the target c == g).
ST_FAST_HD bool duplicate(const RowSegments& seg, int x, int64_t c, int64_t g) {
  return seg.labels[x] != nullptr && c != g && seg.labels[x][c] == seg.labels[x][g];
}

// Whether the positive block's column c leaves the D2Q (column) softmax at row g (mask_duplicates).
ST_FAST_HD bool column_duplicate(const PositiveBlock& block, int64_t c, int64_t g) {
  return block.query_labels != nullptr && c != g && block.query_labels[c] == block.query_labels[g];
}

// The row scale of segment x at row r (1 without).
ST_FAST_HD float row_scale_of(const SegmentScales& scales, int x, int64_t r) {
  return scales.rows[x] ? scales.rows[x][r] : 1.0f;
}

// The scale product row_scale · col_scale[c] of segment x (1 without a column scale).
ST_FAST_HD_VEC float scales_at(const float* col_scale, float row_scale, int64_t c) {
  return row_scale * (col_scale ? col_scale[c] : 1.0f);
}

// s = v · (row_scale · col_scale): the scale product commutes, so s_q2d[i, g] and s_d2q[i, g] agree to the bit.
ST_FAST_HD float scaled(const SegmentScales& scales, int x, float row_scale, int64_t c, float value) {
  return value * scales_at(scales.columns[x], row_scale, c);
}

// The row's log-partition from its segments' LSEs: their log-sum-exp (joint) or their mean (per_direction).
ST_FAST_HD float log_partition(const float* seg_lse, int num_segments, int joint) {
  if (joint) {
    float top = -INFINITY;
    for (int x = 0; x < num_segments; ++x) top = fmaxf(top, seg_lse[x]);
    float total = 0.0f;
    for (int x = 0; x < num_segments; ++x) total += seg_lse[x] == -INFINITY ? 0.0f : row_expf(seg_lse[x] - top);
    return top == -INFINITY ? -INFINITY : top + logf(total);
  }
  float log_z = 0.0f;
  for (int x = 0; x < num_segments; ++x) log_z += seg_lse[x];
  return log_z / static_cast<float>(num_segments);
}

// The symmetric passes' weights (every form): each softmax term's weight and the one-hot shares, Q2D's and, in
// per_direction, D2Q's (the column term's), each the same expression as the weight there, so that a single-column
// softmax gives weight·1 - share = 0 exactly.
struct SymmetricWeights {
  float weight;
  float positive_share;
  bool d2q_holds;
};

ST_FAST_HD SymmetricWeights symmetric_weights(float base, int joint, int directions) {
  SymmetricWeights w;
  w.weight = joint ? base : base / static_cast<float>(directions);
  w.d2q_holds = !joint;
  w.positive_share = base / (w.d2q_holds ? 2.0f : 1.0f);
  return w;
}

// The diagonal entry (the positive of row g in both directions): its row and column terms less the one-hot shares.
ST_FAST_HD float diagonal_coefficient(float row_term, float column_term, const SymmetricWeights& w) {
  return (row_term - w.positive_share) + (w.d2q_holds ? column_term - w.positive_share : column_term);
}

// A finite shift for exp(l - shift): the max itself, or 0 where it is ±inf (all entries -inf: the sum is 0 and the
// LSE -inf; a +inf logit: the sum and the LSE +inf).
ST_FAST_HD float finite_shift(float m) { return m - m == 0.0f ? m : 0.0f; }

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

}  // namespace st_fast
