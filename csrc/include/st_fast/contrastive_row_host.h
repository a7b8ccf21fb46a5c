// Host-side construction of ContrastiveRowArgs from the Python bindings' arguments (CPU and CUDA extensions).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "st_fast/contrastive_row.h"

namespace st_fast {

// One entry per segment; a 0 pointer means "no scale" (scales) or "loss only" (coefficients, all of them).
// grad_scale_factor: 0, or the address of one float that multiplies grad_scale on the device.
struct ContrastiveRowPointers {
  std::vector<uintptr_t> scores, row_scales, col_scales, coefficients;
};

inline ContrastiveRowArgs make_contrastive_row_args(const ContrastiveRowPointers& p, int coefficient_dtype,
                                                    const std::vector<int64_t>& lengths, const std::vector<int>& kinds,
                                                    int64_t rows, int64_t row_start, int64_t width, float scale,
                                                    float alpha, int hardness, bool joint, float grad_scale,
                                                    uintptr_t row_loss, uintptr_t grad_scale_factor = 0) {
  const size_t count = p.scores.size();
  if (count == 0 || count > kMaxSegments || lengths.size() != count || kinds.size() != count ||
      p.row_scales.size() != count || p.col_scales.size() != count || p.coefficients.size() != count)
    throw std::invalid_argument("contrastive_row: 1 to 4 segments, each with scores, scales, coefficients, length, kind");
  if (kinds[0] != kQ2D) throw std::invalid_argument("contrastive_row: the first segment must be query_to_doc");
  if (coefficient_dtype < kStoreFp32 || coefficient_dtype > kStoreFp16)
    throw std::invalid_argument("contrastive_row: coefficient dtype must be a StoreDtype code (see boundary_codes)");
  if (hardness < kHardnessNone || hardness > kAll)
    throw std::invalid_argument("contrastive_row: hardness must be a HardnessKind code (see boundary_codes)");
  for (const int kind : kinds)
    if (kind < kQ2D || kind > kD2D)
      throw std::invalid_argument("contrastive_row: kinds must be SegmentKind codes (see boundary_codes)");
  ContrastiveRowArgs a{};
  a.num_segments = static_cast<int>(count);
  for (size_t x = 0; x < count; ++x) {
    if (grad_scale >= 0.0f && p.coefficients[x] == 0)
      throw std::invalid_argument("contrastive_row: gradient coefficients requested without an output array");
    a.scores[x] = reinterpret_cast<const float*>(p.scores[x]);
    a.row_scale[x] = reinterpret_cast<const float*>(p.row_scales[x]);
    a.col_scale[x] = reinterpret_cast<const float*>(p.col_scales[x]);
    a.coefficients[x] = reinterpret_cast<void*>(p.coefficients[x]);
    a.lengths[x] = lengths[x];
    a.kinds[x] = kinds[x];
  }
  a.coefficient_dtype = coefficient_dtype;
  a.rows = rows;
  a.row_start = row_start;
  a.width = width;
  a.scale = scale;
  a.alpha = alpha;
  a.hardness = hardness;
  a.joint = joint ? 1 : 0;
  a.grad_scale = grad_scale;
  a.row_loss = reinterpret_cast<float*>(row_loss);
  a.grad_scale_factor = reinterpret_cast<const float*>(grad_scale_factor);
  return a;
}

// The two-pass (symmetric) fields of ContrastiveRowArgs: the positive block's columns and the statistics /
// reference arrays of each pass (0: absent; the Python wrapper st_fast._native validates their shapes).
struct SymmetricPointers {
  uintptr_t row_lse = 0, row_positive = 0, row_ref = 0, col_max = 0, col_sum = 0, col_ref = 0, row_factor = 0,
            col_factor = 0;
};

inline void set_symmetric_args(ContrastiveRowArgs& a, const SymmetricPointers& p, int64_t block_begin,
                               int64_t block_count, int directions) {
  const int64_t block_end = block_begin + block_count;
  if (block_begin < 0 || block_count < 0 || block_end > a.width || block_end > a.lengths[0])
    throw std::invalid_argument("contrastive_row: the positive block must lie within the first column block");
  if (a.row_start < block_begin || a.row_start + a.rows > block_begin + block_count)
    throw std::invalid_argument("contrastive_row: the rows must be rows of the positive block");
  if (directions < 1 || directions > kMaxSegments)
    throw std::invalid_argument("contrastive_row: directions must be 1 to 4");
  a.row_lse = reinterpret_cast<float*>(p.row_lse);
  a.row_positive = reinterpret_cast<float*>(p.row_positive);
  a.row_ref = reinterpret_cast<const float*>(p.row_ref);
  a.col_max = reinterpret_cast<float*>(p.col_max);
  a.col_sum = reinterpret_cast<float*>(p.col_sum);
  a.col_ref = reinterpret_cast<const float*>(p.col_ref);
  a.row_factor = reinterpret_cast<const float*>(p.row_factor);
  a.col_factor = reinterpret_cast<const float*>(p.col_factor);
  a.block_begin = block_begin;
  a.block_count = block_count;
  a.directions = directions;
}

// mask_duplicates' labels (st_fast/ops/layout.py): one pointer per segment, all 0 (no masking) or none 0 (an empty
// list: no masking), and the query labels of the positive block's column softmax (two-pass entry points: required
// with segment labels). The Python wrapper st_fast._native validates their shapes and dtype (int32).
inline void set_label_args(ContrastiveRowArgs& a, const std::vector<uintptr_t>& labels, uintptr_t query_labels,
                           bool two_pass) {
  if (labels.empty() && query_labels == 0) return;
  if (labels.size() != static_cast<size_t>(a.num_segments))
    throw std::invalid_argument("contrastive_row: one label pointer per segment (0: no duplicate masking)");
  size_t given = 0;
  for (const uintptr_t p : labels) given += p != 0 ? 1 : 0;
  if (given != 0 && given != labels.size())
    throw std::invalid_argument("contrastive_row: labels for every segment or for none");
  if (two_pass && (given != 0) != (query_labels != 0))
    throw std::invalid_argument("contrastive_row: the two-pass kernels take segment and query labels together");
  for (size_t x = 0; x < labels.size(); ++x) a.labels[x] = reinterpret_cast<const Label*>(labels[x]);
  a.query_labels = reinterpret_cast<const Label*>(query_labels);
}

}  // namespace st_fast
