// The CUDA MaxSim kernels' algorithm (csrc/include/st_fast/maxsim_lanes.h, built for the GPU by csrc/cuda/maxsim.cu)
// run on the CPU, for the test-only st_fast._C_test (submodule emulated_maxsim, tests/ops/test_maxsim_emulated.py):
// every block of the CUDA grid in turn, each phase of a block run by each of its threads in turn (thread order
// forwards, or backwards with `reversed`: the two give the same bits only where no thread reads what another thread
// writes within one phase, as the GPU's barriers require), with per-thread register states and the block's shared
// memory filled with NaN bits first (a read of a slot no thread wrote shows). The backward's threads are independent
// (each owns its gradient column): every (block, thread) in turn.
#include <pybind11/pybind11.h>

#include <cstring>
#include <memory>

#include "st_fast/maxsim_bindings.h"
#include "st_fast/maxsim_calls.h"
#include "st_fast/maxsim_lanes.h"

namespace py = pybind11;

namespace st_fast {
namespace {
using namespace maxsim_lanes;

struct EmulatedForwardBlock {
  MaxSimForwardShared sh;
  MaxSimForwardThread t[kForwardThreads];
  bool reversed = false;

  void reset() {  // uninitialized memory, as a fresh block's on the GPU: NaN bits
    std::memset(static_cast<void*>(&sh), 0xFF, sizeof sh);
    std::memset(static_cast<void*>(t), 0xFF, sizeof t);
  }
  MaxSimForwardShared& shared() { return sh; }
  template <class F>
  void phase(F&& f) {
    for (int n = 0; n < kForwardThreads; ++n) {
      const int tid = reversed ? kForwardThreads - 1 - n : n;
      f(tid, t[tid]);
    }
  }
};

template <class In>
void emulate_forward(const MaxSimForwardArgs& a, bool reversed) {
  auto block = std::make_unique<EmulatedForwardBlock>();
  block->reversed = reversed;
  const int64_t blocks = forward_blocks(a.shape);
  for (int64_t b = 0; b < blocks; ++b) {
    block->reset();
    forward_block<In>(a, b, *block);
  }
}

template <class In>
void emulate_backward(const MaxSimBackwardArgs& a, bool reversed) {
  const int64_t query_blocks = query_gradient_blocks(a.shape), document_blocks = document_gradient_blocks(a.shape);
  for (int64_t n = 0; n < query_blocks; ++n) {
    const int64_t b = reversed ? query_blocks - 1 - n : n;
    for (int t = 0; t < kBackwardThreads; ++t) query_gradient_thread<In>(a, b, reversed ? kBackwardThreads - 1 - t : t);
  }
  for (int64_t n = 0; n < document_blocks; ++n) {
    const int64_t b = reversed ? document_blocks - 1 - n : n;
    for (int t = 0; t < kBackwardThreads; ++t)
      document_gradient_thread<In>(a, b, reversed ? kBackwardThreads - 1 - t : t);
  }
}

void maxsim_forward(const MaxSimForwardCall& call, bool reversed) {
  const MaxSimForwardArgs a = to_args(call);
  py::gil_scoped_release release;
  with_element_type(a.shape.dtype, [&](auto in) { emulate_forward<decltype(in)>(a, reversed); });
}

void maxsim_backward(const MaxSimBackwardCall& call, bool reversed) {
  const MaxSimBackwardArgs a = to_args(call);
  py::gil_scoped_release release;
  with_element_type(a.shape.dtype, [&](auto in) { emulate_backward<decltype(in)>(a, reversed); });
}
}  // namespace

// The submodule emulated_maxsim of st_fast._C_test: maxsim_forward(call) / maxsim_backward(call), the entry points of
// st_fast._C (the CPU) with the CUDA kernels' algorithm, and the argument classes.
void bind_emulated_maxsim(py::module_& m) {
  bind_maxsim_calls(m);
  auto sub = m.def_submodule("emulated_maxsim", "The CUDA MaxSim kernels' algorithm, emulated on the CPU");
  sub.def("maxsim_forward", &maxsim_forward, "sums and first arg-max as the CUDA forward computes them",
          py::arg("call"), py::arg("reversed") = false);
  sub.def("maxsim_backward", &maxsim_backward, "dQ and dD as the CUDA backward computes them", py::arg("call"),
          py::arg("reversed") = false);
  for (const char* name : {"MaxSimForwardCall", "MaxSimBackwardCall"}) sub.attr(name) = m.attr(name);
}

}  // namespace st_fast
