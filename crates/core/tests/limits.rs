//! The high watermark under the default policy: what it refuses, and what it must not.
//!
//! The limit caps what the driver holds for the process, other allocations included; a
//! request that fits under it is served, from mapped memory wherever it lies.

use std::sync::atomic::{AtomicUsize, Ordering};

use bufferheap_core::{
    Allocator, Backend, BackendCaps, BackendError, Config, MemoryInfo, Policy, Region, Storage,
    StreamId,
};
use bufferheap_sim::SimBackend;

const MIB: usize = 1 << 20;

fn config(high: f64) -> Config {
    Config {
        high_watermark_ratio: Some(high),
        low_watermark_ratio: Some(0.0),
        front_cache_bytes: 0,
        ..Config::default()
    }
}

#[test]
fn a_mapped_page_inside_a_free_range_serves_at_the_limit() {
    let sim = SimBackend::new(32 * MIB).with_physical_block(4 * MIB);
    let a = Allocator::new(
        sim,
        Config {
            map_chunk: 4 * MIB,
            ..config(0.0)
        },
    )
    .unwrap();
    let big = a.alloc(16 * MIB).unwrap().unwrap(); // pages 0..8
    let b = a.alloc(2 * MIB).unwrap().unwrap(); // page 8; pages 8 and 9 mapped as one piece
    let kept = a.alloc(2 * MIB).unwrap().unwrap(); // page 9
    a.free(big.ptr).unwrap();
    a.free(b.ptr).unwrap();
    a.empty_cache().unwrap();
    // Free space now starts on unmapped pages (0..8) and ends on mapped page 8, which cannot
    // go back on its own (its piece holds `kept`).
    let reserved = a.total_allocated();
    assert_eq!(reserved, 4 * MIB);
    a.set_watermark_ratios(0.0, reserved as f64 / (32 * MIB) as f64)
        .unwrap();
    let c = a
        .alloc(MIB)
        .unwrap()
        .expect("served from the idle mapped page");
    assert_eq!(c.ptr, b.ptr);
    assert_eq!(a.total_allocated(), reserved, "nothing mapped");
    assert!(a.alloc(3 * MIB).is_err(), "what does not fit is refused");
    a.free(c.ptr).unwrap();
    a.free(kept.ptr).unwrap();
}

/// A sim device on which something else in the process holds `external` bytes.
#[derive(Debug)]
struct Shared {
    sim: SimBackend,
    external: AtomicUsize,
}

impl Backend for Shared {
    type Event = <SimBackend as Backend>::Event;
    fn caps(&self) -> BackendCaps {
        self.sim.caps()
    }
    fn reserve(&self, size: usize, s: Storage, mapped: bool) -> Result<Region, BackendError> {
        self.sim.reserve(size, s, mapped)
    }
    fn release(&self, r: &Region) -> Result<(), BackendError> {
        self.sim.release(r)
    }
    fn map(&self, r: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        self.sim.map(r, offset, len)
    }
    fn unmap(&self, r: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        self.sim.unmap(r, offset, len)
    }
    fn record_event(&self, s: StreamId) -> Result<Self::Event, BackendError> {
        self.sim.record_event(s)
    }
    fn event_complete(&self, e: &Self::Event) -> Result<bool, BackendError> {
        self.sim.event_complete(e)
    }
    fn wait_event(&self, e: &Self::Event) -> Result<(), BackendError> {
        self.sim.wait_event(e)
    }
    fn memory_info(&self) -> MemoryInfo {
        let mut info = self.sim.memory_info();
        info.free -= self.external.load(Ordering::SeqCst);
        info
    }
    fn write(&self, r: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError> {
        self.sim.write(r, offset, bytes)
    }
}

#[test]
fn growth_counts_what_other_allocations_hold_now() {
    for paged in [true, false] {
        let mut sim = SimBackend::new(1000 * MIB);
        if !paged {
            sim = sim.without_page_mapping();
        }
        let shared = Shared {
            sim,
            external: AtomicUsize::new(0),
        };
        let a = Allocator::new(shared, config(0.1)).unwrap();
        let limit = a.high_watermark_limit();
        assert_eq!(limit, 100 * MIB);
        a.backend().external.store(90 * MIB, Ordering::SeqCst);
        assert!(
            a.alloc(40 * MIB).is_err(),
            "paged {paged}: 90 + 40 MiB > 100"
        );
        assert!(a.driver_allocated() <= limit, "paged {paged}");
        let fits = a.alloc(8 * MIB).unwrap();
        assert!(fits.is_some(), "paged {paged}: 90 + 8 MiB fit");
    }
}

#[test]
fn largest_available_counts_what_other_allocations_hold() {
    let shared = Shared {
        sim: SimBackend::new(1000 * MIB),
        external: AtomicUsize::new(0),
    };
    let a = Allocator::new(shared, config(0.1)).unwrap();
    a.backend().external.store(90 * MIB, Ordering::SeqCst);
    let n = a.largest_available();
    assert!(
        n <= 10 * MIB,
        "{} MiB under a 100 MiB limit with 90 held elsewhere",
        n / MIB
    );
    let b = a.alloc(n).unwrap();
    assert!(
        b.is_some(),
        "largest_available() = {n} bytes, and they can be had"
    );
}

#[test]
fn largest_available_under_an_unaligned_limit_can_be_allocated() {
    for policy in [Policy::Default, Policy::Mps] {
        let a = Allocator::new(
            SimBackend::new(16 << 30),
            Config {
                policy,
                ..Config::default()
            },
        )
        .unwrap();
        // 30% of 16 GiB is no whole number of pages.
        a.set_watermark_ratios(0.0, 0.3).unwrap();
        let n = a.largest_available();
        let b = a.alloc(n);
        assert!(
            matches!(b, Ok(Some(_))),
            "{policy}: largest_available() = {n} under a limit of {}: {:?}",
            a.high_watermark_limit(),
            b.map(|b| b.map(|b| b.size)).map_err(|e| e.to_string())
        );
    }
}

#[test]
fn largest_available_counts_only_pools_a_request_reaches() {
    // Under mps, a 1 MiB buffer takes an 8 MiB small heap; 7 MiB of it stay free, but a
    // request of 7 MiB goes to the large pool.
    let a = Allocator::new(
        SimBackend::new(256 * MIB),
        Config {
            policy: Policy::Mps,
            ..Config::default()
        },
    )
    .unwrap();
    let _small = a.alloc(MIB).unwrap().unwrap();
    let mut held = vec![];
    while let Ok(Some(b)) = a.alloc(8 * MIB) {
        held.push(b);
    }
    let n = a.largest_available();
    assert!(
        n == 0 || a.alloc(n).is_ok_and(|b| b.is_some()),
        "mps: {n} bytes"
    );

    // A free range in the shared heap does not serve the private front-end.
    let a = Allocator::new(SimBackend::new(1 << 30), Config::default()).unwrap();
    a.set_watermark_ratios(0.0, 0.1).unwrap();
    let shared = a.shared().unwrap();
    let _keep = shared.alloc(2 * MIB).unwrap().unwrap();
    let big = shared.alloc(40 * MIB).unwrap().unwrap();
    shared.free(big.ptr).unwrap();
    let mut held = vec![];
    while let Ok(Some(b)) = a.alloc(2 * MIB) {
        held.push(b);
    }
    let n = a.largest_available();
    assert!(
        n == 0 || a.alloc(n).is_ok_and(|b| b.is_some()),
        "shared heap: {n} bytes"
    );
}

#[test]
fn a_request_that_fits_on_the_device_is_not_refused_for_pages_mapped_ahead() {
    let a = Allocator::new(SimBackend::new(256 * MIB), Config::default()).unwrap();
    // Shared memory takes part of the device, so private growth runs it out.
    let shared = a.shared().unwrap();
    let _keep = shared.alloc(2 * MIB).unwrap().unwrap();
    let big = shared.alloc(60 * MIB).unwrap().unwrap();
    shared.free(big.ptr).unwrap();
    let mut held = vec![];
    while let Ok(Some(b)) = a.alloc(8 * MIB) {
        held.push(b);
    }
    // Growth in a burst maps pages ahead; where the device cannot hold those, the request
    // itself still gets its pages.
    loop {
        let free = a.backend().memory_info().free;
        match a.alloc(2 * MIB) {
            Ok(b) => held.push(b.unwrap()),
            Err(e) => {
                assert!(
                    free < 2 * MIB,
                    "{} MiB free, 2 MiB refused: {e}",
                    free / MIB
                );
                break;
            }
        }
    }
}

#[test]
fn a_committed_heap_shrinks_to_the_request_under_the_limit() {
    for policy in [Policy::Default, Policy::Mps] {
        let sim = SimBackend::new(1000 * MIB).without_page_mapping();
        let a = Allocator::new(
            sim,
            Config {
                policy,
                ..config(0.01)
            },
        )
        .unwrap();
        assert_eq!(a.high_watermark_limit(), 10 * MIB);
        // The usual heap for 3 MiB holds 20 MiB: over the limit, where 3 MiB fit.
        let b = a.alloc(3 * MIB).unwrap();
        assert!(b.is_some(), "{policy}: 3 MiB under a 10 MiB limit");
        assert!(a.total_allocated() <= 10 * MIB, "{policy}");
    }
}
