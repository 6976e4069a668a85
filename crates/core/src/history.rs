//! The allocation history: the last N allocator events, in the shape of PyTorch's memory
//! snapshot traces, so a snapshot taken under bufferheap can be replayed and viewed.
//!
//! Invariants: off unless asked for (`Config::history`, `Allocator::set_history` or
//! `Allocator::record_history`), and then
//! bounded: the oldest entries go first once `max` are kept. Entries are appended under the
//! engine's lock, in the order the engine changed its state.

use std::collections::VecDeque;

use crate::backend::StreamId;

/// What happened, named as in PyTorch's `device_traces`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceAction {
    Alloc,
    FreeRequested,
    FreeCompleted,
    SegmentAlloc,
    SegmentFree,
    SegmentMap,
    SegmentUnmap,
    Oom,
}

/// One event of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TraceEntry {
    pub action: TraceAction,
    /// The buffer or range address (for `Oom`: the device's free bytes, as PyTorch records).
    pub addr: u64,
    /// Bytes: for a buffer's entries the size requested (as PyTorch records `orig_size` and
    /// `requested_size`), for a segment's its bytes.
    pub size: usize,
    pub stream: StreamId,
    /// Microseconds since the Unix epoch.
    pub time_us: i64,
}

#[derive(Debug)]
pub(crate) struct History {
    entries: VecDeque<TraceEntry>,
    max: usize,
}

impl History {
    pub fn new(max: usize) -> History {
        History {
            entries: VecDeque::with_capacity(max.min(1 << 16)),
            max,
        }
    }

    pub fn push(&mut self, action: TraceAction, addr: u64, size: usize, stream: StreamId) {
        if self.entries.len() == self.max {
            self.entries.pop_front();
        }
        let time_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        self.entries.push_back(TraceEntry {
            action,
            addr,
            size,
            stream,
            time_us,
        });
    }

    /// Keeps at most `max` entries from now on, dropping the oldest beyond it.
    pub fn set_max(&mut self, max: usize) {
        self.max = max;
        let excess = self.entries.len().saturating_sub(max);
        self.entries.drain(..excess);
    }

    /// How many entries are kept at most.
    pub fn max(&self) -> usize {
        self.max
    }

    pub fn entries(&self) -> Vec<TraceEntry> {
        self.entries.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_entries() {
        let mut h = History::new(2);
        for addr in 1..=3 {
            h.push(TraceAction::Alloc, addr, 512, 0);
        }
        let addrs: Vec<u64> = h.entries().iter().map(|e| e.addr).collect();
        assert_eq!(addrs, vec![2, 3]);
    }

    #[test]
    fn a_smaller_limit_drops_the_oldest_entries() {
        let mut h = History::new(4);
        for addr in 1..=4 {
            h.push(TraceAction::Alloc, addr, 512, 0);
        }
        h.set_max(2);
        let addrs: Vec<u64> = h.entries().iter().map(|e| e.addr).collect();
        assert_eq!(addrs, vec![3, 4]);
        h.push(TraceAction::Alloc, 5, 512, 0);
        assert_eq!(h.entries().len(), 2);
    }
}
