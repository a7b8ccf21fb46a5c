// Core of st_fast.NoDuplicatesBatchSampler: the duplicate-free greedy batch scan of sentence-transformers'
// NoDuplicatesBatchSampler, over 64-bit keys of each cell's canonical string.
//
// Cells are byte strings held in Arrow-layout chunks (string/large_string or binary/large_binary: validity bitmap,
// int32/int64 offsets, data), read zero-copy; the Python side keeps the arrays alive (`owner`). A column's rows are
// either physical (looked up through an optional logical -> physical `indices` mapping, like a datasets.Dataset
// after select/shuffle) or already logical. A null cell reads as the string "None" (what datasets returns, then
// str()), or as "no value" in columns flagged null_absent (used to pad rows with fewer values).
//
// Keys: a wyhash-style 64-bit hash of the cell bytes, computed once (threads over rows). A pass takes the shuffled
// order and returns every batch of that pass (flat indices + offsets), with exactly the decisions of the upstream
// linked-list scan. Key equality is always confirmed on the bytes, so a hash collision can never change a batch (the
// `hash_bits` test hook truncates keys to force collisions).
#include <pybind11/numpy.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <stdexcept>
#include <string>
#include <vector>

#include "st_fast/bindings.h"
#include "st_fast/wyhash64.h"

namespace py = pybind11;

namespace st_fast {

namespace {

constexpr char kNoneText[] = "None";  // str(None): a null cell's canonical string

struct Chunk {
  const uint8_t* validity = nullptr;  // null when the chunk has no nulls
  const uint8_t* offsets = nullptr;   // int32 or int64 array, indexed from `offset`
  const char* data = nullptr;
  int64_t offset = 0;  // Arrow slice offset
  int64_t length = 0;
  bool large = false;   // int64 offsets
  bool all_null = false;
};

struct Column {
  std::vector<Chunk> chunks;
  std::vector<int64_t> starts{0};  // starts[k] = first row of chunk k; back() = rows covered so far
  bool mapped = false;             // rows go through the logical -> physical indices
  bool null_absent = false;        // null = no value (padding) instead of "None"
};

// An uninitialized array that Linux may back with transparent huge pages once it is large: the scan reads keys at
// random rows, and beyond the TLB's reach (about 12 MiB of 4 KiB pages) nearly every such read also misses the TLB
// (huge pages took the 1M-row, batch-128 scan from 19.1 to 17.5 ms). Smaller arrays keep small pages: a huge page
// fault zeroes 2 MiB at once, and sometimes waits for the kernel to compact memory (seen: 4 -> 10 ms builds at 100k).
template <typename T>
class HugePageArray {
 public:
  void reset(size_t count) {
    constexpr size_t kHuge = size_t{2} << 20, kMinBytes = size_t{16} << 20;
    const size_t bytes = count * sizeof(T);
    void* p = nullptr;
    if (bytes >= kMinBytes) {
      const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
      p = std::aligned_alloc(kHuge, rounded);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      if (p != nullptr) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: failure just keeps small pages
#endif
    } else if (bytes > 0) {
      p = std::malloc(bytes);
    }
    if (bytes > 0 && p == nullptr) throw std::bad_alloc();
    data_.reset(static_cast<T*>(p));
    size_ = count;
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  size_t size() const { return size_; }
  T& operator[](size_t i) { return data_.get()[i]; }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  size_t size_ = 0;
};

struct CellView {
  const char* data;
  int64_t size;
  bool present;
};

class NoDupCore {
 public:
  NoDupCore(int64_t num_rows, int64_t num_columns, int hash_bits)
      : num_rows_(num_rows), num_columns_(num_columns), columns_(num_columns) {
    if (num_rows < 0 || num_columns < 0) throw std::invalid_argument("num_rows and num_columns must be >= 0");
    if (hash_bits < 1 || hash_bits > 64) throw std::invalid_argument("hash_bits must be in [1, 64]");
    if (num_columns > 0 && num_rows > static_cast<int64_t>(std::numeric_limits<uint32_t>::max()) / num_columns)
      throw std::invalid_argument("more than 2^32 - 1 cells (rows x columns) are not supported");
    key_mask_ = hash_bits == 64 ? ~uint64_t{0} : ((uint64_t{1} << hash_bits) - 1);
  }

  void set_column(int64_t col, bool mapped, bool null_absent) {
    Column& c = column(col);
    c.mapped = mapped;
    c.null_absent = null_absent;
  }

  void add_chunk(int64_t col, uintptr_t validity, uintptr_t offsets, uintptr_t data, int64_t offset, int64_t length,
                 bool large, bool all_null, py::object owner) {
    Column& c = column(col);
    if (length < 0 || offset < 0) throw std::invalid_argument("negative chunk length/offset");
    if (!all_null && length > 0 && offsets == 0) throw std::invalid_argument("chunk without an offsets buffer");
    Chunk k;
    k.validity = reinterpret_cast<const uint8_t*>(validity);
    k.offsets = reinterpret_cast<const uint8_t*>(offsets);
    k.data = reinterpret_cast<const char*>(data);
    k.offset = offset;
    k.length = length;
    k.large = large;
    k.all_null = all_null;
    if (length == 0) return;
    c.chunks.push_back(k);
    c.starts.push_back(c.starts.back() + length);
    owners_.push_back(std::move(owner));
  }

  void set_indices(py::array_t<int64_t, py::array::c_style | py::array::forcecast> indices) {
    if (indices.ndim() != 1 || indices.shape(0) != num_rows_)
      throw std::invalid_argument("indices must be 1-D with one entry per row");
    if (built_) throw std::logic_error("the core is built (and may be read by a running pass): it cannot change");
    indices_ = indices;
    index_data_ = indices_.data();
  }

  // Validates the layout and computes every cell's key. Idempotent.
  void build(int num_threads) {
    if (built_) return;
    const int64_t physical_needed = index_data_ ? physical_rows_needed() : num_rows_;
    for (int64_t col = 0; col < num_columns_; ++col) {
      const Column& c = columns_[col];
      const int64_t needed = c.mapped && index_data_ ? physical_needed : num_rows_;
      if (c.starts.back() < needed)
        throw std::invalid_argument("column " + std::to_string(col) + " has " + std::to_string(c.starts.back()) +
                                    " rows, needs " + std::to_string(needed));
      if (c.null_absent) has_absent_ = true;
    }
    const int64_t cells = num_rows_ * num_columns_;
    keys_.reset(static_cast<size_t>(cells));  // every entry is written below (0 for absent cells)
    if (has_absent_) absent_.assign(static_cast<size_t>(cells), 0);
    // Plain threads rather than OpenMP: libgomp is not fork-safe (a forked child that starts a parallel region after
    // the parent used one hangs), and samplers are built in processes that fork DataLoader workers.
    std::atomic<bool> bad{false};
    auto hash_rows = [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t col = 0; col < num_columns_; ++col) {
          const int64_t ref = row * num_columns_ + col;
          const CellView v = cell(row, col);
          if (v.size < 0 || !v.present) {
            keys_[ref] = 0;
            if (v.size < 0) bad.store(true);
            else absent_[ref] = 1;
            continue;
          }
          keys_[ref] = wyhash64(v.data, static_cast<size_t>(v.size)) & key_mask_;
        }
      }
    };
    const int64_t hw = std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()));
    int64_t threads = num_threads > 0 ? num_threads : hw;
    threads = std::max<int64_t>(1, std::min<int64_t>(threads, cells / (1 << 15)));
    if (threads == 1) {
      hash_rows(0, num_rows_);
    } else {
      std::vector<std::thread> workers;
      const int64_t step = (num_rows_ + threads - 1) / threads;
      for (int64_t t = 1; t < threads; ++t)
        workers.emplace_back(hash_rows, std::min(num_rows_, t * step), std::min(num_rows_, (t + 1) * step));
      hash_rows(0, std::min(num_rows_, step));
      for (std::thread& w : workers) w.join();
    }
    if (bad) throw std::invalid_argument("corrupt offsets in a string column");
    built_ = true;
  }

  py::array_t<uint64_t> keys() const {
    py::array_t<uint64_t> out({num_rows_, num_columns_});
    if (keys_.size() > 0) std::memcpy(out.mutable_data(), keys_.data(), keys_.size() * sizeof(uint64_t));
    return out;
  }

  // Bytes held by this object (keys, flags, chunk tables); the Arrow buffers it reads are not counted.
  int64_t state_bytes() const {
    int64_t total = static_cast<int64_t>(keys_.size() * sizeof(uint64_t) + absent_.capacity());
    {
      std::lock_guard<std::mutex> lock(spare_mutex_);
      if (spare_rows_) total += std::max<int64_t>(num_rows_, 1) * static_cast<int64_t>(sizeof(uint32_t));
    }
    for (const Column& c : columns_) total += c.chunks.capacity() * sizeof(Chunk) + c.starts.capacity() * 8;
    return total;
  }

  int64_t num_rows() const { return num_rows_; }
  int64_t num_columns() const { return num_columns_; }

  // --- read-only after build(); used by the passes, possibly from a background thread ---
  bool built() const { return built_; }
  const uint64_t* keys_data() const { return keys_.data(); }
  bool has_absent() const { return has_absent_; }
  bool absent(int64_t ref) const { return absent_[ref] != 0; }

  // A buffer for the batch rows of one pass (num_rows entries): the one the last finished pass gave back when there is
  // one, as its pages are mapped already (fresh pages cost a page fault and a zeroing each, ms per million rows).
  std::unique_ptr<uint32_t[]> take_row_buffer() const {
    std::lock_guard<std::mutex> lock(spare_mutex_);
    if (spare_rows_) return std::move(spare_rows_);
    return std::unique_ptr<uint32_t[]>(new uint32_t[static_cast<size_t>(std::max<int64_t>(num_rows_, 1))]);
  }
  void give_row_buffer(std::unique_ptr<uint32_t[]> buffer) const {
    std::lock_guard<std::mutex> lock(spare_mutex_);
    spare_rows_ = std::move(buffer);
  }

  bool same_value(int64_t ref_a, int64_t ref_b) const {
    if (ref_a == ref_b) return true;
    const CellView a = cell(ref_a / num_columns_, ref_a % num_columns_);
    const CellView b = cell(ref_b / num_columns_, ref_b % num_columns_);
    return a.size == b.size && (a.size == 0 || a.data == b.data || std::memcmp(a.data, b.data, a.size) == 0);
  }

 private:
  Column& column(int64_t col) {
    if (built_) throw std::logic_error("the core is built (and may be read by a running pass): it cannot change");
    if (col < 0 || col >= num_columns_) throw std::out_of_range("column index out of range");
    return columns_[col];
  }

  int64_t physical_rows_needed() const {
    int64_t mx = -1;
    for (int64_t i = 0; i < num_rows_; ++i) {
      if (index_data_[i] < 0) throw std::invalid_argument("negative index in indices");
      mx = std::max(mx, index_data_[i]);
    }
    return mx + 1;
  }

  CellView cell(int64_t row, int64_t col) const {
    const Column& c = columns_[col];
    const int64_t phys = (c.mapped && index_data_) ? index_data_[row] : row;
    const size_t k = static_cast<size_t>(std::upper_bound(c.starts.begin(), c.starts.end(), phys) - c.starts.begin()) - 1;
    const Chunk& ch = c.chunks[k];
    const int64_t i = phys - c.starts[k] + ch.offset;
    const bool valid = !ch.all_null && (ch.validity == nullptr || ((ch.validity[i >> 3] >> (i & 7)) & 1));
    if (!valid) {
      if (c.null_absent) return {nullptr, 0, false};
      return {kNoneText, 4, true};
    }
    int64_t begin, end;
    if (ch.large) {
      const int64_t* off = reinterpret_cast<const int64_t*>(ch.offsets);
      begin = off[i];
      end = off[i + 1];
    } else {
      const int32_t* off = reinterpret_cast<const int32_t*>(ch.offsets);
      begin = off[i];
      end = off[i + 1];
    }
    if (end < begin) return {nullptr, -1, true};
    return {ch.data ? ch.data + begin : kNoneText, end - begin, true};
  }

  int64_t num_rows_, num_columns_;
  std::vector<Column> columns_;
  std::vector<py::object> owners_;
  mutable std::mutex spare_mutex_;
  mutable std::unique_ptr<uint32_t[]> spare_rows_;  // see take_row_buffer
  py::array_t<int64_t> indices_;
  const int64_t* index_data_ = nullptr;
  uint64_t key_mask_ = ~uint64_t{0};
  HugePageArray<uint64_t> keys_;
  std::vector<uint8_t> absent_;
  bool has_absent_ = false;
  bool built_ = false;
};

// The values of the batch being filled: open addressing with linear probing over 8-byte slots, emptied in O(1) per
// batch by bumping a generation. A slot keeps 16 bits of the key as a tag and the cell it holds; a tag match is
// always confirmed on the bytes of the two cells, so no tag or key collision can change a decision.
class BatchSet {
 public:
  explicit BatchSet(const NoDupCore& core) : core_(core) {}

  void reset(int64_t max_entries) {
    uint32_t bits = 4;
    while ((int64_t{1} << bits) < kLoadInverse * max_entries) ++bits;
    slots_.assign(size_t{1} << bits, Slot{0, 0, 0});
    shift_ = 64 - bits;
    gen_ = 0;
  }

  void clear() {
    if (++gen_ == 0) {  // wrapped: clear for real
      for (Slot& s : slots_) s.gen = 0;
      gen_ = 1;
    }
  }

  // True when the set holds the value of cell `ref` (key `key`); else `*free_slot` = where it would go.
  bool find(uint64_t key, uint32_t ref, uint32_t* free_slot) const {
    const uint16_t tag = static_cast<uint16_t>(key >> 48);
    const size_t mask = slots_.size() - 1;
    size_t pos = static_cast<size_t>((key * 0x9E3779B97F4A7C15ULL) >> shift_);
    while (true) {
      const Slot& s = slots_[pos];
      if (s.gen != gen_) {
        *free_slot = static_cast<uint32_t>(pos);
        return false;
      }
      if (s.tag == tag && core_.same_value(s.ref, ref)) return true;
      pos = (pos + 1) & mask;
    }
  }

  bool live(uint32_t slot) const { return slots_[slot].gen == gen_; }
  void put(uint32_t slot, uint64_t key, uint32_t ref) { slots_[slot] = Slot{ref, static_cast<uint16_t>(key >> 48), gen_}; }

 private:
  // At most 1/8 of the slots are live: probes then nearly always end at their first slot (measured: 1/2 -> 1/8 took
  // the 1M-row, batch-128 scan from 23 to 17 ms).
  static constexpr int64_t kLoadInverse = 8;

  struct Slot {
    uint32_t ref;  // row * num_columns + column of the cell stored here (cells < 2^32, checked)
    uint16_t tag;  // top 16 bits of its key
    uint16_t gen;  // live iff gen == gen_
  };

  const NoDupCore& core_;
  std::vector<Slot> slots_;
  uint32_t shift_ = 60;
  uint16_t gen_ = 0;
};

// The rows no scan has reached yet, in shuffled order, with their keys. The keys sit at random rows of a large array:
// each row's are prefetched kAhead rows before the scan needs them. (Gathering blocks of keys into a small buffer
// first, so that the scan reads them sequentially, was measured slower: the scan is not bound by these reads.)
template <typename I>
class FreshRows {
 public:
  FreshRows(const I* perm, int64_t n, const uint64_t* keys, int64_t num_columns)
      : perm_(perm), n_(n), keys_(keys), nc_(num_columns) {}

  bool done() const { return next_ == n_; }

  // The next row and its keys; false when there are no more.
  bool next(int64_t* row, const uint64_t** keys) {
    if (next_ == n_) return false;
    if (next_ + kAhead < n_) {
      const uint64_t* ahead = keys_ + static_cast<int64_t>(perm_[next_ + kAhead]) * nc_;
      __builtin_prefetch(ahead);
      __builtin_prefetch(ahead + nc_ - 1);  // a row's keys may straddle two cache lines
    }
    *row = perm_[next_++];
    *keys = keys_ + *row * nc_;
    return true;
  }

 private:
  static constexpr int64_t kAhead = 16;

  const I* perm_;
  int64_t n_;
  const uint64_t* keys_;
  int64_t nc_;
  int64_t next_ = 0;
};

// One pass of the greedy scan over a shuffled order, with exactly the decisions of the upstream linked-list scan.
// Batch b is flat[offsets[b]:offsets[b+1]]; iterating yields each batch as a list of ints. With `background`, the
// scan runs on its own thread and each batch can be taken as soon as it is complete (the consumer builds the Python
// lists of earlier batches meanwhile); otherwise the whole pass is computed before the constructor returns.
class PassResult {
 public:
  PassResult(const NoDupCore& core, py::object core_owner, py::array perm, int64_t batch_size, bool drop_last,
             bool background)
      : core_(core), core_owner_(std::move(core_owner)), batch_size_(batch_size), drop_last_(drop_last) {
    if (!core.built()) throw std::invalid_argument("build() the core before running a pass");
    if (batch_size <= 0) throw std::invalid_argument("batch_size must be positive");
    n_ = core.num_rows();
    if (perm.ndim() != 1 || perm.shape(0) != n_) throw std::invalid_argument("perm must be 1-D with one entry per row");
    if (perm.dtype().is(py::dtype::of<int32_t>())) {
      perm_ = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(perm);
      wide_ = false;
    } else if (perm.dtype().is(py::dtype::of<int64_t>())) {
      perm_ = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(perm);
      wide_ = true;
    } else {
      throw std::invalid_argument("perm must be int32 or int64");
    }
    perm_data_ = perm_.data();
    // Uninitialized on purpose: pages are only committed as batches are written (and the row buffer is the last
    // pass's, already committed, when there was one).
    flat_ = core.take_row_buffer();
    offsets_.reset(new int64_t[static_cast<size_t>(n_ + 1)]);
    offsets_[0] = 0;
    {
      py::gil_scoped_release release;
      if (wide_) check_perm<int64_t>(); else check_perm<int32_t>();
    }
    if (bad_perm_) throw std::invalid_argument("perm holds an index out of range");
    if (background && n_ > 0) {
      worker_ = std::thread([this] { run_guarded(); });
    } else {
      py::gil_scoped_release release;
      run_guarded();
    }
  }

  ~PassResult() {
    cancel_.store(true);
    if (worker_.joinable()) worker_.join();  // at most one batch away: the producer checks cancel_ per batch
    core_.give_row_buffer(std::move(flat_));
  }

  // The next ready batches, as a list of lists of ints: at least one batch, and more while they add up to fewer than
  // `max_rows` rows; [] once the pass is over. Handing out many batches per call keeps the per-call cost (argument
  // parsing, GIL hand-overs) off the per-batch path, and the lists are built with the raw C API.
  py::list take(int64_t max_rows, bool untracked) {
    if (!wait_for_batch()) return py::list();
    const int64_t ready = ready_.load(std::memory_order_acquire);
    int64_t last = cursor_ + 1;
    while (last < ready && offsets_[last + 1] - offsets_[cursor_] <= max_rows) ++last;
    py::list out(static_cast<size_t>(last - cursor_));
    for (int64_t b = cursor_; b < last; ++b) {
      PyObject* batch = batch_list(b);
      if (untracked) PyObject_GC_UnTrack(batch);
      PyList_SET_ITEM(out.ptr(), b - cursor_, batch);
    }
    cursor_ = last;
    return out;
  }

  py::list next_batch() {
    if (!wait_for_batch()) throw py::stop_iteration();
    return py::reinterpret_steal<py::list>(batch_list(cursor_++));
  }

  int64_t num_batches() {
    wait_for(-1);
    if (error_) std::rethrow_exception(error_);  // done_ is set: the producer no longer writes
    return ready_.load();
  }

 private:
  static constexpr int64_t kHandOverRows = 1 << 16;

  // True when batch cursor_ is complete (waiting for the producer if needed), false when the pass has no more.
  bool wait_for_batch() {
    if (cursor_ < ready_.load(std::memory_order_acquire)) return true;
    // Caught up with the producer: wait for a good stretch of batches, not one, so that hand-overs (GIL release,
    // wake-up) stay rare.
    wait_for(cursor_ + std::max<int64_t>(1, kHandOverRows / batch_size_));
    if (done_.load() && error_) std::rethrow_exception(error_);
    return cursor_ < ready_.load(std::memory_order_acquire);
  }

  // A new reference to batch b as a list of ints.
  PyObject* batch_list(int64_t b) const {
    const int64_t begin = offsets_[b], end = offsets_[b + 1];
    PyObject* out = PyList_New(static_cast<Py_ssize_t>(end - begin));
    if (out == nullptr) throw py::error_already_set();
    PyObject** items = reinterpret_cast<PyListObject*>(out)->ob_item;
    for (int64_t i = begin; i < end; ++i) {
      PyObject* value = PyLong_FromSsize_t(static_cast<Py_ssize_t>(flat_[i]));
      if (value == nullptr) {
        Py_DECREF(out);  // the items not set yet are NULL, which list_dealloc skips
        throw py::error_already_set();
      }
      items[i - begin] = value;
    }
    return out;
  }

  // Waits (without the GIL) until batch `count` is complete, or the pass is done when count < 0.
  void wait_for(int64_t count) {
    auto ready = [&] { return done_.load() || (count >= 0 && ready_.load() >= count); };
    if (ready()) return;
    py::gil_scoped_release release;
    std::unique_lock<std::mutex> lock(mutex_);
    wanted_.store(count >= 0 ? count : std::numeric_limits<int64_t>::max());
    waiting_.store(true);
    cv_.wait(lock, ready);
    waiting_.store(false);
  }

  void publish(int64_t batches, bool done) {
    ready_.store(batches);
    if (done) done_.store(true);
    if (waiting_.load() && (done || batches >= wanted_.load())) {  // wake the consumer only when it can go on
      std::lock_guard<std::mutex> lock(mutex_);
      cv_.notify_all();
    }
  }

  template <typename I>
  void check_perm() {
    const I* perm = static_cast<const I*>(perm_data_);
    for (int64_t p = 0; p < n_; ++p)
      if (perm[p] < 0 || perm[p] >= n_) bad_perm_ = true;
  }

  void run_guarded() {
    try {
      if (wide_) run<int64_t>(); else run<int32_t>();
    } catch (...) {
      error_ = std::current_exception();
    }
    publish(ready_.load(), true);
  }

  // True when row `row` (its keys at `keys`) shares a value with the batch. Otherwise the free slot found for each of
  // its cells is left in slots_, so that row_insert does not probe again.
  bool row_conflicts(const uint64_t* keys, int64_t row) {
    const int64_t base = row * num_columns_;
    for (int64_t col = 0; col < num_columns_; ++col) {
      const int64_t ref = base + col;
      if (has_absent_ && core_.absent(ref)) continue;
      if (batch_set_.find(keys[col], static_cast<uint32_t>(ref), &slots_[col])) return true;
    }
    return false;
  }

  void row_insert(const uint64_t* keys, int64_t row) {
    const int64_t base = row * num_columns_;
    for (int64_t col = 0; col < num_columns_; ++col) {
      const int64_t ref = base + col;
      if (has_absent_ && core_.absent(ref)) continue;
      uint32_t slot = slots_[col];
      if (batch_set_.live(slot)) {  // taken by an earlier cell of this row: probe again
        if (batch_set_.find(keys[col], static_cast<uint32_t>(ref), &slot)) continue;  // the row repeats a value
      }
      batch_set_.put(slot, keys[col], static_cast<uint32_t>(ref));
    }
  }

  // Upstream keeps a linked list over the shuffled positions and rescans it from the head for every batch. The list
  // is always: the deferred positions (skipped by earlier scans, in position order) followed by every position from
  // `fresh` on. So it is kept here as a dense array of the deferred rows, each with a copy of its keys, plus a cursor:
  // rescans read contiguous memory, and removing accepted rows is a stable in-place compaction. Same visiting order,
  // same decisions.
  template <typename I>
  void run() {
    const int64_t n = n_;
    if (n == 0) return;
    const I* perm = static_cast<const I*>(perm_data_);
    num_columns_ = core_.num_columns();
    keys_ = core_.keys_data();
    has_absent_ = core_.has_absent();
    const int64_t nc = num_columns_;
    slots_.assign(static_cast<size_t>(std::max<int64_t>(nc, 1)), 0);
    batch_set_.reset(std::min(batch_size_, n) * std::max<int64_t>(nc, 1));
    std::vector<int64_t> deferred_rows;
    std::vector<uint64_t> deferred_keys;
    FreshRows<I> fresh_rows(perm, n, keys_, nc);
    uint32_t* flat = flat_.get();
    int64_t size = 0, batches = 0;
    size_t begin = 0;  // deferred rows live in [begin, size()): the prefix is dead space left by early stops
    while (deferred_rows.size() > begin || !fresh_rows.done()) {
      if (cancel_.load(std::memory_order_relaxed)) return;
      batch_set_.clear();
      const int64_t start = size;
      bool full = false;
      // 1) rescan the deferred rows [begin, end), compacting away the accepted ones
      const size_t end = deferred_rows.size();
      size_t kept = begin, r = begin;
      for (; r < end; ++r) {
        const int64_t row = deferred_rows[r];
        const uint64_t* keys = deferred_keys.data() + r * nc;
        if (row_conflicts(keys, row)) {
          if (kept != r) {
            deferred_rows[kept] = row;
            std::memmove(deferred_keys.data() + kept * nc, keys, static_cast<size_t>(nc) * sizeof(uint64_t));
          }
          ++kept;
          continue;
        }
        flat[size++] = static_cast<uint32_t>(row);
        if (size - start == batch_size_) {
          full = true;
          ++r;
          break;
        }
        row_insert(keys, row);
      }
      if (r == end) {
        deferred_rows.resize(kept);
        deferred_keys.resize(kept * nc);
      } else if (kept != r) {
        // The scan stopped early: shift the rows kept so far right, next to the rows it did not reach (this costs no
        // more than the scan did, unlike closing the gap on the tail side).
        const size_t moved = kept - begin, new_begin = r - moved;
        std::memmove(deferred_rows.data() + new_begin, deferred_rows.data() + begin, moved * sizeof(int64_t));
        std::memmove(deferred_keys.data() + new_begin * nc, deferred_keys.data() + begin * nc,
                     moved * static_cast<size_t>(nc) * sizeof(uint64_t));
        begin = new_begin;
      }
      if (begin > 4096 && begin * 2 > deferred_rows.size()) {  // drop the dead prefix now and then
        const size_t live = deferred_rows.size() - begin;
        std::memmove(deferred_rows.data(), deferred_rows.data() + begin, live * sizeof(int64_t));
        std::memmove(deferred_keys.data(), deferred_keys.data() + begin * nc, live * nc * sizeof(uint64_t));
        deferred_rows.resize(live);
        deferred_keys.resize(live * nc);
        begin = 0;
      }
      // 2) go on with the rows no scan has reached yet
      int64_t row;
      const uint64_t* keys;
      while (!full && fresh_rows.next(&row, &keys)) {
        if (row_conflicts(keys, row)) {  // defer: it keeps its place, after the older deferred rows
          deferred_rows.push_back(row);
          deferred_keys.insert(deferred_keys.end(), keys, keys + nc);
          continue;
        }
        flat[size++] = static_cast<uint32_t>(row);
        if (size - start == batch_size_) {
          full = true;
          break;
        }
        row_insert(keys, row);
      }
      if (full || !drop_last_) {
        offsets_[++batches] = size;
        publish(batches, false);
      } else {
        size = start;  // a partial batch is consumed and dropped
      }
    }
  }

  const NoDupCore& core_;
  py::object core_owner_;  // keeps the core (and the Arrow buffers it reads) alive
  py::array perm_;
  const void* perm_data_ = nullptr;
  bool wide_ = false;
  bool bad_perm_ = false;
  int64_t n_ = 0, batch_size_ = 0;
  bool drop_last_ = false;
  std::unique_ptr<uint32_t[]> flat_;  // rows < 2^32 (the core has fewer than 2^32 cells)
  std::unique_ptr<int64_t[]> offsets_;
  int64_t cursor_ = 0;
  // producer state
  int64_t num_columns_ = 0;
  const uint64_t* keys_ = nullptr;
  bool has_absent_ = false;
  BatchSet batch_set_{core_};
  std::vector<uint32_t> slots_;
  // hand-over between producer and consumer
  std::atomic<int64_t> ready_{0}, wanted_{0};
  std::atomic<bool> done_{false}, cancel_{false}, waiting_{false};
  std::mutex mutex_;
  std::condition_variable cv_;
  std::exception_ptr error_;
  std::thread worker_;
};

}  // namespace

void bind_sampler(py::module_& m) {
  py::class_<PassResult>(m, "NoDupPass", "The batches of one pass; iterate for lists of row indices.")
      .def("__len__", &PassResult::num_batches)
      .def("__iter__", [](PassResult& self) -> PassResult& { return self; }, py::return_value_policy::reference_internal)
      .def("__next__", &PassResult::next_batch)
      .def("take", &PassResult::take, py::arg("max_rows"), py::arg("untracked") = false,
           "The next ready batches (at least one, more while within max_rows rows in all) as lists of ints; [] at "
           "the end. With untracked, the batch lists are left out of the cyclic garbage collector (they hold ints "
           "only, so they cannot be part of a reference cycle unless a caller puts a container into one).");
  py::class_<NoDupCore>(m, "NoDupSamplerCore",
                        "Duplicate-free batch scan over Arrow-layout string cells (see st_fast.sampler).")
      .def(py::init<int64_t, int64_t, int>(), py::arg("num_rows"), py::arg("num_columns"), py::arg("hash_bits") = 64)
      .def("set_column", &NoDupCore::set_column, py::arg("column"), py::arg("mapped"), py::arg("null_absent"))
      .def("add_chunk", &NoDupCore::add_chunk, py::arg("column"), py::arg("validity"), py::arg("offsets"),
           py::arg("data"), py::arg("offset"), py::arg("length"), py::arg("large"), py::arg("all_null"),
           py::arg("owner"),
           "Append an Arrow string/binary chunk (raw buffer addresses; `owner` is kept alive with the core).")
      .def("set_indices", &NoDupCore::set_indices, py::arg("indices"))
      .def("build", &NoDupCore::build, py::arg("num_threads") = 0, py::call_guard<py::gil_scoped_release>())
      .def(
          "one_pass",
          [](py::object self, py::array perm, int64_t batch_size, bool drop_last, bool background) {
            const NoDupCore& core = self.cast<const NoDupCore&>();
            return std::make_unique<PassResult>(core, self, perm, batch_size, drop_last, background);
          },
          py::arg("perm"), py::arg("batch_size"), py::arg("drop_last"), py::arg("background") = false,
          "One pass over the shuffled order `perm` (int32/int64 permutation of the rows): a NoDupPass.")
      .def("keys", &NoDupCore::keys)
      .def("state_bytes", &NoDupCore::state_bytes)
      .def_property_readonly("num_rows", &NoDupCore::num_rows)
      .def_property_readonly("num_columns", &NoDupCore::num_columns);
}

}  // namespace st_fast
