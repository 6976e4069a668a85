//! The shipped traces decode to the facts `tools/trace_facts.py` prints for them
//! (see BASELINES.md), and the decoder agrees with itself across gzip/raw input and a
//! re-encoding of the decoded snapshot.

mod common;

use bufferheap_trace::{
    Action, BlockState, ReservedTracker, SettingValue, TraceFacts, facts, initial_live_blocks,
    native_reserved_series, parse_snapshot, read_snapshot,
};
use common::{GPT2, RESNET, encode_snapshot, raw_pickle, trace_path};

#[test]
fn gpt2_facts_match_the_python_oracle() {
    let snap = read_snapshot(&trace_path(GPT2)).unwrap();
    assert_eq!(
        facts(&snap, 0),
        TraceFacts {
            events: 171_428,
            allocs: 57_138,
            initial_live: 447,
            initial_live_bytes: 1_576_914_944,
            peak_live_bytes: 14_433_097_416,
            native_reserved_start: 12_104_761_344,
            native_reserved_end: 18_513_657_856,
        }
    );
    assert_eq!(format!("{:.4}", facts(&snap, 0).native_ratio()), "1.2827");
}

#[test]
fn resnet50_facts_match_the_python_oracle() {
    let snap = read_snapshot(&trace_path(RESNET)).unwrap();
    assert_eq!(
        facts(&snap, 0),
        TraceFacts {
            events: 68_813,
            allocs: 22_934,
            initial_live: 484,
            initial_live_bytes: 275_355_136,
            peak_live_bytes: 3_195_121_448,
            native_reserved_start: 2_805_989_376,
            native_reserved_end: 4_106_223_616,
        }
    );
}

#[test]
fn initial_live_blocks_are_sorted_and_add_up() {
    for name in [GPT2, RESNET] {
        let snap = read_snapshot(&trace_path(name)).unwrap();
        let f = facts(&snap, 0);
        let blocks = initial_live_blocks(&snap, 0);
        assert_eq!(blocks.len() as u64, f.initial_live, "{name}");
        assert_eq!(
            blocks.iter().map(|b| b.1).sum::<u64>(),
            f.initial_live_bytes
        );
        assert!(
            blocks.windows(2).all(|w| w[0].0 < w[1].0),
            "{name}: sorted, unique"
        );
        // Blocks alive before recording do not overlap.
        assert!(
            blocks.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
            "{name}"
        );
    }
}

#[test]
fn reserved_series_runs_from_start_to_the_final_segments() {
    for name in [GPT2, RESNET] {
        let snap = read_snapshot(&trace_path(name)).unwrap();
        let f = facts(&snap, 0);
        let tracker = ReservedTracker::new(&snap, 0);
        assert_eq!(tracker.current(), f.native_reserved_start, "{name}");
        let series = native_reserved_series(&snap, 0);
        assert_eq!(series.len() as u64, f.events);
        assert_eq!(*series.last().unwrap(), f.native_reserved_end);
        // No segment is freed in these traces: the curve only rises.
        assert!(series.windows(2).all(|w| w[0] <= w[1]));
        let steps = series.windows(2).filter(|w| w[0] != w[1]).count();
        let seg_allocs = snap
            .events(0)
            .iter()
            .filter(|e| e.action == Action::SegmentAlloc);
        assert!(steps <= seg_allocs.count());
    }
}

#[test]
fn segments_blocks_and_settings_are_decoded() {
    let snap = read_snapshot(&trace_path(RESNET)).unwrap();
    assert_eq!(snap.segments.len(), 108);
    assert_eq!(snap.device_traces.len(), 1);
    let blocks: Vec<_> = snap.segments.iter().flat_map(|s| &s.blocks).collect();
    assert_eq!(blocks.len(), 587);
    let active = blocks
        .iter()
        .filter(|b| b.state == BlockState::ActiveAllocated)
        .count();
    assert_eq!(active, 484);
    for s in &snap.segments {
        assert_eq!(s.blocks.iter().map(|b| b.size).sum::<u64>(), s.total_size);
        let mut at = s.address;
        for b in &s.blocks {
            assert_eq!(b.address, at, "blocks tile their segment");
            at += b.size;
        }
        assert!(!s.is_expandable);
    }
    assert_eq!(
        snap.setting("expandable_segments"),
        Some(&SettingValue::Bool(false))
    );
    assert_eq!(snap.setting("max_split_size"), Some(&SettingValue::Int(-1)));
    assert_eq!(
        snap.setting("garbage_collection_threshold"),
        Some(&SettingValue::Float(0.0))
    );
    match snap.setting("roundup_power2_divisions") {
        Some(SettingValue::Map(m)) => {
            assert_eq!(m.len(), 16);
            assert_eq!(m[0], ("1".to_owned(), SettingValue::Int(0)));
        }
        other => panic!("roundup_power2_divisions: {other:?}"),
    }
    let first = &snap.device_traces[0][0];
    assert_eq!(first.action, Action::Alloc);
    assert_eq!(first.addr, 140_631_489_904_640);
    assert_eq!(first.size, 28_901_376);
    assert_eq!(first.time_us, 1_795_477_691_554_558);
}

#[test]
fn gzip_and_raw_pickle_decode_the_same() {
    let from_gz = read_snapshot(&trace_path(RESNET)).unwrap();
    let from_raw = parse_snapshot(&raw_pickle(RESNET)).unwrap();
    assert_eq!(from_gz, from_raw);
}

#[test]
fn a_python_style_re_encoding_decodes_to_the_same_snapshot() {
    let snap = read_snapshot(&trace_path(RESNET)).unwrap();
    // Small batches exercise many SETITEMS/APPENDS boundaries and memo lookups past 255.
    let bytes = encode_snapshot(&snap, usize::MAX, usize::MAX, 7);
    let again = parse_snapshot(&bytes).unwrap();
    assert_eq!(again.segments, snap.segments);
    assert_eq!(again.device_traces, snap.device_traces);
    assert_eq!(
        again.setting("max_split_size"),
        Some(&SettingValue::Int(-1))
    );
}
