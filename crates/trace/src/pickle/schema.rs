//! The snapshot schema: turns decoded dict records into typed structs.
//!
//! Invariants:
//! - Required keys: events need `action`, `addr` (`device_free` for `oom` events) and `size`;
//!   segments need `device`, `address`, `total_size`, `segment_type` and `blocks`; blocks need
//!   `size` and `state`; the top level needs `segments` and `device_traces`. Every other key has
//!   a default (0, `false`, `size` for a block's `requested_size`) so older files still load.
//! - A key with a value of the wrong type is an error, never coerced (except that any integer
//!   that fits is accepted for `time_us`).
//! - Errors come back as [`PendingError`]s with a path relative to the record; callers prefix
//!   the record's own place.

use std::collections::HashMap;

use crate::error::{PendingError, Seg};
use crate::model::{
    Action, Block, BlockState, Segment, SegmentType, SettingValue, Snapshot, TraceEvent,
};
use crate::pickle::value::{Budget, Found, ListAcc, ListShape, Name, Record, Value};

type Res<T> = Result<T, PendingError>;

const NON_NEGATIVE: &str = "a non-negative integer";

fn missing(rec: &Record, key: Name) -> PendingError {
    PendingError::missing(key.as_str(), rec.key_list())
}

fn wrong(key: Name, expected: &'static str, found: &Value) -> PendingError {
    // An integer refused here is refused for its value: say which.
    let found = match found {
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        Value::HugeInt(false) => "an integer of 2**64 or more".to_owned(),
        Value::HugeInt(true) => "an integer below -2**63".to_owned(),
        other => other.describe(),
    };
    PendingError::shape(expected, found).at(Seg::Key(key.as_str()))
}

fn as_u64(key: Name, v: &Value) -> Res<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        Value::UInt(u) => Ok(*u),
        Value::Int(i) => {
            Err(PendingError::shape(NON_NEGATIVE, format!("{i}")).at(Seg::Key(key.as_str())))
        }
        other => Err(wrong(key, NON_NEGATIVE, other)),
    }
}

fn req_u64(rec: &Record, key: Name) -> Res<u64> {
    match rec.get(key) {
        Some(v) => as_u64(key, v),
        None => Err(missing(rec, key)),
    }
}

fn opt_u64(rec: &Record, key: Name) -> Res<Option<u64>> {
    rec.get(key).map(|v| as_u64(key, v)).transpose()
}

fn opt_i64(rec: &Record, key: Name) -> Res<Option<i64>> {
    match rec.get(key) {
        None => Ok(None),
        Some(Value::Int(i)) => Ok(Some(*i)),
        Some(other) => Err(wrong(key, "a 64-bit integer", other)),
    }
}

fn opt_bool(rec: &Record, key: Name) -> Res<Option<bool>> {
    match rec.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(wrong(key, "a bool", other)),
    }
}

fn req_text(rec: &Record, key: Name) -> Res<&str> {
    match rec.get(key) {
        None => Err(missing(rec, key)),
        Some(v) => v.as_text().ok_or_else(|| wrong(key, "a string", v)),
    }
}

/// A `device_traces[d][i]` dict.
pub(crate) fn event(rec: &Record) -> Res<TraceEvent> {
    let action = match rec.get(Name::Action) {
        None => return Err(missing(rec, Name::Action)),
        Some(Value::Name(n)) => match n {
            Name::Alloc => Action::Alloc,
            Name::FreeRequested => Action::FreeRequested,
            Name::FreeCompleted => Action::FreeCompleted,
            Name::SegmentAlloc => Action::SegmentAlloc,
            Name::SegmentFree => Action::SegmentFree,
            Name::SegmentMap => Action::SegmentMap,
            Name::SegmentUnmap => Action::SegmentUnmap,
            Name::Snapshot => Action::Snapshot,
            Name::Oom => Action::Oom,
            other => Action::Unknown(other.as_str().to_owned()),
        },
        Some(Value::Str(s)) => Action::from_name(s),
        Some(other) => return Err(wrong(Name::Action, "a string", other)),
    };
    let addr = match (opt_u64(rec, Name::Addr)?, &action) {
        (Some(a), _) => a,
        // PyTorch's oom events carry `device_free` in place of `addr`.
        (None, Action::Oom) => match opt_u64(rec, Name::DeviceFree)? {
            Some(free) => free,
            None => return Err(missing(rec, Name::Addr)),
        },
        (None, _) => return Err(missing(rec, Name::Addr)),
    };
    Ok(TraceEvent {
        addr,
        size: req_u64(rec, Name::Size)?,
        stream: opt_u64(rec, Name::Stream)?.unwrap_or(0),
        time_us: opt_i64(rec, Name::TimeUs)?.unwrap_or(0),
        action,
    })
}

/// A `segments[s].blocks[b]` dict, and whether it had an `address` key.
pub(crate) fn block(rec: &Record) -> Res<(Block, bool)> {
    let size = req_u64(rec, Name::Size)?;
    let state = match rec.get(Name::State) {
        None => return Err(missing(rec, Name::State)),
        Some(Value::Name(Name::ActiveAllocated)) => BlockState::ActiveAllocated,
        Some(Value::Name(Name::ActivePendingFree)) => BlockState::ActivePendingFree,
        Some(Value::Name(Name::Inactive)) => BlockState::Inactive,
        Some(v) => match v.as_text() {
            Some(t) => BlockState::Other(t.to_owned()),
            None => return Err(wrong(Name::State, "a string", v)),
        },
    };
    let address = opt_u64(rec, Name::Address)?;
    let block = Block {
        address: address.unwrap_or(0),
        size,
        requested_size: opt_u64(rec, Name::RequestedSize)?.unwrap_or(size),
        state,
    };
    Ok((block, address.is_some()))
}

/// Takes a list value out of `rec[key]`, which must have the given shape.
fn take_list(rec: &mut Record, key: Name, want: ListShape) -> Res<Option<ListAcc>> {
    let Some(v) = rec.take(key) else {
        return Ok(None);
    };
    let here = Seg::Key(key.as_str());
    let expected = match want {
        ListShape::Events => "a list of trace events",
        ListShape::Blocks => "a list of blocks",
        ListShape::Segments => "a list of segments",
        _ => "a list of per-device lists of trace events",
    };
    let acc = match v {
        Value::List(acc) => *acc,
        other => return Err(PendingError::shape(expected, Found::of(&other).to_string()).at(here)),
    };
    match acc.shape() {
        ListShape::Empty => Ok(Some(acc)),
        s if s == want => Ok(Some(acc)),
        ListShape::Untyped(first) => Err(PendingError::shape(want.item_words(), first.to_string())
            .at(Seg::Index(0))
            .at(here)),
        _ => match acc {
            ListAcc::Broken { err, .. } => Err(err.at(here)),
            other => {
                Err(PendingError::shape(expected, Found::List(other.shape()).to_string()).at(here))
            }
        },
    }
}

/// A `segments[s]` dict.
pub(crate) fn segment(mut rec: Record) -> Res<Segment> {
    let device = req_u64(&rec, Name::Device)?;
    let device = usize::try_from(device).map_err(|_| {
        PendingError::shape("a device index", device.to_string()).at(Seg::Key("device"))
    })?;
    let address = req_u64(&rec, Name::Address)?;
    let total_size = req_u64(&rec, Name::TotalSize)?;
    let segment_type = match req_text(&rec, Name::SegmentType)? {
        "large" => SegmentType::Large,
        "small" => SegmentType::Small,
        other => SegmentType::Other(other.to_owned()),
    };
    let (mut blocks, all_addressed) = match take_list(&mut rec, Name::Blocks, ListShape::Blocks)? {
        Some(ListAcc::Blocks(blocks, all)) => (blocks, all),
        Some(_) => (Vec::new(), true),
        None => return Err(missing(&rec, Name::Blocks)),
    };
    if !all_addressed {
        // Older files give no block addresses: blocks tile the segment in order.
        let mut at = address;
        for b in &mut blocks {
            b.address = at;
            at = at.saturating_add(b.size);
        }
    }
    Ok(Segment {
        device,
        address,
        total_size,
        allocated_size: opt_u64(&rec, Name::AllocatedSize)?.unwrap_or(0),
        active_size: opt_u64(&rec, Name::ActiveSize)?.unwrap_or(0),
        requested_size: opt_u64(&rec, Name::RequestedSize)?.unwrap_or(0),
        stream: opt_u64(&rec, Name::Stream)?.unwrap_or(0),
        segment_type,
        is_expandable: opt_bool(&rec, Name::IsExpandable)?.unwrap_or(false),
        blocks,
    })
}

/// The top-level dict.
pub(crate) fn snapshot(top: Value, budget: &mut Budget) -> Res<Snapshot> {
    let mut rec = match top {
        Value::Dict(rec) => rec,
        other => {
            return Err(PendingError::shape(
                "a dict with keys 'segments' and 'device_traces' (a PyTorch memory snapshot)",
                Found::of(&other).to_string(),
            ));
        }
    };
    budget.release(rec.weight);
    let segments = match take_list(&mut rec, Name::Segments, ListShape::Segments)? {
        Some(ListAcc::Segments(s)) => s,
        Some(_) => Vec::new(),
        None => return Err(missing(&rec, Name::Segments)),
    };
    let device_traces = match take_list(&mut rec, Name::DeviceTraces, ListShape::Traces)? {
        Some(ListAcc::Traces(t)) => t,
        Some(_) => Vec::new(),
        None => return Err(missing(&rec, Name::DeviceTraces)),
    };
    let allocator_settings = match rec.take(Name::AllocatorSettings) {
        None | Some(Value::None) => Vec::new(),
        Some(Value::Dict(settings)) => settings_map(*settings),
        Some(other) => {
            return Err(PendingError::shape("a dict", Found::of(&other).to_string())
                .at(Seg::Key("allocator_settings")));
        }
    };
    Ok(Snapshot {
        segments,
        device_traces,
        allocator_settings,
    })
}

fn key_text(k: &Value) -> String {
    match k {
        Value::Int(i) => i.to_string(),
        Value::UInt(u) => u.to_string(),
        other => other
            .as_text()
            .map_or_else(|| other.describe(), str::to_owned),
    }
}

/// A dict of settings, keys as text, duplicates resolved to the last value in first position.
fn settings_map(rec: Record) -> Vec<(String, SettingValue)> {
    let mut out: Vec<(String, SettingValue)> = Vec::with_capacity(rec.entries.len());
    let mut at: HashMap<String, usize> = HashMap::new();
    for (k, v) in rec.entries {
        let key = key_text(&k);
        let value = setting(v);
        match at.get(&key) {
            Some(&i) => out[i].1 = value,
            None => {
                at.insert(key.clone(), out.len());
                out.push((key, value));
            }
        }
    }
    out
}

fn setting(v: Value) -> SettingValue {
    match v {
        Value::None => SettingValue::None,
        Value::Bool(b) => SettingValue::Bool(b),
        Value::Int(i) => SettingValue::Int(i),
        Value::Float(x) => SettingValue::Float(x),
        Value::Name(n) => SettingValue::Str(n.as_str().to_owned()),
        Value::Str(s) => SettingValue::Str(s.to_string()),
        Value::Dict(rec) => SettingValue::Map(settings_map(*rec)),
        Value::UInt(u) => SettingValue::Other(format!("the integer {u}")),
        Value::List(l) => SettingValue::Other(format!("a list of {} items", l.len())),
        Value::Tuple(n) => SettingValue::Other(format!("a tuple of {n} items")),
        other => SettingValue::Other(Found::of(&other).to_string()),
    }
}
