//! Facts of a snapshot, computed exactly as `tools/trace_facts.py` computes them, and PyTorch's
//! reserved bytes over time.
//!
//! Invariants:
//! - [`facts`] follows the Python oracle step for step, quirks included: a block is alive before
//!   recording if it is freed (`free_requested`, or `free_completed` with no request before it)
//!   before any `alloc` at its address, or if it is `active_allocated` in the final segments at
//!   an address never allocated in the trace (block addresses found by walking each segment's
//!   block sizes). A repeated `alloc` at a live
//!   address counts both sizes, as the oracle does.
//! - Sums are taken in 128 bits, so no input overflows; results saturate to 64 bits.
//! - [`initial_live_blocks`] is sorted by address, so a replay that allocates them first is
//!   deterministic.
//! - [`ReservedTracker`] ends, after the last event, at the final segments' total size.

use std::collections::{HashMap, HashSet};

use crate::model::{Action, BlockState, Snapshot, TraceEvent};

/// What `tools/trace_facts.py` prints for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TraceFacts {
    /// Events in `device_traces[device]`.
    pub events: u64,
    /// `alloc` events.
    pub allocs: u64,
    /// Blocks alive before recording started.
    pub initial_live: u64,
    pub initial_live_bytes: u64,
    /// Most bytes of blocks alive at once, counting the initial live blocks.
    pub peak_live_bytes: u64,
    /// PyTorch's reserved bytes before the first event: final segment total, minus segments
    /// allocated in the trace, plus segments freed in it (negative only if the trace and the
    /// final segments disagree).
    pub native_reserved_start: i64,
    /// PyTorch's reserved bytes at the end: the total size of the final segments.
    pub native_reserved_end: i64,
}

impl TraceFacts {
    /// `native_reserved_end / peak_live_bytes` (how much PyTorch reserved per live byte).
    pub fn native_ratio(&self) -> f64 {
        if self.peak_live_bytes == 0 {
            return f64::NAN;
        }
        self.native_reserved_end as f64 / self.peak_live_bytes as f64
    }
}

fn sat_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn sat_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// The initial live set as a map, exactly as the oracle builds it.
fn initial_live_map(snap: &Snapshot, device: usize) -> HashMap<u64, u64> {
    let trace = snap.events(device);
    let mut allocated: HashSet<u64> = HashSet::new();
    let mut traced: HashSet<u64> = HashSet::new();
    let mut pre: HashMap<u64, u64> = HashMap::new();
    for e in trace {
        match e.action {
            Action::Alloc => {
                allocated.insert(e.addr);
                traced.insert(e.addr);
            }
            Action::FreeRequested if !allocated.contains(&e.addr) => {
                pre.insert(e.addr, e.size);
            }
            // The trace began between a block's free request and its completion (a history
            // that wrapped, or a block waiting on another stream's events): it was alive.
            Action::FreeCompleted if !traced.contains(&e.addr) && !pre.contains_key(&e.addr) => {
                pre.insert(e.addr, e.size);
            }
            Action::FreeCompleted => {
                allocated.remove(&e.addr);
            }
            _ => {}
        }
    }
    for seg in snap.segments_of(device) {
        let mut addr = u128::from(seg.address);
        for b in &seg.blocks {
            if let Ok(a) = u64::try_from(addr)
                && b.state == BlockState::ActiveAllocated
                && !traced.contains(&a)
                && !pre.contains_key(&a)
            {
                pre.insert(a, b.size);
            }
            addr += u128::from(b.size);
        }
    }
    pre
}

/// The blocks alive before recording started on `device`, as `(address, size)` sorted by
/// address.
pub fn initial_live_blocks(snap: &Snapshot, device: usize) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = initial_live_map(snap, device).into_iter().collect();
    v.sort_unstable();
    v
}

/// The facts of `device`'s trace (see [`TraceFacts`]).
pub fn facts(snap: &Snapshot, device: usize) -> TraceFacts {
    let trace = snap.events(device);
    let pre = initial_live_map(snap, device);
    let initial_bytes: u128 = pre.values().map(|&s| u128::from(s)).sum();
    let initial_live = pre.len() as u64;
    let mut live = pre;
    let mut cur = initial_bytes;
    let mut peak = cur;
    let mut allocs = 0u64;
    let (mut seg_alloc, mut seg_free) = (0u128, 0u128);
    for e in trace {
        match e.action {
            Action::Alloc => {
                live.insert(e.addr, e.size);
                cur += u128::from(e.size);
                allocs += 1;
                peak = peak.max(cur);
            }
            Action::FreeCompleted => {
                cur -= live.remove(&e.addr).map_or(0, u128::from);
            }
            Action::SegmentAlloc => seg_alloc += u128::from(e.size),
            Action::SegmentFree => seg_free += u128::from(e.size),
            _ => {}
        }
    }
    let seg_total = segment_total(snap, device);
    TraceFacts {
        events: trace.len() as u64,
        allocs,
        initial_live,
        initial_live_bytes: sat_u64(initial_bytes),
        peak_live_bytes: sat_u64(peak),
        native_reserved_start: sat_i64(seg_total as i128 - seg_alloc as i128 + seg_free as i128),
        native_reserved_end: sat_i64(seg_total as i128),
    }
}

fn segment_total(snap: &Snapshot, device: usize) -> u128 {
    snap.segments_of(device)
        .map(|s| u128::from(s.total_size))
        .sum()
}

/// PyTorch's reserved bytes event by event: start from the value before the first event and
/// call [`ReservedTracker::apply`] on each event in order.
///
/// The start counts `segment_map`/`segment_unmap` as well as `segment_alloc`/`segment_free`, so
/// that the last value equals the final segments' total even with expandable segments. Without
/// map/unmap events it equals [`TraceFacts::native_reserved_start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservedTracker {
    reserved: i128,
}

impl ReservedTracker {
    /// A tracker at the reserved bytes before `device`'s first event.
    pub fn new(snap: &Snapshot, device: usize) -> Self {
        let delta: i128 = snap.events(device).iter().map(Self::delta).sum();
        ReservedTracker {
            reserved: segment_total(snap, device) as i128 - delta,
        }
    }

    fn delta(e: &TraceEvent) -> i128 {
        i128::from(e.action.reserved_sign()) * i128::from(e.size)
    }

    /// The reserved bytes now.
    pub fn current(&self) -> i64 {
        sat_i64(self.reserved)
    }

    /// Applies one event and returns the reserved bytes after it.
    pub fn apply(&mut self, e: &TraceEvent) -> i64 {
        self.reserved += Self::delta(e);
        self.current()
    }
}

/// PyTorch's reserved bytes after each event of `device` (one value per event).
pub fn native_reserved_series(snap: &Snapshot, device: usize) -> Vec<i64> {
    let mut t = ReservedTracker::new(snap, device);
    snap.events(device).iter().map(|e| t.apply(e)).collect()
}
