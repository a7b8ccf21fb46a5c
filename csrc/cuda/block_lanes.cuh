// CUDA: a row owned by one block of kThreads threads (a multiple of 32), for rows wide enough that one warp's memory
// requests do not keep the row's share of the bandwidth busy. Reductions: WarpLanes' butterfly within each warp, then
// every thread combines the warps' values in warp order from shared memory (the same value in every thread, and
// the order that tests/ops/test_emulated_lanes.py runs on the CPU with ThreadLanes).
#pragma once

#include <cuda_runtime.h>

#include "st_fast/portability.h"

namespace st_fast {

template <int kThreads>
struct BlockLanes {
  static_assert(kThreads % 32 == 0 && kThreads >= 64, "BlockLanes: whole warps, at least two");
  static constexpr bool kContiguous = false;  // lanes interleave: the online loops of row_kernel_lanes.h
  static constexpr int kWarps = kThreads / 32;
  float* slots;  // __shared__ float[kWarps] of the kernel

  __device__ __forceinline__ int64_t id() const { return threadIdx.x; }
  __device__ __forceinline__ int64_t count() const { return kThreads; }
  template <class Op>
  __device__ __forceinline__ float reduce(float v, Op op) const {
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = slots[0];
    for (int w = 1; w < kWarps; ++w) total = op(total, slots[w]);
    __syncthreads();  // every thread has read before the slots are written again
    return total;
  }
  __device__ __forceinline__ float max(float v) const {
    return reduce(v, [](float x, float y) { return fmaxf(x, y); });
  }
  __device__ __forceinline__ float sum(float v) const {
    return reduce(v, [](float x, float y) { return x + y; });
  }
};

}  // namespace st_fast
