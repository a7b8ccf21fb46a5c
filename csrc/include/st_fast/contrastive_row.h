// The contrastive row kernel: one row of a chunk of raw similarity scores -> the row's loss and, in place, the
// gradient coefficients. One algorithm source compiled for the CPU (SerialLanes, OpenMP over rows) and for CUDA
// (WarpLanes, one warp per row). Segment kinds, masks and the hardness penalty follow st_fast/ops/layout.py:
//
//   Q2D  columns k·W  positive at c == g; hardness multiplier on the penalized entries
//   Q2Q  columns W    c == g masked
//   D2Q  columns W    nothing masked
//   D2D  columns k·W  c % W == g masked
//
// Per row (g = row_start + r):  l_x = scale·s_x (+ alpha·s_x where penalized, -inf where masked),
// lse_x = logsumexp(l_x), log_z = logsumexp_x(lse_x) (joint) or mean_x(lse_x), loss = log_z - scale·s_q2d[g].
// With grad_scale >= 0 the scores become  grad_scale·scale·w_x·exp(l_x - ref_x)  minus grad_scale·scale at the
// positive, with ref_x = log_z, w_x = 1 (joint) or ref_x = lse_x, w_x = 1/#segments (per_direction).
//
// Passes over a segment's row: (1) s -> logit: a vectorizable multiply of each W-block around the row's own column,
// which gets its own multiplier (or -inf),
// (2) max, (3) e = exp(l - max) in place and its sum, (4) with a gradient, e -> coefficient (multiply).
#pragma once

#include "st_fast/portability.h"

namespace st_fast {

constexpr int kMaxSegments = 4;
enum SegmentKind : int { kQ2D = 0, kQ2Q = 1, kD2Q = 2, kD2D = 3 };
enum HardnessKind : int { kHardnessNone = 0, kInBatch = 1, kHard = 2, kAll = 3 };

struct ContrastiveRowArgs {
  int num_segments;
  float* scores[kMaxSegments];  // (rows, lengths[x]) row-major, contiguous rows
  int64_t lengths[kMaxSegments];
  int kinds[kMaxSegments];  // kinds[0] must be kQ2D
  int64_t rows;
  int64_t row_start;
  int64_t width;
  float scale;
  float alpha;
  int hardness;
  int joint;
  float grad_scale;  // < 0: loss only, scores are left as exp(l - max)
  float* row_loss;   // (rows,)
};

// Multiplier of the raw similarity for the bulk of a segment's entries.
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

template <class Lanes>
ST_FAST_HD void contrastive_row(const ContrastiveRowArgs& a, int64_t r, const Lanes& lanes) {
  const int64_t g = a.row_start + r;
  float seg_max[kMaxSegments], seg_lse[kMaxSegments];
  float positive = 0.0f;
  for (int x = 0; x < a.num_segments; ++x) {
    float* row = a.scores[x] + r * a.lengths[x];
    const int64_t n = a.lengths[x];
    const int kind = a.kinds[x];
    const float bulk = bulk_multiplier(a, kind);
    for (int64_t block = 0; block < n; block += a.width) {  // block j holds the row's own column j·W + g
      const int64_t own = block + g;
      for (int64_t c = block + lanes.id(); c < own; c += lanes.count()) row[c] *= bulk;
      for (int64_t c = own + 1 + lanes.id(); c < block + a.width; c += lanes.count()) row[c] *= bulk;
      if (lanes.id() == 0) {
        const float mult = own_column_multiplier(a, kind, block / a.width);
        row[own] = mult == 0.0f ? -INFINITY : row[own] * mult;
      }
    }
    lanes.sync();
    if (kind == kQ2D) positive = row[g];
    float m = -INFINITY;
    for (int64_t c = lanes.id(); c < n; c += lanes.count()) m = row[c] > m ? row[c] : m;
    m = lanes.max(m);
    float sum = 0.0f;
    const float shift = m == -INFINITY ? 0.0f : m;  // a fully masked segment: every e is exp(-inf) = 0
    for (int64_t c = lanes.id(); c < n; c += lanes.count()) {
      const float e = expf(row[c] - shift);
      row[c] = e;
      sum += e;
    }
    sum = lanes.sum(sum);
    seg_max[x] = m;
    seg_lse[x] = m == -INFINITY ? -INFINITY : m + logf(sum);
  }
  float log_z;
  if (a.joint) {
    float top = -INFINITY;
    for (int x = 0; x < a.num_segments; ++x) top = fmaxf(top, seg_lse[x]);
    float total = 0.0f;
    for (int x = 0; x < a.num_segments; ++x) total += seg_lse[x] == -INFINITY ? 0.0f : expf(seg_lse[x] - top);
    log_z = top + logf(total);
  } else {
    log_z = 0.0f;
    for (int x = 0; x < a.num_segments; ++x) log_z += seg_lse[x];
    log_z /= static_cast<float>(a.num_segments);
  }
  if (lanes.id() == 0) a.row_loss[r] = log_z - positive;
  if (a.grad_scale < 0.0f) return;
  const float base = a.grad_scale * a.scale;
  for (int x = 0; x < a.num_segments; ++x) {
    float* row = a.scores[x] + r * a.lengths[x];
    const int64_t n = a.lengths[x];
    const float ref = a.joint ? log_z : seg_lse[x];
    const float weight = a.joint ? base : base / static_cast<float>(a.num_segments);
    const float factor = seg_max[x] == -INFINITY ? 0.0f : weight * expf(seg_max[x] - ref);
    for (int64_t c = lanes.id(); c < n; c += lanes.count()) row[c] *= factor;
    lanes.sync();
    if (a.kinds[x] == kQ2D && lanes.id() == 0) row[g] -= base;
  }
}

}  // namespace st_fast
