//! The hot-path loop of `BASELINES.md`'s latency table.
//!
//! A ring of `live` slots; step `i` frees slot `i % live`'s old buffer (if any) and allocates
//! `sizes[i]` there. Sizes are log-uniform in `[lo, hi]` (`exp` of a uniform draw in
//! `[ln lo, ln hi]`, truncated to an integer, as the C++ loop of `bench/microbench.py` does),
//! drawn from a fixed-seed generator before anything is timed. A warm-up pass over the whole
//! sequence comes first, so that a caching allocator has seen every size; the timed steps
//! then go round the same sequence again, each pass starting at slot 0 (exactly the C++
//! loop's second pass).

use bufferheap_core::{Allocator, Backend, Config, Policy};
use bufferheap_host::HostBackend;
use bufferheap_sim::SimBackend;

/// Steps of one pass (as `bench/microbench.py --steps`).
pub const STEPS: usize = 200_000;

/// Memory budget of the host and sim devices: a budget only, nothing is touched.
pub const DEVICE_BYTES: usize = 64 << 30;

/// A size range and ring length of the latency table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    pub lo: usize,
    pub hi: usize,
    pub live: usize,
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// 512 B .. 4 KiB, 64 live buffers.
pub const SMALL: Scenario = Scenario {
    name: "small",
    lo: 512,
    hi: 4096,
    live: 64,
};
/// 512 B .. 1 MiB, 256 live buffers.
pub const MEDIUM: Scenario = Scenario {
    name: "medium",
    lo: 512,
    hi: 1 << 20,
    live: 256,
};
/// 1 MiB .. 64 MiB, 32 live buffers.
pub const LARGE: Scenario = Scenario {
    name: "large",
    lo: 1 << 20,
    hi: 64 << 20,
    live: 32,
};

pub const SCENARIOS: [Scenario; 3] = [SMALL, MEDIUM, LARGE];

/// Seed of the size generator (the C++ loop uses 42 too).
pub const SEED: u64 = 42;

/// splitmix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` sizes log-uniform in `[lo, hi]`.
pub fn log_uniform_sizes(n: usize, lo: usize, hi: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let (a, b) = ((lo as f64).ln(), (hi as f64).ln());
    (0..n)
        .map(|_| ((a + (b - a) * rng.next_f64()).exp() as usize).clamp(lo, hi))
        .collect()
}

/// The backends the loop runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Host,
    Sim,
    /// CUDA device 0 through the driver API (needs a GPU).
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(BackendKind::Host),
            "sim" => Ok(BackendKind::Sim),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(format!("unknown backend {other:?} (host, sim or cuda)")),
        }
    }
}

/// The host backend with a 64 GiB budget, default configuration with `policy`.
pub fn host_allocator(policy: Policy) -> Allocator<HostBackend> {
    host_allocator_with(Config {
        policy,
        ..Config::default()
    })
}

/// The host backend with a 64 GiB budget.
pub fn host_allocator_with(config: Config) -> Allocator<HostBackend> {
    Allocator::new(HostBackend::with_memory(DEVICE_BYTES), config).expect("host allocator")
}

/// The simulated backend with 64 GiB, default configuration with `policy`.
pub fn sim_allocator(policy: Policy) -> Allocator<SimBackend> {
    sim_allocator_with(Config {
        policy,
        ..Config::default()
    })
}

/// The simulated backend with 64 GiB.
pub fn sim_allocator_with(config: Config) -> Allocator<SimBackend> {
    Allocator::new(SimBackend::new(DEVICE_BYTES), config).expect("sim allocator")
}

/// CUDA device 0, or why there is none.
pub fn cuda_allocator_with(
    config: Config,
) -> Result<Allocator<bufferheap_cuda::CudaBackend>, String> {
    let backend = bufferheap_cuda::CudaBackend::new(0).map_err(|e| e.to_string())?;
    Allocator::new(backend, config).map_err(|e| e.to_string())
}

/// One ring of live buffers and its size sequence.
#[derive(Debug)]
pub struct Ring {
    sizes: Vec<usize>,
    /// Live buffers: address and requested size (freed with the size, as PyTorch does).
    slots: Vec<Option<(u64, usize)>>,
    next: usize,
    next_slot: usize,
    /// Free by address alone (size 0), as bufferheap's direct PyTorch front does; otherwise
    /// with the requested size, as PyTorch's pluggable wrapper does.
    unsized_frees: bool,
}

impl Ring {
    /// A ring for `scenario` with a pass of `steps` steps.
    pub fn new(scenario: Scenario, steps: usize, seed: u64) -> Ring {
        assert!(steps > 0, "a pass has at least one step");
        Ring {
            sizes: log_uniform_sizes(steps, scenario.lo, scenario.hi, seed),
            slots: vec![None; scenario.live],
            next: 0,
            next_slot: 0,
            unsized_frees: false,
        }
    }

    /// The same ring, freeing by address alone.
    pub fn freeing_unsized(mut self) -> Ring {
        self.unsized_frees = true;
        self
    }

    /// The size a free passes for a buffer of `size` requested bytes.
    #[inline]
    fn hint(&self, size: usize) -> usize {
        if self.unsized_frees { 0 } else { size }
    }

    /// Steps of one pass.
    pub fn steps(&self) -> usize {
        self.sizes.len()
    }

    /// One step: free the slot's old buffer, allocate the next size in its place.
    #[inline]
    pub fn step<B: Backend>(&mut self, a: &Allocator<B>) {
        let (i, j) = (self.next, self.next_slot);
        if let Some((ptr, size)) = self.slots[j].take() {
            a.free_sized(ptr, self.hint(size))
                .expect("free of a live buffer");
        }
        let size = self.sizes[i];
        self.slots[j] = a
            .alloc(size)
            .expect("allocation within the budget")
            .map(|b| (b.ptr, size));
        // Slot = step % live without a division; a new pass starts again at slot 0, as the
        // C++ loop's second pass does.
        if i + 1 == self.sizes.len() {
            (self.next, self.next_slot) = (0, 0);
        } else {
            self.next = i + 1;
            self.next_slot = if j + 1 == self.slots.len() { 0 } else { j + 1 };
        }
    }

    /// `n` steps.
    pub fn run<B: Backend>(&mut self, a: &Allocator<B>, n: usize) {
        for _ in 0..n {
            self.step(a);
        }
    }

    /// One whole pass (the warm-up).
    pub fn warm_up<B: Backend>(&mut self, a: &Allocator<B>) {
        self.run(a, self.steps());
    }

    /// Frees every live buffer of the ring.
    pub fn clear<B: Backend>(&mut self, a: &Allocator<B>) {
        for j in 0..self.slots.len() {
            if let Some((ptr, size)) = self.slots[j].take() {
                a.free_sized(ptr, self.hint(size))
                    .expect("free of a live buffer");
            }
        }
    }
}

/// What one pass does inside the allocator: how many allocations were served from the cache
/// and how many backend calls it made. Measured on a separate, untimed pass (a callback
/// counts the events).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassProfile {
    pub steps: u64,
    pub recycled: u64,
    pub placed: u64,
    pub device_allocs: u64,
    pub device_frees: u64,
    /// Peaks over the warm-up and the pass: bytes reserved, and bytes in use.
    pub reserved_peak: u64,
    pub allocated_peak: u64,
}

impl PassProfile {
    pub fn recycled_fraction(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.recycled as f64 / self.steps as f64
        }
    }
}

/// Runs one pass on a warmed-up ring with a counting callback and returns what happened.
pub fn profile_pass<B: Backend>(a: &Allocator<B>, ring: &mut Ring) -> PassProfile {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use bufferheap_core::CallbackEvent;

    let recycled = Arc::new(AtomicU64::new(0));
    let placed = Arc::new(AtomicU64::new(0));
    let (r, p) = (recycled.clone(), placed.clone());
    a.register_callback("bench-profile", move |_, event| match event {
        CallbackEvent::Recycled => {
            r.fetch_add(1, Ordering::Relaxed);
        }
        CallbackEvent::Allocated => {
            p.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    });
    let before = a.stats();
    ring.warm_up(a);
    let after = a.stats();
    a.unregister_callback("bench-profile");
    PassProfile {
        steps: ring.steps() as u64,
        recycled: recycled.load(Ordering::Relaxed),
        placed: placed.load(Ordering::Relaxed),
        device_allocs: after.num_device_alloc - before.num_device_alloc,
        device_frees: after.num_device_free - before.num_device_free,
        reserved_peak: after.reserved_bytes[0].peak,
        allocated_peak: after.allocated_bytes[0].peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_log_uniform_and_in_range() {
        let s = log_uniform_sizes(100_000, 512, 1 << 20, SEED);
        assert!(s.iter().all(|&x| (512..=1 << 20).contains(&x)));
        // Half the draws lie below the geometric mean.
        let mid = ((512f64 * (1 << 20) as f64).sqrt()) as usize;
        let below = s.iter().filter(|&&x| x < mid).count();
        assert!((45_000..55_000).contains(&below), "{below}");
        assert_eq!(s, log_uniform_sizes(100_000, 512, 1 << 20, SEED));
    }

    #[test]
    fn ring_runs_on_both_backends() {
        for policy in [Policy::Default, Policy::Mps] {
            let a = sim_allocator(policy);
            let mut ring = Ring::new(MEDIUM, 1024, SEED);
            ring.warm_up(&a);
            let p = profile_pass(&a, &mut ring);
            assert_eq!(p.recycled + p.placed, 1024);
            ring.clear(&a);
            assert_eq!(a.current_allocated(), 0);

            let a = host_allocator(policy);
            let mut ring = Ring::new(LARGE, 64, SEED);
            ring.warm_up(&a);
            ring.run(&a, 64);
            ring.clear(&a);
            assert_eq!(a.current_allocated(), 0);
        }
    }
}
