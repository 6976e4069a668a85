//! Input handling: gzip detection by magic bytes and bounded decompression.
//!
//! Invariants:
//! - Gzip is recognised by its first two bytes (1f 8b) only, never by a file name.
//! - Decompression stops with [`TraceError::TooLarge`] once the output would exceed the limit,
//!   so a gzip bomb costs at most `limit` bytes of memory.
//! - Concatenated gzip members are read as one stream, and zero bytes padding the file after
//!   a member are skipped, as Python's `gzip` module does.

use std::borrow::Cow;
use std::io::Read;

use flate2::bufread::GzDecoder;

use crate::error::{Result, TraceError};

/// The default cap on the decompressed size of a snapshot: 4 GiB.
pub const MAX_DECOMPRESSED_BYTES: u64 = 4 << 30;

/// Whether `bytes` starts with the gzip magic number.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// The pickle bytes: `bytes` itself, or its decompression if it is gzip.
pub(crate) fn unpack(bytes: &[u8], limit: u64) -> Result<Cow<'_, [u8]>> {
    if !is_gzip(bytes) {
        return Ok(Cow::Borrowed(bytes));
    }
    // The trailer holds the size modulo 2^32 of the last member: a hint, never trusted beyond
    // what deflate can reach (about 1032:1) or the limit.
    let hint = match bytes.len().checked_sub(4).and_then(|at| bytes.get(at..)) {
        Some(t) => u64::from(u32::from_le_bytes([t[0], t[1], t[2], t[3]])),
        None => 0,
    };
    let cap = hint
        .min(limit)
        .min((bytes.len() as u64).saturating_mul(1032))
        .min(usize::MAX as u64 / 2);
    let mut out = Vec::with_capacity(cap as usize);
    let mut rest = bytes;
    loop {
        // A buffered decoder consumes exactly one member from `rest`.
        let room = (limit.saturating_add(1)).saturating_sub(out.len() as u64);
        GzDecoder::new(&mut rest)
            .take(room)
            .read_to_end(&mut out)
            .map_err(TraceError::Gzip)?;
        if out.len() as u64 > limit {
            return Err(TraceError::TooLarge { limit });
        }
        let padding = rest.iter().take_while(|&&b| b == 0).count();
        rest = &rest[padding..];
        if rest.is_empty() {
            return Ok(Cow::Owned(out));
        }
    }
}
