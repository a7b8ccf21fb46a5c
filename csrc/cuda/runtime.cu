// CUDA runtime helpers of `st_fast._C_cuda` (device count, error strings), compiled by nvcc with the kernels.
#include <cuda_runtime.h>

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
