//! Reads PyTorch memory snapshots: the pickles written by `torch.cuda.memory._snapshot()` /
//! `_dump_snapshot()`, gzipped or not.
//!
//! ```no_run
//! let snap = bufferheap_trace::read_snapshot("traces/resnet50_train.pkl.gz".as_ref())?;
//! let facts = bufferheap_trace::facts(&snap, 0);
//! println!("{} events, peak live {} bytes", facts.events, facts.peak_live_bytes);
//! # Ok::<(), bufferheap_trace::TraceError>(())
//! ```
//!
//! The pickle is decoded by a small streaming decoder of its own (module `pickle`) that turns
//! `device_traces` entries straight into [`TraceEvent`]s and skips stack frames, so a
//! 900k-event trace needs about 56 bytes per event, not a Python-like object tree.
//!
//! Invariants of the crate:
//! - No `unsafe`, no panics on any input: every malformed, truncated or hostile input is a
//!   [`TraceError`], and decoding time and memory are linear in the input and capped.
//! - [`facts`] computes exactly what the project's `tools/trace_facts.py` computes.
#![forbid(unsafe_code)]

mod error;
mod facts;
mod input;
mod model;
mod pickle;

use std::path::Path;

pub use error::{Result, TraceError};
pub use facts::{ReservedTracker, TraceFacts, facts, initial_live_blocks, native_reserved_series};
pub use input::{MAX_DECOMPRESSED_BYTES, is_gzip};
pub use model::{
    Action, Block, BlockState, Segment, SegmentType, SettingValue, Snapshot, TraceEvent,
};

/// Reads a snapshot file (gzipped or not). Errors name the file.
pub fn read_snapshot(path: &Path) -> Result<Snapshot> {
    let bytes = std::fs::read(path).map_err(|source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_snapshot(&bytes).map_err(|e| e.in_file(path.to_path_buf()))
}

/// Decodes a snapshot from memory: a pickle, or a gzip of one (detected by its magic bytes).
pub fn parse_snapshot(bytes: &[u8]) -> Result<Snapshot> {
    parse_snapshot_with_limit(bytes, MAX_DECOMPRESSED_BYTES)
}

/// As [`parse_snapshot`], refusing gzip data that decompresses to more than `max_decompressed`
/// bytes.
pub fn parse_snapshot_with_limit(bytes: &[u8], max_decompressed: u64) -> Result<Snapshot> {
    let data = input::unpack(bytes, max_decompressed)?;
    pickle::decode_snapshot(&data)
}
