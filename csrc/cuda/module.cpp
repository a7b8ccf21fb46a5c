// The optional CUDA extension `st_fast._C_cuda`: pybind11 bindings over the extern "C" launchers of the
// .cu files (compiled by nvcc, linked with the static CUDA runtime). Imports on a machine without a GPU.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "st_fast/boundary_codes.h"
#include "st_fast/maxsim_bindings.h"
#include "st_fast/row_kernel_bindings.h"

extern "C" int st_fast_cuda_contrastive_rows(const st_fast::RowArgs* args, int lanes_per_row,
                                             uintptr_t stream_handle);
extern "C" int st_fast_cuda_contrastive_statistics(const st_fast::StatisticsArgs* args, int lanes_per_row,
                                                   uintptr_t stream_handle);
extern "C" int st_fast_cuda_contrastive_coefficients(const st_fast::CoefficientsArgs* args, int lanes_per_row,
                                                     uintptr_t stream_handle);
extern "C" int st_fast_cuda_maxsim_forward(const st_fast::MaxSimForwardArgs* args, uintptr_t stream_handle);
extern "C" int st_fast_cuda_maxsim_backward(const st_fast::MaxSimBackwardArgs* args, uintptr_t stream_handle);
extern "C" int st_fast_cuda_device_count();
extern "C" const char* st_fast_cuda_error_string(int code);

namespace py = pybind11;

// Set by setup.py: the toolkit release and the gencode targets this extension was compiled for.
#ifndef ST_FAST_CUDA_VERSION
#define ST_FAST_CUDA_VERSION "unknown"
#endif
#ifndef ST_FAST_CUDA_ARCHS
#define ST_FAST_CUDA_ARCHS ""
#endif

namespace {
void check(int code, const char* what) {
  if (code != 0) throw std::runtime_error(std::string(what) + ": " + st_fast_cuda_error_string(code));
}

// The entry point `name`: its argument object (row_kernel_calls.h), the stream and the threads per row, run by the
// .cu launcher `launch`.
template <class Call, class Args>
void def_entry(py::module_& m, const char* name, int (*launch)(const Args*, int, uintptr_t)) {
  m.def(
      name,
      [name, launch](const Call& call, uintptr_t stream, int lanes_per_row) {
        const Args args = st_fast::to_args(call);
        check(launch(&args, lanes_per_row, stream), name);
      },
      py::arg("call"), py::arg("stream"), py::arg("lanes_per_row") = 32);
}

// A MaxSim entry point (maxsim_calls.h's argument object and the stream), run by the .cu launcher `launch`
// (csrc/cuda/maxsim.cu).
template <class Call, class Args>
void def_maxsim_entry(py::module_& m, const char* name, int (*launch)(const Args*, uintptr_t), const char* doc) {
  m.def(
      name,
      [name, launch](const Call& call, uintptr_t stream) {
        const Args args = st_fast::to_args(call);
        check(launch(&args, stream), name);
      },
      doc, py::arg("call"), py::arg("stream"));
}
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "st_fast CUDA kernels (raw device pointers; call through st_fast._native, which validates)";
  m.attr("boundary_codes") = st_fast::boundary_codes();
  m.attr("cuda_version") = ST_FAST_CUDA_VERSION;  // e.g. "13.0"
  m.attr("cuda_archs") = ST_FAST_CUDA_ARCHS;      // e.g. "sm_80 sm_90 compute_90"
  m.def("device_count", &st_fast_cuda_device_count, "CUDA devices visible to the static runtime (0 without a driver)");
  st_fast::bind_row_kernel_calls(m);
  def_entry<st_fast::RowsCall>(m, "contrastive_rows", &st_fast_cuda_contrastive_rows);
  def_entry<st_fast::StatisticsCall>(m, "contrastive_statistics", &st_fast_cuda_contrastive_statistics);
  def_entry<st_fast::CoefficientsCall>(m, "contrastive_coefficients", &st_fast_cuda_contrastive_coefficients);
  st_fast::bind_maxsim_calls(m);
  def_maxsim_entry<st_fast::MaxSimForwardCall>(m, "maxsim_forward", &st_fast_cuda_maxsim_forward,
                                               "MaxSim sums and first arg-max on the stream (device addresses)");
  def_maxsim_entry<st_fast::MaxSimBackwardCall>(m, "maxsim_backward", &st_fast_cuda_maxsim_backward,
                                                "MaxSim dQ and dD through the arg-max on the stream (device addresses)");
}
