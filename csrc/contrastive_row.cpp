// CPU build of the contrastive row kernel (csrc/include/st_fast/contrastive_row.h): OpenMP over rows.
// Test only: the same entry points with the CUDA build's lane algorithm emulated by threads (thread_lanes.h), in the
// submodules emulated_lanes_<N> of st_fast._C (tests/test_emulated_lanes.py).
#include <pybind11/stl.h>

#include <algorithm>

#include "st_fast/bindings.h"
#include "st_fast/contrastive_row_host.h"
#include "st_fast/thread_lanes.h"

namespace py = pybind11;

namespace st_fast {

namespace {
// How an entry point runs the rows of a call: rows(n, f) calls f(r, lanes) for every row r; column_statistics(a)
// continues the positive block's column statistics over the chunk's rows.
// The shipped CPU build: OpenMP over rows, one worker per row (SerialLanes: the vectorized range loops), the column
// statistics by tiles of kColumnTile columns.
struct SerialRows {
  template <class F>
  static void rows(int64_t n, F&& f) {
    const SerialLanes lanes;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < n; ++r) f(r, lanes);
  }
  static void column_statistics(const ContrastiveRowArgs& a) {
    // one OpenMP task per tile of kColumnTile columns of the positive block: rows are read 64 floats at a time
    const int64_t blocks = (a.block_count + kColumnTile - 1) / kColumnTile;
    const bool col_scaled = a.col_scale[0] != nullptr;
    const bool labelled = a.query_labels != nullptr;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kColumnTile, end = std::min(a.block_count, begin + kColumnTile);
      dispatch_range_flags(col_scaled, labelled, [&](auto col_scale, auto labels) {
        contrastive_column_statistics_tile<decltype(col_scale)::value, decltype(labels)::value>(a, begin, end);
      });
    }
  }
};

// Test only: the CUDA build's algorithm (csrc/cuda/contrastive_row.cu) on the CPU, `kLanes` threads per row
// (ThreadLanes, the online loops and butterfly reductions of WarpLanes), one column per worker of the column
// statistics (contrastive_column_statistics, as the CUDA kernel's threads).
template <int kLanes>
struct EmulatedLaneRows {
  template <class F>
  static void rows(int64_t n, F&& f) {
    run_thread_lanes(kLanes, n, f);
  }
  static void column_statistics(const ContrastiveRowArgs& a) {
    for (int64_t j = 0; j < a.block_count; ++j) contrastive_column_statistics(a, j, j + 1);
  }
};

template <class Exec>
void contrastive_rows_cpu(const std::vector<uintptr_t>& scores, const std::vector<uintptr_t>& row_scales,
                          const std::vector<uintptr_t>& col_scales, const std::vector<uintptr_t>& coefficients,
                          int coefficient_dtype, const std::vector<int64_t>& lengths, const std::vector<int>& kinds,
                          int64_t rows, int64_t row_start, int64_t width, float scale, float alpha, int hardness,
                          bool joint, float grad_scale, uintptr_t row_loss, uintptr_t grad_scale_factor,
                          const std::vector<uintptr_t>& labels) {
  ContrastiveRowArgs a =
      make_contrastive_row_args({scores, row_scales, col_scales, coefficients}, coefficient_dtype, lengths, kinds,
                                rows, row_start, width, scale, alpha, hardness, joint, grad_scale, row_loss,
                                grad_scale_factor);
  set_label_args(a, labels, 0, false);
  dispatch_store_dtype(a.coefficient_dtype, [&](auto out) {
    using Out = decltype(out);
    Exec::rows(a.rows, [&](int64_t r, const auto& lanes) { contrastive_row<Out>(a, r, lanes); });
  });
}

// The statistics pass's outputs (row LSEs, positive logits, the positive block's running column max / sum) and the
// labels, shared by its general and fixed-shift forms.
void set_statistics_args(ContrastiveRowArgs& a, uintptr_t row_lse, uintptr_t row_positive, int64_t block_begin,
                         int64_t block_count, uintptr_t col_max, uintptr_t col_sum,
                         const std::vector<uintptr_t>& labels, uintptr_t query_labels) {
  SymmetricPointers p;
  p.row_lse = row_lse;
  p.row_positive = row_positive;
  p.col_max = col_max;
  p.col_sum = col_sum;
  set_symmetric_args(a, p, block_begin, block_count, 1);
  set_label_args(a, labels, query_labels, true);
}

template <class Exec>
void contrastive_statistics_cpu(const std::vector<uintptr_t>& scores, const std::vector<uintptr_t>& row_scales,
                                const std::vector<uintptr_t>& col_scales, const std::vector<int64_t>& lengths,
                                const std::vector<int>& kinds, int64_t rows, int64_t row_start, int64_t width,
                                float scale, float alpha, int hardness, uintptr_t row_lse, uintptr_t row_positive,
                                int64_t block_begin, int64_t block_count, uintptr_t col_max, uintptr_t col_sum,
                                const std::vector<uintptr_t>& labels, uintptr_t query_labels) {
  ContrastiveRowArgs a = make_contrastive_row_args(
      {scores, row_scales, col_scales, std::vector<uintptr_t>(scores.size(), 0)}, kStoreFp32, lengths, kinds, rows,
      row_start, width, scale, alpha, hardness, true, -1.0f, 0);
  set_statistics_args(a, row_lse, row_positive, block_begin, block_count, col_max, col_sum, labels, query_labels);
  Exec::rows(a.rows, [&](int64_t r, const auto& lanes) { contrastive_row_statistics(a, r, lanes); });
  Exec::column_statistics(a);
}

template <class Exec>
void contrastive_coefficients_cpu(const std::vector<uintptr_t>& scores, const std::vector<uintptr_t>& row_scales,
                                  const std::vector<uintptr_t>& col_scales, const std::vector<uintptr_t>& coefficients,
                                  int coefficient_dtype, const std::vector<int64_t>& lengths,
                                  const std::vector<int>& kinds, int64_t rows, int64_t row_start, int64_t width,
                                  float scale, float alpha, int hardness, bool joint, float grad_scale,
                                  uintptr_t row_ref, int64_t block_begin, int64_t block_count, uintptr_t col_ref,
                                  int directions, uintptr_t row_factor, uintptr_t col_factor,
                                  uintptr_t grad_scale_factor, const std::vector<uintptr_t>& labels,
                                  uintptr_t query_labels) {
  ContrastiveRowArgs a =
      make_contrastive_row_args({scores, row_scales, col_scales, coefficients}, coefficient_dtype, lengths, kinds,
                                rows, row_start, width, scale, alpha, hardness, joint, grad_scale, 0,
                                grad_scale_factor);
  SymmetricPointers p;
  p.row_ref = row_ref;
  p.col_ref = col_ref;
  p.row_factor = row_factor;
  p.col_factor = col_factor;
  set_symmetric_args(a, p, block_begin, block_count, directions);
  set_label_args(a, labels, query_labels, true);
  dispatch_store_dtype(a.coefficient_dtype, [&](auto out) {
    using Out = decltype(out);
    Exec::rows(a.rows, [&](int64_t r, const auto& lanes) { contrastive_row_coefficients<Out>(a, r, lanes); });
  });
}

// The fixed-shift form of the two passes (contrastive_row.h): e over the scores and the row LSEs, then the
// positive block's column sums of e; and the coefficients from e.
void contrastive_exp_statistics_cpu(const std::vector<uintptr_t>& scores, const std::vector<int64_t>& lengths,
                                    const std::vector<int>& kinds, int64_t rows, int64_t row_start, int64_t width,
                                    float scale, float shift, uintptr_t row_lse, uintptr_t row_positive,
                                    int64_t block_begin, int64_t block_count, uintptr_t col_max, uintptr_t col_sum,
                                    const std::vector<uintptr_t>& labels, uintptr_t query_labels) {
  const std::vector<uintptr_t> none(scores.size(), 0);
  ContrastiveRowArgs a = make_contrastive_row_args({scores, none, none, none}, kStoreFp32, lengths, kinds, rows,
                                                   row_start, width, scale, 0.0f, kHardnessNone, true, -1.0f, 0);
  set_statistics_args(a, row_lse, row_positive, block_begin, block_count, col_max, col_sum, labels, query_labels);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) contrastive_row_exp_statistics(a, r, shift);
  const int64_t blocks = (block_count + kColumnTile - 1) / kColumnTile;
  const bool labelled = a.query_labels != nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kColumnTile, end = std::min(block_count, (b + 1) * kColumnTile);
    if (labelled)
      contrastive_column_exp_sums_tile<true>(a, begin, end, shift);
    else
      contrastive_column_exp_sums_tile(a, begin, end, shift);
  }
}

template <class Out>
void run_exp_coefficient_rows(const ContrastiveRowArgs& a) {
  const bool labelled = a.labels[0] != nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) {
    if (labelled)
      contrastive_row_exp_coefficients<Out, true>(a, r);
    else
      contrastive_row_exp_coefficients<Out>(a, r);
  }
}

void contrastive_exp_coefficients_cpu(const std::vector<uintptr_t>& exps, const std::vector<uintptr_t>& coefficients,
                                      int coefficient_dtype, const std::vector<int64_t>& lengths,
                                      const std::vector<int>& kinds, int64_t rows, int64_t row_start, int64_t width,
                                      float scale, bool joint, float grad_scale, int64_t block_begin,
                                      int64_t block_count, int directions, uintptr_t row_factor,
                                      uintptr_t col_factor, const std::vector<uintptr_t>& labels,
                                      uintptr_t query_labels) {
  const std::vector<uintptr_t> none(exps.size(), 0);
  ContrastiveRowArgs a = make_contrastive_row_args({exps, none, none, coefficients}, coefficient_dtype, lengths,
                                                   kinds, rows, row_start, width, scale, 0.0f, kHardnessNone, joint,
                                                   grad_scale, 0);
  SymmetricPointers p;
  p.row_factor = row_factor;
  p.col_factor = col_factor;
  set_symmetric_args(a, p, block_begin, block_count, directions);
  set_label_args(a, labels, query_labels, true);
  dispatch_store_dtype(a.coefficient_dtype, [&](auto out) { run_exp_coefficient_rows<decltype(out)>(a); });
}

// row_expf over n floats (the kernels' exp, in a loop as they use it: vectorized), for the accuracy tests.
void row_expf_cpu(uintptr_t input, uintptr_t output, int64_t n) {
  const float* in = reinterpret_cast<const float*>(input);
  float* out = reinterpret_cast<float*>(output);
  for (int64_t i = 0; i < n; ++i) out[i] = row_expf(in[i]);
}

// The three entry points of the row kernel on module m, run by Exec.
template <class Exec>
void bind_row_kernel_entries(py::module_& m) {
  m.def("contrastive_rows", &contrastive_rows_cpu<Exec>, py::arg("scores_ptrs"), py::arg("row_scale_ptrs"),
        py::arg("col_scale_ptrs"), py::arg("coefficient_ptrs"), py::arg("coefficient_dtype"), py::arg("lengths"),
        py::arg("kinds"), py::arg("rows"), py::arg("row_start"), py::arg("width"), py::arg("scale"), py::arg("alpha"),
        py::arg("hardness"), py::arg("joint"), py::arg("grad_scale"), py::arg("row_loss_ptr"),
        py::arg("grad_scale_factor_ptr") = 0, py::arg("label_ptrs") = std::vector<uintptr_t>(),
        "The contrastive row kernel over fp32 score segments (raw pointers; call through "
        "st_fast._native.native_row_kernel, which validates).",
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_statistics", &contrastive_statistics_cpu<Exec>, py::arg("scores_ptrs"), py::arg("row_scale_ptrs"),
        py::arg("col_scale_ptrs"), py::arg("lengths"), py::arg("kinds"), py::arg("rows"), py::arg("row_start"),
        py::arg("width"), py::arg("scale"), py::arg("alpha"), py::arg("hardness"), py::arg("row_lse_ptr"),
        py::arg("row_positive_ptr"), py::arg("block_begin"), py::arg("block_count"), py::arg("col_max_ptr"),
        py::arg("col_sum_ptr"), py::arg("label_ptrs") = std::vector<uintptr_t>(), py::arg("query_labels_ptr") = 0,
        "The symmetric path's statistics pass (raw pointers; call through st_fast._native.native_row_statistics).",
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_coefficients", &contrastive_coefficients_cpu<Exec>, py::arg("scores_ptrs"),
        py::arg("row_scale_ptrs"), py::arg("col_scale_ptrs"), py::arg("coefficient_ptrs"),
        py::arg("coefficient_dtype"), py::arg("lengths"), py::arg("kinds"), py::arg("rows"), py::arg("row_start"),
        py::arg("width"), py::arg("scale"), py::arg("alpha"), py::arg("hardness"), py::arg("joint"),
        py::arg("grad_scale"), py::arg("row_ref_ptr"), py::arg("block_begin"), py::arg("block_count"),
        py::arg("col_ref_ptr"), py::arg("directions"), py::arg("row_factor_ptr"), py::arg("col_factor_ptr"),
        py::arg("grad_scale_factor_ptr") = 0, py::arg("label_ptrs") = std::vector<uintptr_t>(),
        py::arg("query_labels_ptr") = 0,
        "The symmetric path's coefficient pass (raw pointers; call through "
        "st_fast._native.native_row_coefficients).",
        py::call_guard<py::gil_scoped_release>());
}
}  // namespace

void bind_contrastive_row(py::module_& m) {
  bind_row_kernel_entries<SerialRows>(m);
  m.def("contrastive_exp_statistics", &contrastive_exp_statistics_cpu, py::arg("scores_ptrs"), py::arg("lengths"),
        py::arg("kinds"), py::arg("rows"), py::arg("row_start"), py::arg("width"), py::arg("scale"),
        py::arg("shift"), py::arg("row_lse_ptr"), py::arg("row_positive_ptr"), py::arg("block_begin"),
        py::arg("block_count"), py::arg("col_max_ptr"), py::arg("col_sum_ptr"),
        py::arg("label_ptrs") = std::vector<uintptr_t>(), py::arg("query_labels_ptr") = 0,
        "The symmetric path's fixed-shift statistics pass, e = exp(logit - shift) written over the scores (raw "
        "pointers; call through st_fast._native.native_row_exp_statistics).",
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_exp_coefficients", &contrastive_exp_coefficients_cpu, py::arg("exp_ptrs"),
        py::arg("coefficient_ptrs"), py::arg("coefficient_dtype"), py::arg("lengths"), py::arg("kinds"),
        py::arg("rows"), py::arg("row_start"), py::arg("width"), py::arg("scale"), py::arg("joint"),
        py::arg("grad_scale"), py::arg("block_begin"), py::arg("block_count"), py::arg("directions"),
        py::arg("row_factor_ptr"), py::arg("col_factor_ptr"), py::arg("label_ptrs") = std::vector<uintptr_t>(),
        py::arg("query_labels_ptr") = 0,
        "The symmetric path's fixed-shift coefficient pass from e (raw pointers; call through "
        "st_fast._native.native_row_exp_coefficients).",
        py::call_guard<py::gil_scoped_release>());
  m.def("row_expf", &row_expf_cpu, py::arg("input_ptr"), py::arg("output_ptr"), py::arg("n"),
        "The row kernels' CPU exp over n contiguous fp32 values (raw pointers; call through st_fast._native.row_expf).",
        py::call_guard<py::gil_scoped_release>());
  // test only: the CUDA build's lane algorithm with 32 lanes (a warp, WarpLanes), 4 (more columns per lane), 64 or
  // 256 (a block per row, BlockLanes: warps combined in shared memory; 256 is the CUDA build's block)
  auto warp = m.def_submodule("emulated_lanes_32", "Test only: the CUDA build's lane algorithm, 32 threads per row");
  bind_row_kernel_entries<EmulatedLaneRows<32>>(warp);
  auto four = m.def_submodule("emulated_lanes_4", "Test only: the CUDA build's lane algorithm, 4 threads per row");
  bind_row_kernel_entries<EmulatedLaneRows<4>>(four);
  auto two_warps = m.def_submodule("emulated_lanes_64", "Test only: the CUDA block lane algorithm, 64 threads per row");
  bind_row_kernel_entries<EmulatedLaneRows<64>>(two_warps);
  auto block = m.def_submodule("emulated_lanes_256", "Test only: the CUDA block lane algorithm, 256 threads per row");
  bind_row_kernel_entries<EmulatedLaneRows<256>>(block);
}

}  // namespace st_fast
