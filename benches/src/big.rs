//! The big timing trace: the shipped traces' events, concatenated and repeated until there
//! are [`BIG_EVENTS`] of them, each copy shifted in time by the span of the source, with the
//! segments and settings of the first trace. This is what
//! `crates/trace/tools/make_big_trace.py` writes (same events, same order), built in Rust so
//! that no Python and no large file is needed. Addresses repeat from copy to copy: the replay
//! frees a block whose address is allocated again (an orphan, counted), so the live set stays
//! bounded as in the source traces. For timing only: its fragmentation figures mean nothing.

use std::path::Path;

use bufferheap_trace::{Snapshot, TraceEvent};

/// Events of the big trace (the 900k).
pub const BIG_EVENTS: usize = 900_000;

/// Builds the big trace from snapshots (in the given order).
pub fn build(sources: &[Snapshot], events: usize) -> Snapshot {
    let source: Vec<&TraceEvent> = sources.iter().flat_map(|s| s.events(0)).collect();
    let span = match (source.first(), source.last()) {
        (Some(a), Some(b)) => b.time_us - a.time_us + 1,
        _ => 0,
    };
    let mut out = Vec::with_capacity(events);
    let mut copy: i64 = 0;
    while out.len() < events && !source.is_empty() {
        let take = (events - out.len()).min(source.len());
        out.extend(source[..take].iter().map(|&e| TraceEvent {
            time_us: e.time_us + copy * span,
            ..e.clone()
        }));
        copy += 1;
    }
    let first = sources.first().cloned().unwrap_or_default();
    Snapshot {
        segments: first.segments,
        device_traces: vec![out],
        allocator_settings: first.allocator_settings,
    }
}

/// The big trace from the shipped traces (`traces/*.pkl.gz`, sorted by name).
pub fn from_shipped(events: usize) -> Snapshot {
    let sources: Vec<Snapshot> = crate::shipped_traces().iter().map(|p| read(p)).collect();
    build(&sources, events)
}

fn read(path: &Path) -> Snapshot {
    bufferheap_trace::read_snapshot(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The gzipped pickle of the big trace.
pub fn shipped_gz(events: usize) -> Vec<u8> {
    crate::pickle::to_pickle_gz(&from_shipped(events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_the_source_shifted_in_time() {
        let resnet = read(&crate::traces_dir().join("resnet50_train.pkl.gz"));
        let n = resnet.events(0).len();
        let big = build(std::slice::from_ref(&resnet), 2 * n + 10);
        let ev = big.events(0);
        assert_eq!(ev.len(), 2 * n + 10);
        let src = resnet.events(0);
        let span = src[n - 1].time_us - src[0].time_us + 1;
        assert_eq!(ev[n].addr, src[0].addr);
        assert_eq!(ev[n].time_us, src[0].time_us + span);
        assert_eq!(ev[2 * n + 9].time_us, src[9].time_us + 2 * span);
        assert_eq!(big.segments, resnet.segments);
    }
}
