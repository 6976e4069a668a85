//! Each method of the seed's interface, on the host and sim backends.

use std::sync::{Arc, Mutex};

use bufferheap_core::{
    Allocator, Backend, CallbackEvent, Config, Error, Policy, Storage, format_size,
};
use bufferheap_host::HostBackend;
use bufferheap_sim::SimBackend;

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

fn sim(policy: Policy) -> Allocator<SimBackend> {
    Allocator::new(
        SimBackend::new(16 * GIB),
        Config {
            policy,
            ..Config::default()
        },
    )
    .unwrap()
}

fn both_policies() -> [Policy; 2] {
    [Policy::Default, Policy::Mps]
}

#[test]
fn zero_bytes_is_no_allocation() {
    for policy in both_policies() {
        let a = sim(policy);
        assert_eq!(a.alloc(0).unwrap(), None);
        assert_eq!(a.usage().buffers, 0);
    }
}

#[test]
fn alloc_free_and_reuse() {
    for policy in both_policies() {
        let a = sim(policy);
        let b = a.alloc(1000).unwrap().unwrap();
        assert_eq!(b.size, 1024);
        assert_eq!(b.requested, 1000);
        assert_eq!(b.ptr % 512, 0);
        assert_eq!(a.requested_size(b.ptr), Some(1000));
        assert_eq!(a.current_allocated(), 1024);
        a.free(b.ptr).unwrap();
        assert_eq!(a.current_allocated(), 0);
        let c = a.alloc(1000).unwrap().unwrap();
        assert_eq!(
            c.ptr, b.ptr,
            "{policy}: a cached buffer of the same size is reused"
        );
        assert_eq!(c.id, b.id, "{policy}: a recycled buffer keeps its id");
        a.free(c.ptr).unwrap();
    }
}

#[test]
fn unknown_and_double_free_are_errors() {
    let a = sim(Policy::Default);
    assert_eq!(a.free(0xdead_beef), Err(Error::UnknownPointer(0xdead_beef)));
    let b = a.alloc(4096).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    assert_eq!(a.free(b.ptr), Err(Error::DoubleFree(b.ptr)));
    // A large buffer goes straight back to free space and keeps no record: its second free
    // is still told apart from a pointer that was never ours.
    let big = a.alloc(8 << 20).unwrap().unwrap();
    a.free(big.ptr).unwrap();
    assert_eq!(a.free(big.ptr), Err(Error::DoubleFree(big.ptr)));
    assert_eq!(a.record_stream(big.ptr, 1), Err(Error::NotInUse(big.ptr)));
    assert_eq!(a.set_shape(big.ptr, &[2, 3]), Err(Error::NotInUse(big.ptr)));
    // A freed small buffer (cached, record kept) takes no shape either: it would come back
    // with the buffer's next allocation.
    let c = a.alloc(4096).unwrap().unwrap();
    a.free(c.ptr).unwrap();
    assert_eq!(a.set_shape(c.ptr, &[7, 7]), Err(Error::NotInUse(c.ptr)));
    assert_eq!(a.record_stream(c.ptr, 1), Err(Error::NotInUse(c.ptr)));
    let again = a.alloc(4096).unwrap().unwrap();
    assert_eq!(again.ptr, c.ptr);
    assert_eq!(a.shape(again.ptr), Some(vec![]));
    a.free(again.ptr).unwrap();
    assert_eq!(a.requested_size(0x1234), None);
    assert_eq!(a.shape(0x1234), None);
    assert_eq!(a.buffer_id(0x1234), None);
    assert!(!a.is_shared(0x1234));
    assert_eq!(a.shared_host_ptr(0x1234), None);
    assert!(a.set_shape(0x1234, &[1]).is_err());
    assert!(a.record_stream(0x1234, 1).is_err());
}

#[test]
fn buffer_ids_are_unique_increasing_from_one() {
    let a = sim(Policy::Default);
    let ids: Vec<u64> = (1..=5)
        .map(|i| a.alloc(i * 4096).unwrap().unwrap().id)
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4, 5]);
}

#[test]
fn shapes_are_kept_until_free() {
    let a = sim(Policy::Default);
    let b = a.alloc(4096).unwrap().unwrap();
    assert_eq!(a.shape(b.ptr), Some(vec![]));
    a.set_shape(b.ptr, &[2, 3, 4]).unwrap();
    assert_eq!(a.shape(b.ptr), Some(vec![2, 3, 4]));
    a.free(b.ptr).unwrap();
    assert_eq!(a.shape(b.ptr), Some(vec![]), "freeing clears the shape");
}

#[test]
fn shared_front_end_and_host_pointers() {
    // The host backend gives private regions a host address too: still no host pointer.
    let host = Allocator::new(HostBackend::with_memory(GIB), Config::default()).unwrap();
    let p = host.alloc(4096).unwrap().unwrap();
    assert_eq!(
        host.shared_host_ptr(p.ptr),
        None,
        "private buffer on the host backend"
    );
    host.free(p.ptr).unwrap();

    let a = sim(Policy::Default);
    assert!(a.shared_storage_supported());
    let shared = a.shared().unwrap();
    assert_eq!(shared.storage(), Storage::Shared);
    let s = shared.alloc(4096).unwrap().unwrap();
    assert!(a.is_shared(s.ptr));
    let (host, in_flight) = a.shared_host_ptr(s.ptr).unwrap();
    assert_eq!(Some(host), s.host_ptr);
    assert_eq!(in_flight, 0);
    let p = a.alloc(4096).unwrap().unwrap();
    assert!(!a.is_shared(p.ptr));
    assert_eq!(
        a.shared_host_ptr(p.ptr),
        None,
        "private buffers have no host pointer"
    );
}

#[test]
fn scalar_buffers_hold_their_value_and_wait_for_the_device() {
    let backend = HostBackend::with_memory(GIB);
    let a = Allocator::new(backend, Config::default()).unwrap();
    let s = a.alloc_scalar(&42i64.to_le_bytes()).unwrap().unwrap();
    assert!(a.is_shared(s.ptr));
    assert_eq!(a.requested_size(s.ptr), Some(8));
    a.free(s.ptr).unwrap();

    let sim = SimBackend::new(GIB).with_manual_events();
    let a = Allocator::new(sim, Config::default()).unwrap();
    let s = a.alloc_scalar(&[1, 2, 3, 4]).unwrap().unwrap();
    a.free(s.ptr).unwrap();
    assert_eq!(
        a.usage().active,
        512,
        "a freed scalar stays active until the device consumed it"
    );
    let t = a.alloc_scalar(&[5]).unwrap().unwrap();
    assert_ne!(t.ptr, s.ptr, "not reused while its event is pending");
    a.backend().complete_events();
    a.free_inactive_buffers();
    assert_eq!(a.usage().active, 512);
    let u = a.alloc_scalar(&[6]).unwrap().unwrap();
    assert_eq!(u.ptr, s.ptr, "reused once its event completed");
}

#[test]
fn record_stream_guards_reuse_until_the_event_completes() {
    for policy in both_policies() {
        let a = Allocator::new(
            SimBackend::new(GIB).with_manual_events(),
            Config {
                policy,
                ..Config::default()
            },
        )
        .unwrap();
        let b = a.alloc_on(1 << 16, 7).unwrap().unwrap();
        a.record_stream(b.ptr, 9).unwrap();
        a.free(b.ptr).unwrap();
        let c = a.alloc_on(1 << 16, 7).unwrap().unwrap();
        assert_ne!(c.ptr, b.ptr, "{policy}: still in use by stream 9");
        a.backend().complete_events();
        a.free_inactive_buffers();
        let d = a.alloc_on(1 << 16, 7).unwrap().unwrap();
        assert_eq!(d.ptr, b.ptr, "{policy}: reusable after the event");
    }
}

#[test]
fn a_buffer_whose_event_completed_comes_back_before_memory_grows() {
    // Under the default policy nobody needs to call free_inactive_buffers (PyTorch never
    // does): a request that would otherwise map new pages first takes back the buffers whose
    // guarding events have completed.
    let a = Allocator::new(SimBackend::new(GIB).with_manual_events(), Config::default()).unwrap();
    let b = a.alloc_on(64 * MIB, 7).unwrap().unwrap();
    a.record_stream(b.ptr, 9).unwrap();
    a.free(b.ptr).unwrap();
    let reserved = a.usage().reserved;
    a.backend().complete_events();
    let c = a.alloc_on(64 * MIB, 7).unwrap().unwrap();
    assert_eq!(c.ptr, b.ptr, "the completed buffer's space is reused");
    assert_eq!(a.usage().reserved, reserved, "no new pages");
    // Still guarded while its event is pending: then memory grows instead.
    a.record_stream(c.ptr, 9).unwrap();
    a.free(c.ptr).unwrap();
    let d = a.alloc_on(64 * MIB, 7).unwrap().unwrap();
    assert_ne!(d.ptr, c.ptr, "in use by stream 9");
    assert!(a.usage().reserved > reserved);
}

#[test]
fn record_and_wait_for_events() {
    let a = Allocator::new(SimBackend::new(GIB).with_manual_events(), Config::default()).unwrap();
    let shared = a.shared().unwrap();
    let b = shared.alloc(4096).unwrap().unwrap();
    assert!(
        !a.wait_for_events(&[b.ptr]).unwrap(),
        "nothing recorded: no wait"
    );
    assert!(a.record_events(&[b.ptr, 0x1], 3).unwrap());
    assert_eq!(a.shared_host_ptr(b.ptr).unwrap().1, 1, "one use in flight");
    assert!(a.wait_for_events(&[b.ptr]).unwrap());
    assert_eq!(a.shared_host_ptr(b.ptr).unwrap().1, 0);
    assert!(
        !a.record_events(&[0x1], 3).unwrap(),
        "unknown pointers are skipped"
    );
}

#[test]
fn a_freed_buffer_given_an_event_is_not_reused_before_it_completes() {
    let a = Allocator::new(
        SimBackend::new(GIB).with_manual_events(),
        Config {
            front_cache_bytes: 0,
            ..Config::default()
        },
    )
    .unwrap();
    let b = a.alloc(4096).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    let cached = a.usage().cached;
    assert!(a.record_events(&[b.ptr], 5).unwrap());
    assert_eq!(
        a.usage().cached,
        cached - 4096,
        "out of the cache while the event runs"
    );
    let c = a.alloc(4096).unwrap().unwrap();
    assert_ne!(c.ptr, b.ptr, "reused while its event is pending");
    a.backend().complete_events();
    a.free_inactive_buffers();
    let d = a.alloc(4096).unwrap().unwrap();
    assert_eq!(d.ptr, b.ptr, "back once the event completed");
    let u = a.usage();
    assert_eq!((u.allocated, u.buffers), (2 * 4096, 2));
}

#[test]
fn a_buffer_held_back_after_its_free_is_freed_once_in_the_history() {
    let a = Allocator::new(
        SimBackend::new(GIB).with_manual_events(),
        Config {
            front_cache_bytes: 0,
            history: 100,
            ..Config::default()
        },
    )
    .unwrap();
    let b = a.alloc(4096).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    a.record_events(&[b.ptr], 5).unwrap();
    a.backend().complete_events();
    a.free_inactive_buffers();
    let completed = a
        .history()
        .iter()
        .filter(|e| e.action == bufferheap_core::TraceAction::FreeCompleted && e.addr == b.ptr)
        .count();
    assert_eq!(completed, 1);
}

#[test]
fn a_private_buffer_has_no_host_address_however_it_is_served() {
    // The host backend gives private regions a host base too; a private buffer's host
    // address stays None from the engine and from a thread's front cache alike.
    let a = Allocator::new(HostBackend::with_memory(1 << 30), Config::default()).unwrap();
    let first = a.alloc(1000).unwrap().unwrap();
    a.free(first.ptr).unwrap();
    for _ in 0..3 {
        let again = a.alloc(1000).unwrap().unwrap();
        assert_eq!(again.ptr, first.ptr);
        assert_eq!(again.host_ptr, None);
        a.free(again.ptr).unwrap();
    }
}

#[test]
fn format_size_like_the_seed() {
    assert_eq!(format_size(512), "512 bytes");
    assert_eq!(format_size(1536), "1.50 KiB");
    assert_eq!(format_size(3 * MIB), "3.00 MiB");
    assert_eq!(format_size(2 * GIB), "2.00 GiB");
}

#[test]
fn figures_and_empty_cache() {
    for policy in both_policies() {
        let a = sim(policy);
        let bufs: Vec<_> = [4096, 2 * MIB, 40 * MIB]
            .iter()
            .map(|&s| a.alloc(s).unwrap().unwrap())
            .collect();
        assert_eq!(a.current_allocated(), 4096 + 2 * MIB + 40 * MIB);
        assert!(a.total_allocated() >= a.current_allocated());
        assert_eq!(
            a.driver_allocated(),
            a.total_allocated(),
            "{policy}: sim driver = ours"
        );
        assert_eq!(a.recommended_max_memory(), 16 * GIB);
        for b in &bufs {
            a.free(b.ptr).unwrap();
        }
        assert!(a.usage().cached > 0);
        a.empty_cache().unwrap();
        let u = a.usage();
        assert_eq!(
            (u.cached, u.reserved, u.heaps),
            (0, 0, 0),
            "{policy}: {u:?}"
        );
        assert_eq!(a.backend().counters().held, 0);
        assert_eq!(
            a.requested_size(bufs[0].ptr),
            None,
            "released buffers are unknown"
        );
    }
}

#[test]
fn devices_accessor() {
    let devices = bufferheap_core::Devices::new(
        vec![SimBackend::new(GIB), SimBackend::new(GIB)],
        &Config::default(),
    )
    .unwrap();
    assert_eq!(devices.len(), 2);
    assert!(devices.allocator(1, true).is_some());
    assert!(devices.allocator(2, false).is_none());
}

#[test]
fn all_five_callback_events_fire_outside_the_lock() {
    for policy in both_policies() {
        let a = Allocator::new(
            SimBackend::new(64 * MIB),
            Config {
                policy,
                high_watermark_ratio: Some(0.0),
                ..Config::default()
            },
        )
        .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let inner = a.downgrade();
        a.register_callback("log", move |ptr, event| {
            // Calling back into the allocator must not deadlock.
            let _ = inner.upgrade().map(|a| a.usage());
            log.lock().unwrap().push((ptr, event));
        });
        // Buffers up to 1 MiB are cached whole under either policy (larger ones go straight
        // back to free space on page-mapped heaps), so the second request recycles.
        let b = a.alloc(MIB / 2 + 1).unwrap().unwrap();
        a.free(b.ptr).unwrap();
        let c = a.alloc(MIB / 2 + 1).unwrap().unwrap();
        a.free(c.ptr).unwrap();
        a.empty_cache().unwrap();
        let hog = a.alloc(40 * MIB).unwrap().unwrap();
        assert!(a.alloc(40 * MIB).is_err());
        a.free(hog.ptr).unwrap();
        let events: Vec<CallbackEvent> = seen.lock().unwrap().iter().map(|e| e.1).collect();
        for expected in [
            CallbackEvent::Allocated,
            CallbackEvent::Freed,
            CallbackEvent::Recycled,
            CallbackEvent::Released,
            CallbackEvent::AllocationFailed,
        ] {
            assert!(
                events.contains(&expected),
                "{policy}: {expected:?} missing from {events:?}"
            );
        }
        assert!(a.unregister_callback("log"));
        assert!(!a.unregister_callback("log"));
        let n = seen.lock().unwrap().len();
        let d = a.alloc(4096).unwrap().unwrap();
        a.free(d.ptr).unwrap();
        assert_eq!(
            seen.lock().unwrap().len(),
            n,
            "unregistered callbacks do not fire"
        );
    }
}

#[test]
fn allocation_failed_callback_can_free_memory() {
    let a = Allocator::new(
        SimBackend::new(64 * MIB),
        Config {
            high_watermark_ratio: Some(0.0),
            ..Config::default()
        },
    )
    .unwrap();
    let hog = a.alloc(48 * MIB).unwrap().unwrap();
    let inner = a.downgrade();
    let released = Arc::new(Mutex::new(false));
    let flag = released.clone();
    a.register_callback("trim", move |_, event| {
        if event == CallbackEvent::AllocationFailed && !*flag.lock().unwrap() {
            *flag.lock().unwrap() = true;
            inner
                .upgrade()
                .expect("allocator alive")
                .free(hog.ptr)
                .unwrap();
        }
    });
    let b = a.alloc(40 * MIB).unwrap();
    assert!(
        b.is_some(),
        "the callback freed room and the retry succeeded"
    );
    assert!(*released.lock().unwrap());
    assert_eq!(a.stats().num_alloc_retries, 1);
}

#[test]
fn out_of_memory_error_reads_like_the_seed() {
    let a = sim(Policy::Mps);
    a.set_watermark_ratios(0.0, 0.01).unwrap();
    let err = a.alloc(512 * MIB).unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("bufferheap out of memory (allocated: "),
        "{text}"
    );
    assert!(text.contains("other allocations: "), "{text}");
    assert!(text.contains("max allowed: 163.84 MiB"), "{text}");
    assert!(
        text.contains("Tried to allocate 512.00 MiB on private pool"),
        "{text}"
    );
    assert!(
        text.contains("BUFFERHEAP_HIGH_WATERMARK_RATIO=0.0"),
        "{text}"
    );
    match err {
        Error::OutOfMemory(oom) => {
            assert_eq!(oom.requested, 512 * MIB);
            assert_eq!(oom.max_allowed, Some((0.01 * (16 * GIB) as f64) as usize));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(a.stats().num_ooms, 1);

    // The device itself is full: the message says so, without the watermark hint.
    let small = Allocator::new(
        SimBackend::new(64 * MIB),
        Config {
            high_watermark_ratio: Some(0.0),
            ..Config::default()
        },
    )
    .unwrap();
    let _hog = small.alloc(40 * MIB).unwrap().unwrap();
    let text = small.alloc(40 * MIB).unwrap_err().to_string();
    assert!(text.contains("The device itself has no room"), "{text}");
    assert!(!text.contains("max allowed"), "{text}");
}

#[test]
fn a_backend_with_pages_below_the_buffer_alignment_is_refused() {
    // Its regions would be aligned to 256 bytes only, and so would the buffers in them.
    match Allocator::new(
        SimBackend::new(64 * MIB).with_granularity(256),
        Config::default(),
    ) {
        Err(Error::Unsupported(reason)) => assert!(reason.contains("below the buffer alignment")),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn oversized_requests_are_rejected() {
    let a = sim(Policy::Default);
    match a.alloc(usize::MAX) {
        Err(Error::InvalidSize { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        a.alloc(17 * GIB)
            .unwrap_err()
            .to_string()
            .contains("invalid buffer size")
    );
    // Counted as out-of-memory events, as PyTorch counts requests no device could hold.
    assert_eq!(a.stats().num_ooms, 2);
    // A request of exactly the limit is refused (as the seed refuses it), and the message
    // does not claim it exceeds what it equals.
    let at_limit = a.alloc(16 * GIB).unwrap_err().to_string();
    assert!(
        at_limit.contains("16.00 GiB is not below the device's limit of 16.00 GiB"),
        "{at_limit}"
    );
}

#[test]
fn allocator_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Allocator<SimBackend>>();
    check::<Allocator<HostBackend>>();
}

#[test]
fn host_backend_end_to_end() {
    let a = Allocator::new(HostBackend::with_memory(4 * GIB), Config::default()).unwrap();
    let bufs: Vec<_> = (0..64)
        .map(|i| a.alloc(1000 + i * 37_000).unwrap().unwrap())
        .collect();
    for w in bufs.windows(2) {
        assert!(w[0].ptr + w[0].size as u64 <= w[1].ptr || w[1].ptr + w[1].size as u64 <= w[0].ptr);
    }
    for b in bufs {
        a.free(b.ptr).unwrap();
    }
    a.empty_cache().unwrap();
    assert_eq!(a.backend().held(), 0);
    assert_eq!(a.backend().live_regions(), 0);
}

fn _generic<B: Backend>(_: &Allocator<B>) {}

#[test]
fn history_records_allocator_events_in_order() {
    let a = Allocator::new(
        SimBackend::new(GIB),
        Config {
            history: 100,
            ..Config::default()
        },
    )
    .unwrap();
    let b = a.alloc(3 * MIB).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    let c = a.alloc(3 * MIB).unwrap().unwrap();
    a.free(c.ptr).unwrap();
    a.empty_cache().unwrap();
    use bufferheap_core::TraceAction::*;
    let actions: Vec<_> = a.history().iter().map(|e| e.action).collect();
    assert_eq!(
        actions,
        vec![
            SegmentMap,
            Alloc,
            FreeRequested,
            FreeCompleted,
            Alloc,
            FreeRequested,
            FreeCompleted,
            SegmentUnmap
        ]
    );
    assert!(a.history().iter().all(|e| e.time_us > 0));
    a.set_history(0);
    let _ = a.alloc(4096).unwrap().unwrap();
    assert!(a.history().is_empty(), "history off");
}

/// Every segment's blocks start at its address, follow each other without gap or overlap and
/// add up to its size (PyTorch rebuilds block addresses from that).
fn assert_blocks_tile(segments: &[bufferheap_core::SegmentInfo]) {
    for s in segments {
        let mut at = s.address;
        for b in &s.blocks {
            assert_eq!(b.address, at, "segment at {:#x}", s.address);
            at += b.size as u64;
        }
        assert_eq!(at, s.address + s.total_size as u64);
    }
}

#[test]
fn segments_are_the_mapped_runs_and_add_up_to_the_reserved_bytes() {
    use bufferheap_core::BlockState;
    let a = Allocator::new(SimBackend::new(GIB), Config::default()).unwrap();
    let low = a.alloc(20 * MIB).unwrap().unwrap();
    let middle = a.alloc(40 * MIB).unwrap().unwrap();
    let high = a.alloc(20 * MIB).unwrap().unwrap();
    let reserved =
        |a: &Allocator<SimBackend>| a.segments().iter().map(|s| s.total_size).sum::<usize>();
    let segments = a.segments();
    assert_blocks_tile(&segments);
    assert_eq!(
        reserved(&a),
        a.total_allocated(),
        "mapped pages beyond the last buffer count"
    );
    let block = |segments: &[bufferheap_core::SegmentInfo], ptr: u64| {
        segments
            .iter()
            .flat_map(|s| s.blocks.iter())
            .find(|b| b.address == ptr)
            .cloned()
    };
    let b = block(&segments, low.ptr).unwrap();
    assert_eq!(
        (b.state, b.requested_size),
        (BlockState::ActiveAllocated, 20 * MIB)
    );
    assert!(segments.iter().all(|s| s.is_expandable));

    // The middle buffer's whole pieces go back: the range splits into two mapped runs, and the
    // unmapped hole between them is in no segment.
    a.free(middle.ptr).unwrap();
    a.empty_cache().unwrap();
    let segments = a.segments();
    assert_blocks_tile(&segments);
    assert_eq!(reserved(&a), a.total_allocated());
    assert!(segments.len() >= 2, "{segments:#?}");
    let holding = |ptr: u64| {
        segments
            .iter()
            .position(|s| s.address <= ptr && ptr < s.address + s.total_size as u64)
    };
    assert_ne!(holding(low.ptr), holding(high.ptr), "two runs");
    assert!(block(&segments, low.ptr).is_some() && block(&segments, high.ptr).is_some());
    assert!(
        holding(middle.ptr + 20 * MIB as u64).is_none(),
        "the middle of the freed buffer is unmapped"
    );
    a.free(low.ptr).unwrap();
    a.free(high.ptr).unwrap();
}

#[test]
fn recording_history_goes_on_trimmed_or_starts_afresh() {
    let a = Allocator::new(SimBackend::new(GIB), Config::default()).unwrap();
    assert_eq!(a.history_limit(), 0);
    // Small buffers normally stay with the thread's front; while recording, the engine sees
    // every call.
    let before = a.alloc(4096).unwrap().unwrap();
    a.free(before.ptr).unwrap();
    a.record_history(100, false);
    assert_eq!(a.history_limit(), 100);
    let mut ptrs = Vec::new();
    for _ in 0..3 {
        let b = a.alloc(4096).unwrap().unwrap();
        a.free(b.ptr).unwrap();
        ptrs.push(b.ptr);
    }
    let allocs = |a: &Allocator<SimBackend>| {
        a.history()
            .iter()
            .filter(|e| e.action == bufferheap_core::TraceAction::Alloc)
            .count()
    };
    assert_eq!(allocs(&a), 3, "every allocation recorded, none from before");
    // A new limit keeps what was recorded, trimmed from the oldest end.
    a.record_history(2, false);
    let kept = a.history();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept.last().unwrap().addr, *ptrs.last().unwrap());
    // Clearing starts afresh; a limit of 0 stops and drops it.
    a.record_history(50, true);
    assert!(a.history().is_empty());
    let b = a.alloc(4096).unwrap().unwrap();
    assert_eq!(allocs(&a), 1);
    a.free(b.ptr).unwrap();
    a.record_history(0, false);
    assert_eq!(a.history_limit(), 0);
    assert!(a.history().is_empty());
}

#[test]
fn front_cache_and_page_budget_settings_from_the_environment() {
    let env = |pairs: &[(&str, &str)]| {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    };
    let c = env(&[
        ("BUFFERHEAP_FRONT_CACHE_BYTES", "0"),
        ("BUFFERHEAP_IDLE_PAGE_FRACTION", "0.005"),
        ("BUFFERHEAP_UNMAP_RATE_LIMIT", "0"),
    ])
    .unwrap();
    assert_eq!((c.front_cache_bytes, c.idle_page_fraction), (0, 0.005));
    assert_eq!(c.unmap_rate_limit, 0.0);
    for (var, bad) in [
        ("BUFFERHEAP_FRONT_CACHE_BYTES", "1MiB"),
        ("BUFFERHEAP_IDLE_PAGE_FRACTION", "-1"),
        ("BUFFERHEAP_UNMAP_RATE_LIMIT", "often"),
    ] {
        match env(&[(var, bad)]) {
            Err(Error::InvalidConfig {
                variable, value, ..
            }) => {
                assert_eq!((variable.as_str(), value.as_str()), (var, bad));
            }
            other => panic!("{var}={bad}: {other:?}"),
        }
    }
    let mut c = Config::default();
    c.set("idle_page_fraction", "0.02").unwrap();
    c.set("unmap_rate_limit", "8").unwrap();
    assert_eq!(c.unmap_rate_limit, 8.0);
    c.set("front_cache_bytes", "4096").unwrap();
    assert_eq!((c.front_cache_bytes, c.idle_page_fraction), (4096, 0.02));
}

#[test]
fn watermark_ratios_from_the_environment_are_checked_where_they_are_read() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        Config::from_lookup(move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    };
    // Out of range: the variable is named, not a later allocation.
    match env(&[("BUFFERHEAP_HIGH_WATERMARK_RATIO", "5")]) {
        Err(Error::InvalidConfig {
            variable, reason, ..
        }) => {
            assert_eq!(variable, "BUFFERHEAP_HIGH_WATERMARK_RATIO");
            assert!(reason.contains("between 0.0 (disabled) and 2"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // A low ratio above the high one names the low variable and where the high one came from.
    match env(&[
        ("BUFFERHEAP_HIGH_WATERMARK_RATIO", "0.5"),
        ("BUFFERHEAP_LOW_WATERMARK_RATIO", "0.8"),
    ]) {
        Err(Error::InvalidConfig {
            variable, reason, ..
        }) => {
            assert_eq!(variable, "BUFFERHEAP_LOW_WATERMARK_RATIO");
            assert!(
                reason.contains("BUFFERHEAP_HIGH_WATERMARK_RATIO"),
                "{reason}"
            );
        }
        other => panic!("{other:?}"),
    }
    // Above the default high ratio (1.7) with no high one set.
    assert!(env(&[("BUFFERHEAP_LOW_WATERMARK_RATIO", "1.8")]).is_err());
    // A disabled high limit allows any low ratio in range.
    let c = env(&[
        ("BUFFERHEAP_HIGH_WATERMARK_RATIO", "0"),
        ("BUFFERHEAP_LOW_WATERMARK_RATIO", "1.9"),
    ])
    .unwrap();
    assert_eq!(
        (c.low_watermark_ratio, c.high_watermark_ratio),
        (Some(1.9), Some(0.0))
    );
}

#[test]
fn largest_available_is_what_one_request_can_get() {
    for policy in both_policies() {
        let a = sim(policy);
        let fresh = a.largest_available();
        assert!(
            fresh > GIB && fresh < 16 * GIB,
            "{policy}: {}",
            format_size(fresh)
        );
        let all = a.alloc(fresh).unwrap().unwrap();
        a.free(all.ptr).unwrap();

        // a high watermark caps it
        let a = sim(policy);
        a.set_watermark_ratios(0.0, 0.25).unwrap();
        let capped = a.largest_available();
        assert!(
            capped > 3 * GIB && capped <= 4 * GIB,
            "{policy}: {}",
            format_size(capped)
        );
        let b = a.alloc(capped).unwrap().unwrap();
        a.free(b.ptr).unwrap();
        assert!(matches!(
            a.alloc(capped + 2 * GIB),
            Err(Error::OutOfMemory(_))
        ));
        // what a freed buffer left in the pool stays available
        assert!(a.largest_available() >= capped, "{policy}");
    }
}
