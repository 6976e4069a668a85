//! Writes a [`Snapshot`] as the pickle `torch.cuda.memory._dump_snapshot` would write:
//! protocol 4, every dict, list, tuple and string memoized, repeated strings as memo
//! references, items in batches of 1000 (`SETITEMS`/`APPENDS`), integers in the shortest
//! opcode. Events carry the `compile_context` and `user_metadata` keys PyTorch 2.11 adds;
//! segments and blocks carry empty `frames`. No `FRAME` opcodes (readers do not need them).
//!
//! The decoder of `bufferheap-trace` reads back exactly the snapshot that was written (the
//! tests check this), so the output is a faithful stand-in for a recorded trace of the same
//! events, for timing.

use std::collections::HashMap;
use std::io::Write;

use bufferheap_trace::{Action, BlockState, SegmentType, SettingValue, Snapshot, TraceEvent};

const MARK: u8 = b'(';
const STOP: u8 = b'.';
const EMPTY_DICT: u8 = b'}';
const EMPTY_LIST: u8 = b']';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const MEMOIZE: u8 = 0x94;
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const SHORT_BINUNICODE: u8 = 0x8c;
const BINUNICODE: u8 = b'X';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const BININT: u8 = b'J';
const LONG1: u8 = 0x8a;
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const NONE: u8 = b'N';
const BINFLOAT: u8 = b'G';
const TUPLE2: u8 = 0x86;
const PROTO: u8 = 0x80;

/// Python's pickler batch size.
const BATCH: usize = 1000;

/// A pickle being written.
#[derive(Debug, Default)]
struct Pickler {
    out: Vec<u8>,
    strings: HashMap<String, u32>,
    memo: u32,
}

/// A value to write: what Python would hold.
enum Item<'a> {
    Str(&'a str),
    Int(i128),
    Bool(bool),
    None,
    Float(f64),
}

impl Pickler {
    fn new() -> Self {
        let mut p = Pickler::default();
        p.out.extend_from_slice(&[PROTO, 4]);
        p
    }

    fn memoize(&mut self) -> u32 {
        self.out.push(MEMOIZE);
        self.memo += 1;
        self.memo - 1
    }

    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[BINGET, i as u8]);
        } else {
            self.out.push(LONG_BINGET);
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    fn str(&mut self, s: &str) {
        if let Some(&i) = self.strings.get(s) {
            self.get(i);
            return;
        }
        if s.len() < 256 {
            self.out
                .extend_from_slice(&[SHORT_BINUNICODE, s.len() as u8]);
        } else {
            self.out.push(BINUNICODE);
            self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(s.as_bytes());
        let i = self.memoize();
        self.strings.insert(s.to_owned(), i);
    }

    fn int(&mut self, v: i128) {
        if (0..=0xff).contains(&v) {
            self.out.extend_from_slice(&[BININT1, v as u8]);
        } else if (0..=0xffff).contains(&v) {
            self.out.push(BININT2);
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(BININT);
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // Shortest two's complement, little-endian (Python's encode_long).
            let mut bytes = v.to_le_bytes().to_vec();
            while bytes.len() > 1 {
                let (last, prev) = (bytes[bytes.len() - 1], bytes[bytes.len() - 2]);
                if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                    bytes.pop();
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[LONG1, bytes.len() as u8]);
            self.out.extend_from_slice(&bytes);
        }
    }

    fn item(&mut self, item: &Item<'_>) {
        match *item {
            Item::Str(s) => self.str(s),
            Item::Int(i) => self.int(i),
            Item::Bool(b) => self.out.push(if b { NEWTRUE } else { NEWFALSE }),
            Item::None => self.out.push(NONE),
            Item::Float(x) => {
                self.out.push(BINFLOAT);
                self.out.extend_from_slice(&x.to_be_bytes());
            }
        }
    }

    /// A dict whose values are written by `write_value(pickler, index)`.
    fn dict(&mut self, keys: &[&str], mut write_value: impl FnMut(&mut Self, usize)) {
        self.out.push(EMPTY_DICT);
        self.memoize();
        for (b, chunk) in keys.chunks(BATCH).enumerate() {
            if chunk.len() > 1 {
                self.out.push(MARK);
            }
            for (j, k) in chunk.iter().enumerate() {
                self.str(k);
                write_value(self, b * BATCH + j);
            }
            self.out
                .push(if chunk.len() > 1 { SETITEMS } else { SETITEM });
        }
    }

    /// A dict of plain items.
    fn flat_dict(&mut self, entries: &[(&str, Item<'_>)]) {
        let keys: Vec<&str> = entries.iter().map(|e| e.0).collect();
        self.dict(&keys, |p, i| p.item(&entries[i].1));
    }

    /// A list of `n` elements written by `write_elem(pickler, index)`.
    fn list(&mut self, n: usize, mut write_elem: impl FnMut(&mut Self, usize)) {
        self.out.push(EMPTY_LIST);
        self.memoize();
        let mut start = 0;
        while start < n {
            let end = (start + BATCH).min(n);
            if end - start > 1 {
                self.out.push(MARK);
            }
            for i in start..end {
                write_elem(self, i);
            }
            self.out
                .push(if end - start > 1 { APPENDS } else { APPEND });
            start = end;
        }
    }

    fn event(&mut self, e: &TraceEvent) {
        let addr_key = if e.action == Action::Oom {
            "device_free"
        } else {
            "addr"
        };
        self.flat_dict(&[
            ("action", Item::Str(e.action.as_str())),
            (addr_key, Item::Int(e.addr as i128)),
            ("size", Item::Int(e.size as i128)),
            ("stream", Item::Int(e.stream as i128)),
            ("time_us", Item::Int(e.time_us as i128)),
            ("compile_context", Item::Str("N/A")),
            ("user_metadata", Item::Str("")),
        ]);
    }

    fn setting(&mut self, v: &SettingValue) {
        match v {
            SettingValue::None | SettingValue::Other(_) => self.item(&Item::None),
            SettingValue::Bool(b) => self.item(&Item::Bool(*b)),
            SettingValue::Int(i) => self.item(&Item::Int(*i as i128)),
            SettingValue::Float(x) => self.item(&Item::Float(*x)),
            SettingValue::Str(s) => self.item(&Item::Str(s)),
            SettingValue::Map(m) => {
                let keys: Vec<&str> = m.iter().map(|(k, _)| k.as_str()).collect();
                self.dict(&keys, |p, i| p.setting(&m[i].1));
            }
        }
    }

    fn snapshot(&mut self, snap: &Snapshot) {
        let keys = [
            "segments",
            "device_traces",
            "allocator_settings",
            "external_annotations",
        ];
        self.dict(&keys, |p, i| match i {
            0 => p.list(snap.segments.len(), |p, s| p.segment(&snap.segments[s])),
            1 => p.list(snap.device_traces.len(), |p, d| {
                let events = &snap.device_traces[d];
                p.list(events.len(), |p, i| p.event(&events[i]));
            }),
            2 => {
                let keys: Vec<&str> = snap
                    .allocator_settings
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect();
                p.dict(&keys, |p, i| p.setting(&snap.allocator_settings[i].1));
            }
            _ => p.list(0, |_, _| {}),
        });
    }

    fn segment(&mut self, s: &bufferheap_trace::Segment) {
        let segment_type = match &s.segment_type {
            SegmentType::Small => "small",
            SegmentType::Large => "large",
            SegmentType::Other(t) => t.as_str(),
        };
        let keys = [
            "device",
            "address",
            "total_size",
            "allocated_size",
            "active_size",
            "requested_size",
            "stream",
            "segment_type",
            "segment_pool_id",
            "is_expandable",
            "frames",
            "blocks",
        ];
        self.dict(&keys, |p, i| match i {
            0 => p.int(s.device as i128),
            1 => p.int(s.address as i128),
            2 => p.int(s.total_size as i128),
            3 => p.int(s.allocated_size as i128),
            4 => p.int(s.active_size as i128),
            5 => p.int(s.requested_size as i128),
            6 => p.int(s.stream as i128),
            7 => p.str(segment_type),
            8 => {
                p.int(0);
                p.int(0);
                p.out.push(TUPLE2);
                p.memoize();
            }
            9 => p.item(&Item::Bool(s.is_expandable)),
            10 => p.list(0, |_, _| {}),
            _ => p.list(s.blocks.len(), |p, b| {
                let b = &s.blocks[b];
                let state = match &b.state {
                    BlockState::ActiveAllocated => "active_allocated",
                    BlockState::ActivePendingFree => "active_pending_free",
                    BlockState::Inactive => "inactive",
                    BlockState::Other(t) => t.as_str(),
                };
                let keys = ["address", "size", "requested_size", "state", "frames"];
                p.dict(&keys, |p, i| match i {
                    0 => p.int(b.address as i128),
                    1 => p.int(b.size as i128),
                    2 => p.int(b.requested_size as i128),
                    3 => p.str(state),
                    _ => p.list(0, |_, _| {}),
                });
            }),
        });
    }
}

/// The pickle of a snapshot.
pub fn to_pickle(snap: &Snapshot) -> Vec<u8> {
    let mut p = Pickler::new();
    p.snapshot(snap);
    p.out.push(STOP);
    p.out
}

/// The gzipped pickle of a snapshot (default compression level).
pub fn to_pickle_gz(snap: &Snapshot) -> Vec<u8> {
    let raw = to_pickle(snap);
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(raw.len() / 4),
        flate2::Compression::default(),
    );
    enc.write_all(&raw).expect("writing to memory");
    enc.finish().expect("writing to memory")
}

#[cfg(test)]
mod tests {
    use bufferheap_trace::{Block, Segment};

    use super::*;

    fn sample() -> Snapshot {
        let ev = |action: Action, addr: u64, size: u64, t: i64| TraceEvent {
            action,
            addr,
            size,
            stream: 0,
            time_us: t,
        };
        let mut events = Vec::new();
        for i in 0..2500u64 {
            events.push(ev(
                Action::Alloc,
                0x7f00_0000_0000 + i * 512,
                512 + i,
                1 << 50,
            ));
            events.push(ev(
                Action::FreeCompleted,
                0x7f00_0000_0000 + i * 512,
                512 + i,
                -3,
            ));
        }
        events.push(ev(Action::Oom, 123, 1 << 40, 5));
        events.push(ev(Action::Unknown("mystery".into()), 1, 2, 3));
        Snapshot {
            segments: vec![Segment {
                device: 0,
                address: 1 << 40,
                total_size: 2 << 20,
                allocated_size: 512,
                active_size: 512,
                requested_size: 500,
                stream: 7,
                segment_type: SegmentType::Small,
                is_expandable: true,
                blocks: vec![
                    Block {
                        address: 1 << 40,
                        size: 512,
                        requested_size: 500,
                        state: BlockState::ActiveAllocated,
                    },
                    Block {
                        address: (1 << 40) + 512,
                        size: (2 << 20) - 512,
                        requested_size: (2 << 20) - 512,
                        state: BlockState::Inactive,
                    },
                ],
            }],
            device_traces: vec![vec![], events],
            allocator_settings: vec![
                ("expandable_segments".into(), SettingValue::Bool(false)),
                ("max_split_size".into(), SettingValue::Int(-1)),
                (
                    "garbage_collection_threshold".into(),
                    SettingValue::Float(0.5),
                ),
                (
                    "PYTORCH_CUDA_ALLOC_CONF".into(),
                    SettingValue::Str(String::new()),
                ),
                (
                    "roundup_power2_divisions".into(),
                    SettingValue::Map(vec![("1".into(), SettingValue::Int(0))]),
                ),
                ("nothing".into(), SettingValue::None),
            ],
        }
    }

    #[test]
    fn round_trips_through_the_decoder() {
        let snap = sample();
        assert_eq!(
            bufferheap_trace::parse_snapshot(&to_pickle(&snap)).unwrap(),
            snap
        );
        assert_eq!(
            bufferheap_trace::parse_snapshot(&to_pickle_gz(&snap)).unwrap(),
            snap
        );
    }

    #[test]
    fn shipped_trace_round_trips() {
        let path = crate::traces_dir().join("resnet50_train.pkl.gz");
        let snap = bufferheap_trace::read_snapshot(&path).unwrap();
        assert_eq!(
            bufferheap_trace::parse_snapshot(&to_pickle(&snap)).unwrap(),
            snap
        );
    }
}
