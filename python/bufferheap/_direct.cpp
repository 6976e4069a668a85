// bufferheap's direct front inside PyTorch: a CUDAAllocator that calls the C ABI itself.
//
// PyTorch's CUDAPluggableAllocator keeps a map of every live pointer under one mutex, only so
// that it can hand size, device and stream back to the plug-in's free. bufferheap finds all
// three from the address, so this subclass drops that bookkeeping: allocate and raw_alloc call
// bufferheap_try_malloc and raise PyTorch's own errors (torch.OutOfMemoryError when the device
// is full), and every free goes straight to bufferheap_free. PyTorch's statistics calls
// (torch.cuda.memory_stats(), memory_allocated(), max_memory_reserved(), reset_peak_memory_stats(),
// ...) read and reset bufferheap's counters, which no pluggable allocator offers, and cuDNN's
// benchmark mode learns how large a workspace it may take (cacheInfo). Everything else (init,
// empty_cache, the memory fraction, record_stream, base allocations, CUDA graph pools) is the
// pluggable allocator's, with the same hooks the pluggable path sets.
//
// Built by bufferheap.torch.install(direct=True) through torch.utils.cpp_extension against the
// running PyTorch. The C ABI's functions arrive as addresses from the package's ctypes handle,
// so this library links against PyTorch only. Nothing here throws across its C entry point.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <iterator>
#include <memory>
#include <string>
#include <tuple>
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

TryMallocFn try_malloc_fn = nullptr;
FreeFn free_fn = nullptr;
LastErrorFn last_error_fn = nullptr;
StatsValuesFn stats_values_fn = nullptr;
DeviceCallFn reset_peak_fn = nullptr;
DeviceCallFn reset_accumulated_fn = nullptr;
LargestAvailableFn largest_available_fn = nullptr;

constexpr int kAllocated = 0;
constexpr int kOutOfMemory = 1;

void free_buffer(void* ptr) {
  // Size 0 and device -1: bufferheap knows both from the address.
  free_fn(ptr, 0, -1, nullptr);
}

void* take(size_t size, c10::DeviceIndex device, cudaStream_t stream) {
  void* ptr = nullptr;
  int answer = try_malloc_fn(size, device, stream, &ptr);
  if (answer == kAllocated) {
    return ptr;
  }
  std::string reason = last_error_fn();
  if (answer == kOutOfMemory) {
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

c10::DeviceIndex current_device() {
  c10::DeviceIndex device = -1;
  C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
  return device;
}

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

// Makes a DirectAllocator PyTorch's CUDA allocator. The first six addresses are required; a
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
    uintptr_t init,
    uintptr_t reset,
    uintptr_t memory_fraction,
    uintptr_t record_stream,
    uintptr_t base_alloc,
    char* error,
    size_t error_len) {
  if (try_malloc == 0 || free == 0 || last_error == 0 || stats_values == 0 || reset_peak == 0 ||
      reset_accumulated == 0 || largest_available == 0) {
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
