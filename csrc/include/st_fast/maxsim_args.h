// The argument objects of the native MaxSim (late interaction) kernels: one per call, plain pointers and sizes.
//
// Layouts (row-major, contiguous): queries (B, Lq, D), documents (M, Ld, D) in the embeddings' dtype (float32, or
// bfloat16 as its 16 raw bits), masks (B, Lq) / (M, Ld) as bytes (0: masked), sums (B, M) float32, index (B, Lq, M)
// int32 (the first arg-max document token of each (query, query token, document)), gradients float32.
#pragma once

#include <cstdint>

namespace st_fast {

enum class MaxSimDtype : int32_t { kFloat32 = 0, kBFloat16 = 1 };

struct MaxSimShape {
  int64_t queries = 0;          // B
  int64_t documents = 0;        // M
  int64_t query_tokens = 0;     // Lq
  int64_t document_tokens = 0;  // Ld
  int64_t dim = 0;              // D
  MaxSimDtype dtype = MaxSimDtype::kFloat32;
};

struct MaxSimForwardArgs {
  MaxSimShape shape;
  const void* queries = nullptr;
  const void* documents = nullptr;
  const uint8_t* query_mask = nullptr;
  const uint8_t* document_mask = nullptr;
  float fill = 0.0f;           // the masked tokens' product: finfo(dtype).min, as stock's masked_fill
  float* sums = nullptr;       // (B, M)
  int32_t* index = nullptr;    // (B, Lq, M), or null when no gradient is needed
};

struct MaxSimBackwardArgs {
  MaxSimShape shape;
  const void* queries = nullptr;
  const void* documents = nullptr;
  const uint8_t* query_mask = nullptr;
  const int32_t* index = nullptr;      // (B, Lq, M) from the forward
  const float* grad_sums = nullptr;    // (B, M): dL/dsums
  float* grad_queries = nullptr;       // (B, Lq, D), written
  float* grad_documents = nullptr;     // (M, Ld, D), written
};

}  // namespace st_fast
