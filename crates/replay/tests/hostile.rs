//! Traces whose shape would make a replay's cost unbounded are refused with a clear error.

use bufferheap_core::Policy;
use bufferheap_replay::{MAX_STREAMS, ReplayError, ReplayOptions, replay};
use bufferheap_trace::{Action, Snapshot, TraceEvent};

fn on_streams(n: u64) -> Snapshot {
    let events = (0..n)
        .map(|i| TraceEvent {
            action: Action::Alloc,
            addr: 0x7f00_0000_0000 + i * 0x20_0000,
            size: 4096,
            stream: 1000 + i,
            time_us: i as i64,
        })
        .collect();
    Snapshot {
        segments: Vec::new(),
        device_traces: vec![events],
        allocator_settings: Vec::new(),
    }
}

#[test]
fn a_new_stream_in_every_event_is_refused_past_the_limit() {
    for policy in [Policy::Default, Policy::Mps] {
        let options = ReplayOptions {
            policy,
            ..ReplayOptions::default()
        };
        let n = MAX_STREAMS as u64;
        let report = replay(&on_streams(n), 0, &options, &mut |_, _| {}).unwrap();
        assert_eq!(report.allocs, n);
        match replay(&on_streams(n + 1), 0, &options, &mut |_, _| {}) {
            Err(e @ ReplayError::TooManyStreams { .. }) => {
                let text = e.to_string();
                assert!(
                    text.starts_with(&format!(
                        "device 0: the trace allocates on more than {MAX_STREAMS} streams"
                    )),
                    "{text}"
                );
                assert!(text.contains(&format!("at event {n}")), "{text}");
            }
            other => panic!("{policy}: {other:?}"),
        }
    }
}

#[test]
fn blocks_whose_sizes_add_past_u64_do_not_break_the_replay() {
    let free = |addr| TraceEvent {
        action: Action::FreeRequested,
        addr,
        size: 1 << 63,
        stream: 0,
        time_us: 0,
    };
    let snap = Snapshot {
        segments: Vec::new(),
        device_traces: vec![vec![free(0x1000), free(0x2000)]],
        allocator_settings: Vec::new(),
    };
    // Blocks alive before recording, each larger than any device: an error, not a panic.
    let result = replay(&snap, 0, &ReplayOptions::default(), &mut |_, _| {});
    let e = result.expect_err("no device holds them");
    assert!(e.to_string().contains("initial block"), "{e}");
}
