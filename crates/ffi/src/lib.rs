//! C ABI of bufferheap: PyTorch's pluggable CUDA allocator entry points plus statistics and
//! control. The library (`libbufferheap_ffi.so`) is what `bufferheap.torch.install()` hands
//! to `torch.cuda.memory.CUDAPluggableAllocator`; `include/bufferheap.h` declares every
//! function.
//!
//! | function | role |
//! |---|---|
//! | `bufferheap_malloc` / `bufferheap_free`, `bufferheap_try_malloc` | PyTorch's alloc and free; an alloc that answers instead of raising |
//! | `bufferheap_init`, `bufferheap_reset`, `bufferheap_set_memory_fraction`, `bufferheap_record_stream`, `bufferheap_base_alloc` | PyTorch's optional hooks |
//! | `bufferheap_configure`, `bufferheap_configure_all`, `bufferheap_initialized` | settings before the first allocation |
//! | `bufferheap_stats_json`, `bufferheap_snapshot_json`, `bufferheap_string_free` | figures as JSON |
//! | `bufferheap_stats_values`, `bufferheap_memory_snapshot` | the same as C values, for a C++ front |
//! | `bufferheap_record_history`, `bufferheap_history_limit` | the allocation history, at run time |
//! | `bufferheap_empty_cache`, `bufferheap_reset_peak`, `bufferheap_reset_accumulated`, `bufferheap_largest_available`, `bufferheap_set_watermarks` | control |
//! | `bufferheap_last_error` | the calling thread's last error |
//!
//! The memory comes from the backend named by `BUFFERHEAP_BACKEND` (`cuda`, `host`, or unset:
//! CUDA when a driver is present). The host backend pretends to have
//! `BUFFERHEAP_HOST_DEVICES` devices (default 1) of `BUFFERHEAP_HOST_MEMORY` bytes each
//! (default: the machine's RAM). Building with the `host-backend` feature makes host memory
//! the default instead of CUDA.
//!
//! Invariants of the whole crate: no panic crosses the C ABI ([`error::guard`]); every
//! failure leaves a message in the thread's last error, and failures the caller cannot see in
//! a return value are also written to stderr; `unsafe` appears only where a pointer from C is
//! read or written, each time with its `SAFETY` argument.
//!
//! PyTorch (2.11) does not check the pointer an allocator returns: a NULL from
//! `bufferheap_malloc` gives a tensor with a null data pointer and no exception (seen on an
//! H100: `torch.empty(60 GiB)` over the high watermark came back with `data_ptr() == 0`). The
//! first kernel that touches it fails with "an illegal memory access", and the CUDA context is
//! lost: every later CUDA call of the process fails too. So every NULL answer to a non-zero
//! request is written to stderr with that warning; a caller that can check (the Python
//! package) reads `bufferheap_last_error()`.

mod backend;
pub mod error;
mod exports;
mod json;
mod memory_snapshot;
mod raise;
mod registry;

pub use backend::{
    AnyBackend, AnyEvent, BackendChoice, BackendKind, ENV_BACKEND, ENV_HOST_DEVICES,
    ENV_HOST_MEMORY, MAX_HOST_DEVICES,
};
pub use exports::*;
pub use memory_snapshot::{
    BLOCK_ACTIVE_ALLOCATED, BLOCK_ACTIVE_PENDING_FREE, BLOCK_INACTIVE, BlockEntry, SegmentEntry,
    TraceRecord, bufferheap_history_limit, bufferheap_memory_snapshot, bufferheap_record_history,
};
pub use registry::{DeviceAllocator, select_backend};
