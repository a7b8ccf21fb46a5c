// The row kernel's native boundary: one argument object per entry point (plain host values: raw addresses as
// integers, codes as ints), with named fields, bound once by row_kernel_bindings.h for every extension (CPU, CUDA,
// the test-only emulation) and built by name in Python (st_fast/_native_rows.py). Each *Call converts to its pass's
// kernel struct (row_kernel_args.h), checking counts, codes and the positive block before any pointer is read; the
// Python side checks shapes, dtypes, devices and lifetimes first. A 0 address means "none" (no scale, no labels,
// loss only).
//
// Adding an argument: a field in the *Call struct (and its part below), its line in row_kernel_bindings.h, its
// conversion here, and its value in the Python builder.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "st_fast/row_kernel_args.h"

namespace st_fast {

// ---- The parts the entry points share.

// The score segments (every entry point).
struct SegmentsCall {
  std::vector<uintptr_t> scores;  // one fp32 (rows, lengths[x]) array per segment
  std::vector<int64_t> lengths;
  std::vector<int> kinds;          // SegmentKind codes; the first is kOwnPositive
  std::vector<uintptr_t> labels;   // mask_duplicates: empty, or one int32 (lengths[x],) array per segment
  int64_t rows = 0;
  int64_t row_start = 0;
  int64_t width = 0;
  float scale = 1.0f;
};

// The general passes' scales and hardness penalty (the fixed-shift form has neither).
struct ScaledCall {
  std::vector<uintptr_t> row_scales;  // empty, or one (rows,) array (or 0) per segment
  std::vector<uintptr_t> col_scales;  // empty, or one (lengths[x],) array (or 0) per segment
  float alpha = 0.0f;
  int hardness = kHardnessNone;  // HardnessKind code
};

// The two-pass entry points' positive block.
struct BlockCall {
  int64_t block_begin = 0;
  int64_t block_count = 0;
  uintptr_t query_labels = 0;  // mask_duplicates: the int32 (width,) labels of the column softmax (with labels)
};

// The coefficients' outputs.
struct StoreCall {
  std::vector<uintptr_t> coefficients;  // one (rows, lengths[x]) array of coefficient_dtype per segment
  int coefficient_dtype = kStoreFp32;   // StoreDtype code
  bool joint = true;
  float grad_scale = -1.0f;  // the one-pass kernel: < 0 for the loss only
};

// The statistics passes' outputs.
struct StatisticsOutCall {
  uintptr_t row_lse = 0;       // fp32 (rows, segments)
  uintptr_t row_positive = 0;  // fp32 (rows,)
  uintptr_t col_max = 0;       // fp32 (block_count,), continued
  uintptr_t col_sum = 0;       // fp32 (block_count,), continued
};

// ---- One argument object per entry point.

// contrastive_rows: the one-pass kernel.
struct RowsCall : SegmentsCall, ScaledCall, StoreCall {
  uintptr_t row_loss = 0;           // fp32 (rows,)
  uintptr_t grad_scale_factor = 0;  // 0, or one fp32 on the device that multiplies grad_scale
};

// contrastive_statistics: the symmetric statistics pass.
struct StatisticsCall : SegmentsCall, ScaledCall, BlockCall, StatisticsOutCall {};

// contrastive_coefficients: the symmetric coefficient pass.
struct CoefficientsCall : SegmentsCall, ScaledCall, BlockCall, StoreCall {
  uintptr_t grad_scale_factor = 0;
  int directions = 1;
  uintptr_t row_ref = 0;     // fp32 (rows, segments)
  uintptr_t col_ref = 0;     // fp32 (block_count,)
  uintptr_t row_factor = 0;  // 0, or fp32 (rows,)
  uintptr_t col_factor = 0;  // 0, or fp32 (block_count,)
};

// contrastive_exp_statistics: the fixed-shift statistics pass (CPU); the scores are replaced by e.
struct ExpStatisticsCall : SegmentsCall, BlockCall, StatisticsOutCall {
  float shift = 0.0f;
};

// contrastive_exp_coefficients: the fixed-shift coefficient pass (CPU), from e.
struct ExpCoefficientsCall : SegmentsCall, BlockCall, StoreCall {
  int directions = 1;
  uintptr_t row_factor = 0;  // fp32 (rows, segments)
  uintptr_t col_factor = 0;  // fp32 (block_count,)
};

// ---- Conversion to the kernel structs.

namespace calls {

inline void require(bool ok, const char* message) {
  if (!ok) throw std::invalid_argument(message);
}

template <class T>
const T* address(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

inline RowSegments segments(const SegmentsCall& c) {
  const size_t count = c.scores.size();
  require(count >= 1 && count <= kMaxSegments && c.lengths.size() == count && c.kinds.size() == count,
          "contrastive_row: 1 to 4 segments, each with scores, a length and a kind");
  require(c.kinds[0] == kOwnPositive, "contrastive_row: the first segment must be query_to_doc");
  for (const int kind : c.kinds)
    require(kind >= kOwnPositive && kind <= kOwnGroupMasked, "contrastive_row: kinds must be SegmentKind codes (see boundary_codes)");
  require(c.labels.empty() || c.labels.size() == count,
          "contrastive_row: one label pointer per segment (0: no duplicate masking)");
  size_t labelled = 0;
  for (const uintptr_t p : c.labels) labelled += p != 0 ? 1 : 0;
  require(labelled == 0 || labelled == count, "contrastive_row: labels for every segment or for none");
  RowSegments s{};
  s.num_segments = static_cast<int>(count);
  for (size_t x = 0; x < count; ++x) {
    s.scores[x] = address<float>(c.scores[x]);
    s.lengths[x] = c.lengths[x];
    s.kinds[x] = c.kinds[x];
    s.labels[x] = labelled ? address<Label>(c.labels[x]) : nullptr;
  }
  s.rows = c.rows;
  s.row_start = c.row_start;
  s.width = c.width;
  return s;
}

inline LogitRule rule(const SegmentsCall& s, const ScaledCall& c) {
  require(c.hardness >= kHardnessNone && c.hardness <= kAll,
          "contrastive_row: hardness must be a HardnessKind code (see boundary_codes)");
  return LogitRule{s.scale, c.alpha, c.hardness};
}

inline SegmentScales scales(const SegmentsCall& s, const ScaledCall& c) {
  const size_t count = s.scores.size();
  require((c.row_scales.empty() || c.row_scales.size() == count) &&
              (c.col_scales.empty() || c.col_scales.size() == count),
          "contrastive_row: the row and column scales: none, or one pointer (0: none) per segment");
  SegmentScales out{};
  for (size_t x = 0; x < c.row_scales.size(); ++x) out.rows[x] = address<float>(c.row_scales[x]);
  for (size_t x = 0; x < c.col_scales.size(); ++x) out.columns[x] = address<float>(c.col_scales[x]);
  return out;
}

inline CoefficientOutput output(const SegmentsCall& s, const StoreCall& c, bool required, uintptr_t factor) {
  require(c.coefficient_dtype >= kStoreFp32 && c.coefficient_dtype <= kStoreFp16,
          "contrastive_row: coefficient dtype must be a StoreDtype code (see boundary_codes)");
  require(c.coefficients.empty() || c.coefficients.size() == s.scores.size(),
          "contrastive_row: one coefficient pointer per segment");
  CoefficientOutput out{};
  for (size_t x = 0; x < s.scores.size(); ++x) {
    const uintptr_t p = x < c.coefficients.size() ? c.coefficients[x] : 0;
    require(!required || p != 0, "contrastive_row: gradient coefficients requested without an output array");
    out.segments[x] = reinterpret_cast<void*>(p);
  }
  out.dtype = c.coefficient_dtype;
  out.grad_scale = c.grad_scale;
  out.grad_scale_factor = address<float>(factor);
  return out;
}

inline PositiveBlock block(const SegmentsCall& s, const BlockCall& c) {
  const int64_t block_end = c.block_begin + c.block_count;
  require(c.block_begin >= 0 && c.block_count >= 0 && block_end <= s.width && block_end <= s.lengths.at(0),
          "contrastive_row: the positive block must lie within the first column block");
  require(s.row_start >= c.block_begin && s.row_start + s.rows <= block_end,
          "contrastive_row: the rows must be rows of the positive block");
  require(s.labels.empty() || s.labels[0] == 0 ? c.query_labels == 0 : c.query_labels != 0,
          "contrastive_row: the two-pass kernels take segment and query labels together");
  return PositiveBlock{c.block_begin, c.block_count, address<Label>(c.query_labels)};
}

inline StatisticsOutput statistics(const StatisticsOutCall& c) {
  return StatisticsOutput{reinterpret_cast<float*>(c.row_lse), reinterpret_cast<float*>(c.row_positive),
                          reinterpret_cast<float*>(c.col_max), reinterpret_cast<float*>(c.col_sum)};
}

inline int directions(int d) {
  require(d >= 1 && d <= kMaxSegments, "contrastive_row: directions must be 1 to 4");
  return d;
}

}  // namespace calls

namespace calls {

// The general passes' segments, logits' rule and scales.
template <class Args, class Call>
void set_general(Args& a, const Call& c) {
  a.seg = segments(c);
  a.rule = rule(c, c);
  a.scales = scales(c, c);
}

// The statistics passes' positive block and outputs.
template <class Args, class Call>
void set_statistics(Args& a, const Call& c) {
  a.block = block(c, c);
  a.stats = statistics(c);
}

// The coefficient passes' positive block, outputs, partition and factors (the general pass's references: its own).
template <class Args, class Call>
void set_coefficients(Args& a, const Call& c, uintptr_t grad_scale_factor) {
  a.block = block(c, c);
  a.out = output(c, c, true, grad_scale_factor);
  a.joint = c.joint ? 1 : 0;
  a.directions = directions(c.directions);
  a.row_factor = address<float>(c.row_factor);
  a.col_factor = address<float>(c.col_factor);
}

}  // namespace calls

inline RowArgs to_args(const RowsCall& c) {
  RowArgs a{};
  calls::set_general(a, c);
  a.out = calls::output(c, c, c.grad_scale >= 0.0f, c.grad_scale_factor);
  a.joint = c.joint ? 1 : 0;
  a.row_loss = reinterpret_cast<float*>(c.row_loss);
  return a;
}

inline StatisticsArgs to_args(const StatisticsCall& c) {
  StatisticsArgs a{};
  calls::set_general(a, c);
  calls::set_statistics(a, c);
  return a;
}

inline CoefficientsArgs to_args(const CoefficientsCall& c) {
  CoefficientsArgs a{};
  calls::set_general(a, c);
  calls::set_coefficients(a, c, c.grad_scale_factor);
  a.row_ref = calls::address<float>(c.row_ref);
  a.col_ref = calls::address<float>(c.col_ref);
  return a;
}

inline ExpStatisticsArgs to_args(const ExpStatisticsCall& c) {
  ExpStatisticsArgs a{};
  a.seg = calls::segments(c);
  a.scale = c.scale;
  a.shift = c.shift;
  calls::set_statistics(a, c);
  return a;
}

inline ExpCoefficientsArgs to_args(const ExpCoefficientsCall& c) {
  ExpCoefficientsArgs a{};
  a.seg = calls::segments(c);
  a.scale = c.scale;
  calls::set_coefficients(a, c, 0);
  return a;
}

}  // namespace st_fast
