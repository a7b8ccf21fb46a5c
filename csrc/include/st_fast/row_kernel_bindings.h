// The Python classes of the row kernel's argument objects (row_kernel_calls.h), bound once here for every extension
// that takes them: st_fast._C (csrc/contrastive_row.cpp), st_fast._C_cuda (csrc/cuda/module.cpp) and the test-only
// st_fast._C_test (csrc/testing/emulated_lanes.cpp). Python builds one with named fields (st_fast/_native_rows.py:
// `call = ext.RowsCall(); call.scores = [...]`); an unknown field name raises AttributeError. The classes are
// module-local: each extension has its own, so that the CPU and CUDA extensions load side by side.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "st_fast/row_kernel_calls.h"

namespace st_fast {

namespace bindings {

template <class T>
using Class = pybind11::class_<T>;

template <class T>
void segments(Class<T>& c) {
  c.def_readwrite("scores", &T::scores)
      .def_readwrite("lengths", &T::lengths)
      .def_readwrite("kinds", &T::kinds)
      .def_readwrite("labels", &T::labels)
      .def_readwrite("rows", &T::rows)
      .def_readwrite("row_start", &T::row_start)
      .def_readwrite("width", &T::width)
      .def_readwrite("scale", &T::scale);
}

template <class T>
void scaled(Class<T>& c) {
  c.def_readwrite("row_scales", &T::row_scales)
      .def_readwrite("col_scales", &T::col_scales)
      .def_readwrite("alpha", &T::alpha)
      .def_readwrite("hardness", &T::hardness);
}

template <class T>
void block(Class<T>& c) {
  c.def_readwrite("block_begin", &T::block_begin)
      .def_readwrite("block_count", &T::block_count)
      .def_readwrite("query_labels", &T::query_labels);
}

template <class T>
void store(Class<T>& c) {
  c.def_readwrite("coefficients", &T::coefficients)
      .def_readwrite("coefficient_dtype", &T::coefficient_dtype)
      .def_readwrite("joint", &T::joint)
      .def_readwrite("grad_scale", &T::grad_scale);
}

template <class T>
void statistics(Class<T>& c) {
  c.def_readwrite("row_lse", &T::row_lse)
      .def_readwrite("row_positive", &T::row_positive)
      .def_readwrite("col_max", &T::col_max)
      .def_readwrite("col_sum", &T::col_sum);
}

template <class T>
Class<T> declare(pybind11::module_& m, const char* name, const char* doc) {
  Class<T> c(m, name, doc, pybind11::module_local());
  c.def(pybind11::init<>());
  segments(c);
  return c;
}

}  // namespace bindings

// Binds RowsCall, StatisticsCall, CoefficientsCall, ExpStatisticsCall and ExpCoefficientsCall on m.
inline void bind_row_kernel_calls(pybind11::module_& m) {
  namespace b = bindings;
  auto rows = b::declare<RowsCall>(m, "RowsCall", "contrastive_rows' arguments (st_fast/_native_rows.py builds it)");
  b::scaled(rows);
  b::store(rows);
  rows.def_readwrite("row_loss", &RowsCall::row_loss).def_readwrite("grad_scale_factor", &RowsCall::grad_scale_factor);

  auto stats = b::declare<StatisticsCall>(m, "StatisticsCall", "contrastive_statistics' arguments");
  b::scaled(stats);
  b::block(stats);
  b::statistics(stats);

  auto coefficients = b::declare<CoefficientsCall>(m, "CoefficientsCall", "contrastive_coefficients' arguments");
  b::scaled(coefficients);
  b::block(coefficients);
  b::store(coefficients);
  coefficients.def_readwrite("grad_scale_factor", &CoefficientsCall::grad_scale_factor)
      .def_readwrite("directions", &CoefficientsCall::directions)
      .def_readwrite("row_ref", &CoefficientsCall::row_ref)
      .def_readwrite("col_ref", &CoefficientsCall::col_ref)
      .def_readwrite("row_factor", &CoefficientsCall::row_factor)
      .def_readwrite("col_factor", &CoefficientsCall::col_factor);

  auto exp_stats = b::declare<ExpStatisticsCall>(m, "ExpStatisticsCall", "contrastive_exp_statistics' arguments");
  b::block(exp_stats);
  b::statistics(exp_stats);
  exp_stats.def_readwrite("shift", &ExpStatisticsCall::shift);

  auto exp_coefficients =
      b::declare<ExpCoefficientsCall>(m, "ExpCoefficientsCall", "contrastive_exp_coefficients' arguments");
  b::block(exp_coefficients);
  b::store(exp_coefficients);
  exp_coefficients.def_readwrite("directions", &ExpCoefficientsCall::directions)
      .def_readwrite("row_factor", &ExpCoefficientsCall::row_factor)
      .def_readwrite("col_factor", &ExpCoefficientsCall::col_factor);
}

}  // namespace st_fast
