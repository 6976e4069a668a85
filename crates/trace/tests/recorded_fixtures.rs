//! Two small snapshots recorded with `tools/record_snapshot.py` on an H100 (torch 2.11): one
//! with Python stack frames (frame dicts shared through the memo), one with expandable
//! segments (`segment_map` instead of `segment_alloc`). Facts as `tools/trace_facts.py` prints.

use std::path::PathBuf;

use bufferheap_trace::{
    Action, ReservedTracker, SettingValue, TraceFacts, facts, initial_live_blocks,
    native_reserved_series, read_snapshot,
};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn a_trace_with_stack_frames_decodes_and_drops_the_frames() {
    let snap = read_snapshot(&fixture("stacks_small.pkl.gz")).unwrap();
    assert_eq!(
        facts(&snap, 0),
        TraceFacts {
            events: 1877,
            allocs: 620,
            initial_live: 0,
            initial_live_bytes: 0,
            peak_live_bytes: 838_472_192,
            native_reserved_start: 0,
            native_reserved_end: 838_860_800,
        }
    );
    assert_eq!(snap.segments.len(), 19);
}

#[test]
fn expandable_segments_map_pages_and_the_reserved_curve_starts_at_zero() {
    let snap = read_snapshot(&fixture("expandable_small.pkl.gz")).unwrap();
    let f = facts(&snap, 0);
    assert_eq!(
        (f.events, f.allocs, f.peak_live_bytes),
        (1877, 620, 838_472_192)
    );
    // The oracle counts only segment_alloc/segment_free, so its start equals its end here.
    assert_eq!(f.native_reserved_start, 838_860_800);
    assert_eq!(f.native_reserved_end, 838_860_800);
    let maps = snap
        .events(0)
        .iter()
        .filter(|e| e.action == Action::SegmentMap);
    assert_eq!(maps.count(), 19);
    assert_eq!(
        snap.setting("expandable_segments"),
        Some(&SettingValue::Bool(true))
    );
    assert_eq!(snap.segments.len(), 1);
    assert!(snap.segments[0].is_expandable);

    // The per-event curve counts the mapped pages: from 0 up to the final segment size.
    assert_eq!(ReservedTracker::new(&snap, 0).current(), 0);
    let series = native_reserved_series(&snap, 0);
    assert_eq!(*series.last().unwrap(), 838_860_800);
    assert!(series.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn a_block_whose_free_completes_in_the_trace_was_alive_at_its_start() {
    // The history began between y's free request and its completion (it wrapped, or y waited
    // on another stream's events): y was alive, and the peak counts it.
    let (y, z) = (0x7f00_0000_0000, 0x7f10_0000_0000);
    let ev = |action, addr, size| bufferheap_trace::TraceEvent {
        action,
        addr,
        size,
        stream: 0,
        time_us: 0,
    };
    let snap = bufferheap_trace::Snapshot {
        segments: Vec::new(),
        device_traces: vec![vec![
            ev(Action::FreeCompleted, y, 100 << 20),
            ev(Action::Alloc, z, 1 << 20),
        ]],
        allocator_settings: Vec::new(),
    };
    assert_eq!(initial_live_blocks(&snap, 0), vec![(y, 100 << 20)]);
    assert_eq!(facts(&snap, 0).peak_live_bytes, 100 << 20);
}
