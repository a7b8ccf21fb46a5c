// CUDA build of the contrastive row kernel (csrc/include/st_fast/contrastive_row.h): one warp per row, fp32 math.
// The score segments are fp32 (written by the score GEMMs of the native backend, fp32 output from any input dtype);
// the coefficients are written in the dtype of the gradient GEMMs that consume them.
#include <cuda_runtime.h>

#include "launch.cuh"
#include "st_fast/contrastive_row_host.h"
#include "warp_lanes.cuh"

namespace st_fast {

template <class Out>
__global__ void contrastive_row_kernel(ContrastiveRowArgs args) {
  const int64_t row = warp_row();
  if (row >= args.rows) return;
  contrastive_row<Out>(args, row, WarpLanes{});
}

}  // namespace st_fast

extern "C" int st_fast_cuda_contrastive_rows(const st_fast::ContrastiveRowArgs* args, uintptr_t stream_handle) {
  using namespace st_fast;
  if (args->rows == 0) return 0;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  dispatch_store_dtype(args->coefficient_dtype, [&](auto out) {
    contrastive_row_kernel<decltype(out)><<<warp_per_row_grid(args->rows), warp_per_row_block(), 0, stream>>>(*args);
  });
  return static_cast<int>(cudaGetLastError());
}
