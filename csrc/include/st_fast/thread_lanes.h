// Test-only CPU emulation of the CUDA build's lanes (cuda/warp_lanes.cuh), so that the CPU tests run the code paths
// of row_kernel_lanes.h that only the CUDA build takes (Lanes::kContiguous == false: the online max / sum and the
// interleaved column loops; SerialLanes takes the contiguous range loops instead).
//
// `count` std::threads own one row together, as the 32 lanes of a warp (WarpLanes) or the threads of a block
// (BlockLanes, cuda/block_lanes.cuh) do: lane `id` visits columns id, id + count, ...; max / sum reduce across the
// lanes in the CUDA build's order, so that every lane gets the same value, the one the GPU computes: within each
// warp of up to 32 lanes WarpLanes' butterfly (v = op(v, v of lane id ^ offset) for offsets 16 .. 1, through shared
// slots and a barrier), then, with more than 32 lanes, BlockLanes' combination of the warps' values in warp order.
// Only for tests (the test-only st_fast._C_test, csrc/testing/emulated_lanes.cpp): a barrier per reduction step
// makes it orders of magnitude slower than SerialLanes.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

#include "st_fast/portability.h"

namespace st_fast {

// A reusable barrier for `count` threads (C++17 has no std::barrier).
class LaneBarrier {
 public:
  explicit LaneBarrier(int64_t count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    released_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  int64_t count_;
  int64_t arrived_ = 0;
  uint64_t generation_ = 0;
};

constexpr int64_t kEmulatedWarpSize = 32;

// What the lanes of one row share: the barrier and one slot per lane (a warp's shuffle, then a block's warp values).
struct LaneShared {
  explicit LaneShared(int64_t count) : barrier(count), slots(static_cast<size_t>(count)) {}
  LaneBarrier barrier;
  std::vector<float> slots;
};

struct ThreadLanes {
  static constexpr bool kContiguous = false;  // lanes interleave, as WarpLanes
  int64_t lane;
  int64_t lanes;
  LaneShared* shared;

  int64_t id() const { return lane; }
  int64_t count() const { return lanes; }
  template <class Op>
  float reduce(float v, Op op) const {
    const int64_t warp = lanes < kEmulatedWarpSize ? lanes : kEmulatedWarpSize;
    for (int64_t offset = warp / 2; offset > 0; offset >>= 1) {
      shared->slots[static_cast<size_t>(lane)] = v;
      shared->barrier.wait();
      v = op(v, shared->slots[static_cast<size_t>(lane ^ offset)]);
      shared->barrier.wait();  // every lane has read before the slots are written again
    }
    if (lanes <= kEmulatedWarpSize) return v;
    if (lane % kEmulatedWarpSize == 0) shared->slots[static_cast<size_t>(lane / kEmulatedWarpSize)] = v;
    shared->barrier.wait();
    float total = shared->slots[0];
    for (int64_t w = 1; w < lanes / kEmulatedWarpSize; ++w) total = op(total, shared->slots[static_cast<size_t>(w)]);
    shared->barrier.wait();
    return total;
  }
  float max(float v) const {
    return reduce(v, [](float x, float y) { return fmaxf(x, y); });
  }
  float sum(float v) const {
    return reduce(v, [](float x, float y) { return x + y; });
  }
};

// Runs f(r, lanes) for the rows r = 0 .. rows in order on `count` threads (a power of two), each with its lane.
template <class F>
void run_thread_lanes(int64_t count, int64_t rows, F&& f) {
  if (count < 1 || (count & (count - 1)) != 0)
    throw std::invalid_argument("run_thread_lanes: the lane count must be a power of two");
  LaneShared shared(count);
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(count));
  for (int64_t lane = 0; lane < count; ++lane)
    threads.emplace_back([&, lane] {
      const ThreadLanes lanes{lane, count, &shared};
      for (int64_t r = 0; r < rows; ++r) f(r, lanes);
    });
  for (auto& thread : threads) thread.join();
}

}  // namespace st_fast
