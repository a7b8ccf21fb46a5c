// CPU build of the MaxSim kernels (csrc/include/st_fast/maxsim_cpu.h): OpenMP over query blocks (forward), over
// queries and documents (backward). The block functions are compiled twice on x86-64 (GCC / Clang: the baseline and
// an AVX2 + FMA version), picked once at the first call by the CPU's features.
//
// Bound into st_fast._C by bind_maxsim (the argument objects of maxsim_calls.h; st_fast/_native_maxsim.py calls them).
#include <algorithm>
#include <vector>

#include "st_fast/maxsim_args.h"
#include "st_fast/maxsim_bindings.h"
#include "st_fast/maxsim_calls.h"
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

void backward_query_block(const MaxSimBackwardArgs& a, int64_t i0, int64_t i1) {
  maxsim::backward_queries(a, i0, i1);
}
void backward_document_block(const MaxSimBackwardArgs& a, int64_t m0, int64_t m1) {
  maxsim::backward_documents(a, m0, m1);
}

#ifdef ST_FAST_MAXSIM_X86_CLONE
__attribute__((target("avx2,fma"))) void backward_query_block_avx2(const MaxSimBackwardArgs& a, int64_t i0,
                                                                    int64_t i1) {
  maxsim::backward_queries(a, i0, i1);
}
__attribute__((target("avx2,fma"))) void backward_document_block_avx2(const MaxSimBackwardArgs& a, int64_t m0,
                                                                       int64_t m1) {
  maxsim::backward_documents(a, m0, m1);
}
#endif

using ForwardBlock = void (*)(const MaxSimForwardArgs&, int64_t, int64_t, float*, float*);
using BackwardBlock = void (*)(const MaxSimBackwardArgs&, int64_t, int64_t);

#ifdef ST_FAST_MAXSIM_X86_CLONE
bool has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#define ST_FAST_MAXSIM_PICK(name) (has_avx2_fma() ? name##_avx2 : name)
#else
#define ST_FAST_MAXSIM_PICK(name) (name)
#endif

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
  static const ForwardBlock block_function = ST_FAST_MAXSIM_PICK(forward_block);
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
  static const BackwardBlock query_block = ST_FAST_MAXSIM_PICK(backward_query_block);
  static const BackwardBlock document_block = ST_FAST_MAXSIM_PICK(backward_document_block);
  const int64_t query_blocks = (s.queries + maxsim::kQueryBlock - 1) / maxsim::kQueryBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < query_blocks; ++b) {
    const int64_t i0 = b * maxsim::kQueryBlock;
    query_block(a, i0, std::min(s.queries, i0 + maxsim::kQueryBlock));
  }
  const int64_t document_blocks = (s.documents + maxsim::kDocumentBlock - 1) / maxsim::kDocumentBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < document_blocks; ++b) {
    const int64_t m0 = b * maxsim::kDocumentBlock;
    document_block(a, m0, std::min(s.documents, m0 + maxsim::kDocumentBlock));
  }
}

void bind_maxsim(pybind11::module_& m) {
  bind_maxsim_calls(m);
  m.def(
      "maxsim_forward", [](const MaxSimForwardCall& call) { maxsim_forward_cpu(to_args(call)); }, pybind11::arg("call"),
      "MaxSim sums and first arg-max (a MaxSimForwardCall; call through st_fast._native_maxsim.maxsim_forward).",
      pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def(
      "maxsim_backward", [](const MaxSimBackwardCall& call) { maxsim_backward_cpu(to_args(call)); },
      pybind11::arg("call"),
      "MaxSim query and document gradients through the arg-max (a MaxSimBackwardCall; call through "
      "st_fast._native_maxsim.maxsim_backward).",
      pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace st_fast
