// The Python classes of the MaxSim kernels' argument objects (maxsim_calls.h), bound once here for the extensions
// that take them (st_fast._C, st_fast._C_cuda and the test-only st_fast._C_test). Module-local, as the row kernel's
// (row_kernel_bindings.h). Python builds one with named fields (st_fast/_native_maxsim.py).
#pragma once

#include <pybind11/pybind11.h>

#include "st_fast/maxsim_calls.h"

namespace st_fast {

template <class T>
void bind_maxsim_shape(pybind11::class_<T>& c) {
  c.def(pybind11::init<>())
      .def_readwrite("queries", &T::queries)
      .def_readwrite("documents", &T::documents)
      .def_readwrite("query_tokens", &T::query_tokens)
      .def_readwrite("document_tokens", &T::document_tokens)
      .def_readwrite("dim", &T::dim)
      .def_readwrite("dtype", &T::dtype)
      .def_readwrite("queries_ptr", &T::queries_ptr)
      .def_readwrite("documents_ptr", &T::documents_ptr)
      .def_readwrite("query_mask_ptr", &T::query_mask_ptr)
      .def_readwrite("index_ptr", &T::index_ptr);
}

// Binds MaxSimForwardCall and MaxSimBackwardCall on m.
inline void bind_maxsim_calls(pybind11::module_& m) {
  pybind11::class_<MaxSimForwardCall> forward(m, "MaxSimForwardCall",
                                              "maxsim_forward's arguments (st_fast/_native_maxsim.py builds it)",
                                              pybind11::module_local());
  bind_maxsim_shape(forward);
  forward.def_readwrite("document_mask_ptr", &MaxSimForwardCall::document_mask_ptr)
      .def_readwrite("fill", &MaxSimForwardCall::fill)
      .def_readwrite("sums_ptr", &MaxSimForwardCall::sums_ptr);
  pybind11::class_<MaxSimBackwardCall> backward(m, "MaxSimBackwardCall",
                                                "maxsim_backward's arguments (st_fast/_native_maxsim.py builds it)",
                                                pybind11::module_local());
  bind_maxsim_shape(backward);
  backward.def_readwrite("grad_sums_ptr", &MaxSimBackwardCall::grad_sums_ptr)
      .def_readwrite("grad_queries_ptr", &MaxSimBackwardCall::grad_queries_ptr)
      .def_readwrite("grad_documents_ptr", &MaxSimBackwardCall::grad_documents_ptr);
}

// The MaxSim entry points of st_fast._C (csrc/maxsim.cpp).
void bind_maxsim(pybind11::module_& m);

}  // namespace st_fast
