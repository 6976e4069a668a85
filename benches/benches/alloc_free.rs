//! Hot path: one alloc + one free per step, the loop of `BASELINES.md`'s latency table (see
//! `bufferheap_benches::ring`). `host` and `sim` report the time of one step (one alloc+free
//! pair) of a warmed-up ring, sampled for at least a second. `threads` reports the time of a
//! 200,000-step pass of each thread's own ring, all threads running at once on one shared
//! allocator: ns per pair per thread = time / 200,000 (the throughput line is per thread).
//!
//!     cargo bench -p bufferheap-benches --bench alloc_free

use std::cell::RefCell;
use std::sync::Mutex;

use bufferheap_benches::ring::{
    Ring, SCENARIOS, SEED, STEPS, Scenario, host_allocator, sim_allocator,
};
use bufferheap_core::{Allocator, Backend, Policy};
use divan::Bencher;

fn main() {
    divan::main();
}

/// Steps one warmed-up ring per iteration: time per iteration = ns per alloc+free pair.
fn per_pair<B: Backend>(bencher: Bencher, a: Allocator<B>, s: Scenario) {
    let ring = RefCell::new(Ring::new(s, STEPS, SEED));
    ring.borrow_mut().warm_up(&a);
    bencher.bench_local(|| ring.borrow_mut().step(&a));
    ring.borrow_mut().clear(&a);
}

/// `threads` threads, each with its own warmed-up ring, run one pass each at the same time.
fn concurrent<B>(bencher: Bencher, a: Allocator<B>, s: Scenario, threads: usize)
where
    B: Backend + Send + Sync,
    B::Event: Send + Sync,
{
    let rings: Vec<Mutex<Ring>> = (0..threads)
        .map(|t| Mutex::new(Ring::new(s, STEPS, SEED + t as u64)))
        .collect();
    for r in &rings {
        r.lock().expect("ring").warm_up(&a);
    }
    bencher
        .counter(divan::counter::ItemsCount::new(STEPS))
        .bench_local(|| {
            std::thread::scope(|scope| {
                for r in &rings {
                    let a = &a;
                    scope.spawn(move || r.lock().expect("ring").run(a, STEPS));
                }
            });
        });
    for r in &rings {
        r.lock().expect("ring").clear(&a);
    }
}

mod host {
    use super::*;

    #[divan::bench(args = SCENARIOS, min_time = 1)]
    fn default(bencher: Bencher, s: Scenario) {
        per_pair(bencher, host_allocator(Policy::Default), s);
    }

    #[divan::bench(args = SCENARIOS, min_time = 1)]
    fn mps(bencher: Bencher, s: Scenario) {
        per_pair(bencher, host_allocator(Policy::Mps), s);
    }
}

mod sim {
    use super::*;

    #[divan::bench(args = SCENARIOS, min_time = 1)]
    fn default(bencher: Bencher, s: Scenario) {
        per_pair(bencher, sim_allocator(Policy::Default), s);
    }

    #[divan::bench(args = SCENARIOS, min_time = 1)]
    fn mps(bencher: Bencher, s: Scenario) {
        per_pair(bencher, sim_allocator(Policy::Mps), s);
    }
}

/// One pass per thread, 1 vs 2 threads on one shared host allocator.
mod threads {
    use super::*;

    #[divan::bench(consts = [1, 2], args = SCENARIOS, sample_count = 15, sample_size = 1)]
    fn host_default<const T: usize>(bencher: Bencher, s: Scenario) {
        concurrent(bencher, host_allocator(Policy::Default), s, T);
    }

    #[divan::bench(consts = [1, 2], args = SCENARIOS, sample_count = 15, sample_size = 1)]
    fn host_mps<const T: usize>(bencher: Bencher, s: Scenario) {
        concurrent(bencher, host_allocator(Policy::Mps), s, T);
    }
}
