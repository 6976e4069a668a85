//! Targeted fault injection: each backend operation fails at its N-th call, for every N that a
//! fixed workload reaches, under both policies, on a page-mapping and a committing backend.
//!
//! After every step of the workload: an error is typed (out of memory for a failed reservation
//! or map, a backend error naming the operation otherwise) and comes only from the operation
//! made to fail; the engine's reserved bytes equal what the simulated device holds (the sim's
//! counters are the truth: a failed call never reaches it); in-use bytes and buffer counts equal
//! the shadow model's; live buffers never overlap. At the end, once the faults stop: freeing
//! everything and emptying the cache gives every byte and every region back, the same workload
//! runs again without an error, and dropping the allocator leaves nothing behind.
//!
//! `BUFFERHEAP_FAULT_SEEDS` sets how many seeded random-fault runs the last test makes.

mod common;

use common::Rng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bufferheap_core::faults::{Fault, FaultyBackend, INJECTABLE};
use bufferheap_core::{
    Allocator, Backend, BackendCaps, BackendError, BackendOp, Buffer, Config, Error, MemoryInfo,
    Policy, Region, Storage, StreamId,
};
use bufferheap_sim::SimBackend;

const MIB: usize = 1 << 20;

const OPS: [BackendOp; 7] = INJECTABLE;

fn op_index(op: BackendOp) -> usize {
    OPS.iter().position(|&o| o == op).expect("an injectable op")
}

/// The faulty backend behind an `Arc`, so the test still sees the simulated device after the
/// allocator (which owns its backend) is dropped; counts the calls of each operation.
#[derive(Debug, Clone)]
struct Probe {
    faulty: Arc<FaultyBackend<SimBackend>>,
    calls: Arc<[AtomicU64; 7]>,
    /// Faults injected, by operation.
    injected: Arc<[AtomicU64; 7]>,
}

impl Probe {
    fn new(paged: bool) -> Probe {
        let mut sim = SimBackend::new(4096 * MIB).with_manual_events();
        if !paged {
            sim = sim.without_page_mapping();
        }
        Probe {
            faulty: Arc::new(FaultyBackend::new(sim, 0x5eed)),
            calls: Arc::new(Default::default()),
            injected: Arc::new(Default::default()),
        }
    }

    fn sim(&self) -> &SimBackend {
        self.faulty.inner()
    }

    /// Counts a call of `op` and, when it failed on purpose, the fault.
    fn count<T>(&self, op: BackendOp, r: Result<T, BackendError>) -> Result<T, BackendError> {
        self.calls[op_index(op)].fetch_add(1, Ordering::Relaxed);
        if let Err(e) = &r
            && e.message.starts_with("injected fault")
        {
            self.injected[op_index(op)].fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn calls(&self, op: BackendOp) -> u64 {
        self.calls[op_index(op)].load(Ordering::Relaxed)
    }
}

impl Backend for Probe {
    type Event = <SimBackend as Backend>::Event;

    fn caps(&self) -> BackendCaps {
        self.faulty.caps()
    }
    fn reserve(&self, size: usize, storage: Storage, mapped: bool) -> Result<Region, BackendError> {
        self.count(
            BackendOp::Reserve,
            self.faulty.reserve(size, storage, mapped),
        )
    }
    fn release(&self, region: &Region) -> Result<(), BackendError> {
        self.count(BackendOp::Release, self.faulty.release(region))
    }
    fn map(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        self.count(BackendOp::Map, self.faulty.map(region, offset, len))
    }
    fn unmap(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        self.count(BackendOp::Unmap, self.faulty.unmap(region, offset, len))
    }
    fn record_event(&self, stream: StreamId) -> Result<Self::Event, BackendError> {
        self.count(BackendOp::RecordEvent, self.faulty.record_event(stream))
    }
    fn event_complete(&self, event: &Self::Event) -> Result<bool, BackendError> {
        self.count(BackendOp::QueryEvent, self.faulty.event_complete(event))
    }
    fn wait_event(&self, event: &Self::Event) -> Result<(), BackendError> {
        self.count(BackendOp::WaitEvent, self.faulty.wait_event(event))
    }
    fn memory_info(&self) -> MemoryInfo {
        self.faulty.memory_info()
    }
    fn write(&self, region: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError> {
        self.faulty.write(region, offset, bytes)
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Alloc {
        size: usize,
        stream: u64,
        shared: bool,
    },
    Scalar(usize),
    Free(usize),
    RecordStream(usize, u64),
    RecordEvents(usize),
    Complete,
    FreeInactive,
    Wait(usize),
    EmptyCache,
}

/// A fixed workload that reaches every backend operation: growth in both storages and three
/// streams, frees that wait on events, explicit event records and waits, cache trims.
fn workload(seed: u64, len: usize) -> Vec<Step> {
    let mut r = Rng(seed);
    let mut steps = Vec::with_capacity(len);
    for _ in 0..len {
        let step = match r.below(20) {
            0..=6 => {
                let size = match r.below(10) {
                    0..=3 => 1 + r.below(64 << 10) as usize,
                    4..=6 => 64 << 10 | r.below(MIB as u64) as usize,
                    7..=8 => MIB + r.below(12 * MIB as u64) as usize,
                    _ => 16 * MIB + r.below(48 * MIB as u64) as usize,
                };
                Step::Alloc {
                    size,
                    stream: r.below(3),
                    shared: r.below(6) == 0,
                }
            }
            7 => Step::Scalar(1 + r.below(16) as usize),
            8..=12 => Step::Free(r.next() as usize),
            13 => Step::RecordStream(r.next() as usize, 1 + r.below(2)),
            14 => Step::RecordEvents(r.next() as usize),
            15 => Step::Complete,
            16 => Step::FreeInactive,
            17 => Step::Wait(r.next() as usize),
            _ => Step::EmptyCache,
        };
        steps.push(step);
    }
    steps
}

/// Live buffers as the test sees them: ptr -> (rounded size, requested size).
type Live = BTreeMap<u64, (usize, usize)>;

fn pick(live: &Live, i: usize) -> Option<u64> {
    (!live.is_empty()).then(|| *live.keys().nth(i % live.len()).expect("in range"))
}

/// True if `e` is what a fault injected into one of `ops` may surface as.
fn is_injected(e: &Error, ops: &[BackendOp]) -> bool {
    match e {
        Error::OutOfMemory(_) => ops
            .iter()
            .any(|op| matches!(op, BackendOp::Reserve | BackendOp::Map)),
        Error::Backend(b) => ops.contains(&b.op) && b.message.starts_with("injected fault"),
        _ => false,
    }
}

fn check(a: &Allocator<Probe>, live: &Live, what: &str) {
    let u = a.usage();
    let held = a.backend().sim().counters().held;
    assert_eq!(u.reserved, held, "{what}: engine and device disagree");
    assert_eq!(
        u.allocated,
        live.values().map(|l| l.0).sum::<usize>(),
        "{what}: in-use bytes"
    );
    assert_eq!(
        u.requested,
        live.values().map(|l| l.1).sum::<usize>(),
        "{what}: requested bytes"
    );
    assert_eq!(u.buffers, live.len(), "{what}: buffers in use");
    assert!(u.active >= u.allocated, "{what}: {u:?}");
    assert!(u.active + u.cached <= u.reserved, "{what}: {u:?}");
    let mut end = 0;
    for (&ptr, &(size, _)) in live {
        assert!(ptr >= end, "{what}: buffers overlap at {ptr:#x}");
        end = ptr + size as u64;
    }
}

/// Runs `steps`; `faults` are the operations made to fail. With `heal_after_first`, the faults
/// stop after the first step in which one was injected. Panics on any broken invariant.
fn run_steps(
    a: &Allocator<Probe>,
    live: &mut Live,
    steps: &[Step],
    faults: &[BackendOp],
    heal_after_first: bool,
) {
    let shared = a.shared().expect("the sim has shared storage");
    let faulty = a.backend().faulty.clone();
    for (i, &step) in steps.iter().enumerate() {
        let before = faulty.injected();
        let what = format!("step {i} {step:?} (faults in {faults:?})");
        let ok = |r: Result<(), Error>, live: &Live| {
            if let Err(e) = r {
                assert!(is_injected(&e, faults), "{what}: unexpected error {e}");
                assert!(
                    faulty.injected() > before,
                    "{what}: error without a fault: {e}"
                );
            }
            let _ = live;
        };
        match step {
            Step::Alloc {
                size,
                stream,
                shared: s,
            } => {
                let front = if s { &shared } else { a };
                match front.alloc_on(size, stream) {
                    Ok(Some(b)) => {
                        assert!(b.size >= size && b.requested == size, "{what}");
                        assert!(live.insert(b.ptr, (b.size, size)).is_none(), "{what}");
                    }
                    Ok(None) => panic!("{what}: no buffer for a non-zero size"),
                    Err(e) => ok(Err(e), live),
                }
            }
            Step::Scalar(n) => match a.alloc_scalar(&vec![7u8; n]) {
                Ok(Some(b)) => {
                    live.insert(b.ptr, (b.size, n));
                }
                Ok(None) => panic!("{what}: no scalar buffer"),
                Err(e) => ok(Err(e), live),
            },
            Step::Free(k) => {
                if let Some(ptr) = pick(live, k) {
                    live.remove(&ptr);
                    // A failed event record or query still takes the buffer out of use.
                    ok(a.free(ptr), live);
                    assert_eq!(a.free(ptr), Err(Error::DoubleFree(ptr)), "{what}");
                }
            }
            Step::RecordStream(k, stream) => {
                if let Some(ptr) = pick(live, k) {
                    a.record_stream(ptr, stream).expect("a live buffer");
                }
            }
            Step::RecordEvents(k) => {
                if let Some(ptr) = pick(live, k) {
                    ok(a.record_events(&[ptr], 1).map(drop), live);
                }
            }
            Step::Complete => a.backend().sim().complete_events(),
            Step::FreeInactive => a.free_inactive_buffers(),
            Step::Wait(k) => {
                if let Some(ptr) = pick(live, k) {
                    ok(a.wait_for_events(&[ptr]).map(drop), live);
                }
            }
            Step::EmptyCache => {
                let r = a.empty_cache();
                let failed = r.is_err();
                ok(r, live);
                if !failed && faulty.injected() == before {
                    assert_eq!(a.usage().cached, 0, "{what}: cache left after empty_cache");
                }
            }
        }
        check(a, live, &what);
        if heal_after_first && faulty.injected() > before {
            faulty.heal();
        }
    }
}

/// Frees everything, empties the cache, and checks that every byte and region went back.
fn drain(a: &Allocator<Probe>, live: &mut Live, what: &str) {
    for (&ptr, _) in live.iter() {
        a.free(ptr).unwrap_or_else(|e| panic!("{what}: free: {e}"));
    }
    live.clear();
    a.empty_cache()
        .unwrap_or_else(|e| panic!("{what}: empty_cache: {e}"));
    check(a, live, what);
    let u = a.usage();
    assert_eq!((u.reserved, u.cached, u.heaps), (0, 0, 0), "{what}: {u:?}");
    let sim = a.backend().sim();
    assert_eq!(sim.counters().held, 0, "{what}: device still holds memory");
    assert_eq!(sim.live_regions(), 0, "{what}: regions leaked");
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    runs: u64,
    injected: u64,
    steps_failed: u64,
}

fn config(policy: Policy) -> Config {
    Config {
        policy,
        ..Config::default()
    }
}

/// One run with `op` failing at every `n`-th call until the first step that saw a fault.
fn nth_call_run(policy: Policy, paged: bool, steps: &[Step], op: BackendOp, n: u64) -> Tally {
    let probe = Probe::new(paged);
    let a = Allocator::new(probe.clone(), config(policy)).unwrap();
    probe.faulty.set(op, Fault::EveryNth(n));
    let mut live = Live::new();
    let errors_before = a.stats().num_ooms;
    run_steps(&a, &mut live, steps, &[op], true);
    let injected = probe.faulty.injected();
    probe.faulty.heal();
    let what = format!("{policy} paged={paged} {op} at call {n}");
    drain(&a, &mut live, &what);
    // Working again: the same workload, no fault, no error.
    run_steps(&a, &mut live, steps, &[], false);
    drain(&a, &mut live, &format!("{what}, second pass"));
    let ooms = a.stats().num_ooms - errors_before;
    drop(a);
    assert_eq!(probe.sim().live_regions(), 0, "{what}: regions after drop");
    assert_eq!(probe.sim().counters().held, 0, "{what}: bytes after drop");
    Tally {
        runs: 1,
        injected,
        steps_failed: ooms,
    }
}

/// Calls of each operation in a clean run of `steps`.
fn clean_calls(policy: Policy, paged: bool, steps: &[Step]) -> [u64; 7] {
    let probe = Probe::new(paged);
    let a = Allocator::new(probe.clone(), config(policy)).unwrap();
    let mut live = Live::new();
    run_steps(&a, &mut live, steps, &[], false);
    let calls = OPS.map(|op| probe.calls(op));
    drain(&a, &mut live, "clean run");
    calls
}

fn sweep(policy: Policy, paged: bool, ops: &[BackendOp]) -> Vec<(BackendOp, Tally)> {
    let steps = workload(0xfa17 + paged as u64, 320);
    let calls = clean_calls(policy, paged, &steps);
    let mut out = Vec::new();
    for &op in ops {
        let n_calls = calls[op_index(op)];
        assert!(
            n_calls > 0,
            "{policy} paged={paged}: the workload never calls {op}"
        );
        let mut t = Tally::default();
        // Every call up to 160, then a spread of later ones.
        let ns: Vec<u64> = (1..=n_calls.min(160))
            .chain((161..=n_calls).step_by((n_calls as usize / 16).max(1)))
            .collect();
        for n in ns {
            let r = nth_call_run(policy, paged, &steps, op, n);
            t.runs += r.runs;
            t.injected += r.injected;
            t.steps_failed += r.steps_failed;
        }
        assert!(
            t.injected > 0,
            "{policy} paged={paged}: no {op} fault injected"
        );
        eprintln!(
            "{policy:>7} paged={paged:<5} {:<14} calls in clean run {n_calls:>4}, runs {:>3}, faults injected {:>4}, allocations out of memory {:>3}",
            op.to_string(),
            t.runs,
            t.injected,
            t.steps_failed
        );
        out.push((op, t));
    }
    out
}

#[test]
fn default_policy_page_mapped_each_op_failing_at_the_nth_call() {
    sweep(Policy::Default, true, &OPS);
}

#[test]
fn default_policy_committed_heaps_each_op_failing_at_the_nth_call() {
    // No page mapping: growth reserves committed heaps; map and unmap are never called.
    sweep(
        Policy::Default,
        false,
        &[
            BackendOp::Reserve,
            BackendOp::Release,
            BackendOp::RecordEvent,
            BackendOp::QueryEvent,
            BackendOp::WaitEvent,
        ],
    );
}

#[test]
fn mps_policy_each_op_failing_at_the_nth_call() {
    sweep(
        Policy::Mps,
        true,
        &[
            BackendOp::Reserve,
            BackendOp::Release,
            BackendOp::RecordEvent,
            BackendOp::QueryEvent,
            BackendOp::WaitEvent,
        ],
    );
}

#[test]
fn one_transient_reserve_or_map_failure_is_cured_by_the_retry() {
    // A single out-of-memory answer is what a device gives when another process briefly held
    // the memory: the fallback chain asks again, so the allocation succeeds.
    for (policy, paged, op) in [
        (Policy::Default, true, BackendOp::Map),
        (Policy::Default, true, BackendOp::Reserve),
        (Policy::Default, false, BackendOp::Reserve),
        (Policy::Mps, true, BackendOp::Reserve),
    ] {
        for size in [4096, 3 * MIB, 40 * MIB] {
            let what = format!("{policy} paged={paged} {op} size {size}");
            let probe = Probe::new(paged);
            let a = Allocator::new(probe.clone(), config(policy)).unwrap();
            // Every call fails until the first failure is reported to the callbacks, which
            // heal the device.
            probe.faulty.set(op, Fault::EveryNth(1));
            let f = probe.faulty.clone();
            a.register_callback("heal", move |_, e| {
                if e == bufferheap_core::CallbackEvent::AllocationFailed {
                    f.heal();
                }
            });
            let b = a
                .alloc(size)
                .unwrap_or_else(|e| panic!("{what}: {e}"))
                .unwrap();
            // The seed's chain may ask twice in its first step (its heap, then a dedicated one).
            assert!((1..=2).contains(&probe.faulty.injected()), "{what}");
            assert_eq!(a.stats().num_alloc_retries, 1, "{what}");
            let mut live = Live::from([(b.ptr, (b.size, size))]);
            check(&a, &live, &what);
            drain(&a, &mut live, &what);
        }
    }
}

#[test]
fn a_failing_release_keeps_the_heap_and_its_bytes_until_it_succeeds() {
    for policy in [Policy::Default, Policy::Mps] {
        let probe = Probe::new(false);
        let a = Allocator::new(probe.clone(), config(policy)).unwrap();
        let b = a.alloc(30 * MIB).unwrap().unwrap();
        a.free(b.ptr).unwrap();
        let held = probe.sim().counters().held;
        assert!(held > 0);
        probe.faulty.set(BackendOp::Release, Fault::Always);
        match a.empty_cache() {
            Err(Error::Backend(e)) => assert_eq!(e.op, BackendOp::Release),
            other => panic!("{policy}: {other:?}"),
        }
        assert_eq!(a.usage().reserved, held, "{policy}: bytes still counted");
        assert_eq!(probe.sim().live_regions(), 1);
        probe.faulty.heal();
        a.empty_cache().unwrap();
        assert_eq!(a.usage().reserved, 0);
        assert_eq!(probe.sim().live_regions(), 0);
    }
}

#[test]
fn a_failing_unmap_is_reported_and_the_pages_stay_counted() {
    let probe = Probe::new(true);
    let a = Allocator::new(probe.clone(), config(Policy::Default)).unwrap();
    let b = a.alloc(9 * MIB).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    let held = probe.sim().counters().held;
    probe.faulty.set(BackendOp::Unmap, Fault::Always);
    match a.empty_cache() {
        Err(Error::Backend(e)) => assert_eq!(e.op, BackendOp::Unmap),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.usage().reserved, held);
    assert_eq!(probe.sim().counters().held, held);
    // The buffer's space went back to its heap; a new allocation still works.
    let c = a.alloc(MIB).unwrap().unwrap();
    a.free(c.ptr).unwrap();
    probe.faulty.heal();
    a.empty_cache().unwrap();
    assert_eq!(probe.sim().counters().held, 0);
    assert_eq!(probe.sim().live_regions(), 0);
}

#[test]
fn failing_event_calls_keep_guarded_buffers_out_of_reuse() {
    for op in [
        BackendOp::RecordEvent,
        BackendOp::QueryEvent,
        BackendOp::WaitEvent,
    ] {
        let probe = Probe::new(true);
        let a = Allocator::new(probe.clone(), config(Policy::Default)).unwrap();
        let b = a.alloc(MIB).unwrap().unwrap();
        a.record_stream(b.ptr, 5).unwrap();
        a.record_events(&[b.ptr], 5).unwrap();
        probe.faulty.set(op, Fault::Always);
        let r = a.free(b.ptr);
        match op {
            BackendOp::WaitEvent => assert_eq!(r, Ok(())),
            _ => match r {
                Err(Error::Backend(e)) => assert_eq!(e.op, op),
                other => panic!("{op}: {other:?}"),
            },
        }
        // The event never completed (or is unknown): the same size must not get this buffer.
        let c = a.alloc(MIB).unwrap().unwrap();
        assert_ne!(c.ptr, b.ptr, "{op}: a guarded buffer was reused");
        if op == BackendOp::WaitEvent {
            match a.wait_for_events(&[b.ptr]) {
                Err(Error::Backend(e)) => assert_eq!(e.op, op),
                other => panic!("{op}: {other:?}"),
            }
        }
        a.free(c.ptr).unwrap();
        probe.faulty.heal();
        a.empty_cache().unwrap();
        let u = a.usage();
        assert_eq!((u.active, u.reserved), (0, 0), "{op}: {u:?}");
        assert_eq!(probe.sim().live_regions(), 0);
    }
}

/// An allocator on `probe` whose large pool has pages retiring behind an event: a 32 MiB
/// buffer is freed, a miss (`y`, 3 MiB) dissolves it so most of its pages fall idle, the
/// clock moves on (small buffers, another pool) and the next miss (`z`, 5 MiB) retires the
/// stale pages.
fn with_stale_pages_retiring(probe: &Probe) -> (Allocator<Probe>, Buffer, Buffer) {
    let a = Allocator::new(
        probe.clone(),
        Config {
            stale_page_age: 1,
            ..config(Policy::Default)
        },
    )
    .unwrap();
    let x = a.alloc(32 * MIB).unwrap().unwrap();
    a.free(x.ptr).unwrap();
    let y = a.alloc(3 * MIB).unwrap().unwrap();
    for _ in 0..300 {
        let s = a.alloc(4096).unwrap().unwrap();
        a.free(s.ptr).unwrap();
    }
    let z = a.alloc(5 * MIB).unwrap().unwrap();
    (a, y, z)
}

#[test]
fn a_failed_event_query_while_trimming_leaves_no_stale_page_retirement() {
    // Pages retire behind an event when they go stale; emptying the cache waits for the
    // device and unmaps every idle page. If the query of the retirement's event fails there,
    // the pages are unmapped anyway: their retirement must go with them, or completing it
    // later unmaps pages that are no longer mapped.
    let probe = Probe::new(true);
    let (a, y, z) = with_stale_pages_retiring(&probe);
    let mut live = Live::from([
        (y.ptr, (y.size, y.requested)),
        (z.ptr, (z.size, z.requested)),
    ]);
    check(&a, &live, "after retiring");
    probe.faulty.set(BackendOp::QueryEvent, Fault::Always);
    a.empty_cache().unwrap();
    check(&a, &live, "emptied with failing queries");
    probe.faulty.heal();
    // The retirement's event is complete now: nothing may be unmapped twice.
    let w = a.alloc(7 * MIB).unwrap().unwrap();
    live.insert(w.ptr, (w.size, w.requested));
    check(&a, &live, "after the retirement completed");
    drain(&a, &mut live, "end");
}

#[test]
fn a_failed_event_query_while_releasing_a_heap_leaves_no_stale_page_retirement() {
    // As above, but the heap itself is released while its pages are retiring: the retirement
    // must not outlive the heap (completing it would look the released heap up).
    let probe = Probe::new(true);
    let (a, y, z) = with_stale_pages_retiring(&probe);
    a.free(y.ptr).unwrap();
    a.free(z.ptr).unwrap();
    probe.faulty.set(BackendOp::QueryEvent, Fault::Always);
    a.empty_cache().unwrap();
    let mut live = Live::new();
    check(&a, &live, "emptied with failing queries");
    assert_eq!(probe.sim().live_regions(), 0, "every heap was empty");
    probe.faulty.heal();
    let w = a.alloc(7 * MIB).unwrap().unwrap();
    live.insert(w.ptr, (w.size, w.requested));
    check(&a, &live, "after the retirement completed");
    drain(&a, &mut live, "end");
}

#[test]
fn seeded_random_faults_in_every_op() {
    let seeds: u64 = std::env::var("BUFFERHEAP_FAULT_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let mut injected = [0u64; 7];
    let mut steps_run = 0;
    for seed in 0..seeds {
        for policy in [Policy::Default, Policy::Mps] {
            let paged = seed % 3 != 0;
            let what = format!("seed {seed} {policy} paged={paged}");
            let probe = Probe::new(paged);
            let a = Allocator::new(probe.clone(), config(policy)).unwrap();
            let steps = workload(seed, 120);
            // Every op at once, each at its own rate: a step may fail for any of them.
            let rates = [4, 3, 5, 3, 4, 6, 3];
            for (i, &op) in OPS.iter().enumerate() {
                probe.faulty.set(op, Fault::OneIn(rates[i]));
            }
            let mut live = Live::new();
            run_steps(&a, &mut live, &steps, &OPS, false);
            probe.faulty.heal();
            drain(&a, &mut live, &what);
            run_steps(&a, &mut live, &steps, &[], false);
            drain(&a, &mut live, &what);
            drop(a);
            assert_eq!(probe.sim().live_regions(), 0, "{what}");
            assert_eq!(probe.sim().counters().held, 0, "{what}");
            for (i, n) in injected.iter_mut().enumerate() {
                *n += probe.injected[i].load(Ordering::Relaxed);
            }
            steps_run += steps.len();
        }
    }
    let by_kind: Vec<String> = OPS
        .iter()
        .zip(injected)
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    eprintln!(
        "random faults: {seeds} seeds x 2 policies, {steps_run} steps, injected: {}",
        by_kind.join(", ")
    );
    assert!(injected.iter().all(|&n| n > 0), "{by_kind:?}");
}

#[test]
fn a_failed_release_while_emptying_the_mps_cache_loses_no_buffer() {
    let sim = SimBackend::new(4096 * MIB).without_page_mapping();
    let a = Allocator::new(
        FaultyBackend::new(sim, 1),
        Config {
            policy: Policy::Mps,
            ..Config::default()
        },
    )
    .unwrap();
    // Dedicated heaps, one buffer each, both cached.
    let x = a.alloc(80 * MIB).unwrap().unwrap();
    let y = a.alloc(90 * MIB).unwrap().unwrap();
    a.free(x.ptr).unwrap();
    a.free(y.ptr).unwrap();
    a.backend().set(BackendOp::Release, Fault::EveryNth(1));
    assert!(a.empty_cache().is_err());
    a.backend().heal();
    a.empty_cache().unwrap();
    let u = a.usage();
    assert_eq!((u.reserved, u.cached, u.heaps), (0, 0, 0), "{u:?}");
}
