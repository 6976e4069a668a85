//! Replay speed: decoding a snapshot (gunzip + pickle), replaying it through the engine on the
//! sim backend, and both together (what `bufferheap replay FILE` does), for the shipped traces
//! and for the ~900k-event trace of `bufferheap_benches::big` (built in memory at start-up).
//!
//!     cargo bench -p bufferheap-benches --bench replay

use std::sync::LazyLock;

use bufferheap_benches::big::{BIG_EVENTS, shipped_gz};
use bufferheap_benches::traces_dir;
use bufferheap_core::Policy;
use bufferheap_replay::{ReplayOptions, replay};
use bufferheap_trace::{Snapshot, parse_snapshot};
use divan::Bencher;

fn main() {
    divan::main();
}

#[derive(Debug, Clone, Copy)]
enum Trace {
    Gpt2,
    Resnet50,
    Big,
}

impl std::fmt::Display for Trace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Trace::Gpt2 => "gpt2_train",
            Trace::Resnet50 => "resnet50_train",
            Trace::Big => "big_900k",
        })
    }
}

const TRACES: [Trace; 3] = [Trace::Gpt2, Trace::Resnet50, Trace::Big];

fn shipped(name: &str) -> Vec<u8> {
    let path = traces_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

static GPT2: LazyLock<Vec<u8>> = LazyLock::new(|| shipped("gpt2_train.pkl.gz"));
static RESNET50: LazyLock<Vec<u8>> = LazyLock::new(|| shipped("resnet50_train.pkl.gz"));
static BIG: LazyLock<Vec<u8>> = LazyLock::new(|| shipped_gz(BIG_EVENTS));

/// The gzipped pickle of a trace, as it would be read from disk.
fn gz(t: Trace) -> &'static [u8] {
    match t {
        Trace::Gpt2 => &GPT2,
        Trace::Resnet50 => &RESNET50,
        Trace::Big => &BIG,
    }
}

fn parse(t: Trace) -> Snapshot {
    parse_snapshot(gz(t)).expect("trace decodes")
}

fn run(snap: &Snapshot, policy: Policy) -> u64 {
    let opts = ReplayOptions {
        policy,
        ..ReplayOptions::default()
    };
    let r = replay(snap, 0, &opts, &mut |_, _| {}).expect("replay succeeds");
    r.peak_reserved_bytes
}

/// gunzip + pickle decoding into a `Snapshot`.
#[divan::bench(args = TRACES, sample_count = 10, sample_size = 1)]
fn decode(bencher: Bencher, t: Trace) {
    let _ = gz(t);
    bencher.bench(|| parse(t));
}

/// The replay alone (snapshot decoded beforehand), sim backend.
mod replay_only {
    use super::*;

    #[divan::bench(args = TRACES, sample_count = 10, sample_size = 1)]
    fn default(bencher: Bencher, t: Trace) {
        let snap = parse(t);
        bencher.bench(|| run(&snap, Policy::Default));
    }

    #[divan::bench(args = TRACES, sample_count = 10, sample_size = 1)]
    fn mps(bencher: Bencher, t: Trace) {
        let snap = parse(t);
        bencher.bench(|| run(&snap, Policy::Mps));
    }
}

/// Decoding and replay together, from the gzipped bytes.
mod parse_replay {
    use super::*;

    #[divan::bench(args = TRACES, sample_count = 10, sample_size = 1)]
    fn default(bencher: Bencher, t: Trace) {
        let _ = gz(t);
        bencher.bench(|| run(&parse(t), Policy::Default));
    }

    #[divan::bench(args = TRACES, sample_count = 10, sample_size = 1)]
    fn mps(bencher: Bencher, t: Trace) {
        let _ = gz(t);
        bencher.bench(|| run(&parse(t), Policy::Mps));
    }
}
