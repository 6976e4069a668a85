//! The backend trait: the engine's only door to memory, events and the device.
//!
//! A backend hands out *regions* (address ranges) and, when it can, maps and unmaps physical
//! pages inside them. It never decides anything: where a buffer goes, when memory comes back
//! and what is cached is the engine's business. Invariants every backend keeps:
//! - a region's `[base, base + size)` does not overlap any other live region of the backend;
//! - `base` is aligned to `caps().granularity`;
//! - with `BackendCaps::page_mapping`, a region reserved with `mapped = false` holds no memory
//!   until [`Backend::map`] commits pages in it; `map`/`unmap` take granularity-aligned ranges;
//! - every method is callable from any thread (`Send + Sync`); the engine serialises the
//!   calls that change its own state, but may call `event_complete`/`wait_event` outside its
//!   lock;
//! - failures are values ([`BackendError`]), never panics.

use std::fmt;

/// An opaque stream handle. `0` is the default stream; on CUDA it is the `CUstream` value.
pub type StreamId = u64;

/// Where a buffer lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// Device memory, not visible to the host.
    Private,
    /// Memory visible to both host and device (pinned host memory on a discrete GPU).
    Shared,
}

/// What a backend can do. Constant for the lifetime of the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendCaps {
    /// Host-visible storage exists ([`Storage::Shared`] regions can be reserved).
    pub shared_storage: bool,
    /// Host and device share one memory (a unified-memory device, or host memory itself).
    /// Shapes the watermark defaults, as on the seed's system.
    pub unified_memory: bool,
    /// Regions of [`Storage::Private`] can be reserved as address space only and pages mapped
    /// into them on demand.
    pub page_mapping: bool,
    /// Page size for `map`/`unmap` and the alignment of every region base.
    pub granularity: usize,
    /// The engine unmaps only whole *pieces* of earlier `map` calls: a call's range cut at
    /// multiples of this many bytes from the region's base (a multiple of `granularity`;
    /// `usize::MAX`: not cut, each call is one piece). A backend that backs each piece with
    /// one physical allocation (cheaper than one per page) sets its piece size; one that can
    /// unmap any page sets `granularity`.
    pub physical_block: usize,
    /// Largest single buffer the device supports.
    pub max_buffer_size: usize,
}

/// The pieces of a map call's range `[start, end)`: the range cut at multiples of `block`
/// (see [`BackendCaps::physical_block`]), as `(start, end)` pairs in address order. Any unit
/// works (bytes or pages) as long as all three are in it; `usize::MAX` never cuts.
pub fn physical_pieces(
    start: usize,
    end: usize,
    block: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let mut p = start;
    std::iter::from_fn(move || {
        (p < end).then(|| {
            let piece = (p, (p - p % block).saturating_add(block).min(end));
            p = piece.1;
            piece
        })
    })
}

/// A range of addresses obtained from a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// Device address of the first byte.
    pub base: u64,
    /// Length in bytes.
    pub size: usize,
    /// Host address of the first byte, for shared storage.
    pub host_base: Option<u64>,
    /// The backend's own token for this region (an index, a handle); the engine never reads it.
    pub handle: u64,
}

/// The device's memory figures as the backend sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryInfo {
    /// Total memory of the device.
    pub total: usize,
    /// Memory not in use by anyone (this process or others).
    pub free: usize,
    /// The working set the device recommends for one process (the seed's
    /// `recommendedMaxWorkingSetSize`); the watermark ratios multiply it.
    pub recommended_max: usize,
}

impl MemoryInfo {
    /// Bytes the driver says are in use: `total - free`.
    pub fn driver_allocated(&self) -> usize {
        self.total.saturating_sub(self.free)
    }
}

/// Which backend operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendOp {
    Reserve,
    Release,
    Map,
    Unmap,
    RecordEvent,
    QueryEvent,
    WaitEvent,
    Write,
    Init,
}

impl fmt::Display for BackendOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            BackendOp::Reserve => "reserve",
            BackendOp::Release => "release",
            BackendOp::Map => "map",
            BackendOp::Unmap => "unmap",
            BackendOp::RecordEvent => "record event",
            BackendOp::QueryEvent => "query event",
            BackendOp::WaitEvent => "wait for event",
            BackendOp::Write => "write",
            BackendOp::Init => "init",
        };
        f.write_str(name)
    }
}

/// A failed backend call. `out_of_memory` marks failures the engine may cure by freeing
/// cached memory and trying again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("backend {op} failed: {message}")]
pub struct BackendError {
    pub op: BackendOp,
    pub out_of_memory: bool,
    pub message: String,
}

impl BackendError {
    pub fn new(op: BackendOp, message: impl Into<String>) -> Self {
        BackendError {
            op,
            out_of_memory: false,
            message: message.into(),
        }
    }

    pub fn out_of_memory(op: BackendOp, message: impl Into<String>) -> Self {
        BackendError {
            op,
            out_of_memory: true,
            message: message.into(),
        }
    }
}

/// Checks that `[offset, offset + len)` is a non-empty run of whole pages of `granularity`
/// bytes inside a region of `region_size` bytes: what `map` and `unmap` may be given.
pub fn check_page_range(
    region_size: usize,
    offset: usize,
    len: usize,
    granularity: usize,
    op: BackendOp,
) -> Result<(), BackendError> {
    if len == 0
        || !offset.is_multiple_of(granularity)
        || !len.is_multiple_of(granularity)
        || offset.checked_add(len).is_none_or(|e| e > region_size)
    {
        return Err(BackendError::new(
            op,
            format!("range [{offset:#x}, +{len:#x}) is unaligned or outside the region"),
        ));
    }
    Ok(())
}

/// The memory system under one allocator: a device, host memory, or a simulation.
pub trait Backend: Send + Sync + 'static {
    /// A marker recorded on a stream; complete once the work queued before it has finished.
    /// Dropping it gives it back to the backend.
    type Event: Send + Sync + 'static;

    /// What this backend supports; must not change.
    fn caps(&self) -> BackendCaps;

    /// Reserves a region of `size` bytes (a multiple of the granularity). With
    /// `mapped = true` the whole region is usable at once; with `mapped = false` (only for
    /// private storage on a backend with `page_mapping`) it is address space only.
    fn reserve(&self, size: usize, storage: Storage, mapped: bool) -> Result<Region, BackendError>;

    /// Gives a region back, unmapping whatever is still mapped in it.
    fn release(&self, region: &Region) -> Result<(), BackendError>;

    /// Commits physical pages to `[offset, offset + len)` of a region reserved unmapped. On
    /// error nothing is mapped.
    fn map(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError>;

    /// Returns the pages of `[offset, offset + len)` to the device; the addresses stay reserved.
    /// The range holds no live data and covers whole pieces of earlier `map` calls (see
    /// [`BackendCaps::physical_block`]; one piece, or several adjacent ones), never part of
    /// one, so a backend may back each piece with one physical allocation and free it whole.
    /// On error nothing changed: the engine keeps counting the range as mapped and may place
    /// buffers there again, so a backend that has unmapped part of it must succeed instead
    /// (and deal with what it could not give back itself).
    fn unmap(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError>;

    /// Records an event on `stream` after the work queued so far.
    fn record_event(&self, stream: StreamId) -> Result<Self::Event, BackendError>;

    /// True once the event's work has finished. Never blocks.
    fn event_complete(&self, event: &Self::Event) -> Result<bool, BackendError>;

    /// Blocks the calling thread until the event's work has finished.
    fn wait_event(&self, event: &Self::Event) -> Result<(), BackendError>;

    /// Current memory figures of the device. May cost a driver call: the engine calls it on
    /// slow paths only.
    fn memory_info(&self) -> MemoryInfo;

    /// Copies `bytes` into shared storage at `offset` of `region` (used for scalar buffers).
    /// Backends without memory (a simulation) accept and drop the bytes.
    fn write(&self, region: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError>;
}
