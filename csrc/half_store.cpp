// The coefficient stores of the row kernels (csrc/include/st_fast/half_store.h), element by element: a test hook, so
// that tests check their rounding against torch's (st_fast._native.store_coefficients wraps it).
#include <cstdint>
#include <stdexcept>

#include "st_fast/bindings.h"
#include "st_fast/half_store.h"

namespace py = pybind11;

namespace st_fast {

namespace {
void store_f32_as(uintptr_t src_ptr, uintptr_t dst_ptr, int64_t n, int dtype) {
  if (dtype < kStoreFp32 || dtype > kStoreFp16)
    throw std::invalid_argument("store_f32_as: dtype must be a StoreDtype code (see boundary_codes)");
  const float* src = reinterpret_cast<const float*>(src_ptr);
  void* dst = reinterpret_cast<void*>(dst_ptr);
  dispatch_store_dtype(dtype, [&](auto out) {
    for (int64_t i = 0; i < n; ++i) decltype(out)::put(dst, i, src[i]);
  });
}
}  // namespace

void bind_half_store(py::module_& m) {
  m.def("store_f32_as", &store_f32_as, py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("n"), py::arg("dtype"),
        "dst[i] = src[i] stored as StoreDtype `dtype` (fp16 saturating) exactly as the row kernels store "
        "coefficients (raw pointers; call through st_fast._native.store_coefficients, which validates).",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace st_fast
