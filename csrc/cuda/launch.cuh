// Launch helpers shared by the .cu files: one warp per row, WARPS_PER_BLOCK rows per block.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace st_fast {

constexpr int kWarpsPerBlock = 8;

inline dim3 warp_per_row_grid(int64_t rows) {
  return dim3(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
}
inline dim3 warp_per_row_block() { return dim3(32 * kWarpsPerBlock); }
__device__ __forceinline__ int64_t warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
}

}  // namespace st_fast
