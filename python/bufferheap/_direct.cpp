// bufferheap's direct front inside PyTorch: a CUDAAllocator that calls the C ABI itself.
//
// PyTorch's CUDAPluggableAllocator keeps a map of every live pointer under one mutex, only so
// that it can hand size, device and stream back to the plug-in's free. bufferheap finds all
// three from the address, so this subclass drops that bookkeeping: allocate and raw_alloc call
// bufferheap_try_malloc and raise PyTorch's own errors (torch.OutOfMemoryError when the device
// is full), and every free goes straight to bufferheap_free. PyTorch's statistics calls
// (torch.cuda.memory_stats(), memory_allocated(), max_memory_reserved(), reset_peak_memory_stats(),
// ...) read and reset bufferheap's counters, which no pluggable allocator offers, cuDNN's
// benchmark mode learns how large a workspace it may take (cacheInfo), and PyTorch's memory
// snapshots (torch.cuda.memory._record_memory_history(), _snapshot(), _dump_snapshot(), and so
// its memory viewer) show bufferheap's segments, blocks and history, with the stacks PyTorch
// records; out-of-memory observers are called before the error is raised. Everything else (init,
// empty_cache, the memory fraction, record_stream, base allocations, CUDA graph pools) is the
// pluggable allocator's, with the same hooks the pluggable path sets.
//
// Built by bufferheap.torch.install(direct=True) through torch.utils.cpp_extension against the
// running PyTorch. The C ABI's functions arrive as addresses from the package's ctypes handle,
// so this library links against PyTorch only. Nothing here throws across its C entry point.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <deque>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

// The C ABI (crates/ffi/include/bufferheap.h).
using TryMallocFn = int (*)(size_t size, int device, void* stream, void** out);
using FreeFn = void (*)(void* ptr, ptrdiff_t size, int device, void* stream);
using LastErrorFn = const char* (*)();
using StatsValuesFn = int (*)(int device, const char* const* keys, size_t n, int64_t* out);
using DeviceCallFn = int (*)(int device);
using LargestAvailableFn = int (*)(int device, size_t* out);

// The snapshot's records, as declared in bufferheap.h (python/tests/test_direct.py checks that
// the two declarations agree).
struct bufferheap_block {
  uint64_t address;
  uint64_t size;
  uint64_t requested_size;
  int32_t state;
};
struct bufferheap_segment {
  int32_t device;
  int32_t is_large;
  int32_t is_expandable;
  uint64_t address;
  uint64_t total_size;
  uint64_t allocated_size;
  uint64_t active_size;
  uint64_t requested_size;
  uint64_t stream;
  uint64_t first_block;
  uint64_t block_count;
};
struct bufferheap_trace_entry {
  int32_t action;
  int32_t device;
  uint64_t addr;
  uint64_t size;
  uint64_t stream;
  int64_t time_us;
};
using MemorySnapshotFn = int (*)(int device, int include_traces, bufferheap_segment* segments,
                                 size_t segment_capacity, bufferheap_block* blocks,
                                 size_t block_capacity, bufferheap_trace_entry* trace,
                                 size_t trace_capacity, size_t* counts);
using RecordHistoryFn = int (*)(size_t max_entries, int clear);
using HistoryLimitFn = int (*)(size_t* out);

TryMallocFn try_malloc_fn = nullptr;
FreeFn free_fn = nullptr;
LastErrorFn last_error_fn = nullptr;
StatsValuesFn stats_values_fn = nullptr;
DeviceCallFn reset_peak_fn = nullptr;
DeviceCallFn reset_accumulated_fn = nullptr;
LargestAvailableFn largest_available_fn = nullptr;
MemorySnapshotFn memory_snapshot_fn = nullptr;
RecordHistoryFn record_history_fn = nullptr;
HistoryLimitFn history_limit_fn = nullptr;

constexpr int kAllocated = 0;
constexpr int kOutOfMemory = 1;
constexpr int kTraceAlloc = 0;
constexpr int kTraceFreeRequested = 1;
constexpr int kTraceFreeCompleted = 2;

namespace cca = c10::cuda::CUDACachingAllocator;
using Context = std::shared_ptr<c10::GatheredContext>;

// The stacks PyTorch's recorder gathers (torch.cuda.memory._record_memory_history(stacks=...))
// while bufferheap records its history: kept here, beside the history, and matched to its
// entries when a snapshot is built. While a recorder is set, each allocation and free calls the
// C ABI and files its stack under this book's lock, and a snapshot reads bufferheap and copies
// the book under the same lock: the stacks of one address are then exactly the newest of that
// address's history entries, in their order. Stacks are gathered before the lock is taken (the
// recorder may need the GIL, which a thread taking a snapshot holds). Off, it costs one relaxed
// load per call.
class ContextBook {
 public:
  void start(cca::CreateContextFn recorder, cca::RecordContext when, size_t max, bool clear) {
    std::lock_guard<std::mutex> guard(mutex_);
    // The book must stay the newest part of bufferheap's history: once trace entries get no
    // stacks (STATE, or no recorder), the stacks kept would be matched to later entries.
    // With no recorder at all, blocks' stacks are not kept up to date either.
    if (clear || when < cca::RecordContext::ALLOC || recorder == nullptr) {
      events_.clear();
    }
    if (when == cca::RecordContext::NEVER || recorder == nullptr) {
      live_.clear();
    }
    recorder_ = when == cca::RecordContext::NEVER ? nullptr : recorder;
    when_ = when;
    max_ = max;
    trim();
    on_.store(recorder_ != nullptr, std::memory_order_relaxed);
  }

  void stop() {
    std::lock_guard<std::mutex> guard(mutex_);
    on_.store(false, std::memory_order_relaxed);
    recorder_ = nullptr;
    events_.clear();
    live_.clear();
  }

  bool on() const {
    return on_.load(std::memory_order_relaxed);
  }

  // Allocates through `call` (bufferheap_try_malloc's answer, the pointer in *ptr) and files the
  // caller's stack under the pointer.
  template <typename Call>
  int record_allocation(Call&& call, void** ptr) {
    auto [recorder, when] = settings();
    Context context = recorder != nullptr ? recorder() : nullptr;
    std::lock_guard<std::mutex> guard(mutex_);
    int answer = call();
    // A request of 0 bytes gets no buffer and leaves no entry in bufferheap's history: filing it
    // would push out the stacks of real entries.
    if (answer != kAllocated || !on() || *ptr == nullptr) {
      return answer;
    }
    live_[address(*ptr)] = context;
    if (when >= cca::RecordContext::ALLOC) {
      push(kTraceAlloc, address(*ptr), context);
    }
    return answer;
  }

  // Files the free's stack, then frees through `call`. As in PyTorch, a free's entries carry the
  // free's own stack when every stack is recorded (ALL), else the allocation's.
  template <typename Call>
  void record_free(void* ptr, Call&& call) {
    auto [recorder, when] = settings();
    Context context = recorder != nullptr && when == cca::RecordContext::ALL ? recorder() : nullptr;
    std::lock_guard<std::mutex> guard(mutex_);
    auto live = live_.find(address(ptr));
    if (live != live_.end()) {
      context = context ? context : live->second;
      live_.erase(live);
    }
    if (on() && when >= cca::RecordContext::ALLOC) {
      push(kTraceFreeRequested, address(ptr), context);
    }
    call();
  }

  // The stacks of the buffers in use, by address, and of each (action, address) in order.
  struct Copy {
    std::unordered_map<uint64_t, Context> live;
    std::map<std::pair<int, uint64_t>, std::vector<Context>> events;
  };

  // Runs `read` (the reading of bufferheap's state) and copies the book, with no allocation or
  // free in between.
  template <typename Read>
  Copy read_with(Read&& read) {
    std::lock_guard<std::mutex> guard(mutex_);
    read();
    Copy c;
    c.live = live_;
    for (const auto& e : events_) {
      c.events[{e.action, e.addr}].push_back(e.context);
    }
    return c;
  }

 private:
  struct Event {
    int action;
    uint64_t addr;
    Context context;
  };

  static uint64_t address(void* ptr) {
    return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(ptr));
  }

  std::pair<cca::CreateContextFn, cca::RecordContext> settings() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {recorder_, when_};
  }

  void push(int action, uint64_t addr, Context context) {
    events_.push_back({action, addr, std::move(context)});
    trim();
  }

  void trim() {
    while (events_.size() > max_) {
      events_.pop_front();
    }
  }

  std::atomic<bool> on_{false};
  std::mutex mutex_;
  cca::CreateContextFn recorder_ = nullptr;
  cca::RecordContext when_ = cca::RecordContext::NEVER;
  size_t max_ = 0;
  std::unordered_map<uint64_t, Context> live_;
  std::deque<Event> events_;
};

// Never destroyed: PyTorch frees tensors held by its own statics while the process exits,
// possibly after this library's statics are gone, and every free reads the book.
ContextBook& contexts() {
  static ContextBook* book = new ContextBook();
  return *book;
}

void free_buffer(void* ptr) {
  // Size 0 and device -1: bufferheap knows both from the address.
  auto call = [ptr] { free_fn(ptr, 0, -1, nullptr); };
  if (contexts().on()) {
    contexts().record_free(ptr, call);
  } else {
    call();
  }
}

// Callbacks PyTorch registers for an out-of-memory error (torch._C._cuda_attach_out_of_memory_observer,
// the usual way to dump a snapshot when a program runs out of memory). Called before the error
// is raised, with the request's size and the device's memory as the driver reports it.
class OomObservers {
 public:
  void attach(cca::OutOfMemoryObserver observer) {
    std::lock_guard<std::mutex> guard(mutex_);
    observers_.push_back(std::move(observer));
  }

  void notify(c10::DeviceIndex device, size_t size) {
    std::vector<cca::OutOfMemoryObserver> observers;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      observers = observers_;
    }
    if (observers.empty()) {
      return;
    }
    size_t free = 0;
    size_t total = 0;
    {
      c10::cuda::CUDAGuard on_device(device);
      if (cudaMemGetInfo(&free, &total) != cudaSuccess) {
        (void)cudaGetLastError();  // the figures stay 0; the error is not this call's to keep
      }
    }
    for (const auto& observer : observers) {
      observer(device, size, total, free);
    }
  }

 private:
  std::mutex mutex_;
  std::vector<cca::OutOfMemoryObserver> observers_;
};

// Never destroyed, like the context book: an allocation may fail while the process exits.
OomObservers& oom_observers() {
  static OomObservers* observers = new OomObservers();
  return *observers;
}

void* take(size_t size, c10::DeviceIndex device, cudaStream_t stream) {
  void* ptr = nullptr;
  auto call = [&] { return try_malloc_fn(size, device, stream, &ptr); };
  int answer = contexts().on() ? contexts().record_allocation(call, &ptr) : call();
  if (answer == kAllocated) {
    return ptr;
  }
  std::string reason = last_error_fn();
  if (answer == kOutOfMemory) {
    oom_observers().notify(device, size);
    C10_THROW_ERROR(OutOfMemoryError, reason);
  }
  C10_THROW_ERROR(Error, reason);
}

using c10::CachingDeviceAllocator::DeviceStats;
using c10::CachingDeviceAllocator::StatArray;

// DeviceStats' counters in the order their keys are listed (memory_stats() names).
constexpr std::pair<const char*, StatArray DeviceStats::*> kStatArrays[] = {
    {"allocation", &DeviceStats::allocation},
    {"segment", &DeviceStats::segment},
    {"active", &DeviceStats::active},
    {"inactive_split", &DeviceStats::inactive_split},
    {"allocated_bytes", &DeviceStats::allocated_bytes},
    {"reserved_bytes", &DeviceStats::reserved_bytes},
    {"active_bytes", &DeviceStats::active_bytes},
    {"inactive_split_bytes", &DeviceStats::inactive_split_bytes},
    {"requested_bytes", &DeviceStats::requested_bytes},
};
constexpr std::pair<const char*, int64_t DeviceStats::*> kStatCounts[] = {
    {"num_alloc_retries", &DeviceStats::num_alloc_retries},
    {"num_ooms", &DeviceStats::num_ooms},
    {"num_sync_all_streams", &DeviceStats::num_sync_all_streams},
    {"num_device_alloc", &DeviceStats::num_device_alloc},
    {"num_device_free", &DeviceStats::num_device_free},
};
// A StatArray's entries: the aggregate, then the small and the large pool.
constexpr const char* kPools[] = {"all", "small_pool", "large_pool"};
static_assert(std::tuple_size<StatArray>::value == std::size(kPools), "StatArray has one Stat per pool");

// Every key, in the order DeviceStats is filled.
const std::vector<std::string>& stat_keys() {
  static const std::vector<std::string> keys = [] {
    std::vector<std::string> k;
    for (const auto& array : kStatArrays) {
      for (const char* pool : kPools) {
        for (const char* field : {"current", "peak", "allocated", "freed"}) {
          k.push_back(std::string(array.first) + "." + pool + "." + field);
        }
      }
    }
    for (const auto& count : kStatCounts) {
      k.emplace_back(count.first);
    }
    return k;
  }();
  return keys;
}

DeviceStats read_stats(c10::DeviceIndex device) {
  const auto& keys = stat_keys();
  std::vector<const char*> names;
  names.reserve(keys.size());
  for (const auto& key : keys) {
    names.push_back(key.c_str());
  }
  std::vector<int64_t> values(keys.size(), 0);
  if (stats_values_fn(device, names.data(), names.size(), values.data()) < 0) {
    C10_THROW_ERROR(Error, last_error_fn());
  }
  DeviceStats stats;
  size_t i = 0;
  for (const auto& array : kStatArrays) {
    for (auto& stat : stats.*array.second) {
      stat.current = values[i++];
      stat.peak = values[i++];
      stat.allocated = values[i++];
      stat.freed = values[i++];
    }
  }
  for (const auto& count : kStatCounts) {
    stats.*count.second = values[i++];
  }
  return stats;
}

void call_on_device(DeviceCallFn fn, c10::DeviceIndex device) {
  if (fn(device) != 0) {
    C10_THROW_ERROR(Error, last_error_fn());
  }
}

constexpr int kDidNotFit = 1;
constexpr int kBlockInactive = 0;
constexpr int kBlockActiveAllocated = 1;

// One reading of every device's segments (and history), grown until it fits.
struct FlatSnapshot {
  std::vector<bufferheap_segment> segments;
  std::vector<bufferheap_block> blocks;
  std::vector<bufferheap_trace_entry> trace;
};

FlatSnapshot read_flat_snapshot(bool include_traces) {
  FlatSnapshot flat;
  size_t counts[3] = {0, 0, 0};
  // Each try reads anew; the state may grow between two tries, so ask for some room to spare.
  for (int attempt = 0; attempt < 16; ++attempt) {
    int answer = memory_snapshot_fn(
        -1, include_traces ? 1 : 0, flat.segments.data(), flat.segments.size(),
        flat.blocks.data(), flat.blocks.size(), flat.trace.data(), flat.trace.size(), counts);
    if (answer == 0) {
      flat.segments.resize(counts[0]);
      flat.blocks.resize(counts[1]);
      flat.trace.resize(counts[2]);
      return flat;
    }
    if (answer != kDidNotFit) {
      C10_THROW_ERROR(Error, last_error_fn());
    }
    auto room = [](size_t n) { return n + n / 8 + 16; };
    flat.segments.resize(room(counts[0]));
    flat.blocks.resize(room(counts[1]));
    flat.trace.resize(room(counts[2]));
  }
  C10_THROW_ERROR(Error, "bufferheap: the memory snapshot kept outgrowing its arrays; try again");
}

c10::DeviceIndex current_device() {
  c10::DeviceIndex device = -1;
  C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
  return device;
}

// Hands each history entry its stack: the k-th alloc (or free) entry of an address gets the
// k-th stack kept for it, counted from the newest, since either side may have dropped its oldest
// (bufferheap's history counts page maps too, so it reaches back less far). A completed free
// gets the stack of the free that requested it.
class TraceStacks {
 public:
  TraceStacks(const std::vector<bufferheap_trace_entry>& trace,
              std::map<std::pair<int, uint64_t>, std::vector<Context>> kept)
      : kept_(std::move(kept)) {
    for (const auto& e : trace) {
      if (e.action == kTraceAlloc || e.action == kTraceFreeRequested) {
        ++in_trace_[{e.action, e.addr}];
      }
    }
  }

  Context next(const bufferheap_trace_entry& e) {
    if (e.action == kTraceFreeCompleted) {
      auto freed = last_free_.find(e.addr);
      return freed == last_free_.end() ? nullptr : freed->second;
    }
    if (e.action != kTraceAlloc && e.action != kTraceFreeRequested) {
      return nullptr;
    }
    std::pair<int, uint64_t> key{e.action, e.addr};
    size_t seen = seen_[key]++;
    size_t entries = in_trace_[key];
    Context context;
    auto kept = kept_.find(key);
    if (kept != kept_.end() && seen + kept->second.size() >= entries) {
      context = kept->second[seen + kept->second.size() - entries];
    }
    if (e.action == kTraceFreeRequested) {
      last_free_[e.addr] = context;
    }
    return context;
  }

 private:
  std::map<std::pair<int, uint64_t>, std::vector<Context>> kept_;
  std::map<std::pair<int, uint64_t>, size_t> in_trace_;
  std::map<std::pair<int, uint64_t>, size_t> seen_;
  std::unordered_map<uint64_t, Context> last_free_;
};

using Pluggable = torch::cuda::CUDAPluggableAllocator::CUDAPluggableAllocator;

struct DirectAllocator final : Pluggable {
  // The base keeps these two for its own malloc, which nothing calls on this class.
  DirectAllocator()
      : Pluggable(
            [](size_t size, int device, cudaStream_t stream) {
              return take(size, static_cast<c10::DeviceIndex>(device), stream);
            },
            [](void* ptr, size_t, int, cudaStream_t) { free_buffer(ptr); }) {}

  c10::DataPtr allocate(size_t size) override {
    c10::DeviceIndex device = current_device();
    void* ptr = take(size, device, c10::cuda::getCurrentCUDAStream(device));
    return {ptr, ptr, &free_buffer, c10::Device(c10::DeviceType::CUDA, device)};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &free_buffer;
  }

  void* raw_alloc(size_t size) override {
    c10::DeviceIndex device = current_device();
    return take(size, device, c10::cuda::getCurrentCUDAStream(device));
  }

  void* raw_alloc_with_stream(size_t size, cudaStream_t stream) override {
    return take(size, current_device(), stream);
  }

  void raw_delete(void* ptr) override {
    free_buffer(ptr);
  }

  DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    return read_stats(device);
  }

  void resetPeakStats(c10::DeviceIndex device) override {
    call_on_device(reset_peak_fn, device);
  }

  void resetAccumulatedStats(c10::DeviceIndex device) override {
    call_on_device(reset_accumulated_fn, device);
  }

  // cuDNN's benchmark (torch.backends.cudnn.benchmark) sizes its workspaces by this; the
  // pluggable wrapper raises here, which fails every convolution in benchmark mode.
  void cacheInfo(c10::DeviceIndex device, size_t* largestBlock) override {
    size_t largest = 0;
    if (largest_available_fn(device, &largest) != 0) {
      C10_THROW_ERROR(Error, last_error_fn());
    }
    *largestBlock = largest;
  }

  // torch.cuda.memory._snapshot() and memory_snapshot(): bufferheap's segments and history in
  // PyTorch's own structures. A block's address is rebuilt by PyTorch from the segment's
  // address and the sizes before it, which bufferheap_memory_snapshot guarantees.
  cca::SnapshotInfo snapshot(c10::cuda::MempoolId_t mempool, bool include_traces) override {
    TORCH_CHECK(
        mempool.first == 0 && mempool.second == 0,
        "bufferheap keeps no separate memory pools (",
        mempool.first,
        ", ",
        mempool.second,
        "): take the snapshot of the whole allocator, without a mempool id");
    FlatSnapshot flat;
    ContextBook::Copy stacks =
        contexts().read_with([&] { flat = read_flat_snapshot(include_traces); });
    cca::SnapshotInfo info;
    bool expandable = false;
    for (const auto& seg : flat.segments) {
      cca::SegmentInfo s;
      s.device = static_cast<c10::DeviceIndex>(seg.device);
      s.address = seg.address;
      s.total_size = seg.total_size;
      s.requested_size = seg.requested_size;
      s.allocated_size = seg.allocated_size;
      s.active_size = seg.active_size;
      s.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(seg.stream));
      s.is_large = seg.is_large != 0;
      s.is_expandable = seg.is_expandable != 0;
      expandable = expandable || s.is_expandable;
      for (uint64_t i = seg.first_block; i < seg.first_block + seg.block_count && i < flat.blocks.size(); ++i) {
        const auto& blk = flat.blocks[i];
        cca::BlockInfo b;
        b.size = blk.size;
        b.requested_size = blk.requested_size;
        b.allocated = blk.state == kBlockActiveAllocated;
        b.active = blk.state != kBlockInactive;
        if (b.allocated) {
          auto live = stacks.live.find(blk.address);
          if (live != stacks.live.end()) {
            b.context_when_allocated = live->second;
          }
        }
        s.blocks.push_back(std::move(b));
      }
      info.segments.push_back(std::move(s));
    }
    // One list per device, as PyTorch's own allocator answers.
    info.device_traces.resize(static_cast<size_t>(std::max<int>(c10::cuda::device_count(), 0)));
    std::vector<int> skipped = skipped_actions();
    TraceStacks trace_stacks(flat.trace, std::move(stacks.events));
    for (const auto& e : flat.trace) {
      Context context = trace_stacks.next(e);
      if (e.device < 0 || static_cast<size_t>(e.device) >= info.device_traces.size() ||
          std::find(skipped.begin(), skipped.end(), e.action) != skipped.end()) {
        continue;
      }
      cca::TraceEntry entry(
          static_cast<cca::TraceEntry::Action>(e.action),
          static_cast<c10::DeviceIndex>(e.device),
          e.addr,
          e.size,
          reinterpret_cast<void*>(static_cast<uintptr_t>(e.stream)),
          {0, 0},
          0,
          std::move(context));
      // Snapshots carry wall-clock microseconds here, as PyTorch's own allocator converts them.
      entry.time_.t_ = e.time_us;
      info.device_traces[e.device].push_back(std::move(entry));
    }
    info.config_metadata.garbage_collection_threshold = 0.0;
    info.config_metadata.max_split_size = SIZE_MAX;
    info.config_metadata.pinned_num_register_threads = 0;
    info.config_metadata.expandable_segments = expandable;
    info.config_metadata.release_lock_on_malloc = false;
    info.config_metadata.pinned_use_host_register = false;
    info.config_metadata.graph_capture_record_stream_reuse = false;
    info.config_metadata.last_allocator_settings = "bufferheap";
    return info;
  }

  // torch.cuda.memory._record_memory_history(): bufferheap records the same events on every
  // device, and the stacks PyTorch's recorder gathers are kept here (see ContextBook); a max
  // of 0 entries still records one, as recording is on.
  void recordHistory(
      bool enabled,
      cca::CreateContextFn context_recorder,
      size_t alloc_trace_max_entries,
      cca::RecordContext when,
      bool clearHistory,
      const std::vector<std::string>& skip_actions) override {
    std::vector<int> skipped;
    for (const auto& action : skip_actions) {
      skipped.push_back(static_cast<int>(c10::CachingDeviceAllocator::parseTraceEntryAction(action)));
    }
    size_t limit = enabled ? std::max<size_t>(alloc_trace_max_entries, 1) : 0;
    if (record_history_fn(limit, clearHistory ? 1 : 0) != 0) {
      C10_THROW_ERROR(Error, last_error_fn());
    }
    if (enabled) {
      contexts().start(context_recorder, when, limit, clearHistory);
    } else {
      contexts().stop();
    }
    std::lock_guard<std::mutex> guard(skip_mutex_);
    skip_actions_ = std::move(skipped);
  }

  void attachOutOfMemoryObserver(cca::OutOfMemoryObserver observer) override {
    oom_observers().attach(std::move(observer));
  }

  bool isHistoryEnabled() override {
    size_t limit = 0;
    if (history_limit_fn(&limit) != 0) {
      C10_THROW_ERROR(Error, last_error_fn());
    }
    return limit > 0;
  }

  // torch.cuda.set_per_process_memory_fraction() reaches bufferheap through the base's hook;
  // the fraction is kept here for get_per_process_memory_fraction() (1.0 until one is set).
  void setMemoryFraction(double fraction, c10::DeviceIndex device) override {
    Pluggable::setMemoryFraction(fraction, device);
    std::lock_guard<std::mutex> guard(fraction_mutex_);
    fractions_[device] = fraction;
  }

  double getMemoryFraction(c10::DeviceIndex device) override {
    std::lock_guard<std::mutex> guard(fraction_mutex_);
    auto it = fractions_.find(device);
    return it == fractions_.end() ? 1.0 : it->second;
  }

  // CUDA graphs and torch.cuda.MemPool allocate into private pools that nothing else may use
  // while a graph can replay. bufferheap keeps no such pools: a graph's memory would be handed
  // to other tensors and overwritten by each replay. Refused, so that capture fails loudly.
  void beginAllocateToPool(
      c10::DeviceIndex device,
      c10::cuda::MempoolId_t mempool_id,
      std::function<bool(cudaStream_t)> /*filter*/) override {
    // A std::runtime_error (RuntimeError in Python): a c10::Error thrown here crashed inside
    // PyTorch 2.11's capture_begin on the H100, where this one is reported cleanly.
    throw std::runtime_error(
        "bufferheap does not support CUDA graph capture or torch.cuda.MemPool (pool (" +
        std::to_string(mempool_id.first) + ", " + std::to_string(mempool_id.second) +
        ") on device " + std::to_string(static_cast<int>(device)) +
        "): it keeps no private memory pools, so a captured graph's memory would be reused by "
        "other tensors. Capture graphs in a process that does not install bufferheap.");
  }

  // Nothing was ever allocated to a pool (see beginAllocateToPool).
  void endAllocateToPool(c10::DeviceIndex, c10::cuda::MempoolId_t) override {}
  void releasePool(c10::DeviceIndex, c10::cuda::MempoolId_t) override {}

 private:
  std::mutex fraction_mutex_;
  std::unordered_map<c10::DeviceIndex, double> fractions_;

  std::vector<int> skipped_actions() {
    std::lock_guard<std::mutex> guard(skip_mutex_);
    return skip_actions_;
  }

  std::mutex skip_mutex_;
  // Actions left out of snapshots' traces (recordHistory's skip_actions), PyTorch's numbers.
  std::vector<int> skip_actions_;
};

template <typename Fn>
Fn as_function(uintptr_t address) {
  return reinterpret_cast<Fn>(address);
}

void write_error(char* out, size_t len, const char* text) {
  if (out != nullptr && len > 0) {
    std::snprintf(out, len, "%s", text);
  }
}

}  // namespace

// Makes a DirectAllocator PyTorch's CUDA allocator. The first ten addresses are required; a
// hook whose address is 0 is left unset. 0 on success; -1 with the reason in `error`
// (PyTorch's own text, e.g. when CUDA already allocated and the allocator cannot be swapped).
extern "C" __attribute__((visibility("default"))) int bufferheap_direct_install(
    uintptr_t try_malloc,
    uintptr_t free,
    uintptr_t last_error,
    uintptr_t stats_values,
    uintptr_t reset_peak,
    uintptr_t reset_accumulated,
    uintptr_t largest_available,
    uintptr_t memory_snapshot,
    uintptr_t record_history,
    uintptr_t history_limit,
    uintptr_t init,
    uintptr_t reset,
    uintptr_t memory_fraction,
    uintptr_t record_stream,
    uintptr_t base_alloc,
    char* error,
    size_t error_len) {
  if (try_malloc == 0 || free == 0 || last_error == 0 || stats_values == 0 || reset_peak == 0 ||
      reset_accumulated == 0 || largest_available == 0 || memory_snapshot == 0 ||
      record_history == 0 || history_limit == 0) {
    write_error(error, error_len, "a required bufferheap function has no address");
    return -1;
  }
  try {
    try_malloc_fn = as_function<TryMallocFn>(try_malloc);
    free_fn = as_function<FreeFn>(free);
    last_error_fn = as_function<LastErrorFn>(last_error);
    stats_values_fn = as_function<StatsValuesFn>(stats_values);
    reset_peak_fn = as_function<DeviceCallFn>(reset_peak);
    reset_accumulated_fn = as_function<DeviceCallFn>(reset_accumulated);
    largest_available_fn = as_function<LargestAvailableFn>(largest_available);
    memory_snapshot_fn = as_function<MemorySnapshotFn>(memory_snapshot);
    record_history_fn = as_function<RecordHistoryFn>(record_history);
    history_limit_fn = as_function<HistoryLimitFn>(history_limit);
    auto allocator = std::make_shared<DirectAllocator>();
    if (init != 0) {
      allocator->set_init_fn(as_function<void (*)(int)>(init));
    }
    if (reset != 0) {
      allocator->set_reset_fn(as_function<void (*)()>(reset));
    }
    if (memory_fraction != 0) {
      allocator->set_memory_fraction_fn(as_function<void (*)(double, int)>(memory_fraction));
    }
    if (record_stream != 0) {
      allocator->set_record_stream_fn(as_function<void (*)(void*, cudaStream_t)>(record_stream));
    }
    if (base_alloc != 0) {
      allocator->set_base_alloc_fn(as_function<void* (*)(void*, size_t*)>(base_alloc));
    }
    // Checks that the current allocator has not started, then keeps `allocator` alive.
    torch::cuda::CUDAPluggableAllocator::changeCurrentAllocator(allocator);
    return 0;
  } catch (const c10::Error& e) {
    write_error(error, error_len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_error(error, error_len, e.what());
  } catch (...) {
    write_error(error, error_len, "unknown C++ exception");
  }
  return -1;
}
