// CUDA build of the contrastive row kernel (csrc/include/st_fast/row_kernel_lanes.h): one warp per row (WarpLanes), or
// one block of kBlockLanes threads per row (BlockLanes; lanes_per_row = kBlockLanes, st_fast._native's
// ST_FAST_CUDA_ROW_LANES, a switch for measuring it), fp32 math. The score segments are fp32 (written by the score
// GEMMs of the native backend, fp32 output from any input dtype); the coefficients are written in the dtype of the
// gradient GEMMs that consume them.
#include <cuda_runtime.h>

#include "block_lanes.cuh"
#include "launch.cuh"
#include "st_fast/row_kernel_lanes.h"
#include "warp_lanes.cuh"

namespace st_fast {

template <class Out>
__global__ void contrastive_row_kernel(RowArgs args) {
  const int64_t row = warp_row();
  if (row >= args.seg.rows) return;
  contrastive_row<Out>(args, row, WarpLanes{});
}

template <class Out>
__global__ void contrastive_coefficient_kernel(CoefficientsArgs args) {
  const int64_t row = warp_row();
  if (row >= args.seg.rows) return;
  contrastive_row_coefficients<Out>(args, row, WarpLanes{});
}

__global__ void contrastive_row_statistics_kernel(StatisticsArgs args) {
  const int64_t row = warp_row();
  if (row >= args.seg.rows) return;
  contrastive_row_statistics(args, row, WarpLanes{});
}

// The same kernels with one block per row.
constexpr int kBlockLanes = 256;
using RowBlockLanes = BlockLanes<kBlockLanes>;

template <class Out>
__global__ void contrastive_row_block_kernel(RowArgs args) {
  __shared__ float slots[RowBlockLanes::kWarps];
  contrastive_row<Out>(args, blockIdx.x, RowBlockLanes{slots});
}

template <class Out>
__global__ void contrastive_coefficient_block_kernel(CoefficientsArgs args) {
  __shared__ float slots[RowBlockLanes::kWarps];
  contrastive_row_coefficients<Out>(args, blockIdx.x, RowBlockLanes{slots});
}

__global__ void contrastive_row_statistics_block_kernel(StatisticsArgs args) {
  __shared__ float slots[RowBlockLanes::kWarps];
  contrastive_row_statistics(args, blockIdx.x, RowBlockLanes{slots});
}

// One thread per column of the positive block, the chunk's rows in order (adjacent threads read adjacent columns).
constexpr int kColumnThreads = 256;

__global__ void contrastive_column_statistics_kernel(StatisticsArgs args) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColumnThreads + threadIdx.x;
  if (j >= args.block.count) return;
  contrastive_column_statistics(args, j, j + 1);
}

// Launches `warp` (one warp per row) or `block` (one block of kBlockLanes threads per row) over the rows of args;
// lanes_per_row: 32 or kBlockLanes, anything else is cudaErrorInvalidValue. Returns the launch's error code.
template <class Args>
int launch_per_row(void (*warp)(Args), void (*block)(Args), const Args& args, int lanes_per_row,
                   uintptr_t stream_handle) {
  if (lanes_per_row != 32 && lanes_per_row != kBlockLanes) return static_cast<int>(cudaErrorInvalidValue);
  if (args.seg.rows == 0) return 0;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (lanes_per_row == kBlockLanes)
    block<<<static_cast<unsigned>(args.seg.rows), kBlockLanes, 0, stream>>>(args);
  else
    warp<<<warp_per_row_grid(args.seg.rows), warp_per_row_block(), 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace st_fast

extern "C" int st_fast_cuda_contrastive_rows(const st_fast::RowArgs* args, int lanes_per_row,
                                             uintptr_t stream_handle) {
  using namespace st_fast;
  int code = 0;
  dispatch_store_dtype(args->out.dtype, [&](auto out) {
    using Out = decltype(out);
    code = launch_per_row(contrastive_row_kernel<Out>, contrastive_row_block_kernel<Out>, *args, lanes_per_row,
                          stream_handle);
  });
  return code;
}

extern "C" int st_fast_cuda_contrastive_statistics(const st_fast::StatisticsArgs* args, int lanes_per_row,
                                                   uintptr_t stream_handle) {
  using namespace st_fast;
  const int code = launch_per_row(contrastive_row_statistics_kernel, contrastive_row_statistics_block_kernel, *args,
                                  lanes_per_row, stream_handle);
  if (code != 0 || args->seg.rows == 0 || args->block.count == 0) return code;
  const auto blocks = static_cast<unsigned>((args->block.count + kColumnThreads - 1) / kColumnThreads);
  contrastive_column_statistics_kernel<<<blocks, kColumnThreads, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      *args);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int st_fast_cuda_contrastive_coefficients(const st_fast::CoefficientsArgs* args, int lanes_per_row,
                                                     uintptr_t stream_handle) {
  using namespace st_fast;
  int code = 0;
  dispatch_store_dtype(args->out.dtype, [&](auto out) {
    using Out = decltype(out);
    code = launch_per_row(contrastive_coefficient_kernel<Out>, contrastive_coefficient_block_kernel<Out>, *args,
                          lanes_per_row, stream_handle);
  });
  return code;
}
