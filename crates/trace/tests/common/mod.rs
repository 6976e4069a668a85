//! Helpers shared by the integration tests: paths of the shipped traces and a small pickle
//! writer that emits what Python's pickler emits for a snapshot (protocol 4, memoized strings,
//! batched SETITEMS/APPENDS).
#![allow(dead_code, reason = "each test file uses a different subset")]

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;

use bufferheap_trace::{Block, BlockState, Segment, SegmentType, Snapshot, TraceEvent};

pub const GPT2: &str = "gpt2_train.pkl.gz";
pub const RESNET: &str = "resnet50_train.pkl.gz";

/// A shipped trace, relative to this crate.
pub fn trace_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../traces")
        .join(name)
}

pub fn gz_bytes(name: &str) -> Vec<u8> {
    std::fs::read(trace_path(name)).expect("shipped trace is readable")
}

/// The decompressed pickle of a shipped trace.
pub fn raw_pickle(name: &str) -> Vec<u8> {
    let gz = gz_bytes(name);
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut out)
        .expect("shipped trace decompresses");
    out
}

/// Writes one value.
pub type Writer<'a> = Box<dyn Fn(&mut Pickler) + 'a>;

/// Writes pickle opcodes the way CPython's pickler does for plain data.
#[derive(Default)]
pub struct Pickler {
    pub out: Vec<u8>,
    memo: HashMap<String, u32>,
    next: u32,
}

impl Pickler {
    pub fn new() -> Self {
        let mut p = Pickler::default();
        p.out.extend_from_slice(&[0x80, 4]);
        p
    }

    pub fn op(&mut self, b: u8) -> &mut Self {
        self.out.push(b);
        self
    }

    pub fn memoize(&mut self) -> u32 {
        self.out.push(0x94);
        self.next += 1;
        self.next - 1
    }

    fn get(&mut self, i: u32) {
        if i < 256 {
            self.out.extend_from_slice(&[0x68, i as u8]);
        } else {
            self.out.push(0x6a);
            self.out.extend_from_slice(&i.to_le_bytes());
        }
    }

    /// A string, memoized: the second time it is written as BINGET.
    pub fn str(&mut self, s: &str) -> &mut Self {
        if let Some(&i) = self.memo.get(s) {
            self.get(i);
            return self;
        }
        self.fresh_str(s);
        self.memo.insert(s.to_owned(), self.next - 1);
        self
    }

    /// A string written out again (a distinct Python object with the same text), memoized.
    pub fn fresh_str(&mut self, s: &str) -> &mut Self {
        self.raw_str(s);
        self.memoize();
        self
    }

    /// A string, not memoized.
    pub fn raw_str(&mut self, s: &str) -> &mut Self {
        if s.len() < 256 {
            self.out.extend_from_slice(&[0x8c, s.len() as u8]);
        } else {
            self.out.push(0x58);
            self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        }
        self.out.extend_from_slice(s.as_bytes());
        self
    }

    pub fn int(&mut self, v: i128) -> &mut Self {
        if (0..256).contains(&v) {
            self.out.extend_from_slice(&[0x4b, v as u8]);
        } else if (0..65536).contains(&v) {
            self.out.push(0x4d);
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.out.push(0x4a);
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            let mut bytes = v.to_le_bytes().to_vec();
            // Shortest two's complement, as Python's encode_long does.
            while bytes.len() > 1 {
                let last = bytes[bytes.len() - 1];
                let prev = bytes[bytes.len() - 2];
                if (last == 0 && prev & 0x80 == 0) || (last == 0xff && prev & 0x80 != 0) {
                    bytes.pop();
                } else {
                    break;
                }
            }
            self.out.extend_from_slice(&[0x8a, bytes.len() as u8]);
            self.out.extend_from_slice(&bytes);
        }
        self
    }

    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.op(if b { 0x88 } else { 0x89 })
    }

    pub fn float(&mut self, x: f64) -> &mut Self {
        self.out.push(0x47);
        self.out.extend_from_slice(&x.to_be_bytes());
        self
    }

    pub fn none(&mut self) -> &mut Self {
        self.op(0x4e)
    }

    pub fn empty_dict(&mut self) -> &mut Self {
        self.out.push(0x7d);
        self.memoize();
        self
    }

    pub fn empty_list(&mut self) -> &mut Self {
        self.out.push(0x5d);
        self.memoize();
        self
    }

    pub fn mark(&mut self) -> &mut Self {
        self.op(0x28)
    }

    pub fn setitems(&mut self) -> &mut Self {
        self.op(0x75)
    }

    pub fn appends(&mut self) -> &mut Self {
        self.op(0x65)
    }

    pub fn stop(&mut self) -> Vec<u8> {
        self.out.push(0x2e);
        std::mem::take(&mut self.out)
    }

    /// A dict of `entries`, each written by its closure, batched like CPython (1000 per batch).
    pub fn dict(&mut self, entries: Vec<(&str, Writer<'_>)>) -> &mut Self {
        self.empty_dict();
        match entries.len() {
            0 => {}
            1 => {
                let (k, f) = &entries[0];
                self.str(k);
                f(self);
                self.op(0x73);
            }
            _ => {
                for batch in entries.chunks(1000) {
                    self.mark();
                    for (k, f) in batch {
                        self.str(k);
                        f(self);
                    }
                    self.setitems();
                }
            }
        }
        self
    }

    /// A list of `n` items written by `item(self, index)`, batched every `batch` items.
    pub fn list(
        &mut self,
        n: usize,
        batch: usize,
        item: &dyn Fn(&mut Pickler, usize),
    ) -> &mut Self {
        self.empty_list();
        if n == 1 {
            item(self, 0);
            return self.op(0x61);
        }
        let mut i = 0;
        while i < n {
            self.mark();
            for j in i..(i + batch).min(n) {
                item(self, j);
            }
            self.appends();
            i += batch;
        }
        self
    }
}

fn bx<'a>(f: impl Fn(&mut Pickler) + 'a) -> Writer<'a> {
    Box::new(f)
}

pub fn event(p: &mut Pickler, e: &TraceEvent) {
    p.dict(vec![
        (
            "action",
            bx(|p| {
                p.str(e.action.as_str());
            }),
        ),
        (
            "addr",
            bx(|p| {
                p.int(e.addr.into());
            }),
        ),
        (
            "size",
            bx(|p| {
                p.int(e.size.into());
            }),
        ),
        (
            "stream",
            bx(|p| {
                p.int(e.stream.into());
            }),
        ),
        (
            "time_us",
            bx(|p| {
                p.int(e.time_us.into());
            }),
        ),
        (
            "compile_context",
            bx(|p| {
                p.fresh_str("N/A");
            }),
        ),
        (
            "user_metadata",
            bx(|p| {
                p.fresh_str("");
            }),
        ),
    ]);
}

fn block(p: &mut Pickler, b: &Block) {
    let state = match &b.state {
        BlockState::ActiveAllocated => "active_allocated",
        BlockState::ActivePendingFree => "active_pending_free",
        BlockState::Inactive => "inactive",
        BlockState::Other(s) => s,
    };
    p.dict(vec![
        (
            "address",
            bx(|p| {
                p.int(b.address.into());
            }),
        ),
        (
            "size",
            bx(|p| {
                p.int(b.size.into());
            }),
        ),
        (
            "requested_size",
            bx(|p| {
                p.int(b.requested_size.into());
            }),
        ),
        (
            "state",
            bx(move |p| {
                p.str(state);
            }),
        ),
        (
            "frames",
            bx(|p| {
                p.empty_list();
            }),
        ),
    ]);
}

fn segment(p: &mut Pickler, s: &Segment) {
    let kind = match &s.segment_type {
        SegmentType::Large => "large",
        SegmentType::Small => "small",
        SegmentType::Other(t) => t,
    };
    p.dict(vec![
        (
            "device",
            bx(|p| {
                p.int(s.device as i128);
            }),
        ),
        (
            "address",
            bx(|p| {
                p.int(s.address.into());
            }),
        ),
        (
            "total_size",
            bx(|p| {
                p.int(s.total_size.into());
            }),
        ),
        (
            "allocated_size",
            bx(|p| {
                p.int(s.allocated_size.into());
            }),
        ),
        (
            "active_size",
            bx(|p| {
                p.int(s.active_size.into());
            }),
        ),
        (
            "requested_size",
            bx(|p| {
                p.int(s.requested_size.into());
            }),
        ),
        (
            "stream",
            bx(|p| {
                p.int(s.stream.into());
            }),
        ),
        (
            "segment_type",
            bx(move |p| {
                p.str(kind);
            }),
        ),
        (
            "segment_pool_id",
            bx(|p| {
                p.int(0).int(0).op(0x86).memoize();
            }),
        ),
        (
            "is_expandable",
            bx(|p| {
                p.bool(s.is_expandable);
            }),
        ),
        (
            "frames",
            bx(|p| {
                p.empty_list();
            }),
        ),
        (
            "blocks",
            bx(|p| {
                p.list(s.blocks.len(), 1000, &|p, i| block(p, &s.blocks[i]));
            }),
        ),
    ]);
}

/// A Python-style pickle of (a prefix of) a snapshot: its first `max_segments` segments and
/// the first `max_events` events of each device, lists batched every `batch` items.
pub fn encode_snapshot(
    s: &Snapshot,
    max_segments: usize,
    max_events: usize,
    batch: usize,
) -> Vec<u8> {
    let mut p = Pickler::new();
    let segs = &s.segments[..s.segments.len().min(max_segments)];
    p.dict(vec![
        (
            "segments",
            bx(|p| {
                p.list(segs.len(), batch, &|p, i| segment(p, &segs[i]));
            }),
        ),
        (
            "device_traces",
            bx(|p| {
                p.list(s.device_traces.len(), batch, &|p, d| {
                    let t = &s.device_traces[d];
                    let t = &t[..t.len().min(max_events)];
                    p.list(t.len(), batch, &|p, i| event(p, &t[i]));
                });
            }),
        ),
        (
            "allocator_settings",
            bx(|p| {
                p.dict(vec![
                    (
                        "expandable_segments",
                        bx(|p| {
                            p.bool(false);
                        }),
                    ),
                    (
                        "max_split_size",
                        bx(|p| {
                            p.int(-1);
                        }),
                    ),
                ]);
            }),
        ),
        (
            "external_annotations",
            bx(|p| {
                p.list(2, batch, &|p, i| {
                    p.dict(vec![
                        (
                            "stage",
                            bx(|p| {
                                p.str("START");
                            }),
                        ),
                        (
                            "name",
                            bx(|p| {
                                p.str("step");
                            }),
                        ),
                        (
                            "time_us",
                            bx(move |p| {
                                p.int(i as i128);
                            }),
                        ),
                    ]);
                });
            }),
        ),
    ]);
    p.stop()
}
