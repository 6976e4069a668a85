//! Many threads on one allocator at once, checked against a shadow model.
//!
//! Eight threads allocate (private, shared, scalar; three streams), free, mark buffers as used
//! by other streams, record and wait for events, poll, empty the cache, change the watermarks,
//! set shapes and read every figure, while a callback that calls back into the allocator is
//! registered. The shadow model is one global map of live ranges: a thread inserts a buffer
//! after `alloc` returns and removes it before `free`, so any overlap it sees is two threads
//! holding the same bytes. Every thread owns its buffers: their size, id and shape never change
//! under it. At quiescent points (all threads at a barrier) the counters must equal the model
//! and the simulated device. At the end everything is returned: reserved 0, device holds 0.
//!
//! `BUFFERHEAP_CONCURRENCY_OPS` sets the operations per thread (default 20,000);
//! `BUFFERHEAP_CONCURRENCY_TIMEOUT_SECS` how long the threads may go without finishing before
//! the run counts as a deadlock (default 120).

mod common;

use common::Rng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bufferheap_core::{Allocator, Backend, CallbackEvent, Config, Error, Policy};
use bufferheap_host::HostBackend;
use bufferheap_sim::SimBackend;
// The engine's own lock types: ThreadSanitizer sees them (the standard library comes
// uninstrumented, so its locks, barrier and channels would read as races).
use parking_lot::{Condvar, Mutex};

const MIB: usize = 1 << 20;
const THREADS: usize = 8;
/// Operations between two quiescent checks.
const ROUND: usize = 250;

fn ops_per_thread() -> usize {
    std::env::var("BUFFERHEAP_CONCURRENCY_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

/// Live ranges of every thread: start -> (end, owner).
type Shadow = Mutex<BTreeMap<u64, (u64, usize)>>;

fn shadow_insert(shadow: &Shadow, ptr: u64, size: usize, owner: usize) {
    let end = ptr + size as u64;
    let mut m = shadow.lock();
    if let Some((&p, &(e, o))) = m.range(..end).next_back() {
        assert!(
            e <= ptr,
            "thread {owner} got [{ptr:#x}, {end:#x}) overlapping thread {o}'s [{p:#x}, {e:#x})"
        );
    }
    m.insert(ptr, (end, owner));
}

/// A reusable barrier on the engine's lock types.
struct Barrier {
    /// (threads arrived, generation)
    state: Mutex<(usize, u64)>,
    cv: Condvar,
    n: usize,
}

impl Barrier {
    fn new(n: usize) -> Barrier {
        Barrier {
            state: Mutex::new((0, 0)),
            cv: Condvar::new(),
            n,
        }
    }

    fn wait(&self) {
        let mut g = self.state.lock();
        let generation = g.1;
        g.0 += 1;
        if g.0 == self.n {
            *g = (0, generation + 1);
            self.cv.notify_all();
        } else {
            while g.1 == generation {
                self.cv.wait(&mut g);
            }
        }
    }
}

/// A buffer a thread owns.
#[derive(Debug, Clone)]
struct Mine {
    ptr: u64,
    size: usize,
    requested: usize,
    id: u64,
    shape: Vec<i64>,
}

/// What a thread did, for the figures.
#[derive(Debug, Default, Clone, Copy)]
struct Done {
    ops: u64,
    allocs: u64,
    frees: u64,
    ooms: u64,
}

trait Device: Backend {
    fn held(&self) -> usize;
    fn regions(&self) -> usize;
    fn progress(&self);
}

impl Device for SimBackend {
    fn held(&self) -> usize {
        self.counters().held
    }
    fn regions(&self) -> usize {
        self.live_regions()
    }
    fn progress(&self) {
        self.complete_events();
    }
}

impl Device for HostBackend {
    fn held(&self) -> usize {
        HostBackend::held(self)
    }
    fn regions(&self) -> usize {
        self.live_regions()
    }
    fn progress(&self) {}
}

fn check_quiescent<B: Device>(a: &Allocator<B>, shadow: &Shadow, round: usize) {
    let m = shadow.lock();
    let u = a.usage();
    let live: u64 = m.iter().map(|(p, (e, _))| e - p).sum();
    assert_eq!(u.allocated as u64, live, "round {round}: in-use bytes");
    assert_eq!(u.buffers, m.len(), "round {round}: buffers in use");
    assert!(u.active >= u.allocated, "round {round}: {u:?}");
    assert!(u.active + u.cached <= u.reserved, "round {round}: {u:?}");
    assert_eq!(
        u.reserved,
        a.backend().held(),
        "round {round}: engine and device"
    );
    let s = a.stats();
    assert_eq!(s.allocated_bytes[0].current as usize, u.allocated);
    assert!(s.allocated_bytes[0].peak >= s.allocated_bytes[0].current);
}

#[allow(clippy::too_many_lines)]
fn worker<B: Device>(
    a: Allocator<B>,
    t: usize,
    ops: usize,
    shadow: Arc<Shadow>,
    barrier: Arc<Barrier>,
) -> Done {
    let shared = a.shared();
    let mut r = Rng(0xc0c0 + t as u64);
    let mut mine: Vec<Mine> = Vec::new();
    let mut done = Done::default();
    let free_one = |mine: &mut Vec<Mine>, i: usize, done: &mut Done| {
        let b = mine.swap_remove(i);
        assert_eq!(a.requested_size(b.ptr), Some(b.requested), "thread {t}");
        assert_eq!(a.buffer_id(b.ptr), Some(b.id), "thread {t}");
        assert_eq!(a.shape(b.ptr), Some(b.shape.clone()), "thread {t}");
        // Out of the model first: once freed, another thread may get the bytes.
        shadow.lock().remove(&b.ptr);
        a.free(b.ptr).unwrap();
        done.frees += 1;
    };
    for i in 0..ops {
        if i % ROUND == 0 && i > 0 {
            // Quiescent point: everyone stops, one thread checks, everyone goes on.
            barrier.wait();
            if t == 0 {
                check_quiescent(&a, &shadow, i / ROUND);
            }
            barrier.wait();
        }
        done.ops += 1;
        match r.below(100) {
            0..=39 => {
                if mine.len() >= 24 {
                    let i = r.below(mine.len() as u64) as usize;
                    free_one(&mut mine, i, &mut done);
                    continue;
                }
                let size = match r.below(16) {
                    0..=9 => 1 + r.below(32 << 10) as usize,
                    10..=13 => 32 << 10 | r.below(MIB as u64) as usize,
                    14 => MIB + r.below(8 * MIB as u64) as usize,
                    _ => 12 * MIB + r.below(24 * MIB as u64) as usize,
                };
                let stream = r.below(3);
                let front = match (&shared, r.below(8)) {
                    (Some(s), 0) => s,
                    _ => &a,
                };
                let result = if r.below(16) == 0 {
                    a.alloc_scalar(&(size as u64).to_le_bytes())
                } else {
                    front.alloc_on(size, stream)
                };
                match result {
                    Ok(Some(b)) => {
                        shadow_insert(&shadow, b.ptr, b.size, t);
                        assert!(b.size >= b.requested, "thread {t}: {b:?}");
                        done.allocs += 1;
                        let shape = vec![t as i64, b.id as i64];
                        a.set_shape(b.ptr, &shape).unwrap();
                        mine.push(Mine {
                            ptr: b.ptr,
                            size: b.size,
                            requested: b.requested,
                            id: b.id,
                            shape,
                        });
                    }
                    Ok(None) => panic!("thread {t}: no buffer for {size} bytes"),
                    // Watermarks are being changed under us: a low high-watermark refuses.
                    Err(Error::OutOfMemory(_)) => done.ooms += 1,
                    Err(e) => panic!("thread {t}: alloc: {e}"),
                }
            }
            40..=69 => {
                if !mine.is_empty() {
                    let i = r.below(mine.len() as u64) as usize;
                    free_one(&mut mine, i, &mut done);
                }
            }
            70..=74 => {
                if let Some(b) = mine.get(r.below(mine.len().max(1) as u64) as usize) {
                    a.record_stream(b.ptr, 1 + r.below(3)).unwrap();
                }
            }
            75..=79 => {
                let ptrs: Vec<u64> = mine.iter().take(3).map(|b| b.ptr).collect();
                a.record_events(&ptrs, r.below(3)).unwrap();
            }
            80..=83 => {
                let ptrs: Vec<u64> = mine.iter().rev().take(2).map(|b| b.ptr).collect();
                a.wait_for_events(&ptrs).unwrap();
            }
            84..=86 => a.free_inactive_buffers(),
            87..=88 => a.backend().progress(),
            89 => a.empty_cache().unwrap(),
            90 => {
                // Valid ratios only; the high limit stays above what eight threads hold.
                let high = [0.0, 1.0, 1.5, 2.0][r.below(4) as usize];
                let low = if high == 0.0 {
                    0.0
                } else {
                    high * r.below(3) as f64 / 2.0
                };
                a.set_watermark_ratios(low, high).unwrap();
            }
            91..=95 => {
                if let Some(b) = mine.get(r.below(mine.len().max(1) as u64) as usize) {
                    assert_eq!(a.buffer_size(b.ptr), Some(b.size));
                    let (base, len) = a.base_allocation(b.ptr).expect("in a heap");
                    assert!(base <= b.ptr && b.ptr + b.size as u64 <= base + len as u64);
                    if a.is_shared(b.ptr) {
                        assert!(a.shared_host_ptr(b.ptr).is_some());
                    }
                }
            }
            _ => {
                let u = a.usage();
                assert!(u.allocated <= u.active && u.active + u.cached <= u.reserved);
                let _ = (a.low_watermark_value(), a.high_watermark_limit());
            }
        }
    }
    // Align with the last quiescent round, then give everything back.
    barrier.wait();
    while !mine.is_empty() {
        free_one(&mut mine, 0, &mut done);
    }
    done
}

/// Ends the process with `msg` on stderr (past the test harness's capture, which an exit would
/// lose).
fn fatal(msg: &str) -> ! {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{msg}");
    std::process::exit(101);
}

/// Runs the threads with a watchdog: a deadlock fails the test instead of hanging it.
fn hammer<B: Device>(a: Allocator<B>, name: &str) {
    let ops = ops_per_thread();
    let start = Instant::now();
    let shadow: Arc<Shadow> = Arc::new(Mutex::new(BTreeMap::new()));
    let barrier = Arc::new(Barrier::new(THREADS));
    let fired = Arc::new(AtomicU64::new(0));
    {
        // A callback that calls back into the allocator: it must never deadlock.
        let probe = a.clone();
        let fired = fired.clone();
        a.register_callback("reenter", move |ptr, event| {
            fired.fetch_add(1, Ordering::Relaxed);
            if event == CallbackEvent::Allocated {
                let _ = probe.buffer_size(ptr);
                let _ = probe.usage();
            }
        });
    }
    let timeout = Duration::from_secs(
        std::env::var("BUFFERHEAP_CONCURRENCY_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    );
    // Each thread's outcome: its figures, or its panic message.
    type Outcome = (usize, Result<Done, String>);
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (a, shadow, barrier) = (a.clone(), shadow.clone(), barrier.clone());
            let outcomes = outcomes.clone();
            std::thread::spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker(a, t, ops, shadow, barrier)
                }))
                .map_err(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                });
                outcomes.lock().push((t, r));
            })
        })
        .collect();
    let mut total = Done::default();
    let mut seen = 0;
    while seen < THREADS {
        let batch: Vec<Outcome> = std::mem::take(&mut *outcomes.lock());
        for (t, r) in batch {
            seen += 1;
            match r {
                Ok(d) => {
                    total.ops += d.ops;
                    total.allocs += d.allocs;
                    total.frees += d.frees;
                    total.ooms += d.ooms;
                }
                // The other threads may be stuck at a barrier: end the process.
                Err(msg) => fatal(&format!("{name}: thread {t} failed: {msg}")),
            }
        }
        if start.elapsed() > timeout {
            fatal(&format!(
                "{name}: not finished after {} s: deadlock",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for h in handles {
        h.join().expect("caught inside");
    }
    a.unregister_callback("reenter");
    assert!(shadow.lock().is_empty());
    assert_eq!(total.allocs, total.frees, "{name}");
    a.backend().progress();
    a.free_inactive_buffers();
    a.set_watermark_ratios(0.0, 0.0).unwrap();
    a.empty_cache().unwrap();
    let u = a.usage();
    assert_eq!(
        (
            u.allocated,
            u.active,
            u.cached,
            u.reserved,
            u.buffers,
            u.heaps
        ),
        (0, 0, 0, 0, 0, 0),
        "{name}: {u:?}"
    );
    assert_eq!(a.backend().held(), 0, "{name}: device still holds memory");
    assert_eq!(a.backend().regions(), 0, "{name}: regions leaked");
    assert!(fired.load(Ordering::Relaxed) > 0);
    eprintln!(
        "{name}: {THREADS} threads x {ops} ops = {} ops ({} allocs, {} frees, {} refused over the \
         watermark), {} callbacks, in {:.2} s",
        total.ops,
        total.allocs,
        total.frees,
        total.ooms,
        fired.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
}

fn sim(policy: Policy) -> Allocator<SimBackend> {
    Allocator::new(
        SimBackend::new(16 << 30).with_manual_events(),
        Config {
            policy,
            ..Config::default()
        },
    )
    .unwrap()
}

#[test]
fn eight_threads_default_policy() {
    hammer(sim(Policy::Default), "default/sim");
}

#[test]
fn eight_threads_mps_policy() {
    hammer(sim(Policy::Mps), "mps/sim");
}

#[test]
fn eight_threads_host_memory() {
    // Real memory: scalar buffers are written, pages really mapped and unmapped.
    let a = Allocator::new(
        HostBackend::with_memory(4 << 30),
        Config {
            policy: Policy::Default,
            ..Config::default()
        },
    )
    .unwrap();
    hammer(a, "default/host");
}

#[test]
fn a_reports_totals_agree_with_its_own_pools_while_others_allocate() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let a = Allocator::new(SimBackend::new(1 << 30), Config::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|t| {
            let (a, stop) = (a.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let size = (64 << 10) * (1 + (i * 7 + t) % 8);
                    let b = a.alloc(size).unwrap().unwrap();
                    a.free(b.ptr).unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    let mut mismatches = 0;
    for _ in 0..2000 {
        let r = a.report();
        let cached: usize = r.pools.iter().map(|p| p.cached_bytes).sum();
        let reserved: usize = r.pools.iter().map(|p| p.reserved).sum();
        if cached != r.usage.cached || reserved != r.usage.reserved {
            mismatches += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(
        mismatches, 0,
        "reports whose pools disagree with their own totals"
    );
}
