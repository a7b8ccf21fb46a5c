// The coefficient stores of the row kernels (csrc/include/st_fast/half_store.h), element by element: a test hook, so
// that tests check their rounding against torch's.
#include <cstdint>

#include "st_fast/bindings.h"
#include "st_fast/half_store.h"

namespace py = pybind11;

namespace st_fast {

namespace {
void store_f32_as(uintptr_t src_ptr, uintptr_t dst_ptr, int64_t n, int dtype) {
  const float* src = reinterpret_cast<const float*>(src_ptr);
  void* dst = reinterpret_cast<void*>(dst_ptr);
  dispatch_store_dtype(dtype, [&](auto out) {
    for (int64_t i = 0; i < n; ++i) decltype(out)::put(dst, i, src[i]);
  });
}
}  // namespace

void bind_half_store(py::module_& m) {
  m.def("store_f32_as", &store_f32_as, py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("n"), py::arg("dtype"),
        "dst[i] = src[i] stored as dtype 0 (fp32), 1 (bf16) or 2 (fp16, saturating) exactly as the row kernels "
        "store coefficients (raw pointers).",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace st_fast
