// CPU build of the contrastive row kernel (csrc/include/st_fast/contrastive_row.h): OpenMP over rows.
#include <pybind11/stl.h>

#include "st_fast/bindings.h"
#include "st_fast/contrastive_row_host.h"

namespace py = pybind11;

namespace st_fast {

namespace {
template <class Out>
void run_rows(const ContrastiveRowArgs& a) {
  const SerialLanes lanes;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) contrastive_row<Out>(a, r, lanes);
}

void contrastive_rows_cpu(const std::vector<uintptr_t>& scores, const std::vector<uintptr_t>& row_scales,
                          const std::vector<uintptr_t>& col_scales, const std::vector<uintptr_t>& coefficients,
                          int coefficient_dtype, const std::vector<int64_t>& lengths, const std::vector<int>& kinds,
                          int64_t rows, int64_t row_start, int64_t width, float scale, float alpha, int hardness,
                          bool joint, float grad_scale, uintptr_t row_loss) {
  const ContrastiveRowArgs a =
      make_contrastive_row_args({scores, row_scales, col_scales, coefficients}, coefficient_dtype, lengths, kinds,
                                rows, row_start, width, scale, alpha, hardness, joint, grad_scale, row_loss);
  dispatch_store_dtype(a.coefficient_dtype, [&](auto out) { run_rows<decltype(out)>(a); });
}
}  // namespace

void bind_contrastive_row(py::module_& m) {
  m.def("contrastive_rows", &contrastive_rows_cpu, py::arg("scores_ptrs"), py::arg("row_scale_ptrs"),
        py::arg("col_scale_ptrs"), py::arg("coefficient_ptrs"), py::arg("coefficient_dtype"), py::arg("lengths"),
        py::arg("kinds"), py::arg("rows"), py::arg("row_start"), py::arg("width"), py::arg("scale"), py::arg("alpha"),
        py::arg("hardness"), py::arg("joint"), py::arg("grad_scale"), py::arg("row_loss_ptr"),
        "The contrastive row kernel over fp32 score segments (raw pointers; call through "
        "st_fast._native.native_row_kernel, which validates).",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace st_fast
