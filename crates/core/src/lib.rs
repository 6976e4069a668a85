//! bufferheap: a heap-based caching allocator for accelerator memory.
#![forbid(unsafe_code)]

pub mod backend;

pub use backend::{
    Backend, BackendCaps, BackendError, BackendOp, MemoryInfo, Region, Storage, StreamId,
};
