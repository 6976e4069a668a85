//! The latency loop of `BASELINES.md` run as a plain program (the same loop as the
//! `alloc_free` bench; handy under a profiler): a warm-up pass, then timed passes of 200,000
//! alloc+free steps; prints ns per pair (per thread) over the passes, median and minimum,
//! and what a pass does inside the allocator (share of allocations served from the cache,
//! backend calls per 1000 steps).
//!
//!     hotpath [--backend host|sim|cuda] [--policy default|mps] [--scenario small|medium|large|all]
//!             [--threads T] [--own-allocators] [--repeats R] [--steps N] [--no-profile]
//!             [--front-cache BYTES] [--unmap-rate-limit R] [--unsized-frees]
//!
//! With `--threads T`, T threads each run their own ring at once (started together for each
//! pass) on one shared allocator; with `--own-allocators`, each thread has an allocator of
//! its own instead, the control that shows what the machine alone does to T threads.
//! `--no-profile` skips the pass that counts recycled buffers (it registers a callback,
//! which a profile of the hot path should not see). `--backend cuda` runs the loop on GPU 0
//! through the CUDA backend: the engine's cost on a GPU without PyTorch's in front of it.
//! `--unsized-frees` frees by address alone, as the direct PyTorch front does (by default
//! frees pass the requested size, as PyTorch's pluggable wrapper does).

use std::sync::Barrier;
use std::time::Instant;

use bufferheap_benches::ring::{
    BackendKind, Ring, SCENARIOS, SEED, STEPS, Scenario, cuda_allocator_with, host_allocator_with,
    profile_pass, sim_allocator_with,
};
use bufferheap_core::{Allocator, Backend, Policy};

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        None => default,
        Some(i) => match args.get(i + 1).map(|v| v.parse()) {
            Some(Ok(v)) => v,
            _ => {
                eprintln!("{name} needs a valid value");
                std::process::exit(2)
            }
        },
    }
}

struct Params {
    threads: usize,
    own_allocators: bool,
    repeats: usize,
    steps: usize,
    profile: bool,
    unsized_frees: bool,
}

impl Params {
    /// A ring of `s` with this run's pass length and way of freeing.
    fn ring(&self, s: Scenario, seed: u64) -> Ring {
        let ring = Ring::new(s, self.steps, seed);
        if self.unsized_frees {
            ring.freeing_unsized()
        } else {
            ring
        }
    }
}

/// Per pass: the mean over threads of their ns per pair, every thread running its own
/// warmed-up ring at the same time.
fn measure<B>(make: &(dyn Fn() -> Allocator<B> + Sync), s: Scenario, p: &Params) -> Vec<f64>
where
    B: Backend + Send + Sync,
    B::Event: Send + Sync,
{
    let shared = (!p.own_allocators).then(make);
    let barrier = Barrier::new(p.threads);
    let per_thread: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..p.threads)
            .map(|t| {
                let (barrier, shared) = (&barrier, &shared);
                scope.spawn(move || {
                    let own = shared.is_none().then(make);
                    let a = shared.as_ref().or(own.as_ref()).expect("an allocator");
                    let mut ring = p.ring(s, SEED + t as u64);
                    ring.warm_up(a);
                    let ns = (0..p.repeats)
                        .map(|_| {
                            barrier.wait();
                            let start = Instant::now();
                            ring.run(a, p.steps);
                            start.elapsed().as_nanos() as f64 / p.steps as f64
                        })
                        .collect::<Vec<f64>>();
                    ring.clear(a);
                    ns
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker"))
            .collect()
    });
    (0..p.repeats)
        .map(|i| per_thread.iter().map(|v| v[i]).sum::<f64>() / p.threads as f64)
        .collect()
}

fn report<B>(label: &str, make: &(dyn Fn() -> Allocator<B> + Sync), s: Scenario, p: &Params)
where
    B: Backend + Send + Sync,
    B::Event: Send + Sync,
{
    let mut ns = measure(make, s, p);
    ns.sort_by(f64::total_cmp);
    let inside = if p.profile {
        let a = make();
        let mut ring = p.ring(s, SEED);
        ring.warm_up(&a);
        let prof = profile_pass(&a, &mut ring);
        ring.clear(&a);
        format!(
            "  recycled {:>5.1}%  backend calls/1000 steps {:>6.2}  peak reserved/allocated {:.3}",
            100.0 * prof.recycled_fraction(),
            (prof.device_allocs + prof.device_frees) as f64 * 1000.0 / prof.steps as f64,
            prof.reserved_peak as f64 / prof.allocated_peak.max(1) as f64
        )
    } else {
        String::new()
    };
    let threads = if p.threads == 1 {
        "1 thread".to_string()
    } else if p.own_allocators {
        format!("{} threads, own allocators", p.threads)
    } else {
        format!("{} threads, one allocator", p.threads)
    };
    println!(
        "{label:<12} {:<7} {threads:<26} ns/pair median {:>8.1}  min {:>8.1}{inside}",
        s.name,
        ns[ns.len() / 2],
        ns[0],
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let backend: BackendKind = flag(&args, "--backend", BackendKind::Host);
    let policy: Policy = flag(&args, "--policy", Policy::Default);
    let which: String = flag(&args, "--scenario", "all".to_string());
    let mut config = bufferheap_core::Config {
        policy,
        front_cache_bytes: flag(
            &args,
            "--front-cache",
            bufferheap_core::Config::default().front_cache_bytes,
        ),
        ..bufferheap_core::Config::default()
    };
    // Checked as the library checks the setting (a finite ratio of at least 0).
    if let Some(i) = args.iter().position(|a| a == "--unmap-rate-limit") {
        let value = args.get(i + 1).map_or("", String::as_str);
        if let Err(e) = config.set("unmap_rate_limit", value) {
            eprintln!("--unmap-rate-limit: {e}");
            std::process::exit(2)
        }
    }
    let p = Params {
        threads: flag(&args, "--threads", 1usize).max(1),
        own_allocators: args.iter().any(|a| a == "--own-allocators"),
        repeats: flag(&args, "--repeats", 5usize).max(1),
        steps: flag(&args, "--steps", STEPS).max(1),
        profile: !args.iter().any(|a| a == "--no-profile"),
        unsized_frees: args.iter().any(|a| a == "--unsized-frees"),
    };
    let scenarios: Vec<Scenario> = SCENARIOS
        .into_iter()
        .filter(|s| which == "all" || which == s.name)
        .collect();
    if scenarios.is_empty() {
        eprintln!("unknown scenario {which:?} (small, medium, large or all)");
        std::process::exit(2);
    }
    for s in scenarios {
        // A fresh allocator per scenario, as a fresh process would have.
        match backend {
            BackendKind::Host => report(
                &format!("host {policy}"),
                &|| host_allocator_with(config.clone()),
                s,
                &p,
            ),
            BackendKind::Sim => report(
                &format!("sim {policy}"),
                &|| sim_allocator_with(config.clone()),
                s,
                &p,
            ),
            BackendKind::Cuda => {
                if let Err(e) = cuda_allocator_with(config.clone()) {
                    eprintln!("no CUDA backend: {e}");
                    std::process::exit(1);
                }
                report(
                    &format!("cuda {policy}"),
                    &|| cuda_allocator_with(config.clone()).expect("CUDA backend"),
                    s,
                    &p,
                )
            }
        }
    }
}
