//! When the last handle on an engine goes, every heap goes back to the backend.
//!
//! A callback that calls back into the allocator needs a handle on it; a strong handle captured
//! by a registered callback is a reference cycle (engine -> registry -> callback -> engine),
//! so such callbacks capture a weak handle (`Allocator::downgrade`), which does not keep the
//! engine alive.

use std::sync::Arc;

use bufferheap_core::{
    Allocator, Backend, BackendCaps, BackendError, CallbackEvent, Config, MemoryInfo, Region,
    Storage, StreamId,
};
use bufferheap_sim::SimBackend;

const MIB: usize = 1 << 20;

/// The simulated device behind an `Arc`, so the test still sees it after the engine is gone.
#[derive(Debug, Clone)]
struct Seen(Arc<SimBackend>);

impl Backend for Seen {
    type Event = <SimBackend as Backend>::Event;
    fn caps(&self) -> BackendCaps {
        self.0.caps()
    }
    fn reserve(&self, size: usize, storage: Storage, mapped: bool) -> Result<Region, BackendError> {
        self.0.reserve(size, storage, mapped)
    }
    fn release(&self, region: &Region) -> Result<(), BackendError> {
        self.0.release(region)
    }
    fn map(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        self.0.map(region, offset, len)
    }
    fn unmap(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        self.0.unmap(region, offset, len)
    }
    fn record_event(&self, stream: StreamId) -> Result<Self::Event, BackendError> {
        self.0.record_event(stream)
    }
    fn event_complete(&self, event: &Self::Event) -> Result<bool, BackendError> {
        self.0.event_complete(event)
    }
    fn wait_event(&self, event: &Self::Event) -> Result<(), BackendError> {
        self.0.wait_event(event)
    }
    fn memory_info(&self) -> MemoryInfo {
        self.0.memory_info()
    }
    fn write(&self, region: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError> {
        self.0.write(region, offset, bytes)
    }
}

/// An engine with a cached buffer and a buffer still in use (a leak the engine reports).
fn busy() -> (Allocator<Seen>, Arc<SimBackend>) {
    let sim = Arc::new(SimBackend::new(1 << 30));
    let a = Allocator::new(Seen(sim.clone()), Config::default()).unwrap();
    let cached = a.alloc(3 * MIB).unwrap().unwrap();
    a.free(cached.ptr).unwrap();
    let _in_use = a.alloc(MIB).unwrap().unwrap();
    let shared = a.shared().unwrap();
    let _ = shared.alloc(4096).unwrap().unwrap();
    assert!(sim.live_regions() > 0 && sim.counters().held > 0);
    (a, sim)
}

#[test]
fn dropping_the_last_handle_releases_every_heap() {
    let (a, sim) = busy();
    let other = a.clone();
    drop(a);
    assert!(sim.live_regions() > 0, "a handle is still alive");
    drop(other);
    assert_eq!(sim.live_regions(), 0);
    assert_eq!(sim.counters().held, 0);
}

#[test]
fn a_callback_holding_a_handle_is_released_by_unregistering_it() {
    let (a, sim) = busy();
    let inner = a.clone();
    a.register_callback("reenter", move |_, event| {
        if event == CallbackEvent::Allocated {
            let _ = inner.usage();
        }
    });
    a.unregister_callback("reenter");
    drop(a);
    assert_eq!(sim.live_regions(), 0);
    assert_eq!(sim.counters().held, 0);
}

#[test]
fn a_callback_holding_a_weak_handle_does_not_keep_the_engine_alive() {
    let (a, sim) = busy();
    let inner = a.downgrade();
    a.register_callback("reenter", move |_, event| {
        if event == CallbackEvent::Allocated
            && let Some(a) = inner.upgrade()
        {
            let _ = a.usage();
        }
    });
    // The callback really reaches the allocator while it lives.
    let b = a.alloc(5 * MIB).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    let weak = a.downgrade();
    drop(a);
    assert!(weak.upgrade().is_none(), "no strong handle is left");
    assert_eq!(
        sim.live_regions(),
        0,
        "heaps still reserved after the last user handle"
    );
    assert_eq!(sim.counters().held, 0);
}

/// The scenario of the two tests below: a 64 MiB buffer freed long ago (its pages idle), then
/// growth beyond the budget. `earlier_peak` first reserves far more (in another pool) and
/// gives it back, so the growth does not set a new peak of reserved bytes. Returns the unmap calls the growth made
/// and the reserved bytes after it, and the times the growth blocked on the device.
fn grow_past_old_idle_pages(complete: bool, earlier_peak: bool) -> (u64, usize, u64) {
    use bufferheap_core::{Allocator, Config};
    use bufferheap_sim::SimBackend;
    const MIB: usize = 1 << 20;
    let a = Allocator::new(
        SimBackend::new(1 << 34).with_manual_events(),
        Config {
            map_chunk: 2 * MIB,
            front_cache_bytes: 0,
            ..Config::default()
        },
    )
    .unwrap();
    if earlier_peak {
        // In another stream's pool, so the default stream's own budget stays as it is.
        let other: Vec<_> = (0..400)
            .map(|_| a.alloc_on(MIB, 7).unwrap().unwrap())
            .collect();
        for b in other {
            a.free(b.ptr).unwrap();
        }
        a.empty_cache().unwrap();
    }
    let first = a.alloc(64 * MIB).unwrap().unwrap();
    let _second = a.alloc(64 * MIB).unwrap().unwrap();
    a.free(first.ptr).unwrap();
    // A miss in the large pool dissolves the first buffer (its pages fall idle); time passes
    // (allocations elsewhere); another miss records an epoch event after that.
    let _a3 = a.alloc(3 * MIB).unwrap().unwrap();
    for _ in 0..100 {
        let b = a.alloc(4096).unwrap().unwrap();
        a.free(b.ptr).unwrap();
    }
    let _a5 = a.alloc(5 * MIB).unwrap().unwrap();
    if complete {
        a.backend().complete_events();
    }
    let (unmaps, waits) = (a.stats().num_unmap_calls, a.stats().num_device_waits);
    // Larger than the hole the first buffer left: the pool grows beyond its budget.
    let _big = a.alloc(96 * MIB).unwrap().unwrap();
    let stats = a.stats();
    (
        stats.num_unmap_calls - unmaps,
        a.usage().reserved,
        stats.num_device_waits - waits,
    )
}

/// Pages idle since before a completed epoch event are given back at once when growth
/// needs room; pages whose last use the device may not have finished stay mapped until it
/// has (the sim's events complete only when told to, like a device running behind).
#[test]
fn idle_pages_past_a_completed_epoch_are_unmapped_at_once() {
    let (unmapped, _, waits) = grow_past_old_idle_pages(true, true);
    assert!(
        unmapped > 0,
        "idle pages past a completed epoch stay mapped"
    );
    assert_eq!(
        waits, 0,
        "unmapping pages past an epoch blocked on the device"
    );
    let (unmapped, reserved, waits) = grow_past_old_idle_pages(false, true);
    assert_eq!(
        unmapped, 0,
        "pages unmapped before the device is done with them"
    );
    assert_eq!(waits, 0, "growth below the peak blocked on the device");
    assert!(
        reserved >= (64 + 96 + 56) << 20,
        "the idle pages are still held"
    );
}

/// Where growth would set a new peak of reserved bytes while pages still wait for the
/// device, the engine waits for the device and gives them back first.
#[test]
fn pages_waiting_for_the_device_never_set_a_new_peak() {
    let (unmapped, reserved, waits) = grow_past_old_idle_pages(false, false);
    assert!(unmapped > 0);
    assert_eq!(waits, 1, "the wait is not counted once");
    assert!(reserved < (64 + 96 + 8 + 16) << 20, "reserved {reserved}");
}
