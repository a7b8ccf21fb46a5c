// CPU MaxSim (late interaction): the forward as register tiles of query tokens x document tokens with the running
// max in the epilogue, and the sparse, deterministic backward through the stored arg-max.
//
// Forward (OpenMP over blocks of kQueryBlock queries; each thread packs one document's unmasked tokens at a time, in
// order, into transposed panels of kCols tokens and scores its block's queries against them, so the packing is
// shared by kQueryBlock queries):
//
//   p[s, t]        = Σ_k q[i, s, k] · d[m, t, k]            float32 accumulation (a kRows x kCols register tile),
//                                                           for the unmasked tokens t only
//   p[s, t]        = bfloat16(p[s, t])                      for bfloat16 embeddings (to nearest even, as torch)
//   best[s], at[s] = running max over the unmasked t, first index of a tie (strictly greater replaces), as
//                    torch.max: kept per register lane across the tiles, the lanes reduced once per (query, document)
//   best[s], at[s] = max with fill at the first masked token (stock's masked_fill: it wins only in an empty
//                    document or where no product is above finfo(dtype).min; a tie goes to the first position;
//                    a masked winner t is written as at[s] = -1 - t, maxsim_formulas.h)
//   sums[i, m]     = Σ_s query_term(best[s])               float32, in token order (a masked query token adds
//                                                           stock's best · 0); index[i, s, m] = at[s]
//
// A NaN product never wins here (torch.max would return it: the callers send non-finite embeddings to the torch
// backend). No products tensor exists beyond one register tile.
//
// Backward, with w = dL/dsums[i, m] rounded to the embeddings' dtype (the gradient of stock's float32 cast) and
// t* = index[i, s, m], for unmasked query tokens and t* >= 0 (a masked token's fill has no gradient):
//
//   dQ[i, s]     = Σ_m w · d[m, t*]       OpenMP over blocks of queries: each thread owns its rows and adds in the
//                                          order m = 0, 1, ... (documents read kDocumentBlock at a time, from cache)
//   dD[m, t*]   += w · q[i, s]            OpenMP over blocks of documents: each thread owns its documents' rows and
//                                          adds in the fixed (i, s) order: no atomics, the same bits every run
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "st_fast/maxsim_args.h"
#include "st_fast/maxsim_formulas.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in always-inline helpers: no call, no ABI
// Inlined into the caller, so that the caller's target (maxsim.cpp's haswell clone) compiles them too.
#define ST_FAST_MAXSIM_INLINE inline __attribute__((always_inline))
#else
#define ST_FAST_MAXSIM_INLINE inline
#endif

namespace st_fast {
namespace maxsim {

constexpr int kRows = 4;         // query tokens per register tile: 8 accumulators of 8 floats, no spills
constexpr int kCols = 16;        // document tokens per register tile
constexpr int64_t kQueryBlock = 16;  // queries scored against one packed document

using maxsim_formulas::bfloat16_to_float;
using maxsim_formulas::round_to_bfloat16;
using maxsim_formulas::query_term;
using maxsim_formulas::with_masked_tokens;

ST_FAST_MAXSIM_INLINE float element(const void* base, int64_t offset, MaxSimDtype dtype) {
  if (dtype == MaxSimDtype::kBFloat16) return bfloat16_to_float(static_cast<const uint16_t*>(base)[offset]);
  return static_cast<const float*>(base)[offset];
}

ST_FAST_MAXSIM_INLINE float in_dtype(float value, MaxSimDtype dtype) {
  return dtype == MaxSimDtype::kBFloat16 ? round_to_bfloat16(value) : value;
}

inline int64_t padded_tokens(int64_t tokens) { return (tokens + kCols - 1) / kCols * kCols; }

// Eight floats, loaded and stored unaligned (GCC vector extension: SSE pairs in the baseline build, one AVX
// register in the haswell clone).
typedef float Float8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t Int8 __attribute__((vector_size(32), aligned(4)));
typedef uint32_t Bits8 __attribute__((vector_size(32), aligned(4)));

ST_FAST_MAXSIM_INLINE Float8 broadcast(float x) { return x + Float8{}; }  // vector + scalar: one broadcast

// The tile's products as the running max sees them: rounded to the embeddings' dtype (bfloat16: to nearest even on
// the bits; a quiet NaN stays NaN), -inf on the packed columns past the document's unmasked tokens (``inside`` 0).
ST_FAST_MAXSIM_INLINE Float8 scored(const float* products, const int32_t* inside_lanes, bool bfloat16) {
  Float8 p = *reinterpret_cast<const Float8*>(products);
  const Int8 inside = *reinterpret_cast<const Int8*>(inside_lanes);
  if (bfloat16) {
    Bits8 bits = (Bits8)p;  // a vector cast reinterprets the bits
    bits = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) & 0xFFFF0000u;
    p = (Float8)bits;
  }
  return inside ? p : broadcast(-std::numeric_limits<float>::infinity());
}

constexpr Int8 kLaneIota = {0, 1, 2, 3, 4, 5, 6, 7};

// out[r][c] = Σ_k q[r·D + k] · dt[k·stride + c], r < ROWS, c < kCols (c < kCols / 2 with HALF: one accumulator per
// row, for a last tile whose upper half is padding): a register tile of up to 2·ROWS accumulators (FMAs in the
// haswell clone: GCC contracts a·b + c).
template <int ROWS, bool HALF>
ST_FAST_MAXSIM_INLINE void tile_products(const float* q, int64_t dim, const float* dt, int64_t stride,
                                         float (&out)[kRows][kCols]) {
  static_assert(kCols == 16 && ROWS <= kRows, "two Float8 accumulators per row, at most kRows rows");
  Float8 low[ROWS], high[ROWS];
  for (int r = 0; r < ROWS; ++r) low[r] = high[r] = Float8{};
  for (int64_t k = 0; k < dim; ++k) {
    const Float8 b_low = *reinterpret_cast<const Float8*>(dt + k * stride);
    if (HALF) {
      for (int r = 0; r < ROWS; ++r) low[r] += q[r * dim + k] * b_low;  // vector * scalar: one broadcast
      continue;
    }
    const Float8 b_high = *reinterpret_cast<const Float8*>(dt + k * stride + 8);
    for (int r = 0; r < ROWS; ++r) {
      const float qk = q[r * dim + k];
      low[r] += qk * b_low;
      high[r] += qk * b_high;
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    *reinterpret_cast<Float8*>(out[r]) = low[r];
    if (!HALF) *reinterpret_cast<Float8*>(out[r] + 8) = high[r];
  }
}

template <bool HALF>
ST_FAST_MAXSIM_INLINE void tile_products(int rows, const float* q, int64_t dim, const float* dt, int64_t stride,
                                         float (&out)[kRows][kCols]) {
  switch (rows) {
    case 4: tile_products<4, HALF>(q, dim, dt, stride, out); break;
    case 3: tile_products<3, HALF>(q, dim, dt, stride, out); break;
    case 2: tile_products<2, HALF>(q, dim, dt, stride, out); break;
    default: tile_products<1, HALF>(q, dim, dt, stride, out); break;
  }
}

ST_FAST_MAXSIM_INLINE void tile_products(int rows, bool half, const float* q, int64_t dim, const float* dt,
                                         int64_t stride, float (&out)[kRows][kCols]) {
  if (half) {
    tile_products<true>(rows, q, dim, dt, stride, out);
  } else {
    tile_products<false>(rows, q, dim, dt, stride, out);
  }
}

// Document m's unmasked tokens ``tokens[0..count)`` (positions, in order) packed as panels of kCols, each transposed:
// dt[(p / kCols)·D·kCols + k·kCols + p % kCols] = d[m, tokens[p], k] as float32, zero up to padded_tokens(count).
ST_FAST_MAXSIM_INLINE void pack_document(const MaxSimForwardArgs& a, int64_t m, const int32_t* tokens, int64_t count,
                                         float* dt) {
  const MaxSimShape& s = a.shape;
  const int64_t padded = padded_tokens(count);
  for (int64_t p = 0; p < padded; ++p) {
    float* out = dt + (p / kCols) * s.dim * kCols + p % kCols;
    if (p >= count) {
      for (int64_t k = 0; k < s.dim; ++k) out[k * kCols] = 0.0f;
      continue;
    }
    const int64_t base = (m * s.document_tokens + tokens[p]) * s.dim;
    for (int64_t k = 0; k < s.dim; ++k) out[k * kCols] = element(a.documents, base + k, s.dtype);
  }
}

// The positions of document m's unmasked tokens, in order, into ``tokens``; returns their count. ``first_masked``:
// the first masked position (Ld if none).
ST_FAST_MAXSIM_INLINE int64_t unmasked_tokens(const uint8_t* valid, int64_t length, int32_t* tokens,
                                              int64_t& first_masked) {
  int64_t count = 0;
  first_masked = length;
  for (int64_t t = 0; t < length; ++t) {
    if (valid[t]) {
      tokens[count++] = static_cast<int32_t>(t);
    } else if (first_masked == length) {
      first_masked = t;
    }
  }
  return count;
}

// Queries [q0, q1) of the forward against every document (see the file comment). Only a document's unmasked tokens
// are scored (packed in order, so the first arg-max among them is stock's; with_masked_tokens adds the masked
// ones' fill). ``queries``: (q1-q0)·Lq·D floats, ``dt``: D·padded_tokens(Ld) floats of scratch.
ST_FAST_MAXSIM_INLINE void forward_query_block(const MaxSimForwardArgs& a, int64_t q0, int64_t q1, float* queries,
                                               float* dt) {
  const MaxSimShape& s = a.shape;
  const int64_t lq = s.query_tokens, ld = s.document_tokens, dim = s.dim;
  for (int64_t e = 0; e < (q1 - q0) * lq * dim; ++e) queries[e] = element(a.queries, q0 * lq * dim + e, s.dtype);
  alignas(32) float acc[kRows][kCols];
  const bool bfloat16 = s.dtype == MaxSimDtype::kBFloat16;
  std::vector<int32_t> tokens(ld), inside(padded_tokens(ld));  // inside: per packed column, -1 below the count
  for (int64_t m = 0; m < s.documents; ++m) {
    int64_t first_masked = ld;
    const int64_t count = unmasked_tokens(a.document_mask + m * ld, ld, tokens.data(), first_masked);
    pack_document(a, m, tokens.data(), count, dt);
    for (int64_t p = 0; p < padded_tokens(count); ++p) inside[p] = p < count ? -1 : 0;
    for (int64_t i = q0; i < q1; ++i) {
      const float* q = queries + (i - q0) * lq * dim;
      const uint8_t* query_valid = a.query_mask + i * lq;
      float total = 0.0f;
      for (int64_t r0 = 0; r0 < lq; r0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, lq - r0));
        // Running max per (row, lane) and its first packed column (strictly greater replaces: within a lane the
        // columns increase, so a lane keeps its first max); the lanes are reduced once per document below.
        Float8 best_low[kRows], best_high[kRows];
        Int8 at_low[kRows], at_high[kRows];
        for (int r = 0; r < kRows; ++r) {
          best_low[r] = best_high[r] = broadcast(-std::numeric_limits<float>::infinity());
          at_low[r] = at_high[r] = Int8{};
        }
        for (int64_t c0 = 0; c0 < count; c0 += kCols) {
          const bool half = count - c0 <= kCols / 2;  // the last tile's upper lanes are all padding: not computed
          tile_products(rows, half, q + r0 * dim, dim, dt + c0 * dim, kCols, acc);
          const Int8 lanes_low = kLaneIota + static_cast<int32_t>(c0);
          const Int8 lanes_high = kLaneIota + static_cast<int32_t>(c0 + 8);
          for (int r = 0; r < rows; ++r) {
            const Float8 low = scored(acc[r], inside.data() + c0, bfloat16);
            const Int8 up_low = low > best_low[r];  // (a NaN product never wins)
            best_low[r] = up_low ? low : best_low[r];
            at_low[r] = up_low ? lanes_low : at_low[r];
            if (half) continue;
            const Float8 high = scored(acc[r] + 8, inside.data() + c0 + 8, bfloat16);
            const Int8 up_high = high > best_high[r];
            best_high[r] = up_high ? high : best_high[r];
            at_high[r] = up_high ? lanes_high : at_high[r];
          }
        }
        for (int r = 0; r < rows; ++r) {
          // the max over the lanes, and the first column reaching it: the smallest of the lanes' first columns
          float best = best_low[r][0];
          for (int c = 0; c < 8; ++c) best = std::max(best, std::max(best_low[r][c], best_high[r][c]));
          int32_t best_at = std::numeric_limits<int32_t>::max();
          for (int c = 0; c < 8; ++c) {
            if (best_low[r][c] == best) best_at = std::min(best_at, static_cast<int32_t>(at_low[r][c]));
            if (best_high[r][c] == best) best_at = std::min(best_at, static_cast<int32_t>(at_high[r][c]));
          }
          int32_t at = count > 0 ? tokens[best_at] : 0;
          with_masked_tokens(a.fill, first_masked, ld, best, at);
          total += query_term(best, query_valid[r0 + r] != 0);
          if (a.index != nullptr) a.index[(i * lq + r0 + r) * s.documents + m] = at;
        }
      }
      a.sums[i * s.documents + m] = total;
    }
  }
}

ST_FAST_MAXSIM_INLINE float weight(const MaxSimBackwardArgs& a, int64_t i, int64_t m) {
  return in_dtype(a.grad_sums[i * a.shape.documents + m], a.shape.dtype);
}

// out[k] += w · x[offset + k], k < dim, x of ``dtype`` (the dtype test hoisted out of the loop, so it vectorizes).
ST_FAST_MAXSIM_INLINE void add_scaled(float* out, float w, const void* x, int64_t offset, int64_t dim, MaxSimDtype dtype) {
  if (dtype == MaxSimDtype::kBFloat16) {
    const uint16_t* in = static_cast<const uint16_t*>(x) + offset;
    for (int64_t k = 0; k < dim; ++k) out[k] += w * bfloat16_to_float(in[k]);
    return;
  }
  const float* in = static_cast<const float*>(x) + offset;
  for (int64_t k = 0; k < dim; ++k) out[k] += w * in[k];
}

constexpr int64_t kDocumentBlock = 4;  // documents whose rows stay in cache while a block of queries reads them

// dQ rows of queries [i0, i1) (see the file comment), documents taken kDocumentBlock at a time (their rows stay in
// cache for the block's queries); each row still adds its documents in order m = 0, 1, ...
ST_FAST_MAXSIM_INLINE void backward_queries(const MaxSimBackwardArgs& a, int64_t i0, int64_t i1) {
  const MaxSimShape& s = a.shape;
  const int64_t lq = s.query_tokens, ld = s.document_tokens, dim = s.dim;
  std::fill(a.grad_queries + i0 * lq * dim, a.grad_queries + i1 * lq * dim, 0.0f);
  for (int64_t m0 = 0; m0 < s.documents; m0 += kDocumentBlock) {
    const int64_t m1 = std::min(s.documents, m0 + kDocumentBlock);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t r = 0; r < lq; ++r) {
        if (!a.query_mask[i * lq + r]) continue;
        float* out = a.grad_queries + (i * lq + r) * dim;
        const int32_t* at = a.index + (i * lq + r) * s.documents;
        for (int64_t m = m0; m < m1; ++m) {
          const float w = weight(a, i, m);
          if (w == 0.0f || at[m] < 0) continue;  // a masked token's fill won: no gradient
          add_scaled(out, w, a.documents, (m * ld + at[m]) * dim, dim, s.dtype);
        }
      }
    }
  }
}

// dD rows of documents [m0, m1) (see the file comment): each row adds its (i, s) terms in order; the arg-max of
// the block's documents is read as one short run per (i, s).
ST_FAST_MAXSIM_INLINE void backward_documents(const MaxSimBackwardArgs& a, int64_t m0, int64_t m1) {
  const MaxSimShape& s = a.shape;
  const int64_t lq = s.query_tokens, ld = s.document_tokens, dim = s.dim;
  std::fill(a.grad_documents + m0 * ld * dim, a.grad_documents + m1 * ld * dim, 0.0f);
  float w[kDocumentBlock];
  for (int64_t i = 0; i < s.queries; ++i) {
    bool any = false;
    for (int64_t m = m0; m < m1; ++m) any |= (w[m - m0] = weight(a, i, m)) != 0.0f;
    if (!any) continue;
    for (int64_t r = 0; r < lq; ++r) {
      if (!a.query_mask[i * lq + r]) continue;
      const int64_t base = (i * lq + r) * dim;
      const int32_t* at = a.index + (i * lq + r) * s.documents;
      for (int64_t m = m0; m < m1; ++m) {
        if (w[m - m0] == 0.0f || at[m] < 0) continue;
        add_scaled(a.grad_documents + (m * ld + at[m]) * dim, w[m - m0], a.queries, base, dim, s.dtype);
      }
    }
  }
}

}  // namespace maxsim
}  // namespace st_fast
