//! CUDA backend for bufferheap: device memory through the CUDA driver API, page-mapped heaps
//! with CUDA virtual memory management (VMM), pinned host memory mapped into the device for
//! shared storage, and pooled CUDA events.
//!
//! The driver is loaded at run time (`dlopen` of `libcuda.so`), so this crate builds and its
//! tests run on machines without CUDA: [`CudaBackend::new`] then returns an error, never
//! panics, and [`device_count`] returns 0.
//!
//! What each [`Backend`](bufferheap_core::Backend) call does on the device:
//!
//! | call | driver |
//! |---|---|
//! | `reserve(size, Private, false)` | `cuMemAddressReserve` (address space only) |
//! | `reserve(size, Private, true)` | `cuMemAlloc_v2` |
//! | `reserve(size, Shared, _)` | `cuMemHostAlloc(DEVICEMAP \| PORTABLE)` + `cuMemHostGetDevicePointer`; `host_base` is the host address, `base` the device address |
//! | `map` | one `cuMemCreate` per unbacked run of the range + `cuMemMap` + `cuMemSetAccess` (this device, read/write) |
//! | `unmap` | `cuCtxSynchronize` (see [`CudaOptions::sync_before_unmap`]), then `cuMemUnmap` + `cuMemRelease` of each physical allocation left with no mapped page; partly covered allocations follow [`PartialUnmap`] |
//! | `release` | everything above undone, then `cuMemAddressFree` / `cuMemFree_v2` / `cuMemFreeHost` |
//! | `record_event` | a pooled `CU_EVENT_DISABLE_TIMING` event, `cuEventRecord` on the stream (0 = legacy default stream) |
//! | `event_complete` / `wait_event` | `cuEventQuery` / `cuEventSynchronize` |
//! | `memory_info` | `cuMemGetInfo_v2`; the recommended maximum is the device's total memory |
//! | `write` | a host copy for shared regions, `cuMemcpyHtoD_v2` for private ones |
//!
//! Invariants kept across the crate:
//! - the backend uses the device's **primary context** (the one PyTorch's runtime uses), makes
//!   it current for each call and restores the calling thread's previous context afterwards;
//! - every driver failure becomes a [`BackendError`](bufferheap_core::BackendError) naming the
//!   operation, the driver function and the driver's error name; `CUDA_ERROR_OUT_OF_MEMORY` is
//!   marked `out_of_memory`;
//! - every `unsafe` block carries a `// SAFETY:` argument; raw handles are wrapped in types
//!   whose `Send`/`Sync` implementations say why sharing them is sound.
//!
//! ## Partial unmap
//!
//! CUDA unmaps physical allocations only whole, while the engine maps a run of pages with one
//! call (one allocation) and may later unmap part of it. By default ([`PartialUnmap::Defer`])
//! such an allocation stays mapped until all its pages are unmapped, so the live buffers on the
//! rest of it keep their bytes; [`DriverStats::held_bytes`] shows what is held that way.
//! [`PartialUnmap::Recreate`] instead gives the rest new allocations at once, which loses their
//! contents: use it only with an engine that guarantees the rest of such a range is free too.
//! [`PartialUnmap`] states the contract in full.
//!
//! VMM pages are made accessible to this device only; a kernel on a peer device cannot access
//! them directly, even with peer access enabled.

mod backend;
mod driver;
mod events;
mod memory;
mod vmm;

pub use backend::{CudaBackend, CudaOptions, DriverStats};
pub use driver::{device_count, driver_present};
pub use events::CudaEvent;
pub use vmm::PartialUnmap;
