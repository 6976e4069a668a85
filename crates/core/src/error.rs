//! The engine's one error type.
//!
//! Every failure a caller can cause or meet is a variant here, with the figures needed to act
//! on it; nothing in the engine panics on bad input.

use crate::backend::{BackendError, Storage};
use crate::format::format_size;
use std::fmt;

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// No memory could be found for the request after the whole fallback chain.
    #[error("{0}")]
    OutOfMemory(Box<OutOfMemory>),
    /// The pointer was never handed out by this allocator (or its memory was released).
    #[error("pointer {0:#x} was not allocated by this allocator")]
    UnknownPointer(u64),
    /// The pointer is in this allocator's memory but not in use: it was freed already.
    #[error("pointer {0:#x} was freed twice")]
    DoubleFree(u64),
    /// A call that needs a buffer in use (`set_shape`, `record_stream`) named a freed one.
    #[error("pointer {0:#x} belongs to a buffer that is not in use (it was freed)")]
    NotInUse(u64),
    /// A request not below the device's limit per buffer (as the seed checks it).
    #[error("invalid buffer size: {} is not below the device's limit of {} per buffer", format_size(*.requested), format_size(*.max))]
    InvalidSize { requested: usize, max: usize },
    /// A watermark ratio out of range.
    #[error("invalid {which} watermark ratio {ratio}: {reason}")]
    InvalidWatermark {
        which: Watermark,
        ratio: f64,
        reason: String,
    },
    /// A configuration variable that could not be parsed.
    #[error("invalid value {value:?} for {variable}: {reason}")]
    InvalidConfig {
        variable: String,
        value: String,
        reason: String,
    },
    /// The operation needs a capability this backend lacks.
    #[error("{0}")]
    Unsupported(String),
    /// A backend call failed for a reason other than lack of memory.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Which watermark a ratio is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watermark {
    Low,
    High,
}

impl fmt::Display for Watermark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Watermark::Low => "low",
            Watermark::High => "high",
        })
    }
}

/// The figures of an out-of-memory failure, in the words of the seed's message.
#[derive(Debug, Clone, PartialEq)]
pub struct OutOfMemory {
    /// Bytes held in heaps by this allocator (in use + cached).
    pub allocator_reserved: usize,
    /// Bytes of buffers in use.
    pub allocator_in_use: usize,
    /// Memory the driver reports in use that is not this allocator's.
    pub other_allocations: usize,
    /// The high watermark limit; `None` when disabled.
    pub max_allowed: Option<usize>,
    /// The rounded size that was asked for.
    pub requested: usize,
    /// The pool's storage.
    pub storage: Storage,
    /// Free memory on the device at the failure, as the backend reported it.
    pub device_free: usize,
    /// Total memory of the device.
    pub device_total: usize,
    /// What refused the request: the high watermark, or the backend (device full).
    pub cause: OomCause,
}

/// Why an allocation failed for lack of memory.
#[derive(Debug, Clone, PartialEq)]
pub enum OomCause {
    /// The request would take the process above the high watermark limit.
    HighWatermark,
    /// The backend refused to provide more memory.
    Backend(String),
}

impl fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bufferheap out of memory (allocated: {}, other allocations: {}",
            format_size(self.allocator_reserved),
            format_size(self.other_allocations)
        )?;
        if let Some(max) = self.max_allowed {
            write!(f, ", max allowed: {}", format_size(max))?;
        }
        let pool = match self.storage {
            Storage::Private => "private",
            Storage::Shared => "shared",
        };
        write!(
            f,
            "). Tried to allocate {} on {pool} pool",
            format_size(self.requested)
        )?;
        write!(
            f,
            " ({} of it in use by live buffers; device has {} free of {}).",
            format_size(self.allocator_in_use),
            format_size(self.device_free),
            format_size(self.device_total)
        )?;
        match &self.cause {
            OomCause::HighWatermark => write!(
                f,
                " Use BUFFERHEAP_HIGH_WATERMARK_RATIO=0.0 to lift the upper limit for memory \
                 allocations (may cause system failure)."
            ),
            OomCause::Backend(msg) => write!(
                f,
                " The device itself has no room ({msg}); free tensors, lower the batch size, \
                 or check other processes on the device."
            ),
        }
    }
}
