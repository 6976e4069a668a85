//! The JSON answers of `bufferheap_stats_json` and `bufferheap_snapshot_json`.
//!
//! Invariants: every answer is one JSON object built with serde_json (so it never holds a
//! NUL byte and always parses); a device whose allocator does not exist yet answers with
//! zero counters and no segments, without creating the allocator (looking does not start a
//! device or freeze the configuration). Disabled watermark limits are `null`, never
//! `usize::MAX`.

use std::collections::BTreeMap;

use bufferheap_core::{SegmentInfo, Stats};
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{FfiError, FfiResult};
use crate::registry::{Registry, System};

fn limit(bytes: usize) -> Value {
    if bytes == usize::MAX {
        Value::Null
    } else {
        json!(bytes)
    }
}

/// `torch.cuda.memory_stats()`-like counters of one device, plus `policy`,
/// `low_watermark_limit`, `high_watermark_limit` and `device`.
pub fn stats_json(reg: &Registry, sys: &System, device: usize) -> FfiResult<String> {
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    let (counters, policy, low, high) = match sys.existing(device) {
        Some(a) => (
            a.stats(),
            a.policy(),
            limit(a.low_watermark_limit()),
            limit(a.high_watermark_limit()),
        ),
        None => (
            Stats::default(),
            reg.config()?.policy,
            Value::Null,
            Value::Null,
        ),
    };
    out.extend(counters.to_map().into_iter().map(|(k, v)| (k, json!(v))));
    out.insert("policy".into(), json!(policy.to_string()));
    out.insert("low_watermark_limit".into(), low);
    out.insert("high_watermark_limit".into(), high);
    out.insert("device".into(), json!(device));
    to_string(&out)
}

/// A block as PyTorch's `_snapshot()` writes it.
#[derive(Debug, Serialize)]
struct Block {
    address: u64,
    size: usize,
    requested_size: usize,
    state: bufferheap_core::BlockState,
    frames: Vec<Value>,
}

/// A segment as PyTorch's `_snapshot()` writes it.
#[derive(Debug, Serialize)]
struct Segment {
    device: usize,
    address: u64,
    total_size: usize,
    allocated_size: usize,
    active_size: usize,
    requested_size: usize,
    stream: u64,
    segment_type: &'static str,
    segment_pool_id: [u64; 2],
    is_expandable: bool,
    frames: Vec<Value>,
    blocks: Vec<Block>,
}

impl Segment {
    fn new(device: usize, s: SegmentInfo) -> Segment {
        Segment {
            device,
            address: s.address,
            total_size: s.total_size,
            allocated_size: s.allocated_size,
            active_size: s.active_size,
            requested_size: s.requested_size,
            stream: s.stream,
            segment_type: s.segment_type,
            segment_pool_id: [0, 0],
            is_expandable: s.is_expandable,
            frames: Vec::new(),
            blocks: s
                .blocks
                .into_iter()
                .map(|b| Block {
                    address: b.address,
                    size: b.size,
                    requested_size: b.requested_size,
                    state: b.state,
                    frames: Vec::new(),
                })
                .collect(),
        }
    }
}

/// `{"segments": [...], "device_traces": [[...]...], "allocator_settings": {...}}` of one
/// device, or of every device for -1 (one trace list per device: its allocation history,
/// empty unless a history is kept).
pub fn snapshot_json(reg: &Registry, sys: &System, device: i32) -> FfiResult<String> {
    let devices = sys.devices_of(device)?;
    let traces = if device == -1 { sys.count() } else { 1 };
    let mut segments = Vec::new();
    let mut device_traces = vec![Vec::<Value>::new(); traces];
    for (i, d) in devices.enumerate() {
        if let Some(a) = sys.existing(d) {
            // Read together, so that they agree while other threads allocate.
            let (segs, history) = a.segments_and_history();
            segments.extend(segs.into_iter().map(|s| Segment::new(d, s)));
            device_traces[i] = history.iter().map(trace_entry).collect();
        }
    }
    let policy = match sys.existing(device.max(0) as usize) {
        Some(a) => a.policy(),
        None => reg.config()?.policy,
    };
    let answer = json!({
        "segments": segments,
        "device_traces": device_traces,
        "allocator_settings": {
            "policy": policy.to_string(),
            "memory_backend": sys.kind.to_string(),
        },
    });
    to_string(&answer)
}

/// One history entry as PyTorch writes a `device_traces` entry (an `oom` names the device's
/// free bytes `device_free`, not an address).
fn trace_entry(e: &bufferheap_core::TraceEntry) -> Value {
    let action = serde_json::to_value(e.action).unwrap_or(Value::Null);
    let mut entry = json!({
        "action": action,
        "size": e.size,
        "stream": e.stream,
        "time_us": e.time_us,
        "frames": [],
    });
    let key = if e.action == bufferheap_core::TraceAction::Oom {
        "device_free"
    } else {
        "addr"
    };
    entry[key] = json!(e.addr);
    entry
}

fn to_string(value: &impl Serialize) -> FfiResult<String> {
    serde_json::to_string(value)
        .map_err(|e| FfiError::new(format!("bufferheap: cannot encode the answer as JSON: {e}")))
}
