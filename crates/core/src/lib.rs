//! bufferheap: a heap-based caching allocator for accelerator memory.
//!
//! The engine implements the system behind PyTorch's Metal allocator — buffers carved from
//! heaps, size-class pools, low and high watermarks, garbage collection, shared host-visible
//! buffers, scalar buffers, events guarding reuse, callbacks on every allocator event — over
//! any [`Backend`]: CUDA devices, host memory, or a simulated address space.
//!
//! ```
//! # use bufferheap_core::{Allocator, Config};
//! # fn demo<B: bufferheap_core::Backend>(backend: B) -> bufferheap_core::Result<()> {
//! let allocator = Allocator::new(backend, Config::default())?;
//! let buffer = allocator.alloc(4096)?.expect("non-zero size");
//! assert_eq!(allocator.requested_size(buffer.ptr), Some(4096));
//! allocator.free(buffer.ptr)?;
//! allocator.empty_cache()?;
//! # Ok(()) }
//! ```
//!
//! This crate has no `unsafe` code and names no driver: backends live in their own crates.
#![forbid(unsafe_code)]

mod addr_map;
mod allocator;
pub mod backend;
mod cache;
mod callbacks;
pub mod config;
mod error;
pub mod faults;
mod format;
mod free_space;
mod history;
mod pages;
mod pool;
mod stats;
mod sync;

pub use allocator::{
    Allocator, BlockInfo, BlockState, Buffer, DEFAULT_HIGH, DEFAULT_LOW_DISCRETE,
    DEFAULT_LOW_UNIFIED, Devices, HeapReport, MAX_RATIO, MPS_REUSE_SLACK, PoolReport, Report,
    SegmentInfo,
};
pub use backend::{
    Backend, BackendCaps, BackendError, BackendOp, MemoryInfo, Region, Storage, StreamId,
    check_page_range, physical_pieces,
};
pub use callbacks::{Callback, CallbackEvent};
pub use config::{Config, Policy};
pub use error::{Error, OomCause, OutOfMemory, Result, Watermark};
pub use format::format_size;
pub use history::{TraceAction, TraceEntry};
pub use pool::{ALIGN, PoolKind};
pub use stats::{GROUPS, GroupStat, Stat, Stats, Usage};
