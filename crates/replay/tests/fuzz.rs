//! Mutation fuzzing of the snapshot reader and the replay: real traces (re-encoded prefixes
//! and the raw pickles), the recorded fixtures, the kept corpus (`fuzz/seeds`, `fuzz/corpus`) and
//! every past crash case (`fuzz/regressions`) are
//! mutated with a seeded generator (bit flips, interesting bytes, truncations, deleted,
//! duplicated and spliced chunks, huge length fields, values of the wrong type, deep nesting,
//! gzip wrapping) and fed through `parse_snapshot`, and each snapshot that decodes is replayed
//! on the simulated device under both policies.
//!
//! The outcome required for every input: no panic, no hang, bounded memory; an error for bad
//! input is a value that displays. Guards: a watchdog fails the run when one input takes more
//! than `BUFFERHEAP_FUZZ_INPUT_SECS` (default 60) and a counting allocator when one input's
//! peak heap use exceeds its bound; each bad input is written to `target/fuzz-failures/` so it
//! can be added to `fuzz/regressions/`.
//!
//! Knobs: `BUFFERHEAP_FUZZ_ITERS` (mutants; default 25,000 in a debug build, about 15 s here,
//! and 200,000 in a release build), `BUFFERHEAP_FUZZ_SECS` (stop after this long whatever the
//! count; default 60), `BUFFERHEAP_FUZZ_SEED` (the generator's seed).

#[path = "../../trace/tests/common/mod.rs"]
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bufferheap_core::Policy;
use bufferheap_replay::{MAX_STREAMS, ReplayOptions, devices, replay};
use bufferheap_trace::{Snapshot, is_gzip, parse_snapshot, read_snapshot};
use common::{GPT2, RESNET, encode_snapshot, raw_pickle, trace_path};

// ---- a heap meter --------------------------------------------------------------------------

/// Counts live heap bytes and the peak since the last reset.
struct Meter;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Past this, allocations fail (the process aborts) instead of taking the machine's memory.
const HARD_CAP: usize = 6 << 30;

// SAFETY: forwards to the system allocator unchanged; only counts bytes on the side.
unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        if now > HARD_CAP {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            return std::ptr::null_mut();
        }
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's layout is passed on as it came.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let grow = new_size - layout.size();
            let now = CURRENT.fetch_add(grow, Ordering::Relaxed) + grow;
            if now > HARD_CAP {
                CURRENT.fetch_sub(grow, Ordering::Relaxed);
                return std::ptr::null_mut();
            }
            PEAK.fetch_max(now, Ordering::Relaxed);
        } else {
            CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from `System` with `layout`; the caller guarantees `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static METER: Meter = Meter;

fn reset_peak() -> usize {
    let now = CURRENT.load(Ordering::Relaxed);
    PEAK.store(now, Ordering::Relaxed);
    now
}

// ---- inputs --------------------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn files_in(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (!name.starts_with('.') && !name.ends_with(".md"))
                        .then(|| std::fs::read(e.path()).ok().map(|b| (name, b)))
                        .flatten()
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("fixture decompresses");
    out
}

/// The length of what a gzip input decompresses to (as far as it goes; at most 64 MiB).
fn gunzipped_len(bytes: &[u8]) -> usize {
    use std::io::Read;
    let mut sink = [0u8; 1 << 16];
    let mut d = flate2::read::MultiGzDecoder::new(bytes).take(64 << 20);
    let mut n = 0;
    while let Ok(k) = d.read(&mut sink) {
        if k == 0 {
            break;
        }
        n += k;
    }
    n
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("in memory");
    gz.finish().expect("in memory")
}

/// Seeds: small re-encoded prefixes of both real traces (Python's layout: memoized keys,
/// batched APPENDS/SETITEMS), the start of the raw traces (framed, as torch writes them), the
/// recorded fixtures, the kept corpus and the crash cases.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for name in [RESNET, GPT2] {
        let snap = read_snapshot(&trace_path(name)).expect("shipped trace");
        for (segs, events, batch) in [(2, 40, 1000), (4, 160, 1000), (3, 60, 7), (0, 300, 1000)] {
            out.push((
                format!("{name} {segs} segments {events} events batch {batch}"),
                encode_snapshot(&snap, segs, events, batch),
            ));
        }
        let raw = raw_pickle(name);
        out.push((
            format!("{name} raw first 64 KiB"),
            raw[..raw.len().min(64 << 10)].to_vec(),
        ));
    }
    for name in ["stacks_small.pkl.gz", "expandable_small.pkl.gz"] {
        let gz = std::fs::read(repo_path("crates/trace/tests/fixtures").join(name))
            .expect("fixture is readable");
        out.push((format!("{name} (gzip)"), gz.clone()));
        out.push((name.to_string(), gunzip(&gz)));
    }
    for dir in ["fuzz/seeds", "fuzz/corpus", "fuzz/regressions"] {
        for (name, bytes) in files_in(&repo_path(dir)) {
            out.push((format!("{dir}/{name}"), bytes));
        }
    }
    out
}

/// Values that make length fields and sizes absurd.
const HUGE: [u64; 8] = [
    u64::MAX,
    1 << 63,
    1 << 62,
    i64::MAX as u64,
    u32::MAX as u64,
    i32::MAX as u64,
    1 << 31,
    0x7fff_ffff_ffff_0000,
];

/// Pickle opcodes of values of other types, to stand in for a value (wrong types).
const OTHER_TYPES: [&[u8]; 12] = [
    b"N",                                            // None
    b"\x88",                                         // True
    b"}",                                            // {}
    b"]",                                            // []
    b")",                                            // ()
    b"\x8c\x03abc",                                  // 'abc'
    b"G\x7f\xf0\x00\x00\x00\x00\x00\x00",            // inf
    b"J\xff\xff\xff\xff",                            // -1
    b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x7f", // 2**71 - 1
    b"\x8a\x01\xff",                                 // -1 as LONG1
    b"C\x02ab",                                      // b'ab'
    b"\x8c\x00",                                     // ''
];

/// Opcodes that open or close nesting, repeated to build deep structures.
const NESTING: [&[u8]; 6] = [b"(", b"]", b"}", b"(]", b"}\x8c\x01a", b"]("];

fn mutate(r: &mut Rng, seed: &[u8], pool: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = seed.to_vec();
    // Mostly one mutation, so that many mutants still decode and reach the replay.
    let rounds = [1, 1, 1, 1, 2, 2, 3, 4][r.below(8)];
    for _ in 0..rounds {
        let len = b.len();
        match r.below(15) {
            12..=14 => {
                // A number changed in place (structure kept): a size, address, stream, time or
                // memo index becomes another value, possibly absurd.
                let starts: Vec<usize> = b
                    .iter()
                    .enumerate()
                    .filter(|&(i, &c)| matches!(c, b'K' | b'M' | b'J' | 0x8a) && i + 2 < len)
                    .map(|(i, _)| i)
                    .take(8192)
                    .collect();
                if !starts.is_empty() {
                    let at = starts[r.below(starts.len())];
                    let width = match b[at] {
                        b'K' => 1,
                        b'M' => 2,
                        b'J' => 4,
                        _ => usize::from(b[at + 1]).min(9) + 1,
                    };
                    let from = at + 1 + usize::from(b[at] == 0x8a);
                    let to = (at + 1 + width).min(len);
                    if from < to {
                        let k = from + r.below(to - from);
                        b[k] = if r.chance(2) {
                            r.next() as u8
                        } else {
                            b[k] ^ (1 << r.below(8))
                        };
                    }
                }
            }
            0 | 1 => {
                // Bit flips.
                for _ in 0..1 + r.below(3) {
                    if len > 0 {
                        let at = r.below(len);
                        b[at] ^= 1 << r.below(8);
                    }
                }
            }
            2 => {
                // An interesting byte.
                if len > 0 {
                    let at = r.below(len);
                    b[at] = [0, 0xff, 0x7f, 0x80, b'(', b'.', 0x95, r.next() as u8][r.below(8)];
                }
            }
            3 => b.truncate(r.below(len + 1)),
            4 => {
                // Delete a chunk.
                if len > 1 {
                    let at = r.below(len);
                    let n = 1 + r.below((len - at).min(256));
                    b.drain(at..at + n);
                }
            }
            5 => {
                // Duplicate a chunk in place.
                if len > 1 {
                    let at = r.below(len);
                    let n = 1 + r.below((len - at).min(512));
                    let chunk = b[at..at + n].to_vec();
                    let to = r.below(len);
                    b.splice(to..to, chunk);
                }
            }
            6 => {
                // Splice in a chunk of another input.
                let (_, other) = &pool[r.below(pool.len())];
                if !other.is_empty() {
                    let at = r.below(other.len());
                    let n = 1 + r.below((other.len() - at).min(1024));
                    let to = r.below(len + 1);
                    b.splice(to..to, other[at..at + n].iter().copied());
                }
            }
            7 => {
                // A huge length: over the 4 or 8 bytes after an opcode-looking position.
                if len > 9 {
                    let at = 1 + r.below(len - 9);
                    let v = HUGE[r.below(HUGE.len())].to_le_bytes();
                    let w = if r.chance(2) { 4 } else { 8 };
                    b[at..at + w].copy_from_slice(&v[..w]);
                }
            }
            8 => {
                // A value of the wrong type in place of a small int (BININT1 / BININT2 /
                // BININT) or a short string.
                let starts: Vec<usize> = b
                    .iter()
                    .enumerate()
                    .filter(|&(i, &c)| matches!(c, b'K' | b'M' | b'J' | 0x8c) && i + 1 < len)
                    .map(|(i, _)| i)
                    .take(4096)
                    .collect();
                if !starts.is_empty() {
                    let at = starts[r.below(starts.len())];
                    let width = match b[at] {
                        b'K' => 2,
                        b'M' => 3,
                        b'J' => 5,
                        _ => 2 + b[at + 1] as usize,
                    }
                    .min(len - at);
                    let with = OTHER_TYPES[r.below(OTHER_TYPES.len())];
                    b.splice(at..at + width, with.iter().copied());
                }
            }
            9 => {
                // Deep nesting.
                let unit = NESTING[r.below(NESTING.len())];
                let n = [64, 65, 1000, 70_000][r.below(4)];
                let to = r.below(len + 1);
                let deep: Vec<u8> = unit.iter().copied().cycle().take(unit.len() * n).collect();
                b.splice(to..to, deep);
            }
            10 => {
                // An integer made huge (sizes, addresses, streams, memo indexes).
                let starts: Vec<usize> = b
                    .iter()
                    .enumerate()
                    .filter(|&(i, &c)| matches!(c, b'K' | b'M' | b'J') && i + 1 < len)
                    .map(|(i, _)| i)
                    .take(4096)
                    .collect();
                if !starts.is_empty() {
                    let at = starts[r.below(starts.len())];
                    let width = [2, 3, 5][usize::from(b[at] != b'K') + usize::from(b[at] == b'J')]
                        .min(len - at);
                    let v = HUGE[r.below(HUGE.len())].to_le_bytes();
                    let mut long = vec![0x8a, 9];
                    long.extend_from_slice(&v);
                    long.push(0);
                    b.splice(at..at + width, long);
                }
            }
            _ => {
                // Overwrite a window with random bytes.
                if len > 0 {
                    let at = r.below(len);
                    let end = (at + 1 + r.below(16)).min(len);
                    for byte in &mut b[at..end] {
                        *byte = r.next() as u8;
                    }
                }
            }
        }
    }
    if r.chance(10) {
        // Through the gzip path too: a valid gzip of the mutant, or a damaged one.
        b = gzip(&b);
        if r.chance(2) && b.len() > 20 {
            let at = 10 + r.below(b.len() - 10);
            b[at] ^= 1 << r.below(8);
        }
    }
    b
}

// ---- the harness ---------------------------------------------------------------------------

/// What happened to one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Rejected,
    Replayed,
    ReplayError,
}

/// What an input may cost.
#[derive(Debug, Default, Clone, Copy)]
struct Size {
    /// The pickle's length (decompressed, for gzip).
    pickle: usize,
    /// Streams other than the default one that one device's replay allocates on.
    streams: usize,
}

/// Decodes `bytes` and replays every device of the snapshot under both policies. Panics are
/// the caller's to catch.
fn exercise(bytes: &[u8], size: &mut Size) -> Outcome {
    let snap: Snapshot = match parse_snapshot(bytes) {
        Ok(s) => s,
        Err(e) => {
            // A clear error: it displays, and says something.
            assert!(!e.to_string().is_empty());
            return Outcome::Rejected;
        }
    };
    let mut outcome = Outcome::Replayed;
    for device in devices(&snap).into_iter().take(4) {
        let streams: std::collections::HashSet<u64> = snap
            .events(device)
            .iter()
            .filter(|e| e.action == bufferheap_trace::Action::Alloc && e.stream != 0)
            .map(|e| e.stream)
            .collect();
        size.streams = size.streams.max(streams.len().min(MAX_STREAMS));
        for policy in [Policy::Default, Policy::Mps] {
            let options = ReplayOptions {
                policy,
                series_points: 64,
                ..ReplayOptions::default()
            };
            match replay(&snap, device, &options, &mut |_, _| {}) {
                Ok(report) => {
                    assert!(report.peak_reserved_bytes >= report.final_reserved_bytes);
                    let _ = report.warnings();
                }
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    outcome = Outcome::ReplayError;
                }
            }
        }
    }
    outcome
}

/// Heap an input may use at its peak: a fixed part; the decoded snapshot and the replay's
/// tables, linear in the pickle; for gzip, the output buffer sized from the trailer's length
/// (capped at deflate's largest ratio); and the engine's pools, whose page tables are sized to
/// the simulated device (80 GB: measured up to 0.9 MiB for each stream's pools).
fn memory_bound(input_len: usize, gzip: bool, size: Size) -> usize {
    (64usize << 20)
        .saturating_add(size.pickle.saturating_mul(256))
        .saturating_add(if gzip {
            input_len.saturating_mul(1032)
        } else {
            0
        })
        .saturating_add(size.streams.saturating_mul(2 << 20))
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

fn save_failure(bytes: &[u8], why: &str) -> PathBuf {
    let dir = repo_path("target/fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in bytes {
        h = (h ^ u64::from(c)).wrapping_mul(0x100_0000_01b3);
    }
    let path = dir.join(format!("{why}-{h:016x}.pkl"));
    let _ = std::fs::write(&path, bytes);
    path
}

struct Watchdog {
    current: Arc<Mutex<Vec<u8>>>,
    started: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// A thread that ends the process, saving the input, if one input runs too long.
fn watchdog(limit: Duration) -> Watchdog {
    let w = Watchdog {
        current: Arc::new(Mutex::new(Vec::new())),
        started: Arc::new(AtomicU64::new(0)),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let (current, started, stop) = (w.current.clone(), w.started.clone(), w.stop.clone());
    let epoch = Instant::now();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let s = started.load(Ordering::Relaxed);
            if s == 0 {
                continue;
            }
            // Started up to 1 ms "after" now: the stored time is rounded up.
            let running = (epoch.elapsed().as_millis() as u64).saturating_sub(s);
            if running > limit.as_millis() as u64 {
                let bytes = current.lock().map(|b| b.clone()).unwrap_or_default();
                let path = save_failure(&bytes, "hang");
                eprintln!(
                    "an input ran for more than {limit:?}: saved to {}",
                    path.display()
                );
                std::process::exit(101);
            }
        }
    });
    // The epoch is shared through the start times, in ms since it (+1 so 0 means idle).
    EPOCH.get_or_init(|| epoch);
    w
}

static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Runs one input under the guards; `Err` describes a failure (and the saved input).
fn guarded(w: &Watchdog, bytes: &[u8]) -> Result<Outcome, String> {
    *w.current.lock().unwrap() = bytes.to_vec();
    let epoch = *EPOCH.get().expect("watchdog started");
    w.started
        .store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Relaxed);
    let gzip = is_gzip(bytes);
    let mut size = Size {
        pickle: if gzip {
            gunzipped_len(bytes)
        } else {
            bytes.len()
        },
        streams: 0,
    };
    let base = reset_peak();
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(bytes, &mut size)));
    w.started.store(0, Ordering::Relaxed);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let bound = memory_bound(bytes.len(), gzip, size);
    match result {
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let path = save_failure(bytes, "panic");
            Err(format!("panic: {msg} (input saved to {})", path.display()))
        }
        Ok(_) if peak > bound => {
            let path = save_failure(bytes, "memory");
            Err(format!(
                "{} bytes of input used {} MiB of heap (bound {} MiB; input saved to {})",
                bytes.len(),
                peak >> 20,
                bound >> 20,
                path.display()
            ))
        }
        Ok(o) => Ok(o),
    }
}

#[test]
fn mutated_snapshots_never_panic_hang_or_blow_up() {
    let iters = env_u64("BUFFERHEAP_FUZZ_ITERS").unwrap_or(if cfg!(debug_assertions) {
        25_000
    } else {
        200_000
    });
    let budget = Duration::from_secs(env_u64("BUFFERHEAP_FUZZ_SECS").unwrap_or(60));
    let seed = env_u64("BUFFERHEAP_FUZZ_SEED").unwrap_or(0x5eed_f00d);
    let w = watchdog(Duration::from_secs(
        env_u64("BUFFERHEAP_FUZZ_INPUT_SECS").unwrap_or(60),
    ));
    // The panic message goes into the report; keep the default hook quiet meanwhile.
    std::panic::set_hook(Box::new(|_| {}));
    let pool = seeds();
    let start = Instant::now();
    let mut r = Rng(seed);
    let mut failures: Vec<String> = Vec::new();
    let mut counts = [0u64; 3];
    let mut bytes_in = 0u64;
    let mut done = 0;
    // The seeds themselves first: every one must pass as it is.
    for (name, bytes) in &pool {
        match guarded(&w, bytes) {
            Ok(o) => counts[o as usize] += 1,
            Err(e) => failures.push(format!("seed {name}: {e}")),
        }
    }
    while done < iters && start.elapsed() < budget {
        let (name, base) = &pool[r.below(pool.len())];
        let input = mutate(&mut r, base, &pool);
        bytes_in += input.len() as u64;
        match guarded(&w, &input) {
            Ok(o) => counts[o as usize] += 1,
            Err(e) => failures.push(format!("mutant {done} of {name}: {e}")),
        }
        done += 1;
    }
    w.stop.store(true, Ordering::Relaxed);
    let _ = std::panic::take_hook();
    eprintln!(
        "fuzz: {} seeds + {done} mutants ({} MiB) in {:.1} s: {} rejected with an error, {} \
         replayed, {} stopped the replay with an error; {} failures",
        pool.len(),
        bytes_in >> 20,
        start.elapsed().as_secs_f64(),
        counts[Outcome::Rejected as usize],
        counts[Outcome::Replayed as usize],
        counts[Outcome::ReplayError as usize],
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The mutants reach both sides: some decode and replay, most are refused.
    assert!(counts[Outcome::Rejected as usize] > 0);
    assert!(counts[Outcome::Replayed as usize] > 0);
}
