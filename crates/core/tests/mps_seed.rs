//! The `mps` policy against the seed's behaviour, as its notes (`reference/mps_allocator.md`) describe it.

use std::sync::{Arc, Mutex};

use bufferheap_core::{Allocator, CallbackEvent, Config, Policy};
use bufferheap_sim::SimBackend;

const MIB: usize = 1 << 20;

fn mps(total: usize, low: f64, high: f64) -> Allocator<SimBackend> {
    Allocator::new(
        SimBackend::new(total),
        Config {
            policy: Policy::Mps,
            low_watermark_ratio: Some(low),
            high_watermark_ratio: Some(high),
            front_cache_bytes: 0,
            ..Config::default()
        },
    )
    .unwrap()
}

/// Seed (reference/mps_allocator.md 4.8): threshold = total_age / n, "the mean age"; a block
/// is released if gc_count >= threshold. Ages 2 (Y, 20 MiB) and 1 (X, 12 MiB): mean 1.5, so
/// only Y is older than average; the 10 MiB target is reached by releasing Y alone.
#[test]
fn gc_releases_only_blocks_at_least_as_old_as_the_mean() {
    // 1 GiB device (discrete: 128 MiB heaps for 10..64 MiB); low limit 118 MiB.
    let a = mps(1 << 30, 118.0 / 1024.0, 1.7);
    let x = a.alloc(12 * MIB).unwrap().unwrap(); // new 128 MiB heap; age tick 1
    let y = a.alloc(20 * MIB).unwrap().unwrap(); // tick 2 (pressure from now on)
    a.free(y.ptr).unwrap(); // Y cached
    let _w = a.alloc(40 * MIB).unwrap().unwrap(); // no cached block >= 40: tick 3, Y age 1
    a.free(x.ptr).unwrap(); // X cached
    // 24 MiB: no cached block >= 24; tick 4 -> Y age 2, X age 1; 24 < 32 cached: GC, target
    // 128 - 118 = 10 MiB.
    let _z = a.alloc(24 * MIB).unwrap().unwrap();
    assert!(
        a.buffer_id(y.ptr).is_none(),
        "Y (age 2 >= mean 1.5) should have been released"
    );
    assert!(
        a.buffer_id(x.ptr).is_some(),
        "X (age 1 < mean 1.5) should still be cached"
    );
}

/// Seed (4.2 step 2): every get_free_buffer call on a large pool ages every cached block,
/// including calls served by an exact-size cached buffer. Y waits through ten exact reuses of
/// E, X through none: Y is far older, and GC (4.8) releases Y, not X.
#[test]
fn exact_size_reuse_ages_cached_buffers() {
    let a = mps(1 << 30, 118.0 / 1024.0, 1.7);
    let x = a.alloc(12 * MIB).unwrap().unwrap();
    let y = a.alloc(20 * MIB).unwrap().unwrap();
    let mut e = a.alloc(16 * MIB).unwrap().unwrap();
    a.free(y.ptr).unwrap();
    for _ in 0..10 {
        a.free(e.ptr).unwrap();
        e = a.alloc(16 * MIB).unwrap().unwrap(); // exact reuse: seed ages Y each time
    }
    a.free(x.ptr).unwrap();
    // Seed ages: Y 11, X 1 -> mean 6: Y released (20 MiB >= 10 MiB target), X kept.
    let _z = a.alloc(24 * MIB).unwrap().unwrap();
    assert!(
        a.buffer_id(y.ptr).is_none(),
        "Y, much older, should have been released"
    );
    assert!(
        a.buffer_id(x.ptr).is_some(),
        "X, young, should still be cached"
    );
}

/// Seed (4.2 step 1): "If the high ratio is > 0 and (driver allocated + A) exceeds the high
/// limit, fail at once. This applies even though reusing a cached buffer would not grow driver
/// memory. Near the limit the request therefore drops into the fallbacks, which free cache
/// first." So ALLOCATION_FAILED fires and the cached buffer is released (4.6), then a new one
/// is allocated.
#[test]
fn exact_reuse_over_the_high_limit_takes_the_fallbacks() {
    // 1 GiB device, high limit 0.2 GiB = 204.8 MiB, low disabled.
    let a = mps(1 << 30, 0.0, 0.2);
    let events = Arc::new(Mutex::new(Vec::new()));
    let ev = events.clone();
    a.register_callback("log", move |_, e| ev.lock().unwrap().push(e));
    let _keep = a.alloc(80 * MIB).unwrap().unwrap(); // dedicated 80 MiB heap
    let b = a.alloc(80 * MIB).unwrap().unwrap(); // driver 160 MiB
    a.free(b.ptr).unwrap();
    events.lock().unwrap().clear();
    // 160 + 80 > 204.8: the seed's get_free_buffer refuses the cached buffer.
    let c = a.alloc(80 * MIB).unwrap().unwrap();
    let events = events.lock().unwrap().clone();
    assert!(
        events.contains(&CallbackEvent::AllocationFailed),
        "events: {events:?}"
    );
    assert_ne!(
        c.id, b.id,
        "the cached buffer was released and a new one allocated"
    );
}

/// Seed (4.1 step 5b, 4.6): the third fallback is `release_available_cached_buffers` "then
/// alloc_buffer", and 4.6 returns true "only if the total reached A"; in the seed's chain
/// `(release_available_cached_buffers(params) && alloc_buffer(params)) ||
/// (release_cached_buffers() && alloc_buffer(params))`, a partial trim goes on to the full
/// release of every pool's cache (4.7) before allocating.
#[test]
fn a_partial_trim_goes_on_to_release_all_cached_buffers() {
    // 1 GiB device, high limit 204.8 MiB, low disabled.
    let a = mps(1 << 30, 0.0, 0.2);
    let _k = a.alloc(80 * MIB).unwrap().unwrap(); // dedicated 80 MiB heap, kept
    let c = a.alloc(70 * MIB).unwrap().unwrap(); // dedicated 70 MiB heap
    let s = a.alloc(MIB).unwrap().unwrap(); // small pool: 8 MiB heap
    a.free(c.ptr).unwrap();
    a.free(s.ptr).unwrap();
    assert_eq!(a.total_allocated(), 158 * MIB);
    // 158 + 90 > 204.8: Normal and AfterCallbacks fail; the large pool's trim releases C
    // (70 MiB < 90 MiB: returns false), so the seed releases every cached buffer (the small
    // one and its 8 MiB heap too) and then allocates.
    let _r = a.alloc(90 * MIB).unwrap().unwrap();
    assert!(
        a.buffer_id(s.ptr).is_none(),
        "the cached small buffer should be released"
    );
    assert_eq!(a.total_allocated(), 170 * MIB);
}

/// Seed (4.4 step 3, 4.9): a freed scalar buffer goes back to its pool "when that command
/// buffer completes" (a completion handler calls free_buffer), so once the device consumed
/// it the next scalar allocation reuses it.
#[test]
fn a_consumed_scalar_buffer_is_reused() {
    let sim = SimBackend::new(1 << 30).with_manual_events();
    let a = Allocator::new(
        sim,
        Config {
            policy: Policy::Mps,
            front_cache_bytes: 0,
            ..Config::default()
        },
    )
    .unwrap();
    let first = a.alloc_scalar(&7u64.to_le_bytes()).unwrap().unwrap();
    a.free(first.ptr).unwrap();
    a.backend().complete_events(); // the device consumed it
    let second = a.alloc_scalar(&7u64.to_le_bytes()).unwrap().unwrap();
    assert_eq!(second.id, first.id, "the consumed scalar buffer is reused");
    a.free(second.ptr).unwrap();
    a.backend().complete_events();
    for _ in 0..20_000 {
        let s = a.alloc_scalar(&7u64.to_le_bytes()).unwrap().unwrap();
        a.free(s.ptr).unwrap();
        a.backend().complete_events();
    }
    assert_eq!(
        a.total_allocated(),
        8 * MIB,
        "one 8 MiB scalar heap suffices"
    );
}

/// Seed (5.3): "Tried to allocate D on shared|private pool … The pool word comes from the
/// pool's SHARED bit, so 'shared pool' also appears for ≤8-byte tensors and scalars" (on
/// unified memory a ≤ 8-byte request of the private allocator goes to SHARED_SMALL, 3.3 rule 2).
#[test]
fn oom_names_the_pool_of_a_tiny_private_request() {
    use bufferheap_core::Error;
    use bufferheap_host::HostBackend;
    let host = HostBackend::with_memory(1 << 30); // unified
    let a = Allocator::new(
        host,
        Config {
            policy: Policy::Mps,
            low_watermark_ratio: Some(0.0),
            high_watermark_ratio: Some(1.7),
            front_cache_bytes: 0,
            ..Config::default()
        },
    )
    .unwrap();
    let tiny = a.alloc(8).unwrap().unwrap();
    assert_eq!(
        tiny.storage,
        bufferheap_core::Storage::Shared,
        "served by SHARED_SMALL"
    );
    a.free(tiny.ptr).unwrap();
    a.empty_cache().unwrap();
    // A high limit under one heap: the next tiny request fails.
    a.set_watermark_ratios(0.0, 0.001).unwrap();
    let err = a.alloc(8).unwrap_err();
    let Error::OutOfMemory(_) = &err else {
        panic!("{err}")
    };
    let msg = err.to_string();
    assert!(msg.contains("on shared pool"), "{msg}");
}
