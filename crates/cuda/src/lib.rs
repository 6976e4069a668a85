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
//! | `map` | `cuMemCreate` + `cuMemMap` per 16 MiB piece of the range (per page with [`PhysicalGranularity::PerPage`], per call with [`PhysicalGranularity::PerMap`]), then one `cuMemSetAccess` (this device and its peers, read/write) over the whole new range |
//! | `unmap` | `cuCtxSynchronize` only with [`CudaOptions::sync_before_unmap`], then one `cuMemUnmap` per run of adjacent allocations left with no mapped page, and `cuMemRelease` of each; with `PerMap`, partly covered allocations follow [`PartialUnmap`] |
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
//! ## Physical granularity
//!
//! CUDA unmaps a physical allocation only whole, and every allocation costs driver time
//! (create, map, access, unmap, release: about 0.12 ms per allocation on an H100, whether it
//! is one 2 MiB page or 16 of them). By default ([`PhysicalGranularity::PerBlock`]) a `map`
//! call is backed by one allocation per 16 MiB piece (its range cut at multiples of 16 MiB),
//! the backend says so in `BackendCaps::physical_block`, and the engine unmaps only whole
//! pieces: memory goes back to the device at once, the pages around keep their bytes,
//! [`DriverStats::held_bytes`] stays 0, at a tenth of the driver time of one allocation per
//! page ([`PhysicalGranularity::PerPage`]). The driver calls are batched: one
//! `cuMemSetAccess` per `map` call, one `cuMemUnmap` per run of adjacent allocations.
//! [`PhysicalGranularity::PerMap`] makes one allocation per `map` call; for a caller that
//! unmaps part of one, it either keeps it until all its pages are unmapped
//! ([`PartialUnmap::Defer`], memory held) or replaces the rest of it
//! ([`PartialUnmap::Recreate`], which loses the rest's contents).
//!
//! ## Unmapping and queued work
//!
//! `cuMemUnmap` does not wait for device work still using the pages. The engine unmaps pages
//! only after an event recorded on the pool's stream when it chose them has completed, so by
//! default the backend does not synchronise; [`CudaOptions::sync_before_unmap`] makes it call
//! `cuCtxSynchronize` first, for callers outside the engine.
//!
//! VMM pages are made accessible to this device and to every device that can reach it as a
//! peer (as PyTorch's expandable segments do), so cross-device copies and peer kernels work on
//! them.

mod backend;
mod driver;
mod events;
mod memory;
mod vmm;

pub use backend::{CudaBackend, CudaOptions, DriverStats};
pub use driver::{device_count, driver_present};
pub use events::CudaEvent;
pub use vmm::{DEFAULT_PHYSICAL_BLOCK, PartialUnmap, PhysicalGranularity, physical_block};
