// CUDA side of the portability layer: a row owned by one warp of 32 lanes.
#pragma once

#include <cuda_runtime.h>

#include "st_fast/portability.h"

namespace st_fast {

struct WarpLanes {
  static constexpr bool kContiguous = false;  // lanes interleave: the online loops of row_kernel_lanes.h
  __device__ __forceinline__ int64_t id() const { return threadIdx.x & 31; }
  __device__ __forceinline__ int64_t count() const { return 32; }
  __device__ __forceinline__ float max(float v) const {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
  }
  __device__ __forceinline__ float sum(float v) const {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
  }
};

}  // namespace st_fast
