// The CPU entry points of the row kernel, over an execution policy Exec that says how the rows of a call run:
// Exec::rows(n, f) calls f(r, lanes) for every row r; Exec::column_statistics(a) continues the positive block's
// column statistics over the chunk's rows. st_fast._C binds them with SerialRows (csrc/contrastive_row.cpp: OpenMP
// over rows, the range loops); the test-only st_fast._C_test with the CUDA build's lane algorithm emulated by
// threads (csrc/testing/emulated_lanes.cpp). Each entry point takes its argument object (row_kernel_calls.h).
#pragma once

#include <pybind11/pybind11.h>

#include "st_fast/row_kernel_calls.h"
#include "st_fast/row_kernel_ranges.h"

namespace st_fast {

// Runs pass(out, r, lanes) for every row of a, with out the Store of a's coefficient dtype (half_store.h).
template <class Exec, class Args, class Pass>
void run_store_rows(const Args& a, Pass&& pass) {
  dispatch_store_dtype(a.out.dtype, [&](auto out) {
    Exec::rows(a.seg.rows, [&](int64_t r, const auto& lanes) { pass(out, r, lanes); });
  });
}

template <class Exec>
void contrastive_rows_cpu(const RowsCall& call) {
  const RowArgs a = to_args(call);
  run_store_rows<Exec>(a, [&](auto out, int64_t r, const auto& lanes) { contrastive_row<decltype(out)>(a, r, lanes); });
}

template <class Exec>
void contrastive_statistics_cpu(const StatisticsCall& call) {
  const StatisticsArgs a = to_args(call);
  Exec::rows(a.seg.rows, [&](int64_t r, const auto& lanes) { contrastive_row_statistics(a, r, lanes); });
  Exec::column_statistics(a);
}

template <class Exec>
void contrastive_coefficients_cpu(const CoefficientsCall& call) {
  const CoefficientsArgs a = to_args(call);
  run_store_rows<Exec>(a, [&](auto out, int64_t r, const auto& lanes) {
    contrastive_row_coefficients<decltype(out)>(a, r, lanes);
  });
}

// The three entry points of the row kernel on module m, run by Exec (the argument classes: bind_row_kernel_calls).
template <class Exec>
void bind_row_kernel_entries(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("contrastive_rows", &contrastive_rows_cpu<Exec>, py::arg("call"),
        "The contrastive row kernel over fp32 score segments (a RowsCall of raw pointers; call through "
        "st_fast._native_rows.native_row_kernel, which validates).",
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_statistics", &contrastive_statistics_cpu<Exec>, py::arg("call"),
        "The symmetric path's statistics pass (a StatisticsCall; call through "
        "st_fast._native_rows.native_row_statistics).",
        py::call_guard<py::gil_scoped_release>());
  m.def("contrastive_coefficients", &contrastive_coefficients_cpu<Exec>, py::arg("call"),
        "The symmetric path's coefficient pass (a CoefficientsCall; call through "
        "st_fast._native_rows.native_row_coefficients).",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace st_fast
