// CPU build of the contrastive row kernel (csrc/include/st_fast/row_kernel_*.h): OpenMP over rows, the range loops
// (SerialLanes), and the fixed-shift form of the symmetric passes. The test-only emulation of the CUDA build's lane
// algorithm is another extension, st_fast._C_test (csrc/testing/emulated_lanes.cpp), never shipped.
#include <algorithm>

#include "st_fast/bindings.h"
#include "st_fast/row_kernel_bindings.h"
#include "st_fast/row_kernel_cpu.h"
#include "st_fast/row_kernel_fixed_shift.h"

namespace py = pybind11;

namespace st_fast {

namespace {
// The shipped CPU build: OpenMP over rows, one worker per row (SerialLanes: the vectorized range loops), the column
// statistics by tiles of kColumnTile columns.
struct SerialRows {
  template <class F>
  static void rows(int64_t n, F&& f) {
    const SerialLanes lanes;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; ++r) f(r, lanes);
  }
  static void column_statistics(const StatisticsArgs& a) {
    // one OpenMP task per tile of kColumnTile columns of the positive block: rows are read 64 floats at a time
    const int64_t blocks = (a.block.count + kColumnTile - 1) / kColumnTile;
    const bool col_scaled = a.scales.columns[0] != nullptr;
    const bool labelled = a.block.query_labels != nullptr;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kColumnTile, end = std::min(a.block.count, begin + kColumnTile);
      dispatch_range_flags(col_scaled, labelled, [&](auto col_scale, auto labels) {
        contrastive_column_statistics_tile<decltype(col_scale)::value, decltype(labels)::value>(a, begin, end);
      });
    }
  }
};

// The fixed-shift form of the two passes (row_kernel_fixed_shift.h): e over the scores and the row LSEs, then the
// positive block's column sums of e; and the coefficients from e.
void contrastive_exp_statistics_cpu(const ExpStatisticsCall& call) {
  const ExpStatisticsArgs a = to_args(call);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < a.seg.rows; ++r) contrastive_row_exp_statistics(a, r);
  const int64_t blocks = (a.block.count + kColumnTile - 1) / kColumnTile;
  const bool labelled = a.block.query_labels != nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kColumnTile, end = std::min(a.block.count, (b + 1) * kColumnTile);
    if (labelled)
      contrastive_column_exp_sums_tile<true>(a, begin, end);
    else
      contrastive_column_exp_sums_tile(a, begin, end);
  }
}

template <class Out>
void run_exp_coefficient_rows(const ExpCoefficientsArgs& a) {
  const bool labelled = a.seg.labels[0] != nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < a.seg.rows; ++r) {
    if (labelled)
      contrastive_row_exp_coefficients<Out, true>(a, r);
    else
      contrastive_row_exp_coefficients<Out>(a, r);
  }
}

void contrastive_exp_coefficients_cpu(const ExpCoefficientsCall& call) {
  const ExpCoefficientsArgs a = to_args(call);
  dispatch_store_dtype(a.out.dtype, [&](auto out) { run_exp_coefficient_rows<decltype(out)>(a); });
}

// row_expf over n floats (the kernels' exp, in a loop as they use it: vectorized), for the accuracy tests.
void row_expf_cpu(uintptr_t input, uintptr_t output, int64_t n) {
  const float* in = reinterpret_cast<const float*>(input);
  float* out = reinterpret_cast<float*>(output);
  for (int64_t i = 0; i < n; ++i) out[i] = row_expf(in[i]);
}
}  // namespace

void bind_contrastive_row(py::module_& m) {
  bind_row_kernel_calls(m);
  bind_row_kernel_entries<SerialRows>(m);
  m.def("contrastive_exp_statistics", &contrastive_exp_statistics_cpu, py::arg("call"),
        "The symmetric path's fixed-shift statistics pass, e = exp(logit - shift) written over the scores (an "
        "ExpStatisticsCall; call through st_fast._native_rows.native_row_exp_statistics).",
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_exp_coefficients", &contrastive_exp_coefficients_cpu, py::arg("call"),
        "The symmetric path's fixed-shift coefficient pass from e (an ExpCoefficientsCall; call through "
        "st_fast._native_rows.native_row_exp_coefficients).",
        py::call_guard<py::gil_scoped_release>());
  m.def("row_expf", &row_expf_cpu, py::arg("input_ptr"), py::arg("output_ptr"), py::arg("n"),
        "The row kernels' CPU exp over n contiguous fp32 values (raw pointers; call through st_fast._native.row_expf).",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace st_fast
