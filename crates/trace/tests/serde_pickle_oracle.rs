//! serde-pickle, an independent general-purpose decoder, agrees with the streaming decoder on
//! every event, segment and block of the ResNet-50 trace.

mod common;

use bufferheap_trace::{BlockState, SegmentType, read_snapshot};
use common::{RESNET, raw_pickle, trace_path};
use serde::Deserialize;

#[derive(Deserialize)]
struct Snap {
    segments: Vec<Seg>,
    device_traces: Vec<Vec<Ev>>,
}

#[derive(Deserialize)]
struct Ev {
    action: String,
    addr: u64,
    size: u64,
    stream: u64,
    time_us: i64,
}

#[derive(Deserialize)]
struct Seg {
    device: u64,
    address: u64,
    total_size: u64,
    allocated_size: u64,
    active_size: u64,
    requested_size: u64,
    stream: u64,
    segment_type: String,
    is_expandable: bool,
    blocks: Vec<Blk>,
}

#[derive(Deserialize)]
struct Blk {
    address: u64,
    size: u64,
    requested_size: u64,
    state: String,
}

#[test]
fn every_event_segment_and_block_matches_serde_pickle() {
    let oracle: Snap =
        serde_pickle::from_slice(&raw_pickle(RESNET), serde_pickle::DeOptions::new()).unwrap();
    let ours = read_snapshot(&trace_path(RESNET)).unwrap();

    assert_eq!(ours.device_traces.len(), oracle.device_traces.len());
    for (d, (mine, theirs)) in ours
        .device_traces
        .iter()
        .zip(&oracle.device_traces)
        .enumerate()
    {
        assert_eq!(mine.len(), theirs.len(), "device {d}");
        for (i, (a, b)) in mine.iter().zip(theirs).enumerate() {
            let at = format!("device_traces[{d}][{i}]");
            assert_eq!(a.action.as_str(), b.action, "{at}");
            assert_eq!(a.addr, b.addr, "{at}");
            assert_eq!(a.size, b.size, "{at}");
            assert_eq!(a.stream, b.stream, "{at}");
            assert_eq!(a.time_us, b.time_us, "{at}");
        }
    }

    assert_eq!(ours.segments.len(), oracle.segments.len());
    for (i, (a, b)) in ours.segments.iter().zip(&oracle.segments).enumerate() {
        let kind = match &a.segment_type {
            SegmentType::Large => "large",
            SegmentType::Small => "small",
            SegmentType::Other(s) => s,
        };
        assert_eq!(
            (
                a.device as u64,
                a.address,
                a.total_size,
                a.allocated_size,
                a.active_size
            ),
            (
                b.device,
                b.address,
                b.total_size,
                b.allocated_size,
                b.active_size
            ),
            "segments[{i}]"
        );
        assert_eq!((a.requested_size, a.stream), (b.requested_size, b.stream));
        assert_eq!(
            (kind, a.is_expandable),
            (b.segment_type.as_str(), b.is_expandable)
        );
        assert_eq!(a.blocks.len(), b.blocks.len(), "segments[{i}].blocks");
        for (x, y) in a.blocks.iter().zip(&b.blocks) {
            let state = match &x.state {
                BlockState::ActiveAllocated => "active_allocated",
                BlockState::ActivePendingFree => "active_pending_free",
                BlockState::Inactive => "inactive",
                BlockState::Other(s) => s,
            };
            assert_eq!(
                (x.address, x.size, x.requested_size),
                (y.address, y.size, y.requested_size)
            );
            assert_eq!(state, y.state);
        }
    }
}
