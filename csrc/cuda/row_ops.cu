// CUDA build of the row kernels: the algorithm sources in csrc/include/st_fast/, one warp per row.
// No torch headers here (see README: the CPU torch wheel cannot compile them); tensors arrive as raw
// pointers and the stream as an integer handle.
#include <cuda_runtime.h>

#include "launch.cuh"
#include "st_fast/row_logsumexp.h"
#include "warp_lanes.cuh"

namespace st_fast {

template <class T>
__global__ void row_logsumexp_kernel(const T* scores, int64_t rows, int64_t cols, int64_t row_stride, float* out) {
  const int64_t row = warp_row();
  if (row >= rows) return;
  const float lse = row_logsumexp(scores + row * row_stride, cols, WarpLanes{});
  if ((threadIdx.x & 31) == 0) out[row] = lse;
}

}  // namespace st_fast

extern "C" int st_fast_cuda_row_logsumexp(int dtype_code, const void* scores, int64_t rows, int64_t cols,
                                          int64_t row_stride, float* out, uintptr_t stream_handle) {
  using namespace st_fast;
  if (rows == 0) return 0;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid = warp_per_row_grid(rows), block = warp_per_row_block();
  switch (dtype_code) {
    case 0:
      row_logsumexp_kernel<<<grid, block, 0, stream>>>(static_cast<const float*>(scores), rows, cols, row_stride, out);
      break;
    case 1:
      row_logsumexp_kernel<<<grid, block, 0, stream>>>(static_cast<const __half*>(scores), rows, cols, row_stride, out);
      break;
    case 2:
      row_logsumexp_kernel<<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(scores), rows, cols,
                                                       row_stride, out);
      break;
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  return static_cast<int>(cudaGetLastError());
}

extern "C" int st_fast_cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

extern "C" const char* st_fast_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
