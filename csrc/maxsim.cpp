// CPU build of the MaxSim kernels (csrc/include/st_fast/maxsim_cpu.h): OpenMP over query blocks (forward), over
// queries and documents (backward). The forward's block function is compiled twice on x86-64 (GCC / Clang: the
// baseline and an AVX2 + FMA version), picked once at the first call by the CPU's features.
//
// Not bound to Python yet: the entry points go into st_fast's extension with the shared binding of the native
// restructuring (issue 27). With -DST_FAST_MAXSIM_C_API they are also exported as C functions, for a standalone
// build (tests/ops/test_maxsim_native.py).
#include <vector>

#include "st_fast/maxsim_args.h"
#include "st_fast/maxsim_cpu.h"

namespace st_fast {

namespace {

void forward_block(const MaxSimForwardArgs& a, int64_t q0, int64_t q1, float* queries, float* dt) {
  maxsim::forward_query_block(a, q0, q1, queries, dt);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ST_FAST_MAXSIM_X86_CLONE 1
// The same block compiled for AVX2 + FMA (the always-inline helpers are compiled into it), picked at run time.
__attribute__((target("avx2,fma"))) void forward_block_avx2(const MaxSimForwardArgs& a, int64_t q0, int64_t q1,
                                                             float* queries, float* dt) {
  maxsim::forward_query_block(a, q0, q1, queries, dt);
}
#endif

using ForwardBlock = void (*)(const MaxSimForwardArgs&, int64_t, int64_t, float*, float*);

ForwardBlock pick_forward_block() {
#ifdef ST_FAST_MAXSIM_X86_CLONE
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return forward_block_avx2;
#endif
  return forward_block;
}

}  // namespace

void maxsim_forward_cpu(const MaxSimForwardArgs& a) {
  const MaxSimShape& s = a.shape;
  if (s.queries == 0 || s.documents == 0) return;
  if (s.query_tokens == 0 || s.document_tokens == 0) {  // nothing to take a max over: zero sums, index 0
    for (int64_t e = 0; e < s.queries * s.documents; ++e) a.sums[e] = 0.0f;
    if (a.index != nullptr)
      for (int64_t e = 0; e < s.queries * s.query_tokens * s.documents; ++e) a.index[e] = 0;
    return;
  }
  const int64_t blocks = (s.queries + maxsim::kQueryBlock - 1) / maxsim::kQueryBlock;
  static const ForwardBlock block_function = pick_forward_block();
#pragma omp parallel
  {
    std::vector<float> queries(maxsim::kQueryBlock * s.query_tokens * s.dim);
    std::vector<float> dt(s.dim * maxsim::padded_tokens(s.document_tokens));
#pragma omp for schedule(dynamic)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t q0 = b * maxsim::kQueryBlock;
      block_function(a, q0, std::min(s.queries, q0 + maxsim::kQueryBlock), queries.data(), dt.data());
    }
  }
}

void maxsim_backward_cpu(const MaxSimBackwardArgs& a) {
  const MaxSimShape& s = a.shape;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < s.queries; ++i) maxsim::backward_query(a, i);
#pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < s.documents; ++m) maxsim::backward_document(a, m);
}

}  // namespace st_fast

#ifdef ST_FAST_MAXSIM_C_API
extern "C" {
void st_fast_maxsim_forward_cpu(const st_fast::MaxSimForwardArgs* a) { st_fast::maxsim_forward_cpu(*a); }
void st_fast_maxsim_backward_cpu(const st_fast::MaxSimBackwardArgs* a) { st_fast::maxsim_backward_cpu(*a); }
}
#endif
