//! A snapshot made from the engine's own history replays to the engine's own figures: what
//! `bufferheap.snapshot()` writes can be fed back to `bufferheap replay`.

use bufferheap_core::{Allocator, Config, TraceAction};
use bufferheap_replay::{ReplayOptions, replay};
use bufferheap_sim::SimBackend;
use bufferheap_trace::{Action, Snapshot, TraceEvent};

#[test]
fn a_history_replays_to_the_engines_own_peak() {
    let a = Allocator::new(
        SimBackend::new(16 << 30),
        Config {
            history: 1 << 20,
            ..Config::default()
        },
    )
    .unwrap();
    let mut live = Vec::new();
    let mut x: u64 = 7;
    for i in 0..5000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if live.len() < 64 || (x.is_multiple_of(2) && live.len() < 256) {
            let size = 512 + (x % (64 << 20)) as usize / (1 + (i % 7) as usize);
            live.push(a.alloc(size).unwrap().unwrap().ptr);
        } else {
            let k = (x as usize / 2) % live.len();
            a.free(live.swap_remove(k)).unwrap();
        }
    }
    let events: Vec<TraceEvent> = a
        .history()
        .iter()
        .map(|e| TraceEvent {
            action: match e.action {
                TraceAction::Alloc => Action::Alloc,
                TraceAction::FreeRequested => Action::FreeRequested,
                TraceAction::FreeCompleted => Action::FreeCompleted,
                TraceAction::SegmentAlloc => Action::SegmentAlloc,
                TraceAction::SegmentFree => Action::SegmentFree,
                TraceAction::SegmentMap => Action::SegmentMap,
                TraceAction::SegmentUnmap => Action::SegmentUnmap,
                TraceAction::Oom => Action::Oom,
            },
            addr: e.addr,
            size: e.size as u64,
            stream: e.stream,
            time_us: e.time_us,
        })
        .collect();
    let snap = Snapshot {
        segments: Vec::new(),
        device_traces: vec![events],
        allocator_settings: Vec::new(),
    };
    let r = replay(&snap, 0, &ReplayOptions::default(), &mut |_, _| {}).unwrap();
    // Trace sizes are the sizes requested, as in PyTorch's traces.
    assert_eq!(r.peak_live_bytes, a.stats().requested_bytes[0].peak);
    assert_eq!(r.orphan_frees, 0);
}

fn event(action: Action, addr: u64, size: u64) -> TraceEvent {
    TraceEvent {
        action,
        addr,
        size,
        stream: 0,
        time_us: 0,
    }
}

#[test]
fn replaced_blocks_and_empty_blocks_are_not_called_frees_of_unknown_addresses() {
    let (a, b) = (0x7f00_0000_0000, 0x7f10_0000_0000);
    let snap = Snapshot {
        segments: Vec::new(),
        device_traces: vec![vec![
            // A block whose free the trace lacks, replaced by a new one at its address.
            event(Action::Alloc, a, 1 << 20),
            event(Action::Alloc, a, 2 << 20),
            event(Action::FreeCompleted, a, 2 << 20),
            // A block of 0 bytes, allocated and freed.
            event(Action::Alloc, b, 0),
            event(Action::FreeCompleted, b, 0),
        ]],
        allocator_settings: Vec::new(),
    };
    let r = replay(&snap, 0, &ReplayOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(r.orphan_frees, 0, "{:?}", r.warnings());
    assert_eq!(r.replaced_allocs, 1);
    let warnings = r.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("never freed"), "{warnings:?}");
    // Both sizes count as live, as the trace's facts count them.
    assert_eq!(r.peak_live_bytes, 3 << 20);
}

#[test]
fn the_series_starts_with_the_state_before_the_first_event() {
    let (a, b) = (0x7f00_0000_0000, 0x7f10_0000_0000);
    // PyTorch held a 20 MiB segment when recording began and gave it back first.
    let snap = Snapshot {
        segments: Vec::new(),
        device_traces: vec![vec![
            event(Action::SegmentFree, a, 20 << 20),
            event(Action::Alloc, b, 1 << 20),
        ]],
        allocator_settings: Vec::new(),
    };
    let r = replay(&snap, 0, &ReplayOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(r.pytorch_reserved_bytes, 20 << 20);
    let first = r.series.first().expect("a series");
    assert_eq!((first.event, first.pytorch_reserved_bytes), (0, 20 << 20));
    let last = r.series.last().expect("a series");
    assert_eq!(
        (last.event, last.live_bytes),
        (2, 1 << 20),
        "events applied"
    );
}
