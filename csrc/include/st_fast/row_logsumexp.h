// Row-wise log-sum-exp: out[r] = log(sum_j exp(x[r, j])), computed with the running-max trick in fp32.
// A row whose entries are all -inf yields -inf (never NaN). Shared by the CPU and CUDA builds.
#pragma once

#include "st_fast/portability.h"

namespace st_fast {

template <class Lanes, class T>
ST_FAST_HD float row_logsumexp(const T* row, int64_t n, const Lanes& lanes) {
  float row_max = -INFINITY;
  for (int64_t j = lanes.id(); j < n; j += lanes.count()) row_max = fmaxf(row_max, to_float(row[j]));
  row_max = lanes.max(row_max);
  if (row_max == -INFINITY) return -INFINITY;
  float sum_exp = 0.0f;
  for (int64_t j = lanes.id(); j < n; j += lanes.count()) sum_exp += expf(to_float(row[j]) - row_max);
  sum_exp = lanes.sum(sum_exp);
  return row_max + logf(sum_exp);
}

}  // namespace st_fast
