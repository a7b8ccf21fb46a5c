// CUDA build of the MaxSim (late interaction) kernels (csrc/include/st_fast/maxsim_lanes.h): the forward as one block
// of kForwardThreads threads per (document, block of queries), register tiles over shared-memory slices with the
// running max in registers; the backward as one thread per gradient column (dQ per query-token row, dD per
// document), adding its terms in a fixed order: no atomics, the same bits every run. float32 or bfloat16 embeddings.
#include <cuda_runtime.h>

#include <cstdint>

#include "st_fast/maxsim_lanes.h"

namespace st_fast {
namespace maxsim_lanes {

// maxsim_lanes.h's executor on the GPU: the calling thread runs each phase with its registers, then the barrier.
struct CudaForwardBlock {
  MaxSimForwardShared* sh;
  MaxSimForwardThread t;
  __device__ __forceinline__ MaxSimForwardShared& shared() { return *sh; }
  template <class F>
  __device__ __forceinline__ void phase(F&& f) {
    f(static_cast<int>(threadIdx.x), t);
    __syncthreads();
  }
};

template <class In>
__global__ void __launch_bounds__(kForwardThreads) maxsim_forward_kernel(MaxSimForwardArgs args) {
  __shared__ MaxSimForwardShared sh;
  CudaForwardBlock block{&sh, {}};
  forward_block<In>(args, blockIdx.x, block);
}

template <class In>
__global__ void __launch_bounds__(kBackwardThreads) maxsim_query_gradient_kernel(MaxSimBackwardArgs args) {
  query_gradient_thread<In>(args, blockIdx.x, static_cast<int>(threadIdx.x));
}

template <class In>
__global__ void __launch_bounds__(kBackwardThreads) maxsim_document_gradient_kernel(MaxSimBackwardArgs args) {
  document_gradient_thread<In>(args, blockIdx.x, static_cast<int>(threadIdx.x));
}

constexpr int64_t kMaxBlocks = 0x7FFFFFFF;  // gridDim.x

template <class In>
int launch_forward(const MaxSimForwardArgs& a, cudaStream_t stream) {
  const int64_t blocks = forward_blocks(a.shape);
  if (blocks == 0) return 0;
  if (blocks > kMaxBlocks) return static_cast<int>(cudaErrorInvalidConfiguration);
  maxsim_forward_kernel<In><<<static_cast<unsigned>(blocks), kForwardThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

template <class In>
int launch_backward(const MaxSimBackwardArgs& a, cudaStream_t stream) {
  const int64_t query_blocks = query_gradient_blocks(a.shape), document_blocks = document_gradient_blocks(a.shape);
  if (query_blocks > kMaxBlocks || document_blocks > kMaxBlocks) return static_cast<int>(cudaErrorInvalidConfiguration);
  if (query_blocks > 0) {
    maxsim_query_gradient_kernel<In><<<static_cast<unsigned>(query_blocks), kBackwardThreads, 0, stream>>>(a);
    const int code = static_cast<int>(cudaGetLastError());
    if (code != 0) return code;
  }
  if (document_blocks > 0) {
    maxsim_document_gradient_kernel<In><<<static_cast<unsigned>(document_blocks), kBackwardThreads, 0, stream>>>(a);
    return static_cast<int>(cudaGetLastError());
  }
  return 0;
}

}  // namespace maxsim_lanes
}  // namespace st_fast

extern "C" int st_fast_cuda_maxsim_forward(const st_fast::MaxSimForwardArgs* args, uintptr_t stream_handle) {
  using namespace st_fast::maxsim_lanes;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return with_element_type(args->shape.dtype,
                           [&](auto in) { return launch_forward<decltype(in)>(*args, stream); });
}

extern "C" int st_fast_cuda_maxsim_backward(const st_fast::MaxSimBackwardArgs* args, uintptr_t stream_handle) {
  using namespace st_fast::maxsim_lanes;
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  return with_element_type(args->shape.dtype,
                           [&](auto in) { return launch_backward<decltype(in)>(*args, stream); });
}
