// Portability layer: lets one algorithm source compile for the CPU (g++) and for CUDA (nvcc).
//
// Kernels are written against a `Lanes` object: a row is processed by `lanes.count()` cooperating
// workers, worker `lanes.id()` visiting elements id, id + count, ...; `lanes.max/sum` reduce a
// per-worker value across the group. On the CPU a row has one worker (SerialLanes); on CUDA a row
// is owned by one warp (WarpLanes, in cuda/warp_lanes.cuh).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ST_FAST_HD __host__ __device__ __forceinline__
#else
#define ST_FAST_HD inline
#endif

namespace st_fast {

struct SerialLanes {
  ST_FAST_HD int64_t id() const { return 0; }
  ST_FAST_HD int64_t count() const { return 1; }
  ST_FAST_HD float max(float v) const { return v; }
  ST_FAST_HD float sum(float v) const { return v; }
};

}  // namespace st_fast
