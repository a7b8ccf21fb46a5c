// CPU build of the row kernels (one row per iteration, OpenMP over rows).
#include <cstdint>

#include "st_fast/bindings.h"
#include "st_fast/half_store.h"
#include "st_fast/row_logsumexp.h"

namespace py = pybind11;

namespace st_fast {

namespace {
void row_logsumexp_f32(uintptr_t scores_ptr, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t out_ptr) {
  const float* scores = reinterpret_cast<const float*>(scores_ptr);
  float* out = reinterpret_cast<float*>(out_ptr);
  const SerialLanes lanes;
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) out[r] = row_logsumexp(scores + r * row_stride, cols, lanes);
}

// The stores of the row kernels' coefficients, element by element (exposed so that tests check their rounding).
void store_f32_as(uintptr_t src_ptr, uintptr_t dst_ptr, int64_t n, int dtype) {
  const float* src = reinterpret_cast<const float*>(src_ptr);
  void* dst = reinterpret_cast<void*>(dst_ptr);
  dispatch_store_dtype(dtype, [&](auto out) {
    for (int64_t i = 0; i < n; ++i) decltype(out)::put(dst, i, src[i]);
  });
}
}  // namespace

void bind_row_ops(py::module_& m) {
  m.def("row_logsumexp_f32", &row_logsumexp_f32, py::arg("scores_ptr"), py::arg("rows"), py::arg("cols"),
        py::arg("row_stride"), py::arg("out_ptr"),
        "out[r] = logsumexp(scores[r, :cols]) for fp32 rows at scores_ptr + r * row_stride (raw pointers; "
        "call through st_fast._native, which validates).",
        py::call_guard<py::gil_scoped_release>());
  m.def("store_f32_as", &store_f32_as, py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("n"), py::arg("dtype"),
        "dst[i] = src[i] stored as dtype 0 (fp32), 1 (bf16) or 2 (fp16, saturating) exactly as the row kernels "
        "store coefficients (raw pointers).",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace st_fast
