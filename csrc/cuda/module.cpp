// The optional CUDA extension `st_fast._C_cuda`: pybind11 bindings over the extern "C" launchers of the
// .cu files (compiled by nvcc, linked with the static CUDA runtime). Imports on a machine without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "st_fast/boundary_codes.h"
#include "st_fast/contrastive_row_host.h"

extern "C" int st_fast_cuda_contrastive_rows(const st_fast::ContrastiveRowArgs* args, int lanes_per_row,
                                             uintptr_t stream_handle);
extern "C" int st_fast_cuda_contrastive_statistics(const st_fast::ContrastiveRowArgs* args, int lanes_per_row,
                                                   uintptr_t stream_handle);
extern "C" int st_fast_cuda_contrastive_coefficients(const st_fast::ContrastiveRowArgs* args, int lanes_per_row,
                                                     uintptr_t stream_handle);
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
}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "st_fast CUDA kernels (raw device pointers; call through st_fast._native, which validates)";
  m.attr("boundary_codes") = st_fast::boundary_codes();
  m.attr("cuda_version") = ST_FAST_CUDA_VERSION;  // e.g. "13.0"
  m.attr("cuda_archs") = ST_FAST_CUDA_ARCHS;      // e.g. "sm_80 sm_90 compute_90"
  m.def("device_count", &st_fast_cuda_device_count, "CUDA devices visible to the static runtime (0 without a driver)");
  m.def(
      "contrastive_rows",
      [](const std::vector<uintptr_t>& scores, const std::vector<uintptr_t>& row_scales,
         const std::vector<uintptr_t>& col_scales, const std::vector<uintptr_t>& coefficients, int coefficient_dtype,
         const std::vector<int64_t>& lengths, const std::vector<int>& kinds, int64_t rows, int64_t row_start,
         int64_t width, float scale, float alpha, int hardness, bool joint, float grad_scale, uintptr_t row_loss,
         uintptr_t grad_scale_factor, const std::vector<uintptr_t>& labels, uintptr_t stream, int lanes_per_row) {
        st_fast::ContrastiveRowArgs args = st_fast::make_contrastive_row_args(
            {scores, row_scales, col_scales, coefficients}, coefficient_dtype, lengths, kinds, rows, row_start, width,
            scale, alpha, hardness, joint, grad_scale, row_loss, grad_scale_factor);
        st_fast::set_label_args(args, labels, 0, false);
        check(st_fast_cuda_contrastive_rows(&args, lanes_per_row, stream), "contrastive_rows");
      },
      py::arg("scores_ptrs"), py::arg("row_scale_ptrs"), py::arg("col_scale_ptrs"), py::arg("coefficient_ptrs"),
      py::arg("coefficient_dtype"), py::arg("lengths"), py::arg("kinds"), py::arg("rows"), py::arg("row_start"),
      py::arg("width"), py::arg("scale"), py::arg("alpha"), py::arg("hardness"), py::arg("joint"),
      py::arg("grad_scale"), py::arg("row_loss_ptr"), py::arg("grad_scale_factor_ptr"), py::arg("label_ptrs"),
      py::arg("stream"), py::arg("lanes_per_row") = 32);
  m.def(
      "contrastive_statistics",
      [](const std::vector<uintptr_t>& scores, const std::vector<uintptr_t>& row_scales,
         const std::vector<uintptr_t>& col_scales, const std::vector<int64_t>& lengths, const std::vector<int>& kinds,
         int64_t rows, int64_t row_start, int64_t width, float scale, float alpha, int hardness, uintptr_t row_lse,
         uintptr_t row_positive, int64_t block_begin, int64_t block_count, uintptr_t col_max, uintptr_t col_sum,
         const std::vector<uintptr_t>& labels, uintptr_t query_labels, uintptr_t stream, int lanes_per_row) {
        st_fast::ContrastiveRowArgs args = st_fast::make_contrastive_row_args(
            {scores, row_scales, col_scales, std::vector<uintptr_t>(scores.size(), 0)}, st_fast::kStoreFp32, lengths,
            kinds, rows, row_start, width, scale, alpha, hardness, true, -1.0f, 0);
        st_fast::SymmetricPointers p;
        p.row_lse = row_lse;
        p.row_positive = row_positive;
        p.col_max = col_max;
        p.col_sum = col_sum;
        st_fast::set_symmetric_args(args, p, block_begin, block_count, 1);
        st_fast::set_label_args(args, labels, query_labels, true);
        check(st_fast_cuda_contrastive_statistics(&args, lanes_per_row, stream), "contrastive_statistics");
      },
      py::arg("scores_ptrs"), py::arg("row_scale_ptrs"), py::arg("col_scale_ptrs"), py::arg("lengths"),
      py::arg("kinds"), py::arg("rows"), py::arg("row_start"), py::arg("width"), py::arg("scale"), py::arg("alpha"),
      py::arg("hardness"), py::arg("row_lse_ptr"), py::arg("row_positive_ptr"), py::arg("block_begin"),
      py::arg("block_count"), py::arg("col_max_ptr"), py::arg("col_sum_ptr"), py::arg("label_ptrs"),
      py::arg("query_labels_ptr"), py::arg("stream"), py::arg("lanes_per_row") = 32);
  m.def(
      "contrastive_coefficients",
      [](const std::vector<uintptr_t>& scores, const std::vector<uintptr_t>& row_scales,
         const std::vector<uintptr_t>& col_scales, const std::vector<uintptr_t>& coefficients, int coefficient_dtype,
         const std::vector<int64_t>& lengths, const std::vector<int>& kinds, int64_t rows, int64_t row_start,
         int64_t width, float scale, float alpha, int hardness, bool joint, float grad_scale, uintptr_t row_ref,
         int64_t block_begin, int64_t block_count, uintptr_t col_ref, int directions, uintptr_t row_factor,
         uintptr_t col_factor, uintptr_t grad_scale_factor, const std::vector<uintptr_t>& labels,
         uintptr_t query_labels, uintptr_t stream, int lanes_per_row) {
        st_fast::ContrastiveRowArgs args = st_fast::make_contrastive_row_args(
            {scores, row_scales, col_scales, coefficients}, coefficient_dtype, lengths, kinds, rows, row_start, width,
            scale, alpha, hardness, joint, grad_scale, 0, grad_scale_factor);
        st_fast::SymmetricPointers p;
        p.row_ref = row_ref;
        p.col_ref = col_ref;
        p.row_factor = row_factor;
        p.col_factor = col_factor;
        st_fast::set_symmetric_args(args, p, block_begin, block_count, directions);
        st_fast::set_label_args(args, labels, query_labels, true);
        check(st_fast_cuda_contrastive_coefficients(&args, lanes_per_row, stream), "contrastive_coefficients");
      },
      py::arg("scores_ptrs"), py::arg("row_scale_ptrs"), py::arg("col_scale_ptrs"), py::arg("coefficient_ptrs"),
      py::arg("coefficient_dtype"), py::arg("lengths"), py::arg("kinds"), py::arg("rows"), py::arg("row_start"),
      py::arg("width"), py::arg("scale"), py::arg("alpha"), py::arg("hardness"), py::arg("joint"),
      py::arg("grad_scale"), py::arg("row_ref_ptr"), py::arg("block_begin"), py::arg("block_count"),
      py::arg("col_ref_ptr"), py::arg("directions"), py::arg("row_factor_ptr"), py::arg("col_factor_ptr"),
      py::arg("grad_scale_factor_ptr"), py::arg("label_ptrs"), py::arg("query_labels_ptr"), py::arg("stream"),
      py::arg("lanes_per_row") = 32);
}
