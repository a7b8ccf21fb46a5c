// Host-side construction of ContrastiveRowArgs from the Python bindings' arguments (CPU and CUDA extensions).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

#include "st_fast/contrastive_row.h"

namespace st_fast {

inline ContrastiveRowArgs make_contrastive_row_args(const std::vector<uintptr_t>& scores, const std::vector<int64_t>& lengths,
                                             const std::vector<int>& kinds, int64_t rows, int64_t row_start,
                                             int64_t width, float scale, float alpha, int hardness, bool joint,
                                             float grad_scale, uintptr_t row_loss) {
  const size_t count = scores.size();
  if (count == 0 || count > kMaxSegments || lengths.size() != count || kinds.size() != count)
    throw std::invalid_argument("contrastive_row: 1 to 4 segments with one length and one kind each");
  if (kinds[0] != kQ2D) throw std::invalid_argument("contrastive_row: the first segment must be query_to_doc");
  ContrastiveRowArgs a{};
  a.num_segments = static_cast<int>(count);
  for (size_t x = 0; x < count; ++x) {
    a.scores[x] = reinterpret_cast<float*>(scores[x]);
    a.lengths[x] = lengths[x];
    a.kinds[x] = kinds[x];
  }
  a.rows = rows;
  a.row_start = row_start;
  a.width = width;
  a.scale = scale;
  a.alpha = alpha;
  a.hardness = hardness;
  a.joint = joint ? 1 : 0;
  a.grad_scale = grad_scale;
  a.row_loss = reinterpret_cast<float*>(row_loss);
  return a;
}

}  // namespace st_fast
