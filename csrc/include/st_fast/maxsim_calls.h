// The MaxSim kernels' native boundary: one argument object per entry point (plain host values: raw addresses as
// integers, the dtype as an int), with named fields, bound by maxsim_bindings.h and built by name in Python
// (st_fast/_native_maxsim.py, which checks shapes, dtypes, devices and contiguity first). Each *Call converts to its
// kernel struct (maxsim_args.h), checking sizes and codes before any pointer is read. A 0 ``index`` address: no
// arg-max (no gradient needed).
#pragma once

#include <cstdint>
#include <stdexcept>

#include "st_fast/maxsim_args.h"

namespace st_fast {

struct MaxSimShapeCall {
  int64_t queries = 0;
  int64_t documents = 0;
  int64_t query_tokens = 0;
  int64_t document_tokens = 0;
  int64_t dim = 0;
  int dtype = 0;  // MaxSimDtype code: 0 float32, 1 bfloat16
};

struct MaxSimForwardCall : MaxSimShapeCall {
  uintptr_t queries_ptr = 0;        // (B, Lq, D) dtype
  uintptr_t documents_ptr = 0;      // (M, Ld, D) dtype
  uintptr_t query_mask_ptr = 0;     // (B, Lq) uint8
  uintptr_t document_mask_ptr = 0;  // (M, Ld) uint8
  float fill = 0.0f;                // finfo(dtype).min
  uintptr_t sums_ptr = 0;           // (B, M) float32, written
  uintptr_t index_ptr = 0;          // (B, Lq, M) int32, written; 0: none
};

struct MaxSimBackwardCall : MaxSimShapeCall {
  uintptr_t queries_ptr = 0;
  uintptr_t documents_ptr = 0;
  uintptr_t query_mask_ptr = 0;
  uintptr_t index_ptr = 0;           // (B, Lq, M) int32 from the forward
  uintptr_t grad_sums_ptr = 0;       // (B, M) float32
  uintptr_t grad_queries_ptr = 0;    // (B, Lq, D) float32, written
  uintptr_t grad_documents_ptr = 0;  // (M, Ld, D) float32, written
};

inline MaxSimShape to_shape(const MaxSimShapeCall& c) {
  if (c.queries < 0 || c.documents < 0 || c.query_tokens < 0 || c.document_tokens < 0 || c.dim < 1)
    throw std::invalid_argument("MaxSim: negative sizes or dim < 1");
  if (c.dtype != static_cast<int>(MaxSimDtype::kFloat32) && c.dtype != static_cast<int>(MaxSimDtype::kBFloat16))
    throw std::invalid_argument("MaxSim: dtype code must be 0 (float32) or 1 (bfloat16)");
  MaxSimShape s;
  s.queries = c.queries;
  s.documents = c.documents;
  s.query_tokens = c.query_tokens;
  s.document_tokens = c.document_tokens;
  s.dim = c.dim;
  s.dtype = static_cast<MaxSimDtype>(c.dtype);
  return s;
}

inline void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

inline MaxSimForwardArgs to_args(const MaxSimForwardCall& c) {
  MaxSimForwardArgs a;
  a.shape = to_shape(c);
  const bool any = a.shape.queries * a.shape.documents > 0;
  require(!any || (c.queries_ptr && c.documents_ptr && c.query_mask_ptr && c.document_mask_ptr && c.sums_ptr),
          "MaxSimForwardCall: a required address is 0");
  a.queries = reinterpret_cast<const void*>(c.queries_ptr);
  a.documents = reinterpret_cast<const void*>(c.documents_ptr);
  a.query_mask = reinterpret_cast<const uint8_t*>(c.query_mask_ptr);
  a.document_mask = reinterpret_cast<const uint8_t*>(c.document_mask_ptr);
  a.fill = c.fill;
  a.sums = reinterpret_cast<float*>(c.sums_ptr);
  a.index = reinterpret_cast<int32_t*>(c.index_ptr);
  return a;
}

inline MaxSimBackwardArgs to_args(const MaxSimBackwardCall& c) {
  MaxSimBackwardArgs a;
  a.shape = to_shape(c);
  require(c.queries_ptr && c.documents_ptr && c.query_mask_ptr && c.index_ptr && c.grad_sums_ptr &&
              c.grad_queries_ptr && c.grad_documents_ptr,
          "MaxSimBackwardCall: a required address is 0");
  a.queries = reinterpret_cast<const void*>(c.queries_ptr);
  a.documents = reinterpret_cast<const void*>(c.documents_ptr);
  a.query_mask = reinterpret_cast<const uint8_t*>(c.query_mask_ptr);
  a.index = reinterpret_cast<const int32_t*>(c.index_ptr);
  a.grad_sums = reinterpret_cast<const float*>(c.grad_sums_ptr);
  a.grad_queries = reinterpret_cast<float*>(c.grad_queries_ptr);
  a.grad_documents = reinterpret_cast<float*>(c.grad_documents_ptr);
  return a;
}

}  // namespace st_fast
