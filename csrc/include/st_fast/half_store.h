// Stores of fp32 values as fp32, bfloat16 or float16 with round-to-nearest-even, in plain integer arithmetic so
// that the CPU and CUDA builds write bit-identical results (and the CPU tests check the CUDA rounding).
#pragma once

#include <cstdint>
#include <cstring>

#include "st_fast/portability.h"

namespace st_fast {

enum StoreDtype : int { kStoreFp32 = 0, kStoreBf16 = 1, kStoreFp16 = 2 };

ST_FAST_HD uint32_t float_bits(float value) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(value);
#else
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
#endif
}

// bfloat16 = the high half of the fp32 bits, rounded to nearest even; NaN stays a (quiet) NaN.
ST_FAST_HD uint16_t float_to_bf16_bits(float value) {
  uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// float16 (1-5-10) rounded to nearest even: overflow -> inf, values below 2^-24 / 2 -> signed zero, subnormals kept.
ST_FAST_HD uint16_t float_to_fp16_bits(float value) {
  const uint32_t bits = float_bits(value);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude >= 0x7F800000u) return static_cast<uint16_t>(sign | (magnitude > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (magnitude >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds past 65504
  const uint32_t exponent = magnitude >> 23;
  uint32_t result, remainder, halfway;
  if (exponent >= 113) {  // normal fp16: rebias the exponent, keep 10 mantissa bits
    result = ((exponent - 112) << 10) | ((magnitude >> 13) & 0x3FFu);
    remainder = magnitude & 0x1FFFu;
    halfway = 0x1000u;
  } else {  // fp16 subnormal (or zero): mantissa with its implicit bit, shifted to units of 2^-24
    if (exponent < 102) return static_cast<uint16_t>(sign);
    const uint32_t mantissa = (magnitude & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - exponent;  // 14 .. 24
    result = mantissa >> shift;
    remainder = mantissa & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1);
  }
  if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;  // a carry into the exponent is right
  return static_cast<uint16_t>(sign | result);
}

// Out policies of the row kernels: element i of an output array of that dtype.
struct Fp32Out {
  static ST_FAST_HD void put(void* base, int64_t i, float value) { static_cast<float*>(base)[i] = value; }
};
struct Bf16Out {
  static ST_FAST_HD void put(void* base, int64_t i, float value) {
    static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(value);
  }
};
// float16 coefficients saturate at +-65504 instead of overflowing to inf (an inf coefficient times a zero entry would
// be NaN in the gradient GEMM); NaN stays NaN.
struct Fp16Out {
  static ST_FAST_HD void put(void* base, int64_t i, float value) {
    if (value > 65504.0f) value = 65504.0f;
    if (value < -65504.0f) value = -65504.0f;
    static_cast<uint16_t*>(base)[i] = float_to_fp16_bits(value);
  }
};

// Calls launch(Out{}) with the Out policy of a StoreDtype code (fp32 for an unknown one; callers validate).
template <class Launch>
void dispatch_store_dtype(int dtype, Launch&& launch) {
  switch (dtype) {
    case kStoreBf16:
      launch(Bf16Out{});
      break;
    case kStoreFp16:
      launch(Fp16Out{});
      break;
    default:
      launch(Fp32Out{});
  }
}

}  // namespace st_fast
