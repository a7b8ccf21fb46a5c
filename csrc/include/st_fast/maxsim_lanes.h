// The CUDA MaxSim (late interaction) kernels' algorithm, written once for the device (nvcc, csrc/cuda/maxsim.cu) and
// for its CPU emulation (g++, csrc/testing/emulated_maxsim.cpp, the test-only st_fast._C_test). The semantics are
// maxsim_cpu.h's (its file comment): the same sums, first arg-max and gradients; only the float32 accumulation over
// D of each product differs in form (here: fmaf in index order k = 0 .. D-1, on both the GPU and the emulation).
//
// Forward: one block of kForwardThreads threads per (document m, block of queries_per_block(Lq) queries): the block's
// query-token rows (the queries' (Lq, D) rows are contiguous, so the rows g = i·Lq + s form one matrix) are taken
// kTileRows at a time; for each row tile the document's tokens up to its last unmasked one (scored_width) are taken
// kTileCols at a time, and D kTileK at a time: both operands staged in shared memory as float32 (zero past the ends),
// each thread accumulating a kThreadRows x kThreadCols register tile of products with fmaf in k order. After a
// token chunk, each product is rounded to bfloat16 (bf16 embeddings), replaced by -inf on a masked token, and
// folded into the thread's running max per row (strictly greater replaces: its tokens increase, so it keeps its first
// max; a NaN never wins). The kColGroups threads that share a row then reduce (max, first index) through shared memory
// in thread order (max and smallest index: exact, so any order gives the same bits), the masked tokens' fill is added
// (maxsim_formulas.h's with_masked_tokens: it wins only where no unmasked product is above it, and is written as a
// negative arg-max), and one thread adds the rows' query_term in token order (float32), as maxsim_cpu.h.
//
// Backward (no shared memory, no atomics): dQ: one block per (query token row g, kBackwardThreads columns of D), each
// thread owns one column k and adds w·d[m, t*, k] in the order m = 0, 1, ...; dD: one block per (document m,
// kBackwardThreads columns), each thread owns one column k of the document's Ld token rows and adds w·q[i, s, k] in
// the fixed (i, s) order. w = grad_sums rounded to the embeddings' dtype (maxsim_cpu.h's `weight`); a zero w, a
// masked query token or a negative arg-max (a masked token's fill) adds nothing. Each term is one fmaf.
//
// A block is run by an executor (`Block`): `block.phase(f)` runs f(thread, state) on every thread of the block, then
// waits at a barrier (CUDA: the calling thread with its registers, then __syncthreads(); the emulation: every thread
// in turn, forwards or backwards, with an array of per-thread states: a phase that read what another thread of the
// same phase writes would give different results in the two orders, which tests/ops/test_maxsim_emulated.py checks);
// `block.shared()` is the block's MaxSimForwardShared.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "st_fast/maxsim_args.h"
#include "st_fast/maxsim_formulas.h"
#include "st_fast/portability.h"

#if defined(__CUDACC__)
#define ST_FAST_UNROLL _Pragma("unroll")
#define ST_FAST_UNROLL_8 _Pragma("unroll 8")
#else
#define ST_FAST_UNROLL
#define ST_FAST_UNROLL_8
#endif

namespace st_fast {
namespace maxsim_lanes {

constexpr int kForwardThreads = 128;
constexpr int kTileRows = 32;    // query-token rows per tile
constexpr int kTileCols = 32;    // document tokens per chunk
constexpr int kTileK = 32;       // embedding dims per staged slice
constexpr int kThreadRows = 4;   // register tile of a thread: rows ...
constexpr int kThreadCols = 2;   // ... x document tokens (thread column group c: tokens kThreadCols·c + 0, 1, ...)
constexpr int kRowGroups = kTileRows / kThreadRows;  // 8
constexpr int kColGroups = kTileCols / kThreadCols;  // 16: the threads sharing a row
constexpr int kMaxQueriesPerBlock = kTileRows;
constexpr int kBackwardThreads = 64;
static_assert(kRowGroups * kColGroups == kForwardThreads, "one register tile per thread covers the tile");
static_assert(kForwardThreads % kTileK == 0 && (kTileRows * kTileK) % kForwardThreads == 0, "staging: whole rows");

using maxsim_formulas::float_from_bits;
using maxsim_formulas::round_to_bfloat16;
using maxsim_formulas::query_term;
using maxsim_formulas::with_masked_tokens;

// float32 from the embeddings' element type: float, or bfloat16 as its 16 raw bits.
ST_FAST_HD float load_float(const float* base, int64_t offset) { return base[offset]; }
ST_FAST_HD float load_float(const uint16_t* base, int64_t offset) {
  return maxsim_formulas::bfloat16_to_float(base[offset]);
}

ST_FAST_HD float negative_infinity() { return float_from_bits(0xFF800000u); }

// A value in the embeddings' dtype (In = uint16_t: bfloat16), as float32.
template <class In>
ST_FAST_HD float in_dtype(float value) {
  return sizeof(In) == 2 ? round_to_bfloat16(value) : value;
}

// Queries per forward block: as many whole queries as fill one row tile (at least one; a longer query takes several
// row tiles).
ST_FAST_HD int64_t queries_per_block(int64_t query_tokens) {
  const int64_t n = query_tokens > 0 ? kTileRows / query_tokens : 1;
  return n < 1 ? 1 : n;
}

// f(In{}) with In the embeddings' element type of ``dtype``: float, or uint16_t (bfloat16's raw bits). Host code:
// the CUDA launchers and the CPU emulation pick their instantiation with it.
template <class F>
inline auto with_element_type(MaxSimDtype dtype, F&& f) {
  if (dtype == MaxSimDtype::kBFloat16) return f(uint16_t{});
  return f(float{});
}

ST_FAST_HD int64_t forward_blocks(const MaxSimShape& s) {
  const int64_t per = queries_per_block(s.query_tokens);
  return (s.queries + per - 1) / per * s.documents;
}

// The tokens of document m up to its last unmasked one (at least 1): the products of the masked tokens after it
// are not computed (with_masked_tokens adds their fill).
ST_FAST_HD int64_t scored_width(const uint8_t* valid, int64_t tokens) {
  int64_t width = tokens;
  while (width > 1 && !valid[width - 1]) --width;
  return width;
}

ST_FAST_HD int64_t first_masked_token(const uint8_t* valid, int64_t tokens) {
  int64_t t = 0;
  while (t < tokens && valid[t]) ++t;
  return t;
}

constexpr int kPitchPad = 4;

// A thread's kThreadRows (kThreadCols) consecutive floats of a staged slice row: one vector load on the GPU.
ST_FAST_HD void load_rows(const float* p, float (&out)[kThreadRows]) {
#if defined(__CUDA_ARCH__)
  static_assert(kThreadRows == 4, "one float4");
  const float4 v = *reinterpret_cast<const float4*>(p);
  out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
#else
  for (int r = 0; r < kThreadRows; ++r) out[r] = p[r];
#endif
}
ST_FAST_HD void load_cols(const float* p, float (&out)[kThreadCols]) {
#if defined(__CUDA_ARCH__)
  static_assert(kThreadCols == 2, "one float2");
  const float2 v = *reinterpret_cast<const float2*>(p);
  out[0] = v.x, out[1] = v.y;
#else
  for (int c = 0; c < kThreadCols; ++c) out[c] = p[c];
#endif
}

// What the forward block's threads share (CUDA: __shared__; 13 KB).
struct MaxSimForwardShared {
  // transposed slices, [k][row] / [k][token]: a thread's rows (tokens) are one 16-byte (8-byte) load; the row pitch
  // (+4) keeps that alignment and spreads the staging stores over 8 banks
  alignas(16) float q[kTileK][kTileRows + kPitchPad];
  alignas(16) float d[kTileK][kTileCols + kPitchPad];
  float best[kTileRows][kColGroups];
  int32_t at[kTileRows][kColGroups];
  float row_max[kTileRows];
  float total[kMaxQueriesPerBlock];
  int64_t width;         // scored_width
  int64_t first_masked;  // first_masked_token
};

// A forward thread's registers.
struct MaxSimForwardThread {
  float acc[kThreadRows][kThreadCols];
  float best[kThreadRows];
  int32_t at[kThreadRows];
};

// Forward block `block` (0 .. forward_blocks - 1): document m = block / query_blocks, queries from
// (block % query_blocks)·queries_per_block.
template <class In, class Block>
ST_FAST_HD void forward_block(const MaxSimForwardArgs& a, int64_t block, Block& b) {
  const MaxSimShape& s = a.shape;
  const int64_t per = queries_per_block(s.query_tokens);
  const int64_t query_blocks = (s.queries + per - 1) / per;
  const int64_t m = block / query_blocks;
  const int64_t i0 = (block % query_blocks) * per;
  const int64_t queries = (s.queries - i0 < per ? s.queries - i0 : per);
  const int64_t rows = queries * s.query_tokens, g0 = i0 * s.query_tokens;
  const int64_t ld = s.document_tokens, dim = s.dim;
  const In* q_in = static_cast<const In*>(a.queries);
  const In* d_in = static_cast<const In*>(a.documents);
  const uint8_t* valid = a.document_mask + m * ld;
  MaxSimForwardShared& sh = b.shared();
  b.phase([&](int tid, MaxSimForwardThread&) {
    if (tid < kMaxQueriesPerBlock) sh.total[tid] = 0.0f;
    if (tid == 0) sh.width = scored_width(valid, ld);
    if (tid == 1) sh.first_masked = first_masked_token(valid, ld);
  });
  const int64_t width = sh.width;
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    b.phase([&](int, MaxSimForwardThread& t) {
      ST_FAST_UNROLL
      for (int r = 0; r < kThreadRows; ++r) {
        t.best[r] = negative_infinity();
        t.at[r] = 0;
      }
    });
    for (int64_t c0 = 0; c0 < width; c0 += kTileCols) {
      b.phase([&](int, MaxSimForwardThread& t) {
        ST_FAST_UNROLL
        for (int r = 0; r < kThreadRows; ++r) {
          ST_FAST_UNROLL
          for (int c = 0; c < kThreadCols; ++c) t.acc[r][c] = 0.0f;
        }
      });
      for (int64_t k0 = 0; k0 < dim; k0 += kTileK) {
        // stage: the rows' and the tokens' slices [k0, k0 + kTileK) as float32, zero past the ends
        b.phase([&](int tid, MaxSimForwardThread&) {
          const int kk = tid % kTileK;
          const int64_t k = k0 + kk;
          ST_FAST_UNROLL
          for (int u = 0; u < kTileRows * kTileK / kForwardThreads; ++u) {
            const int row = tid / kTileK + u * (kForwardThreads / kTileK);
            const int64_t g = r0 + row, t = c0 + row;
            sh.q[kk][row] = (g < rows && k < dim) ? load_float(q_in, (g0 + g) * dim + k) : 0.0f;
            sh.d[kk][row] = (t < width && k < dim) ? load_float(d_in, (m * ld + t) * dim + k) : 0.0f;
          }
        });
        // the register tile's products, k in order
        b.phase([&](int tid, MaxSimForwardThread& t) {
          const int rg = tid / kColGroups, cg = tid % kColGroups;
          ST_FAST_UNROLL_8
          for (int kk = 0; kk < kTileK; ++kk) {
            float qv[kThreadRows], dv[kThreadCols];
            load_rows(&sh.q[kk][rg * kThreadRows], qv);
            load_cols(&sh.d[kk][cg * kThreadCols], dv);
            ST_FAST_UNROLL
            for (int r = 0; r < kThreadRows; ++r) {
              ST_FAST_UNROLL
              for (int c = 0; c < kThreadCols; ++c) t.acc[r][c] = fmaf(qv[r], dv[c], t.acc[r][c]);
            }
          }
        });
      }
      // the chunk's products as the masked max sees them, into the running max (no barrier needed: registers only,
      // but a phase keeps the form)
      b.phase([&](int tid, MaxSimForwardThread& t) {
        const int cg = tid % kColGroups;
        ST_FAST_UNROLL
        for (int c = 0; c < kThreadCols; ++c) {
          const int64_t token = c0 + cg * kThreadCols + c;
          if (token >= width) continue;
          const bool keep = valid[token] != 0;
          ST_FAST_UNROLL
          for (int r = 0; r < kThreadRows; ++r) {
            const float p = keep ? in_dtype<In>(t.acc[r][c]) : negative_infinity();  // fill: with_masked_tokens
            if (p > t.best[r]) {  // strictly greater: the first max stays; a NaN never wins
              t.best[r] = p;
              t.at[r] = static_cast<int32_t>(token);
            }
          }
        }
      });
    }
    // the (max, first index) of each row over its kColGroups threads
    b.phase([&](int tid, MaxSimForwardThread& t) {
      const int rg = tid / kColGroups, cg = tid % kColGroups;
      ST_FAST_UNROLL
      for (int r = 0; r < kThreadRows; ++r) {
        sh.best[rg * kThreadRows + r][cg] = t.best[r];
        sh.at[rg * kThreadRows + r][cg] = t.at[r];
      }
    });
    b.phase([&](int tid, MaxSimForwardThread&) {
      if (tid >= kTileRows || r0 + tid >= rows) return;
      float best = sh.best[tid][0];
      for (int c = 1; c < kColGroups; ++c) best = fmaxf(best, sh.best[tid][c]);  // no NaN: never stored
      int32_t at = 0x7FFFFFFF;
      for (int c = 0; c < kColGroups; ++c)
        if (sh.best[tid][c] == best && sh.at[tid][c] < at) at = sh.at[tid][c];
      with_masked_tokens(a.fill, sh.first_masked, ld, best, at);
      sh.row_max[tid] = best;
      if (a.index != nullptr) a.index[(g0 + r0 + tid) * s.documents + m] = at;
    });
    // the sums over the unmasked query tokens, in token order
    b.phase([&](int tid, MaxSimForwardThread&) {
      if (tid != 0) return;
      const int64_t end = rows - r0 < kTileRows ? rows - r0 : kTileRows;
      for (int64_t row = 0; row < end; ++row) {
        sh.total[(r0 + row) / s.query_tokens] += query_term(sh.row_max[row], a.query_mask[g0 + r0 + row] != 0);
      }
    });
  }
  b.phase([&](int tid, MaxSimForwardThread&) {
    if (tid < queries) a.sums[(i0 + tid) * s.documents + m] = sh.total[tid];
  });
}

template <class In>
ST_FAST_HD float weight(const MaxSimBackwardArgs& a, int64_t i, int64_t m) {
  return in_dtype<In>(a.grad_sums[i * a.shape.documents + m]);
}

ST_FAST_HD int64_t column_blocks(const MaxSimShape& s) { return (s.dim + kBackwardThreads - 1) / kBackwardThreads; }
ST_FAST_HD int64_t query_gradient_blocks(const MaxSimShape& s) {
  return s.queries * s.query_tokens * column_blocks(s);
}
ST_FAST_HD int64_t document_gradient_blocks(const MaxSimShape& s) { return s.documents * column_blocks(s); }

// dQ, block `block` (0 .. query_gradient_blocks - 1), thread `tid`: row g = block / column_blocks, column
// k = (block % column_blocks)·kBackwardThreads + tid.
template <class In>
ST_FAST_HD void query_gradient_thread(const MaxSimBackwardArgs& a, int64_t block, int tid) {
  const MaxSimShape& s = a.shape;
  const int64_t columns = column_blocks(s);
  const int64_t g = block / columns, k = (block % columns) * kBackwardThreads + tid;
  if (k >= s.dim) return;
  const int64_t i = g / s.query_tokens;
  float out = 0.0f;
  if (a.query_mask[g]) {
    const In* d_in = static_cast<const In*>(a.documents);
    const int32_t* at = a.index + g * s.documents;
    for (int64_t m = 0; m < s.documents; ++m) {
      const float w = weight<In>(a, i, m);
      if (w == 0.0f || at[m] < 0) continue;  // a masked token's fill won: no gradient
      out = fmaf(w, load_float(d_in, (m * s.document_tokens + at[m]) * s.dim + k), out);
    }
  }
  a.grad_queries[g * s.dim + k] = out;
}

// dD, block `block` (0 .. document_gradient_blocks - 1), thread `tid`: document m = block / column_blocks, column
// k = (block % column_blocks)·kBackwardThreads + tid of every token row of m.
template <class In>
ST_FAST_HD void document_gradient_thread(const MaxSimBackwardArgs& a, int64_t block, int tid) {
  const MaxSimShape& s = a.shape;
  const int64_t columns = column_blocks(s);
  const int64_t m = block / columns, k = (block % columns) * kBackwardThreads + tid;
  if (k >= s.dim) return;
  float* out = a.grad_documents + m * s.document_tokens * s.dim + k;
  for (int64_t t = 0; t < s.document_tokens; ++t) out[t * s.dim] = 0.0f;
  const In* q_in = static_cast<const In*>(a.queries);
  for (int64_t i = 0; i < s.queries; ++i) {
    const float w = weight<In>(a, i, m);
    if (w == 0.0f) continue;
    for (int64_t r = 0; r < s.query_tokens; ++r) {
      const int64_t g = i * s.query_tokens + r;
      const int32_t at = a.index[g * s.documents + m];
      if (!a.query_mask[g] || at < 0) continue;
      float* row = out + static_cast<int64_t>(at) * s.dim;
      *row = fmaf(w, load_float(q_in, g * s.dim + k), *row);
    }
  }
}

}  // namespace maxsim_lanes
}  // namespace st_fast
