//! Model checking of the engine's synchronisation with loom: every interleaving of a few
//! operations on one allocator, with the state lock, the callback registry's lock and its
//! `active` flag replaced by loom's instrumented versions (`src/sync.rs`). loom fails a model on
//! a deadlock (every thread blocked) and on a panic in any interleaving.
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p bufferheap-core --test loom --release
//! ```
//!
//! The simulated backend keeps its own (uninstrumented) lock; its critical sections hold no
//! loom operation, so loom never switches threads inside one and it cannot block.
#![cfg(loom)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bufferheap_core::{Allocator, Buffer, CallbackEvent, Config, Error, Policy};
use bufferheap_sim::SimBackend;
use loom::thread;

const MIB: usize = 1 << 20;

fn allocator(policy: Policy, device: usize) -> Allocator<SimBackend> {
    Allocator::new(
        SimBackend::new(device).with_manual_events(),
        Config {
            policy,
            ..Config::default()
        },
    )
    .unwrap()
}

/// Every byte back: nothing in use, cached or reserved, and the device holds nothing.
fn assert_all_returned(a: &Allocator<SimBackend>) {
    a.backend().complete_events();
    a.empty_cache().unwrap();
    let u = a.usage();
    assert_eq!(
        (u.allocated, u.active, u.cached, u.reserved, u.buffers),
        (0, 0, 0, 0, 0),
        "{u:?}"
    );
    assert_eq!(a.backend().counters().held, 0);
    assert_eq!(a.backend().live_regions(), 0);
}

fn disjoint(x: &Buffer, y: &Buffer) -> bool {
    x.ptr + x.size as u64 <= y.ptr || y.ptr + y.size as u64 <= x.ptr
}

/// Runs `f` under loom with a bound on preemptions (keeps the state space small) and reports
/// how many interleavings were explored.
fn model(name: &str, f: impl Fn() + Sync + Send + 'static) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let start = std::time::Instant::now();
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(4);
    }
    builder.check(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!(
        "loom {name}: {} interleavings in {:.1} s",
        runs.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn alloc_free_while_a_reentrant_callback_comes_and_goes() {
    // Two threads allocate and free; a third registers a callback that calls back into the
    // allocator (a figure, the buffer's own size), then unregisters it.
    for policy in [Policy::Default, Policy::Mps] {
        model(&format!("alloc/free + callback ({policy})"), move || {
            let a = allocator(policy, 64 * MIB);
            let workers: Vec<_> = [4096usize, 3 * MIB]
                .into_iter()
                .map(|size| {
                    let a = a.clone();
                    thread::spawn(move || {
                        let b = a.alloc(size).unwrap().unwrap();
                        assert_eq!(a.requested_size(b.ptr), Some(size));
                        b
                    })
                })
                .collect();
            let c = {
                let a = a.clone();
                thread::spawn(move || {
                    let inner = a.clone();
                    a.register_callback("reenter", move |ptr, event| {
                        if event == CallbackEvent::Allocated {
                            assert!(inner.buffer_size(ptr).is_some());
                        }
                        let _ = inner.usage();
                    });
                    a.unregister_callback("reenter")
                })
            };
            let bufs: Vec<Buffer> = workers.into_iter().map(|h| h.join().unwrap()).collect();
            assert!(c.join().unwrap(), "the callback was registered");
            assert!(disjoint(&bufs[0], &bufs[1]), "{bufs:?}");
            assert_eq!(a.usage().buffers, 2);
            for b in &bufs {
                a.free(b.ptr).unwrap();
            }
            assert!(a.callback_names().is_empty());
            assert_all_returned(&a);
        });
    }
}

#[test]
fn concurrent_frees_and_reuse_never_hand_out_one_buffer_twice() {
    // One thread frees a buffer while two others allocate the same size: at most one of them
    // may get its bytes, and only after the free.
    model("free vs two allocs", || {
        let a = allocator(Policy::Default, 64 * MIB);
        let first = a.alloc(MIB).unwrap().unwrap();
        let freer = {
            let a = a.clone();
            thread::spawn(move || a.free(first.ptr).unwrap())
        };
        let takers: Vec<_> = (0..2)
            .map(|_| {
                let a = a.clone();
                thread::spawn(move || a.alloc(MIB).unwrap().unwrap())
            })
            .collect();
        freer.join().unwrap();
        let got: Vec<Buffer> = takers.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(disjoint(&got[0], &got[1]), "{got:?}");
        assert_eq!(a.usage().buffers, 2);
        for b in &got {
            a.free(b.ptr).unwrap();
        }
        assert_all_returned(&a);
    });
}

#[test]
fn allocation_failed_callback_empties_the_cache_while_another_thread_frees() {
    // A full device: the AllocationFailed callback empties the cache (calling back into the
    // allocator from inside the fallback chain) while another thread frees its buffer.
    model("oom callback + free", || {
        // Two 2 MiB pages: the first buffer maps both.
        let a = allocator(Policy::Default, 4 * MIB);
        let held = a.alloc(3 * MIB).unwrap().unwrap();
        {
            let inner = a.clone();
            a.register_callback("relief", move |_, event| {
                if event == CallbackEvent::AllocationFailed {
                    let _ = inner.empty_cache();
                }
            });
        }
        let freer = {
            let a = a.clone();
            thread::spawn(move || a.free(held.ptr).unwrap())
        };
        let taker = {
            let a = a.clone();
            thread::spawn(move || match a.alloc(3 * MIB) {
                Ok(Some(b)) => Some(b),
                Ok(None) => panic!("no buffer"),
                Err(Error::OutOfMemory(_)) => None,
                Err(e) => panic!("{e}"),
            })
        };
        freer.join().unwrap();
        let got = taker.join().unwrap();
        if let Some(b) = got {
            a.free(b.ptr).unwrap();
        }
        a.unregister_callback("relief");
        assert_all_returned(&a);
    });
}

#[test]
fn waiting_for_events_races_with_free_and_polling() {
    // One thread records an event on a buffer and waits for it; another frees a buffer guarded
    // by a second stream, polls and allocates. A buffer in use is never handed out again.
    model("events", || {
        let a = allocator(Policy::Default, 64 * MIB);
        let x = a.alloc(MIB).unwrap().unwrap();
        let y = a.alloc(MIB).unwrap().unwrap();
        a.record_stream(y.ptr, 7).unwrap();
        let waiter = {
            let a = a.clone();
            thread::spawn(move || {
                a.record_events(&[x.ptr], 1).unwrap();
                a.wait_for_events(&[x.ptr]).unwrap();
            })
        };
        let freer = {
            let a = a.clone();
            thread::spawn(move || {
                a.free(y.ptr).unwrap();
                a.free_inactive_buffers();
                // y is reused only once its event completed (the simulated device completes
                // every earlier event when one is waited for).
                let events_done = a.usage().active == a.usage().allocated;
                let z = a.alloc(MIB).unwrap().unwrap();
                if z.ptr == y.ptr {
                    assert!(events_done || a.backend().counters().events_recorded >= 2);
                }
                z
            })
        };
        waiter.join().unwrap();
        let z = freer.join().unwrap();
        assert!(disjoint(&x, &z), "{x:?} {z:?}");
        a.free(x.ptr).unwrap();
        a.free(z.ptr).unwrap();
        assert_all_returned(&a);
    });
}
