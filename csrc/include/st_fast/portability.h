// Portability layer: lets one algorithm source compile for the CPU (g++) and for CUDA (nvcc).
//
// Kernels are written against a `Lanes` object: a row is processed by `lanes.count()` cooperating
// workers, worker `lanes.id()` visiting elements id, id + count, ...; `lanes.max/sum` reduce a
// per-worker value across the group. On the CPU a row has one worker (SerialLanes); on CUDA a row
// is owned by one warp (WarpLanes, in cuda/warp_lanes.cuh); the CPU tests run the CUDA build's lane
// algorithm with ThreadLanes (thread_lanes.h, test only: one thread per lane).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ST_FAST_HD __host__ __device__ __forceinline__
#else
#define ST_FAST_HD inline
#endif

// For the small functions called inside the CPU build's vectorizable loops: a call the inliner leaves out (its
// budget runs out in the larger template instantiations) stops the loop's vectorization, so they are always inlined.
#if defined(__CUDACC__)
#define ST_FAST_HD_VEC ST_FAST_HD
#elif defined(__GNUC__)
#define ST_FAST_HD_VEC inline __attribute__((always_inline))
#else
#define ST_FAST_HD_VEC inline
#endif

namespace st_fast {

struct SerialLanes {
  // A row's columns are one worker's contiguous range: the kernels take their vectorizable range loops
  // (row_kernel_ranges.h), which GCC -O3 turns into SIMD code; WarpLanes (CUDA) says false (row_kernel_lanes.h's
  // templates refuse a contiguous Lanes).
  static constexpr bool kContiguous = true;
  ST_FAST_HD int64_t id() const { return 0; }
  ST_FAST_HD int64_t count() const { return 1; }
  ST_FAST_HD float max(float v) const { return v; }
  ST_FAST_HD float sum(float v) const { return v; }
};

// c ? a : b on the bits: branch-free, so that loops calling it vectorize.
ST_FAST_HD_VEC float select_float(bool c, float a, float b) {
  uint32_t a_bits, b_bits;
  std::memcpy(&a_bits, &a, sizeof a_bits);
  std::memcpy(&b_bits, &b, sizeof b_bits);
  const uint32_t mask = 0u - static_cast<uint32_t>(c);
  const uint32_t bits = (a_bits & mask) | (b_bits & ~mask);
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// exp of the row kernels' softmax terms. CUDA: the libdevice expf, as before. CPU: a branch-free float32 exp that
// GCC -O3 vectorizes inside a loop (glibc's expf is a call per element). Range reduction x = n·ln2 + r with
// n = round(x·log2 e) (the 1.5·2^23 rounding trick: SSE2 has no round instruction) and ln2 split in two (Cody-Waite:
// n·LN2_HI is exact for |n| <= 2^9), |r| <= ln2/2; exp(r) by Cephes' degree-7 minimax form
// 1 + r + r^2·P(r) (P of degree 5), whose error over that interval is below an ulp; 2^n is applied as two
// factors 2^(n/2)·2^(n - n/2) so that results between FLT_MIN and the smallest subnormal round once (gradual
// underflow as glibc), and overflow gives +inf like expf. Measured max relative error vs float64 exp over
// [-87.3, 88.7]: see tests/test_row_expf.py (bound 2 ulp = 2.4e-7). Special values: exp(-inf) = 0 (x < -104
// clamps to -104, whose exp rounds to 0), x > 88.73 (+inf included) -> +inf, NaN -> NaN.
ST_FAST_HD_VEC float row_expf(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  // the clamps as bitwise selects (a float `c ? a : b` feeding arithmetic is left as a branch by GCC under the
  // default -ftrapping-math, which stops the loop's vectorization); NaN compares false and passes through
  x = select_float(x < -104.0f, -104.0f, x);
  x = select_float(x > 89.0f, 89.0f, x);
  const float round_shift = 12582912.0f;  // 1.5·2^23: t's low mantissa bits then hold round(x·log2 e)
  const float t = x * 1.44269504088896341f + round_shift;
  const float n = t - round_shift;
  uint32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof t_bits);
  const int32_t ni = static_cast<int32_t>(t_bits - 0x4B400000u);  // the integer n (|n| <= 151)
  float r = x - n * 0.693359375f;  // LN2_HI: 9 significant bits, n·LN2_HI exact
  r = r - n * -2.12194440e-4f;     // LN2_LO = ln2 - LN2_HI
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = (p * (r * r) + r) + 1.0f;
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;  // n1, n2 in [-76, 64]: both 2^n1 and 2^n2 are normal floats
  const uint32_t b1 = static_cast<uint32_t>(n1 + 127) << 23, b2 = static_cast<uint32_t>(n2 + 127) << 23;
  float f1, f2;
  std::memcpy(&f1, &b1, sizeof f1);
  std::memcpy(&f2, &b2, sizeof f2);
  return (er * f1) * f2;
#endif
}

}  // namespace st_fast
