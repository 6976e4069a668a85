//! The crate's one error type.
//!
//! Invariants:
//! - Every failure is a [`TraceError`]; decoding never panics, whatever the input.
//! - Byte offsets in pickle errors count from the start of the (decompressed) pickle stream.
//! - Shape errors carry a path into the snapshot written the way Python would index it,
//!   e.g. `device_traces[0][1234].addr`, plus what was expected and what was found.
//! - Errors from [`crate::read_snapshot`] name the file.

use std::io;
use std::path::PathBuf;

/// Result with [`TraceError`] as the default error.
pub type Result<T, E = TraceError> = std::result::Result<T, E>;

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The file could not be read at all.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Any other error, found while decoding the named file.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<TraceError>,
    },
    /// The input starts like gzip (bytes 1f 8b) but does not decompress.
    #[error("corrupt or truncated gzip data: {0}")]
    Gzip(#[source] io::Error),
    /// The gzip data decompresses to more than the limit.
    #[error(
        "the gzip data decompresses to more than {limit} bytes, the limit; not reading further"
    )]
    TooLarge { limit: u64 },
    /// The input is not a pickle of protocol 2 or later.
    #[error("not a pickle (protocol 2 or later): {0}")]
    NotPickle(String),
    /// A valid pickle opcode that memory snapshots never use (e.g. one that builds objects).
    #[error(
        "unsupported pickle opcode {name} (0x{opcode:02x}) at byte offset {offset}; \
         a PyTorch memory snapshot holds only dicts, lists, strings and numbers"
    )]
    UnsupportedOpcode {
        opcode: u8,
        name: &'static str,
        offset: u64,
    },
    /// The pickle stream ends in the middle of an opcode or before STOP.
    #[error("pickle data ends early: {what} at byte offset {offset} runs past the end of the data")]
    Truncated { offset: u64, what: &'static str },
    /// The pickle stream is malformed (stack underflow, bad memo index, unknown opcode byte, ...).
    #[error("corrupt pickle at byte offset {offset}: {reason}")]
    Corrupt { offset: u64, reason: String },
    /// The pickle is larger or deeper than the decoder accepts.
    #[error("pickle exceeds a decoder limit at byte offset {offset}: {what}")]
    Limit { offset: u64, what: String },
    /// A value has the wrong type or the top level is not a snapshot.
    #[error("{path}: expected {expected}, found {found}")]
    Shape {
        path: String,
        expected: String,
        found: String,
    },
    /// A dict lacks a key the snapshot format requires.
    #[error("{path}: missing key '{key}' (keys present: {present})")]
    MissingKey {
        path: String,
        key: String,
        present: String,
    },
}

impl TraceError {
    /// Wraps an error with the file it came from (I/O errors already carry their path).
    pub(crate) fn in_file(self, path: PathBuf) -> TraceError {
        match self {
            e @ (TraceError::Io { .. } | TraceError::InFile { .. }) => e,
            e => TraceError::InFile {
                path,
                source: Box::new(e),
            },
        }
    }

    /// The error without the file wrapper, for matching on the kind of failure.
    pub fn root(&self) -> &TraceError {
        match self {
            TraceError::InFile { source, .. } => source.root(),
            e => e,
        }
    }
}

/// One step of a path into the snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(&'static str),
    Index(u64),
}

/// A shape error found inside a container before the container's own place in the snapshot is
/// known. Path steps are pushed innermost first as the container is attached to its parents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PendingError {
    path: Vec<Seg>,
    kind: PendingKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PendingKind {
    Missing { key: &'static str, present: String },
    Shape { expected: String, found: String },
}

impl PendingError {
    pub(crate) fn missing(key: &'static str, present: String) -> Self {
        PendingError {
            path: Vec::new(),
            kind: PendingKind::Missing { key, present },
        }
    }

    pub(crate) fn shape(expected: impl Into<String>, found: impl Into<String>) -> Self {
        PendingError {
            path: Vec::new(),
            kind: PendingKind::Shape {
                expected: expected.into(),
                found: found.into(),
            },
        }
    }

    /// Prefixes the path with one more outer step.
    pub(crate) fn at(mut self, seg: Seg) -> Self {
        self.path.push(seg);
        self
    }

    pub(crate) fn into_error(self) -> TraceError {
        let path = format_path(&self.path);
        match self.kind {
            PendingKind::Missing { key, present } => TraceError::MissingKey {
                path,
                key: key.to_owned(),
                present,
            },
            PendingKind::Shape { expected, found } => TraceError::Shape {
                path,
                expected,
                found,
            },
        }
    }
}

/// Renders innermost-first steps as `device_traces[0][12].addr`.
fn format_path(innermost_first: &[Seg]) -> String {
    use std::fmt::Write;
    if innermost_first.is_empty() {
        return "top level".to_owned();
    }
    let mut out = String::new();
    for seg in innermost_first.iter().rev() {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_like_python_indexing() {
        let e = PendingError::missing("addr", "action, size".into())
            .at(Seg::Index(1234))
            .at(Seg::Index(0))
            .at(Seg::Key("device_traces"))
            .into_error();
        assert_eq!(
            e.to_string(),
            "device_traces[0][1234]: missing key 'addr' (keys present: action, size)"
        );
        let e = PendingError::shape("a dict", "a list of 3 items").into_error();
        assert_eq!(
            e.to_string(),
            "top level: expected a dict, found a list of 3 items"
        );
    }
}
