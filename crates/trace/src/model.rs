//! The typed snapshot model: what a PyTorch memory snapshot says, in compact Rust types.
//!
//! Invariants:
//! - A [`Snapshot`] holds only what a replay needs: the segments alive when the snapshot was
//!   taken (with their blocks), one event list per device, and the allocator settings.
//!   Stack frames, user metadata and compile contexts are never kept.
//! - `device_traces[d]` keeps PyTorch's order: event `i` happened before event `i + 1`.
//! - Unknown action, block-state and segment-type strings are kept verbatim in an `Unknown` /
//!   `Other` variant, never rejected, so newer PyTorch versions still load.
//! - Every size and address is in bytes and non-negative; the decoder rejects negative values.

use std::fmt;

/// A decoded PyTorch memory snapshot (`torch.cuda.memory._snapshot()`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// Segments (cudaMalloc'd ranges) alive when the snapshot was taken, every device.
    pub segments: Vec<Segment>,
    /// Recorded allocator events, one list per device index.
    pub device_traces: Vec<Vec<TraceEvent>>,
    /// `allocator_settings` as PyTorch reported them, in file order (empty for older versions).
    pub allocator_settings: Vec<(String, SettingValue)>,
}

impl Snapshot {
    /// The events recorded for `device`; empty if the snapshot has none for it.
    pub fn events(&self, device: usize) -> &[TraceEvent] {
        self.device_traces.get(device).map_or(&[], Vec::as_slice)
    }

    /// The segments of `device`.
    pub fn segments_of(&self, device: usize) -> impl Iterator<Item = &Segment> {
        self.segments.iter().filter(move |s| s.device == device)
    }

    /// One allocator setting by name, e.g. `"expandable_segments"`.
    pub fn setting(&self, name: &str) -> Option<&SettingValue> {
        self.allocator_settings
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

/// One segment: a range PyTorch obtained from the driver, split into blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub device: usize,
    pub address: u64,
    pub total_size: u64,
    pub allocated_size: u64,
    pub active_size: u64,
    pub requested_size: u64,
    pub stream: u64,
    pub segment_type: SegmentType,
    pub is_expandable: bool,
    /// Blocks in address order; their sizes add up to `total_size` in PyTorch's snapshots.
    pub blocks: Vec<Block>,
}

/// The pool a segment belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SegmentType {
    /// Blocks of at most 1 MiB live in 2 MiB segments.
    Small,
    Large,
    Other(String),
}

/// One block inside a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Start address. Taken from the file when present, else the segment address plus the sizes
    /// of the blocks before it.
    pub address: u64,
    pub size: u64,
    /// What the caller asked for (`size` when the file does not say).
    pub requested_size: u64,
    pub state: BlockState,
}

/// The state of a block when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Handed out to the program.
    ActiveAllocated,
    /// Freed by the program but still in use by a stream (recorded events pending).
    ActivePendingFree,
    /// Cached: free for reuse.
    Inactive,
    Other(String),
}

/// One allocator event of `device_traces`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceEvent {
    pub action: Action,
    /// The block or segment address. For [`Action::Oom`] PyTorch records the device's free bytes
    /// (key `device_free`) instead, and that value is stored here.
    pub addr: u64,
    pub size: u64,
    /// The CUDA stream handle as an integer (0 is the default stream).
    pub stream: u64,
    /// Microseconds since the epoch (0 when the file has no `time_us`).
    pub time_us: i64,
}

/// What an event did.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// A block was handed out (`alloc`).
    Alloc,
    /// The program freed a block; streams may still use it (`free_requested`).
    FreeRequested,
    /// The block is really free (`free_completed`); the live set shrinks here.
    FreeCompleted,
    /// A segment was obtained from the driver (`segment_alloc`).
    SegmentAlloc,
    /// A segment was given back to the driver (`segment_free`).
    SegmentFree,
    /// Pages were mapped into an expandable segment (`segment_map`).
    SegmentMap,
    /// Pages were unmapped from an expandable segment (`segment_unmap`).
    SegmentUnmap,
    /// The program called `_snapshot()` while recording (`snapshot`).
    Snapshot,
    /// An allocation failed (`oom`).
    Oom,
    /// An action this crate does not know, kept verbatim.
    Unknown(String),
}

impl Action {
    /// The action from PyTorch's name for it.
    pub fn from_name(name: &str) -> Action {
        match name {
            "alloc" => Action::Alloc,
            "free_requested" => Action::FreeRequested,
            "free_completed" => Action::FreeCompleted,
            "segment_alloc" => Action::SegmentAlloc,
            "segment_free" => Action::SegmentFree,
            "segment_map" => Action::SegmentMap,
            "segment_unmap" => Action::SegmentUnmap,
            "snapshot" => Action::Snapshot,
            "oom" => Action::Oom,
            other => Action::Unknown(other.to_owned()),
        }
    }

    /// PyTorch's name for the action.
    pub fn as_str(&self) -> &str {
        match self {
            Action::Alloc => "alloc",
            Action::FreeRequested => "free_requested",
            Action::FreeCompleted => "free_completed",
            Action::SegmentAlloc => "segment_alloc",
            Action::SegmentFree => "segment_free",
            Action::SegmentMap => "segment_map",
            Action::SegmentUnmap => "segment_unmap",
            Action::Snapshot => "snapshot",
            Action::Oom => "oom",
            Action::Unknown(name) => name,
        }
    }

    /// How the event changes PyTorch's reserved bytes: `+1` for segment alloc/map, `-1` for
    /// segment free/unmap, `0` otherwise.
    pub fn reserved_sign(&self) -> i8 {
        match self {
            Action::SegmentAlloc | Action::SegmentMap => 1,
            Action::SegmentFree | Action::SegmentUnmap => -1,
            _ => 0,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One value of `allocator_settings`.
#[derive(Debug, Clone, PartialEq)]
pub enum SettingValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A nested dict (e.g. `roundup_power2_divisions`), keys as strings, file order, last
    /// duplicate wins.
    Map(Vec<(String, SettingValue)>),
    /// Anything else, described in words (e.g. "a list of 3 items").
    Other(String),
}

impl fmt::Display for SettingValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SettingValue::None => f.write_str("None"),
            SettingValue::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            SettingValue::Int(i) => write!(f, "{i}"),
            SettingValue::Float(x) => write!(f, "{x:?}"),
            SettingValue::Str(s) => write!(f, "{s:?}"),
            SettingValue::Map(m) => {
                f.write_str("{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k:?}: {v}")?;
                }
                f.write_str("}")
            }
            SettingValue::Other(s) => write!(f, "<{s}>"),
        }
    }
}
