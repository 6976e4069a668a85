//! Random programs of allocator operations checked against a shadow model after every step
//! (the rlsf approach): no two live buffers overlap, every buffer is aligned and inside a
//! heap, the counters equal what the model says, the backend holds exactly what the engine
//! says it reserved, and `empty_cache` leaves nothing cached.

use std::collections::BTreeMap;

use bufferheap_core::faults::{Fault, FaultyBackend};
use bufferheap_core::{Allocator, BackendOp, Config, Error, Policy};
use bufferheap_sim::SimBackend;
use proptest::prelude::*;

const MIB: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Alloc {
        size: usize,
        stream: u8,
        shared: bool,
    },
    Free(usize),
    Scalar(u8),
    RecordStream(usize, u8),
    RecordEvents(usize),
    CompleteEvents,
    FreeInactive,
    Wait(usize),
    EmptyCache,
    Watermarks(u8, u8),
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1usize..4096,
        3 => 4096usize..MIB,
        2 => MIB..16 * MIB,
        1 => 16 * MIB..72 * MIB,
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (size_strategy(), 0u8..3, prop::bool::weighted(0.15))
            .prop_map(|(size, stream, shared)| Op::Alloc { size, stream, shared }),
        8 => any::<usize>().prop_map(Op::Free),
        1 => (1u8..16).prop_map(Op::Scalar),
        1 => (any::<usize>(), 0u8..3).prop_map(|(i, s)| Op::RecordStream(i, s)),
        1 => any::<usize>().prop_map(Op::RecordEvents),
        1 => Just(Op::CompleteEvents),
        1 => Just(Op::FreeInactive),
        1 => any::<usize>().prop_map(Op::Wait),
        1 => Just(Op::EmptyCache),
        1 => (0u8..5, 0u8..5).prop_map(|(l, h)| Op::Watermarks(l, h)),
    ]
}

#[derive(Debug, Clone, Copy)]
struct Live {
    size: usize,
    requested: usize,
}

fn pick(live: &BTreeMap<u64, Live>, i: usize) -> Option<u64> {
    if live.is_empty() {
        None
    } else {
        live.keys().nth(i % live.len()).copied()
    }
}

/// The most bytes and buffers ever live at once in the model.
#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    bytes: usize,
    buffers: usize,
}

impl Peaks {
    fn update(&mut self, live: &BTreeMap<u64, Live>) {
        self.bytes = self.bytes.max(live.values().map(|l| l.size).sum());
        self.buffers = self.buffers.max(live.len());
    }
}

fn check<B: bufferheap_core::Backend>(
    a: &Allocator<B>,
    live: &BTreeMap<u64, Live>,
    held: usize,
    peaks: Peaks,
) -> Result<(), TestCaseError> {
    let mut prev_end = 0u64;
    for (&ptr, l) in live {
        prop_assert!(ptr >= prev_end, "buffers overlap at {ptr:#x}");
        prop_assert_eq!(ptr % 512, 0);
        let (base, size) = a.base_allocation(ptr).expect("every buffer lies in a heap");
        prop_assert!(
            base <= ptr && ptr + l.size as u64 <= base + size as u64,
            "buffer outside its heap"
        );
        prev_end = ptr + l.size as u64;
    }
    let u = a.usage();
    prop_assert_eq!(u.allocated, live.values().map(|l| l.size).sum::<usize>());
    prop_assert_eq!(
        u.requested,
        live.values().map(|l| l.requested).sum::<usize>()
    );
    prop_assert_eq!(u.buffers, live.len());
    prop_assert!(u.active >= u.allocated);
    prop_assert!(
        u.active + u.cached <= u.reserved,
        "placed bytes beyond reserved: {u:?}"
    );
    prop_assert_eq!(
        u.reserved,
        held,
        "engine and backend disagree on reserved bytes"
    );
    let stats = a.stats();
    prop_assert_eq!(stats.allocated_bytes[0].current as usize, u.allocated);
    prop_assert_eq!(stats.allocated_bytes[0].peak as usize, peaks.bytes);
    prop_assert_eq!(stats.allocation[0].peak as usize, peaks.buffers);
    Ok(())
}

fn run(policy: Policy, ops: Vec<Op>, faults: bool) -> Result<(), TestCaseError> {
    let sim = SimBackend::new(512 * MIB).with_manual_events();
    let backend = FaultyBackend::new(sim, 7);
    if faults {
        backend.set(BackendOp::Reserve, Fault::OneIn(5));
        backend.set(BackendOp::Map, Fault::OneIn(5));
        backend.set(BackendOp::RecordEvent, Fault::OneIn(7));
    }
    let a = Allocator::new(
        backend,
        Config {
            policy,
            ..Config::default()
        },
    )
    .unwrap();
    let shared = a.shared().unwrap();
    let mut live: BTreeMap<u64, Live> = BTreeMap::new();
    let mut peaks = Peaks::default();
    for op in ops {
        match op {
            Op::Alloc {
                size,
                stream,
                shared: s,
            } => {
                let front = if s { &shared } else { &a };
                match front.alloc_on(size, stream as u64) {
                    Ok(Some(b)) => {
                        let rounded = size.div_ceil(512) * 512;
                        if policy == Policy::Default {
                            // Exact size, or a cached buffer at most 1/8 larger (1/4 up to
                            // 1 MiB, the small pools).
                            let slack = if rounded <= 1 << 20 {
                                rounded / 4
                            } else {
                                rounded / 8
                            };
                            prop_assert!(
                                b.size >= rounded && b.size <= rounded + slack,
                                "{} for {}",
                                b.size,
                                rounded
                            );
                        } else {
                            // The seed reuses a cached buffer up to 32 MiB larger.
                            prop_assert!(b.size >= rounded && b.size <= rounded + 32 * MIB);
                        }
                        prop_assert_eq!(b.requested, size);
                        live.insert(
                            b.ptr,
                            Live {
                                size: b.size,
                                requested: size,
                            },
                        );
                    }
                    Ok(None) => prop_assert!(false, "non-zero size gave no buffer"),
                    Err(Error::OutOfMemory(_)) => {}
                    Err(e) => prop_assert!(faults, "unexpected error {e}"),
                }
            }
            Op::Scalar(n) => match a.alloc_scalar(&vec![1u8; n as usize]) {
                Ok(Some(b)) => {
                    live.insert(
                        b.ptr,
                        Live {
                            size: b.size,
                            requested: n as usize,
                        },
                    );
                }
                Ok(None) => prop_assert!(false),
                Err(Error::OutOfMemory(_)) => {}
                Err(e) => prop_assert!(faults, "unexpected error {e}"),
            },
            Op::Free(i) => {
                if let Some(ptr) = pick(&live, i) {
                    live.remove(&ptr);
                    match a.free(ptr) {
                        Ok(()) => {}
                        // A failed event record still takes the buffer out of use.
                        Err(Error::Backend(_)) if faults => {}
                        Err(e) => prop_assert!(false, "free failed: {e}"),
                    }
                    prop_assert_eq!(a.free(ptr), Err(Error::DoubleFree(ptr)));
                }
            }
            Op::RecordStream(i, s) => {
                if let Some(ptr) = pick(&live, i) {
                    a.record_stream(ptr, s as u64).unwrap();
                }
            }
            Op::RecordEvents(i) => {
                if let Some(ptr) = pick(&live, i) {
                    let r = a.record_events(&[ptr], 0);
                    prop_assert!(r.is_ok() || faults);
                }
            }
            Op::CompleteEvents => a.backend().inner().complete_events(),
            Op::FreeInactive => a.free_inactive_buffers(),
            Op::Wait(i) => {
                if let Some(ptr) = pick(&live, i) {
                    let r = a.wait_for_events(&[ptr]);
                    prop_assert!(r.is_ok() || faults);
                }
            }
            Op::EmptyCache => {
                let r = a.empty_cache();
                prop_assert!(r.is_ok() || faults, "{r:?}");
                if r.is_ok() {
                    prop_assert_eq!(a.usage().cached, 0, "empty_cache leaves nothing cached");
                }
            }
            Op::Watermarks(l, h) => {
                let (low, high) = (l as f64 * 0.5, h as f64 * 0.5);
                match a.set_watermark_ratios(low, high) {
                    Ok(()) => prop_assert_eq!(a.watermark_ratios(), (low, high)),
                    Err(Error::InvalidWatermark { .. }) => {
                        prop_assert!(high > 0.0 && low > high || high > 2.0 || low > 2.0)
                    }
                    Err(e) => prop_assert!(false, "{e}"),
                }
            }
        }
        peaks.update(&live);
        check(&a, &live, a.backend().inner().counters().held, peaks)?;
    }
    // Freeing everything and emptying the cache gives every byte back.
    a.backend().heal();
    for &ptr in live.keys() {
        a.free(ptr).unwrap();
    }
    live.clear();
    a.empty_cache().unwrap();
    check(&a, &live, a.backend().inner().counters().held, peaks)?;
    prop_assert_eq!(a.usage().reserved, 0);
    prop_assert_eq!(a.backend().inner().counters().held, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn default_policy_matches_the_model(ops in prop::collection::vec(op_strategy(), 1..160)) {
        run(Policy::Default, ops, false)?;
    }

    #[test]
    fn mps_policy_matches_the_model(ops in prop::collection::vec(op_strategy(), 1..160)) {
        run(Policy::Mps, ops, false)?;
    }

    #[test]
    fn random_backend_faults_keep_the_engine_consistent(ops in prop::collection::vec(op_strategy(), 1..160), mps in any::<bool>()) {
        run(if mps { Policy::Mps } else { Policy::Default }, ops, true)?;
    }
}
