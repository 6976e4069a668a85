//! Threads' front caches: what a user relies on stays true when small buffers are freed and
//! reallocated without the engine's lock — reuse, exact statistics and peaks, frees from
//! other threads, lookups, stream safety, `empty_cache`, memory before out-of-memory,
//! callbacks, threads that exit.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use bufferheap_core::{Allocator, CallbackEvent, Config, Error, Policy};
use bufferheap_sim::SimBackend;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn sim(total: usize, policy: Policy) -> Allocator<SimBackend> {
    Allocator::new(
        SimBackend::new(total).with_manual_events(),
        Config {
            policy,
            ..Config::default()
        },
    )
    .unwrap()
}

fn policies() -> [Policy; 2] {
    [Policy::Default, Policy::Mps]
}

#[test]
fn a_freed_small_buffer_comes_back_to_its_thread_with_exact_counters() {
    for policy in policies() {
        let a = sim(1 << 30, policy);
        let first = a.alloc(3000).unwrap().unwrap();
        a.free(first.ptr).unwrap();
        for i in 0..100 {
            let b = a.alloc(2600 + i).unwrap().unwrap();
            assert_eq!(b.ptr, first.ptr, "{policy}: the same buffer each time");
            assert_eq!(b.id, first.id);
            assert_eq!(b.requested, 2600 + i);
            a.free(b.ptr).unwrap();
        }
        let s = a.stats();
        assert_eq!(
            s.allocation[0].allocated, 101,
            "{policy}: every allocation counted"
        );
        assert_eq!(s.allocation[0].freed, 101);
        assert_eq!(s.allocation[1].allocated, 101, "{policy}: small pool too");
        assert_eq!(s.allocated_bytes[0].current, 0);
        assert_eq!(s.allocated_bytes[0].peak, 3072);
        assert_eq!(
            s.requested_bytes[0].allocated,
            3000 + (0..100).map(|i| 2600 + i).sum::<u64>()
        );
        assert_eq!(s.cached_bytes[0].current, 3072);
        assert_eq!(a.usage().cached, 3072);
    }
}

#[test]
fn peaks_reached_only_inside_the_front_cache_are_exact() {
    for policy in policies() {
        let a = sim(1 << 30, policy);
        // Put a 1 KiB and a 2 KiB buffer into this thread's front cache.
        let x = a.alloc(KIB).unwrap().unwrap();
        a.free(x.ptr).unwrap();
        let z = a.alloc(2 * KIB).unwrap().unwrap();
        a.free(z.ptr).unwrap();
        a.reset_peak();
        assert_eq!(a.stats().allocated_bytes[0].peak, 0);
        // Both again, from the front cache: 3 KiB at once, then nothing; no read in between.
        let x2 = a.alloc(KIB).unwrap().unwrap();
        let z2 = a.alloc(2 * KIB).unwrap().unwrap();
        assert_eq!((x2.ptr, z2.ptr), (x.ptr, z.ptr));
        a.free(x2.ptr).unwrap();
        a.free(z2.ptr).unwrap();
        let s = a.stats();
        assert_eq!(s.allocated_bytes[0].current, 0);
        assert_eq!(s.allocated_bytes[0].peak, 3 * KIB as u64, "{policy}");
        assert_eq!(
            s.allocated_bytes[1].peak,
            3 * KIB as u64,
            "{policy}: small pool"
        );
        assert_eq!(s.allocation[0].peak, 2);
        assert_eq!(s.active_bytes[0].peak, 3 * KIB as u64);
        assert_eq!(s.cached_bytes[0].peak, 3 * KIB as u64);
    }
}

/// A thread that runs one job at a time for the test, which waits for each: its calls and
/// the test thread's take turns and never overlap.
struct Turns {
    jobs: Option<mpsc::Sender<Box<dyn FnOnce() + Send>>>,
    done: mpsc::Receiver<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Turns {
    fn new() -> Turns {
        let (jobs, inbox) = mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let (finished, done) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            while let Ok(job) = inbox.recv() {
                job();
                finished.send(()).unwrap();
            }
        });
        Turns {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        }
    }

    fn run(&self, job: impl FnOnce() + Send + 'static) {
        self.jobs.as_ref().unwrap().send(Box::new(job)).unwrap();
        self.done.recv().unwrap();
    }
}

impl Drop for Turns {
    fn drop(&mut self) {
        drop(self.jobs.take());
        self.thread.take().unwrap().join().unwrap();
    }
}

#[test]
fn peaks_stay_exact_while_threads_take_turns() {
    let a = sim(1 << 30, Policy::Default);
    let worker = Turns::new();
    let cycle = |a: &Allocator<SimBackend>| {
        let a = a.clone();
        move || {
            let b = a.alloc(KIB).unwrap().unwrap();
            a.free(b.ptr).unwrap();
        }
    };
    worker.run(cycle(&a)); // the worker's front now holds a 1 KiB buffer
    a.reset_peak();
    // The worker takes it from its front and keeps it; then this thread has 64 KiB more.
    let held = Arc::new(Mutex::new(0u64));
    let (wa, wh) = (a.clone(), held.clone());
    worker.run(move || *wh.lock().unwrap() = wa.alloc(KIB).unwrap().unwrap().ptr);
    let big = a.alloc(64 * KIB).unwrap().unwrap();
    a.free(big.ptr).unwrap();
    let s = a.stats();
    assert_eq!(s.allocated_bytes[0].current, KIB as u64);
    assert_eq!(
        s.allocated_bytes[0].peak,
        65 * KIB as u64,
        "65 KiB in use at once"
    );
    let (wa, wh) = (a.clone(), held.clone());
    worker.run(move || wa.free(*wh.lock().unwrap()).unwrap());
    // The worker's buffer used and freed again before this thread's 64 KiB: never more
    // than 64 KiB at once.
    a.reset_peak();
    worker.run(cycle(&a));
    let big = a.alloc(64 * KIB).unwrap().unwrap();
    assert_eq!(a.stats().allocated_bytes[0].peak, 64 * KIB as u64);
    a.free(big.ptr).unwrap();
}

#[test]
fn a_free_into_another_threads_front_counts_when_it_happens() {
    let a = sim(1 << 30, Policy::Default);
    let mine = a.alloc(2 * KIB).unwrap().unwrap();
    a.free(mine.ptr).unwrap(); // this thread's front, registered first, holds 2 KiB
    let worker = Turns::new();
    let held = Arc::new(Mutex::new(0u64));
    let (wa, wh) = (a.clone(), held.clone());
    worker.run(move || {
        let b = wa.alloc(KIB).unwrap().unwrap();
        wa.free(b.ptr).unwrap();
        *wh.lock().unwrap() = wa.alloc(KIB).unwrap().unwrap().ptr; // from its front
    });
    // This thread frees the worker's buffer (into the worker's front), then takes its own
    // 2 KiB from its front: at most 2 KiB were ever in use at once since the reset.
    a.reset_peak();
    a.free(*held.lock().unwrap()).unwrap();
    let again = a.alloc(2 * KIB).unwrap().unwrap();
    assert_eq!(again.ptr, mine.ptr);
    let s = a.stats();
    assert_eq!(s.allocated_bytes[0].current, 2 * KIB as u64);
    assert_eq!(s.allocated_bytes[0].peak, 2 * KIB as u64);
    a.free(again.ptr).unwrap();
}

#[test]
fn a_buffer_freed_by_another_thread_is_freed_exactly_once() {
    let a = sim(1 << 30, Policy::Default);
    let b = a.alloc(4000).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    // Now delegated to this thread's front; allocate it from there and free it elsewhere.
    let b = a.alloc(4000).unwrap().unwrap();
    let other = a.clone();
    std::thread::spawn(move || other.free(b.ptr).unwrap())
        .join()
        .unwrap();
    assert_eq!(a.free(b.ptr), Err(Error::DoubleFree(b.ptr)));
    assert_eq!(a.usage().allocated, 0);
    assert_eq!(a.usage().buffers, 0);
    // Freed by the other thread, it went back to this thread's front cache.
    let again = a.alloc(4000).unwrap().unwrap();
    assert_eq!(again.ptr, b.ptr);
    assert_eq!(a.usage().allocated, 4096);
    a.free(again.ptr).unwrap();
    assert_eq!(a.free(again.ptr), Err(Error::DoubleFree(again.ptr)));
}

#[test]
fn lookups_and_shapes_see_a_buffer_served_by_the_front_cache() {
    let a = sim(1 << 30, Policy::Default);
    let b = a.alloc(700).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    let b = a.alloc(900).unwrap().unwrap();
    assert_eq!(a.requested_size(b.ptr), Some(900));
    assert_eq!(a.buffer_size(b.ptr), Some(1024));
    a.set_shape(b.ptr, &[3, 300]).unwrap();
    assert_eq!(a.shape(b.ptr), Some(vec![3, 300]));
    a.free(b.ptr).unwrap();
    assert_eq!(a.free(b.ptr), Err(Error::DoubleFree(b.ptr)));
}

#[test]
fn a_buffer_used_by_another_stream_waits_for_its_event() {
    let a = sim(1 << 30, Policy::Default);
    let b = a.alloc(2048).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    let b = a.alloc(2048).unwrap().unwrap();
    a.record_stream(b.ptr, 7).unwrap();
    a.free(b.ptr).unwrap();
    let c = a.alloc(2048).unwrap().unwrap();
    assert_ne!(c.ptr, b.ptr, "reused while stream 7 may still use it");
    a.backend().complete_events();
    a.free_inactive_buffers();
    let d = a.alloc(2048).unwrap().unwrap();
    assert_eq!(d.ptr, b.ptr, "reused once its event completed");
}

#[test]
fn empty_cache_takes_back_what_other_threads_hold() {
    let a = sim(1 << 30, Policy::Default);
    let (done_tx, done_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel::<()>();
    let other = a.clone();
    let worker = std::thread::spawn(move || {
        for size in [512, 1024, 4096, 16 * KIB] {
            let b = other.alloc(size).unwrap().unwrap();
            other.free(b.ptr).unwrap();
            let b = other.alloc(size).unwrap().unwrap();
            other.free(b.ptr).unwrap();
        }
        done_tx.send(()).unwrap();
        exit_rx.recv().unwrap();
    });
    done_rx.recv().unwrap();
    // The worker is alive and holds its cached buffers.
    assert!(a.usage().cached > 0);
    a.empty_cache().unwrap();
    assert_eq!(a.usage().cached, 0);
    assert_eq!(a.usage().reserved, 0, "every page given back");
    exit_tx.send(()).unwrap();
    worker.join().unwrap();
}

#[test]
fn what_an_exited_thread_held_is_taken_back() {
    let a = sim(1 << 30, Policy::Default);
    let other = a.clone();
    let kept = std::thread::spawn(move || {
        let b = other.alloc(1500).unwrap().unwrap();
        other.free(b.ptr).unwrap();
        let kept = other.alloc(1500).unwrap().unwrap();
        let c = other.alloc(6000).unwrap().unwrap();
        other.free(c.ptr).unwrap();
        kept.ptr
    })
    .join()
    .unwrap();
    // A buffer the exited thread still had in use is freed here; its cached one is reused.
    a.free(kept).unwrap();
    let x = a.alloc(100).unwrap().unwrap();
    a.free(x.ptr).unwrap();
    let c = a.alloc(6000).unwrap().unwrap();
    a.free(c.ptr).unwrap();
    assert_eq!(a.usage().allocated, 0);
    a.empty_cache().unwrap();
    assert_eq!(a.usage().reserved, 0);
}

#[test]
fn a_free_into_an_exited_threads_front_comes_back_at_once() {
    let a = sim(1 << 30, Policy::Default);
    // This thread's own front exists before the other thread exits.
    let mine = a.alloc(3000).unwrap().unwrap();
    a.free(mine.ptr).unwrap();
    let other = a.clone();
    let kept = std::thread::spawn(move || {
        let b = other.alloc(1500).unwrap().unwrap();
        other.free(b.ptr).unwrap();
        // Served by the thread's front: delegated to it, and in use when the thread exits.
        other.alloc(1500).unwrap().unwrap().ptr
    })
    .join()
    .unwrap();
    a.free(kept).unwrap();
    assert_eq!(a.usage().allocated, 0);
    // The buffer came back to the engine and into this thread's front, not into the exited
    // thread's, where nothing could reuse it.
    let again = a.alloc(1500).unwrap().unwrap();
    assert_eq!(again.ptr, kept, "the freed buffer serves its size again");
    a.free(again.ptr).unwrap();
}

#[test]
fn memory_held_by_front_caches_is_used_before_running_out() {
    for policy in policies() {
        let total = 64 * MIB;
        let a = Allocator::new(
            SimBackend::new(total),
            Config {
                policy,
                low_watermark_ratio: Some(0.0),
                high_watermark_ratio: Some(0.0),
                ..Config::default()
            },
        )
        .unwrap();
        let small: Vec<_> = (0..2048)
            .map(|_| a.alloc(8 * KIB).unwrap().unwrap().ptr)
            .collect();
        for ptr in small {
            a.free(ptr).unwrap();
        }
        // Every byte of the device, which only fits if the small buffers' memory returns.
        let big = a.alloc(total - 2 * MIB);
        assert!(big.is_ok(), "{policy}: {:?}", big.err());
    }
}

#[test]
fn garbage_collection_takes_back_what_front_caches_hold() {
    for front_cache_bytes in [0, 1 << 20] {
        let a = Allocator::new(
            SimBackend::new(1 << 30),
            Config {
                front_cache_bytes,
                ..Config::default()
            },
        )
        .unwrap();
        let small: Vec<_> = (0..64)
            .map(|_| a.alloc(16 * KIB).unwrap().unwrap())
            .collect();
        for b in &small {
            a.free(b.ptr).unwrap();
        }
        // Every later growth is over the low watermark: garbage collection first.
        a.set_low_watermark_ratio(0.001).unwrap();
        let big = a.alloc(4 * MIB).unwrap().unwrap();
        let stats = a.stats();
        assert_eq!(
            stats.reserved_bytes[1].current, 0,
            "front_cache_bytes {front_cache_bytes}: the small pool keeps pages for cached \
             buffers after garbage collection"
        );
        a.free(big.ptr).unwrap();
    }
}

#[test]
fn a_small_pool_does_not_grow_while_a_front_cache_holds_its_buffers() {
    for policy in policies() {
        let a = Allocator::new(
            SimBackend::new(1 << 30),
            Config {
                policy,
                ..Config::default()
            },
        )
        .unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let (exit_tx, exit_rx) = mpsc::channel::<()>();
        let other = a.clone();
        let t = std::thread::spawn(move || {
            // 512 x 16 KiB fill one 8 MiB heap (mps) exactly; 64 of them go to this thread's
            // front cache (1 MiB).
            let bufs: Vec<_> = (0..512)
                .map(|_| other.alloc(16 * KIB).unwrap().unwrap())
                .collect();
            for b in &bufs[..64] {
                other.free(b.ptr).unwrap();
            }
            done_tx
                .send(bufs[64..].iter().map(|b| b.ptr).collect::<Vec<_>>())
                .unwrap();
            // Stay alive: the front stays this thread's.
            exit_rx.recv().unwrap();
        });
        let live = done_rx.recv().unwrap();
        let before = a.usage().reserved;
        let b = a.alloc(16 * KIB).unwrap().unwrap();
        let after = a.usage().reserved;
        exit_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(
            after, before,
            "{policy}: memory grew for 16 KiB while another thread's front cache held 64 free \
             buffers of that size"
        );
        a.free(b.ptr).unwrap();
        for p in live {
            a.free(p).unwrap();
        }
    }
}

#[test]
fn a_new_callback_sees_every_later_event() {
    let a = sim(1 << 30, Policy::Default);
    let b = a.alloc(1024).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    a.register_callback("watch", move |ptr, event| {
        s.lock().unwrap().push((ptr, event))
    });
    let c = a.alloc(1024).unwrap().unwrap();
    a.free(c.ptr).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (b.ptr, CallbackEvent::Recycled),
            (b.ptr, CallbackEvent::Freed)
        ]
    );
    a.unregister_callback("watch");
    let d = a.alloc(1024).unwrap().unwrap();
    assert_eq!(d.ptr, b.ptr);
    a.free(d.ptr).unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[test]
fn no_front_caches_with_zero_bytes() {
    let a = Allocator::new(
        SimBackend::new(1 << 30),
        Config {
            front_cache_bytes: 0,
            ..Config::default()
        },
    )
    .unwrap();
    let b = a.alloc(1024).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    let c = a.alloc(1024).unwrap().unwrap();
    assert_eq!(c.ptr, b.ptr, "the engine's own cache still reuses it");
    a.free(c.ptr).unwrap();
    assert_eq!(a.stats().allocation[0].allocated, 2);
}

#[test]
fn many_threads_leave_exact_totals() {
    let a = sim(1 << 30, Policy::Default);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || {
                let mut held = Vec::new();
                for i in 0..5000usize {
                    let size = 512 * (1 + (i * 7 + t) % 16);
                    held.push(a.alloc(size).unwrap().unwrap().ptr);
                    if held.len() > 8 {
                        let ptr = held.remove((i * 13) % held.len());
                        a.free(ptr).unwrap();
                    }
                }
                held
            })
        })
        .collect();
    // Each thread's leftovers are freed by another thread.
    let leftovers: Vec<Vec<u64>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for ptrs in leftovers {
        let a = a.clone();
        std::thread::spawn(move || {
            for ptr in ptrs {
                a.free(ptr).unwrap();
            }
        })
        .join()
        .unwrap();
    }
    let s = a.stats();
    assert_eq!(s.allocation[0].allocated, 20_000);
    assert_eq!(s.allocation[0].freed, 20_000);
    assert_eq!(s.allocated_bytes[0].current, 0);
    assert_eq!(s.requested_bytes[0].current, 0);
    assert_eq!(s.active[0].current, 0);
    assert_eq!(s.allocated_bytes[0].allocated, s.allocated_bytes[0].freed);
    a.empty_cache().unwrap();
    assert_eq!(a.usage().reserved, 0);
    assert_eq!(a.stats().cached_bytes[0].current, 0);
}

#[test]
fn a_slightly_larger_cached_buffer_serves_as_the_engine_would() {
    let a = sim(1 << 30, Policy::Default);
    let b = a.alloc(4608).unwrap().unwrap();
    a.free(b.ptr).unwrap();
    // 4000 bytes round to 4096: the cached 4608 is within a quarter more, so it serves.
    let c = a.alloc(4000).unwrap().unwrap();
    assert_eq!((c.ptr, c.size, c.requested), (b.ptr, 4608, 4000));
    assert_eq!(a.usage().allocated, 4608);
    a.free(c.ptr).unwrap();
    // 2048 is far smaller: not this buffer.
    let d = a.alloc(2048).unwrap().unwrap();
    assert_ne!(d.ptr, b.ptr);
    assert_eq!(d.size, 2048);
}

#[test]
fn threads_trading_buffers_while_another_reads_and_empties_stay_consistent() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let a = sim(1 << 30, Policy::Default);
    let stop = Arc::new(AtomicBool::new(false));
    // A reader that folds every front, takes buffers back and empties caches all the while.
    let reader = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let s = a.stats();
                assert!(s.allocated_bytes[0].current <= s.allocated_bytes[0].peak);
                let u = a.report().usage;
                assert!(u.allocated <= u.active, "{u:?}");
                assert!(u.active + u.cached <= u.reserved, "{u:?}");
                if rounds.is_multiple_of(4) {
                    a.empty_cache().unwrap();
                }
                rounds += 1;
            }
            rounds
        })
    };
    // Four threads in a ring: each frees half of what it allocates itself and hands the
    // other half to its neighbour to free.
    let n = 4;
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel::<u64>()).unzip();
    let workers: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(t, rx)| {
            let a = a.clone();
            let next = senders[(t + 1) % n].clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..4000usize {
                    let size = 512 * (1 + (i * 5 + t) % 12);
                    let b = a.alloc(size).unwrap().unwrap();
                    assert_eq!(a.requested_size(b.ptr), Some(size));
                    if i % 2 == 0 {
                        next.send(b.ptr).unwrap();
                    } else {
                        mine.push(b.ptr);
                    }
                    if mine.len() > 6 {
                        a.free(mine.remove(0)).unwrap();
                    }
                    while let Ok(ptr) = rx.try_recv() {
                        a.free(ptr).unwrap();
                    }
                }
                for ptr in mine {
                    a.free(ptr).unwrap();
                }
                drop(next);
                rx
            })
        })
        .collect();
    drop(senders);
    let receivers: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    for rx in receivers {
        while let Ok(ptr) = rx.try_recv() {
            a.free(ptr).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    let s = a.stats();
    assert_eq!(s.allocation[0].allocated, 16_000);
    assert_eq!(s.allocation[0].freed, 16_000);
    assert_eq!(s.allocated_bytes[0].current, 0);
    assert_eq!(s.active_bytes[0].current, 0);
    a.empty_cache().unwrap();
    assert_eq!(a.usage().reserved, 0);
    assert_eq!(a.usage().cached, 0);
}
