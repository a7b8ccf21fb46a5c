// The MaxSim formulas that the CPU kernels (maxsim_cpu.h) and the CUDA kernels' algorithm (maxsim_lanes.h, also
// compiled for its CPU emulation) share, written once and portable (ST_FAST_HD).
#pragma once

#include <cstdint>
#include <cstring>

#include "st_fast/half_store.h"
#include "st_fast/portability.h"

namespace st_fast {
namespace maxsim_formulas {

ST_FAST_HD_VEC float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
#endif
}

// A bfloat16 (its 16 raw bits) as float32: exact. (ST_FAST_HD_VEC: inside the CPU backward's vectorized loops.)
ST_FAST_HD_VEC float bfloat16_to_float(uint16_t bits) { return float_from_bits(static_cast<uint32_t>(bits) << 16); }

// float32 -> bfloat16 -> float32, to nearest even (torch's rounding; half_store.h's, NaN stays NaN): a product or a
// gradient weight as the embeddings' dtype holds it.
ST_FAST_HD float round_to_bfloat16(float value) { return bfloat16_to_float(float_to_bf16_bits(value)); }

// Stock's max over all Ld tokens of a document, masked ones included as ``fill`` (finfo(dtype).min: stock's
// masked_fill), from the max over the unmasked tokens (``best``, -inf if none) and its first position ``at``: the
// fill of the first masked token (``first_masked``, ``length`` if none) wins where no unmasked product is above fill
// (an empty document, or products at or below finfo.min) and ties go to the first position. A masked token that wins
// is written as at = -1 - first_masked: its product is stock's constant fill, so the backward gives it no gradient
// (the backwards skip a negative arg-max).
ST_FAST_HD void with_masked_tokens(float fill, int64_t first_masked, int64_t length, float& best, int32_t& at) {
  if (first_masked >= length || best > fill) return;
  if (fill > best || first_masked < at) {
    best = fill;
    at = static_cast<int32_t>(-1 - first_masked);
  }
}

// A query token's term of the sum: its max, or for a masked query token stock's max · 0 (0, or NaN for an infinite
// max).
ST_FAST_HD float query_term(float best, bool valid) { return valid ? best : best * 0.0f; }

}  // namespace maxsim_formulas
}  // namespace st_fast
