// The always-built CPU extension `st_fast._C`.
#include "st_fast/bindings.h"
#include "st_fast/boundary_codes.h"
#include "st_fast/maxsim_bindings.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "st_fast CPU kernels (C++17, OpenMP where available)";
#ifdef _OPENMP
  m.attr("openmp") = true;
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("openmp") = false;
  m.def("openmp_max_threads", []() { return 1; });
#endif
  m.attr("boundary_codes") = st_fast::boundary_codes();
  st_fast::bind_half_store(m);
  st_fast::bind_contrastive_row(m);
  st_fast::bind_sampler(m);
  st_fast::bind_maxsim(m);
}
