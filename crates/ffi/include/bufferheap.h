/* bufferheap: a caching allocator for accelerator memory — C ABI of libbufferheap_ffi.
 *
 * The first five functions after malloc/free are PyTorch's CUDAPluggableAllocator hooks:
 *
 *   alloc = torch.cuda.memory.CUDAPluggableAllocator(
 *       "libbufferheap_ffi.so", "bufferheap_malloc", "bufferheap_free")
 *   raw = alloc.allocator()
 *   raw.set_init_fn(addr("bufferheap_init")); raw.set_reset_fn(addr("bufferheap_reset"));
 *   raw.set_memory_fraction_fn(addr("bufferheap_set_memory_fraction"));
 *   raw.set_record_stream_fn(addr("bufferheap_record_stream"));
 *   raw.set_base_alloc_fn(addr("bufferheap_base_alloc"))
 *
 * (python/bufferheap does this: bufferheap.torch.install()).
 *
 * Conventions:
 * - No function unwinds or aborts on bad input: every failure is a return value plus a
 *   message in bufferheap_last_error() (per thread; it is only replaced by the next failing
 *   call of the same thread, so read it right after a call reports failure).
 * - Functions returning int answer 0 on success, -1 on failure.
 * - void functions, and bufferheap_malloc when it fails for a non-zero size, also write the
 *   failure to stderr: their callers may not check anything. PyTorch (2.11) does not check
 *   the pointer returned by a pluggable allocator: on NULL it builds a tensor with a null
 *   data pointer and raises nothing; the first kernel that touches it fails with an illegal
 *   memory access, which leaves the process's CUDA context unusable. So inside a process
 *   that has PyTorch's libc10 loaded, a failed bufferheap_malloc of a non-zero size throws
 *   c10::Error (a RuntimeError in Python, carrying the out-of-memory text) through
 *   c10::detail::torchCheckFail instead of returning NULL, the way PyTorch's own allocators
 *   fail; BUFFERHEAP_OOM=null keeps the NULL return. Outside PyTorch it returns NULL.
 * - `device` is a device index; where noted, -1 means every device.
 * - Strings returned as char* are JSON objects owned by the caller, released with
 *   bufferheap_string_free.
 *
 * Environment (read at the first call):
 *   BUFFERHEAP_BACKEND        cuda | host | auto (default: cuda if a driver is present)
 *   BUFFERHEAP_HOST_DEVICES   devices the host backend pretends to have (default 1)
 *   BUFFERHEAP_HOST_MEMORY    bytes per host device (default: the machine's RAM)
 *   BUFFERHEAP_POLICY, BUFFERHEAP_LOW_WATERMARK_RATIO, BUFFERHEAP_HIGH_WATERMARK_RATIO,
 *   BUFFERHEAP_DEBUG, BUFFERHEAP_HISTORY, BUFFERHEAP_FRONT_CACHE_BYTES,
 *   BUFFERHEAP_IDLE_PAGE_FRACTION, BUFFERHEAP_UNMAP_RATE_LIMIT
 *                             allocator settings (bufferheap_configure overrides them)
 */
#ifndef BUFFERHEAP_H
#define BUFFERHEAP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Allocates `size` bytes on `device` for use on `stream` (a cudaStream_t; NULL = default).
 * NULL for size 0 (no allocation), and on failure: negative size, unknown device, out of
 * memory (the message gives the figures and a hint), or a backend that cannot start. */
void *bufferheap_malloc(ssize_t size, int device, void *stream);

/* Allocates like bufferheap_malloc for callers that raise their own errors: never throws,
 * never writes to stderr. Answers 0 with *out set (NULL for size 0), 1 when the device is out
 * of memory, -1 on any other failure (unknown device, a backend that cannot start, out = NULL);
 * the reason is bufferheap_last_error(). */
int bufferheap_try_malloc(size_t size, int device, void *stream, void **out);

/* Frees a pointer from bufferheap_malloc; `size`, `device` and `stream` are those of the
 * allocation (only used in messages: the pointer alone identifies the buffer, on whichever
 * device it lives; size 0 and device -1 when unknown). NULL: nothing. A pointer bufferheap does not know (never allocated here,
 * or freed twice): a message on stderr and nothing else. */
void bufferheap_free(void *ptr, ssize_t size, int device, void *stream);

/* PyTorch's set_init_fn: called once when CUDA starts. Freezes the configuration and starts
 * the backend; allocators are created per device on first use. */
void bufferheap_init(int device_count);

/* PyTorch's set_reset_fn (torch.cuda.empty_cache()): empties the cache of every device. */
void bufferheap_reset(void);

/* PyTorch's set_memory_fraction_fn: the high watermark ratio of `device` becomes `fraction`
 * (0.0 to 2.0; 0.0 allows no memory, as in PyTorch); the low ratio is lowered to it if
 * above. */
void bufferheap_set_memory_fraction(double fraction, int device);

/* PyTorch's set_record_stream_fn: the buffer is also used on `stream`; once freed it waits
 * for that stream's work before reuse. NULL ptr: nothing. */
void bufferheap_record_stream(void *ptr, void *stream);

/* PyTorch's set_base_alloc_fn: the base address of the heap holding `ptr` (any address
 * inside a buffer), its size in *size (if size is not NULL). NULL and *size = 0 for a
 * pointer bufferheap does not hold. */
void *bufferheap_base_alloc(void *ptr, size_t *size);

/* Changes one setting; only before the configuration is frozen (by bufferheap_init or the
 * first allocation), -1 after. Keys: "policy" ("default" | "mps"), "low_watermark_ratio",
 * "high_watermark_ratio" (0.0 to 2.0; 0 disables the limit), "debug" (bit mask, decimal or
 * 0x hex), "history" (events kept for snapshots), "front_cache_bytes" (per thread; 0: none),
 * "idle_page_fraction" (the page budget of the default policy), "unmap_rate_limit" (page
 * unmaps per 1000 allocations before that budget loosens; default 2, 0: never). */
int bufferheap_configure(const char *key, const char *value);

/* Changes several settings at once, all of them or none: `settings` holds one "key=value"
 * per line (the keys of bufferheap_configure). 0, or -1 with nothing applied. */
int bufferheap_configure_all(const char *settings);

/* 1 once the configuration is frozen (bufferheap_init was called or an allocator exists),
 * else 0. */
int bufferheap_initialized(void);

/* Statistics of `device` as a JSON object: torch.cuda.memory_stats() key names
 * ("allocated_bytes.all.current", "reserved_bytes.large_pool.peak", "num_ooms", ...) plus
 * "policy", "low_watermark_limit" and "high_watermark_limit" (bytes; null when disabled or
 * while the device has no allocator yet) and "device". A device not used yet answers zeros.
 * NULL on error (unknown device, backend that cannot start). */
char *bufferheap_stats_json(int device);

/* The numeric statistics named by `keys` (n NUL-terminated strings, the key names of
 * bufferheap_stats_json) written to out[0..n), 0 for a key bufferheap does not keep; all from
 * one consistent reading. Answers how many keys it keeps, -1 on error. */
int bufferheap_stats_values(int device, const char *const *keys, size_t n, int64_t *out);

/* Segments of `device` (-1: every device) in the shape of PyTorch's
 * torch.cuda.memory._snapshot(). A segment is a heap, or one run of mapped pages of a
 * page-mapped heap (as PyTorch reports its expandable segments), so the segments' sizes add up
 * to the reserved bytes: {"segments": [{"device", "address", "total_size",
 * "allocated_size", "active_size", "requested_size", "stream", "segment_type",
 * "segment_pool_id": [0, 0], "is_expandable", "frames": [], "blocks": [{"address", "size",
 * "requested_size", "state", "frames": []}]}], "device_traces": [[...]] (one list per device
 * answered: its allocation history, empty unless one is recorded), "allocator_settings":
 * {"policy", "memory_backend"}}. NULL on error. */
char *bufferheap_snapshot_json(int device);

/* The same snapshot as flat arrays, for a C or C++ caller that builds PyTorch's own
 * SnapshotInfo. A segment's blocks are blocks[first_block .. first_block + block_count] and
 * tile it: the first starts at the segment's address, each where the one before ends, and
 * their sizes add up to total_size. Trace actions and block states use PyTorch's numbering. */
enum {
    BUFFERHEAP_BLOCK_INACTIVE = 0,
    BUFFERHEAP_BLOCK_ACTIVE_ALLOCATED = 1,
    BUFFERHEAP_BLOCK_ACTIVE_PENDING_FREE = 2
};
enum {
    BUFFERHEAP_TRACE_ALLOC = 0,
    BUFFERHEAP_TRACE_FREE_REQUESTED = 1,
    BUFFERHEAP_TRACE_FREE_COMPLETED = 2,
    BUFFERHEAP_TRACE_SEGMENT_ALLOC = 3,
    BUFFERHEAP_TRACE_SEGMENT_FREE = 4,
    BUFFERHEAP_TRACE_SEGMENT_MAP = 5,
    BUFFERHEAP_TRACE_SEGMENT_UNMAP = 6,
    BUFFERHEAP_TRACE_OOM = 8 /* addr holds the device's free bytes */
};
typedef struct bufferheap_block {
    uint64_t address;
    uint64_t size;
    uint64_t requested_size;
    int32_t state; /* BUFFERHEAP_BLOCK_* */
} bufferheap_block;
typedef struct bufferheap_segment {
    int32_t device;
    int32_t is_large;      /* 1: PyTorch's "large" segment type, 0: "small" */
    int32_t is_expandable; /* 1: pages mapped on demand */
    uint64_t address;
    uint64_t total_size;
    uint64_t allocated_size;
    uint64_t active_size;
    uint64_t requested_size;
    uint64_t stream;
    uint64_t first_block;
    uint64_t block_count;
} bufferheap_segment;
typedef struct bufferheap_trace_entry {
    int32_t action; /* BUFFERHEAP_TRACE_* */
    int32_t device;
    uint64_t addr;
    uint64_t size;
    uint64_t stream;
    int64_t time_us; /* microseconds since the Unix epoch */
} bufferheap_trace_entry;

/* Writes the segments, blocks and (include_traces != 0) history entries of `device` (-1:
 * every device) into the arrays, and how many of each into counts[0..3]. Answers 0 when they
 * were written; 1 when an array was too small: nothing was written and counts says how many
 * this reading needed, so call again with that much room (or more: the state may have grown);
 * -1 on error. An array may be NULL when its capacity is 0. */
int bufferheap_memory_snapshot(int device, int include_traces, bufferheap_segment *segments,
                               size_t segment_capacity, bufferheap_block *blocks,
                               size_t block_capacity, bufferheap_trace_entry *trace,
                               size_t trace_capacity, size_t *counts);

/* Records the last max_entries allocator events of every device from now on, devices not used
 * yet included; 0 stops recording and drops the history. A history already recorded goes on,
 * trimmed to the new limit, unless clear != 0 starts it afresh. Snapshots carry it as
 * "device_traces". */
int bufferheap_record_history(size_t max_entries, int clear);

/* The most allocator events kept per device, in *out (0: none are recorded). */
int bufferheap_history_limit(size_t *out);

/* Frees a string returned by this library. NULL: nothing. */
void bufferheap_string_free(char *s);

/* Releases every cached buffer of `device` (-1: every device) back to the device. */
int bufferheap_empty_cache(int device);

/* Resets the peak statistics of `device` (-1: every device) to their current values. */
int bufferheap_reset_peak(int device);

/* The largest buffer one request on `device` could get now without failing (the largest cached
 * buffer or free range, or the device's free memory within the high watermark), in *out: what
 * PyTorch's cacheInfo tells cuDNN when it sizes benchmark workspaces. */
int bufferheap_largest_available(int device, size_t *out);

/* Zeroes the cumulative statistics of `device` (-1: every device): every ".allocated" and
 * ".freed", and event counts such as "num_ooms"; current values and peaks stay. */
int bufferheap_reset_accumulated(int device);

/* Sets the low and high watermark ratios of `device` (0.0 to 2.0; 0 disables a limit;
 * low <= high while high is enabled). */
int bufferheap_set_watermarks(int device, double low, double high);

/* The calling thread's last error message; "" if none. Owned by the library, valid until the
 * thread's next failing call. */
const char *bufferheap_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* BUFFERHEAP_H */
