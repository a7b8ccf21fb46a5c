// The test-only extension `st_fast._C_test` (built only with ST_FAST_TEST_EXTENSIONS=1, as scripts/env.sh does for
// the test environment; never in a wheel): the row kernel's CPU entry points with the CUDA build's lane algorithm
// emulated by threads (csrc/include/st_fast/thread_lanes.h), in the submodules emulated_lanes_<N>
// (tests/ops/test_emulated_lanes.py): `kLanes` threads per row (ThreadLanes: the online loops and butterfly
// reductions of WarpLanes / BlockLanes), one column per worker of the column statistics (contrastive_column_statistics,
// as the CUDA kernel's threads); and the CUDA MaxSim kernels' algorithm in the submodule emulated_maxsim
// (csrc/testing/emulated_maxsim.cpp, tests/ops/test_maxsim_emulated.py).
#include <pybind11/pybind11.h>

#include "st_fast/boundary_codes.h"
#include "st_fast/row_kernel_bindings.h"
#include "st_fast/row_kernel_cpu.h"
#include "st_fast/thread_lanes.h"

namespace py = pybind11;

namespace st_fast {
void bind_emulated_maxsim(py::module_& m);  // csrc/testing/emulated_maxsim.cpp
}

namespace {
template <int kLanes>
struct EmulatedLaneRows {
  template <class F>
  static void rows(int64_t n, F&& f) {
    st_fast::run_thread_lanes(kLanes, n, f);
  }
  static void column_statistics(const st_fast::StatisticsArgs& a) {
    for (int64_t j = 0; j < a.block.count; ++j) st_fast::contrastive_column_statistics(a, j, j + 1);
  }
};

// The submodule emulated_lanes_<kLanes>: the three entry points, and the argument classes of the parent.
template <int kLanes>
void bind_emulation(py::module_& m, const char* name, const char* doc) {
  auto sub = m.def_submodule(name, doc);
  st_fast::bind_row_kernel_entries<EmulatedLaneRows<kLanes>>(sub);
  for (const char* call : {"RowsCall", "StatisticsCall", "CoefficientsCall"}) sub.attr(call) = m.attr(call);
}
}  // namespace

PYBIND11_MODULE(_C_test, m) {
  m.doc() = "st_fast test-only native code: the CUDA build's lane algorithm emulated on the CPU (not shipped)";
  m.attr("boundary_codes") = st_fast::boundary_codes();
  st_fast::bind_row_kernel_calls(m);
  // the CUDA build's lane algorithm with 32 lanes (a warp, WarpLanes), 4 (more columns per lane), 64 or 256 (a block
  // per row, BlockLanes: warps combined in shared memory; 256 is the CUDA build's block)
  bind_emulation<32>(m, "emulated_lanes_32", "The CUDA build's lane algorithm, 32 threads per row");
  bind_emulation<4>(m, "emulated_lanes_4", "The CUDA build's lane algorithm, 4 threads per row");
  bind_emulation<64>(m, "emulated_lanes_64", "The CUDA block lane algorithm, 64 threads per row");
  bind_emulation<256>(m, "emulated_lanes_256", "The CUDA block lane algorithm, 256 threads per row");
  // the CUDA MaxSim kernels' algorithm (maxsim_lanes.h), block by block
  st_fast::bind_emulated_maxsim(m);
}
