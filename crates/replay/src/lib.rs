//! Replays a PyTorch memory snapshot through the bufferheap engine and measures what it
//! reserves, next to what the trace says was live and what PyTorch reserved.
//!
//! The replay first allocates the blocks that were alive before recording started (freed in
//! the trace without being allocated in it, or allocated in the final segments at an address
//! the trace never allocated), then applies `alloc` and `free_completed` in order. Live bytes
//! are counted from the trace's own block sizes, so `peak_live_bytes` is a fact of the trace,
//! independent of any allocator. Our reserved bytes are the engine's `total_allocated()` after
//! every event (mapped bytes on page-mapped heaps).
//!
//! Invariants: a replay never panics on a decoded snapshot; events that cannot apply (a free
//! of an address never allocated, an unknown action) are counted and reported as warnings;
//! the engine's errors stop the replay with the index of the event that caused them; a trace
//! that allocates on more than [`MAX_STREAMS`] streams is refused before the replay starts, so
//! the memory a replay takes stays bounded whatever the trace says.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use bufferheap_core::{Allocator, Backend, Config, Policy};
use bufferheap_host::HostBackend;
use bufferheap_sim::SimBackend;
use bufferheap_trace::{Action, ReservedTracker, Snapshot, initial_live_blocks};

/// Which backend the replay runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Addresses only: any trace at full scale on any machine.
    Sim,
    /// Real host memory mappings (never written, so they cost address space, not RAM).
    Host,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sim" => Ok(BackendKind::Sim),
            "host" => Ok(BackendKind::Host),
            other => Err(format!(
                "unknown backend {other:?} (expected \"sim\" or \"host\")"
            )),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Sim => "sim",
            BackendKind::Host => "host",
        })
    }
}

/// What to replay and how.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub policy: Policy,
    /// Engine configuration; its `policy` is replaced by the field above.
    pub config: Config,
    pub backend: BackendKind,
    /// Memory of the simulated device (the traces come from 80 GB GPUs).
    pub device_memory: usize,
    /// Points kept of the over-time series (for plots); 0 keeps none.
    pub series_points: usize,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            policy: Policy::Default,
            config: Config::default(),
            backend: BackendKind::Sim,
            device_memory: 80 << 30,
            series_points: 2000,
        }
    }
}

/// One point of the over-time series.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SeriesPoint {
    /// Events applied: 0 is the state before the first event (the blocks alive before
    /// recording placed, PyTorch's reserved bytes as recording began).
    pub event: usize,
    pub live_bytes: u64,
    pub reserved_bytes: u64,
    pub pytorch_reserved_bytes: i64,
}

/// The outcome of replaying one device of one snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayReport {
    pub device: usize,
    pub policy: Policy,
    pub backend: BackendKind,
    pub events: usize,
    pub allocs: u64,
    pub initial_live_blocks: u64,
    pub initial_live_bytes: u64,
    pub peak_live_bytes: u64,
    pub peak_reserved_bytes: u64,
    pub reserved_over_live: f64,
    pub final_reserved_bytes: u64,
    /// PyTorch's own reserved bytes: the largest over the trace.
    pub pytorch_reserved_bytes: i64,
    pub pytorch_over_live: f64,
    /// Backend calls that obtained memory (heap reservations, page maps).
    pub device_allocs: u64,
    /// Backend calls that gave memory back.
    pub device_frees: u64,
    pub map_calls: u64,
    pub unmap_calls: u64,
    pub map_unmap_per_1000_allocs: f64,
    /// Physical allocations behind the page maps (one per piece of the backend's physical
    /// block each map spans): the driver's cost on CUDA.
    pub physical_allocs: u64,
    pub alloc_retries: u64,
    /// Frees of addresses the replay never saw allocated (counted, skipped).
    pub orphan_frees: u64,
    /// Allocations at an address whose block was never freed: the earlier block is freed in
    /// the engine first; both count as live, as `tools/trace_facts.py` counts them.
    pub replaced_allocs: u64,
    /// Actions this replay does not know (counted, skipped).
    pub unknown_actions: u64,
    pub replay_seconds: f64,
    #[serde(skip)]
    pub series: Vec<SeriesPoint>,
}

impl ReplayReport {
    /// Warnings a user should see: skipped events.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.orphan_frees > 0 {
            w.push(format!(
                "{} frees of addresses never allocated were skipped",
                self.orphan_frees
            ));
        }
        if self.replaced_allocs > 0 {
            w.push(format!(
                "{} allocations came at an address whose block was never freed: the earlier \
                 block was freed first (its bytes stay counted as live, as the trace's facts \
                 count them)",
                self.replaced_allocs
            ));
        }
        if self.unknown_actions > 0 {
            w.push(format!(
                "{} events with unknown actions were skipped",
                self.unknown_actions
            ));
        }
        w
    }
}

/// The most distinct streams one device's replay accepts. The engine keeps a pool per stream,
/// and a page-mapped pool's page table is sized to the device (about half a MiB for 80 GB): a
/// damaged or hostile trace naming a new stream in every event would cost that much memory per
/// event. PyTorch programs allocate on a few dozen streams at most.
pub const MAX_STREAMS: usize = 256;

/// The most devices one snapshot may name. Each device's replay reads the whole snapshot's
/// segments, so a damaged snapshot naming a new device in every segment would take time
/// growing with the square of its size. Machines have a few dozen GPUs at most.
pub const MAX_DEVICES: usize = 1024;

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The engine failed (out of memory on the simulated device, a backend error).
    #[error("device {device}, event {event}: {source}")]
    Engine {
        device: usize,
        event: String,
        source: bufferheap_core::Error,
    },
    /// The trace allocates on more streams than a replay accepts.
    #[error(
        "device {device}: the trace allocates on more than {max} streams besides the default \
         one (the next one at event {event}); a PyTorch program uses a few dozen at most, so the \
         trace is damaged"
    )]
    TooManyStreams {
        device: usize,
        max: usize,
        event: usize,
    },
}

/// The devices of a snapshot that have anything to replay.
pub fn devices(snap: &Snapshot) -> Vec<usize> {
    let mut out: std::collections::BTreeSet<usize> = (0..snap.device_traces.len())
        .filter(|&d| !snap.device_traces[d].is_empty())
        .collect();
    out.extend(snap.segments.iter().map(|s| s.device));
    out.into_iter().collect()
}

/// Replays one device of a snapshot. `progress` is called with (events done, events total)
/// every few thousand events.
pub fn replay(
    snap: &Snapshot,
    device: usize,
    options: &ReplayOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ReplayReport, ReplayError> {
    let config = Config {
        policy: options.policy,
        ..options.config.clone()
    };
    let engine = |source| ReplayError::Engine {
        device,
        event: "setup".into(),
        source,
    };
    match options.backend {
        BackendKind::Sim => {
            let a =
                Allocator::new(SimBackend::new(options.device_memory), config).map_err(engine)?;
            run(&a, snap, device, options, progress)
        }
        BackendKind::Host => {
            let a = Allocator::new(
                HostBackend::with_memory(options.device_memory)
                    .discrete()
                    .with_physical_block(bufferheap_sim::DEFAULT_PHYSICAL_BLOCK),
                config,
            )
            .map_err(engine)?;
            run(&a, snap, device, options, progress)
        }
    }
}

fn run<B: Backend>(
    a: &Allocator<B>,
    snap: &Snapshot,
    device: usize,
    options: &ReplayOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ReplayReport, ReplayError> {
    let start = Instant::now();
    let events = snap.events(device);
    let total = events.len();
    // The default stream's pools always exist; each other stream gets its own.
    let mut streams: HashSet<u64> = HashSet::new();
    for (i, e) in events.iter().enumerate() {
        if e.action == Action::Alloc
            && e.stream != 0
            && streams.insert(e.stream)
            && streams.len() > MAX_STREAMS
        {
            return Err(ReplayError::TooManyStreams {
                device,
                max: MAX_STREAMS,
                event: i,
            });
        }
    }
    // Each live block of the trace: our buffer (none for a block of 0 bytes) and its size.
    let mut ours: HashMap<u64, (Option<u64>, u64)> = HashMap::with_capacity(4096);
    let mut live: u64 = 0;
    let mut peak_live: u64 = 0;
    let mut peak_reserved: u64 = 0;
    let mut tracker = ReservedTracker::new(snap, device);
    let mut pytorch_peak = tracker.current();
    let (mut allocs, mut orphan_frees, mut replaced, mut unknown) = (0u64, 0u64, 0u64, 0u64);
    let every = if options.series_points == 0 {
        usize::MAX
    } else {
        total.div_ceil(options.series_points).max(1)
    };
    let mut series = Vec::new();

    let initial = initial_live_blocks(snap, device);
    // Saturating, like the trace's own facts: a damaged trace's sizes may add past u64.
    let initial_bytes: u64 = initial.iter().fold(0, |sum, b| sum.saturating_add(b.1));
    for &(addr, size) in &initial {
        let buffer = a
            .alloc(size as usize)
            .map_err(|source| ReplayError::Engine {
                device,
                event: format!("initial block at {addr:#x}"),
                source,
            })?;
        ours.insert(addr, (buffer.map(|b| b.ptr), size));
        live = live.saturating_add(size);
    }
    peak_live = peak_live.max(live);
    peak_reserved = peak_reserved.max(a.total_allocated() as u64);
    if options.series_points > 0 {
        series.push(SeriesPoint {
            event: 0,
            live_bytes: live,
            reserved_bytes: a.total_allocated() as u64,
            pytorch_reserved_bytes: pytorch_peak,
        });
    }

    for (i, e) in events.iter().enumerate() {
        let fail = |source| ReplayError::Engine {
            device,
            event: format!("{i} ({} of {} bytes)", e.action, e.size),
            source,
        };
        match &e.action {
            Action::Alloc => {
                allocs += 1;
                if let Some((old, _)) = ours.remove(&e.addr) {
                    // The trace reuses an address it never freed: the old block is gone.
                    if let Some(old) = old {
                        a.free(old).map_err(fail)?;
                    }
                    replaced += 1;
                }
                let buffer = a.alloc_on(e.size as usize, e.stream).map_err(fail)?;
                ours.insert(e.addr, (buffer.map(|b| b.ptr), e.size));
                live = live.saturating_add(e.size);
                peak_live = peak_live.max(live);
                peak_reserved = peak_reserved.max(a.total_allocated() as u64);
            }
            Action::FreeCompleted => match ours.remove(&e.addr) {
                Some((ptr, size)) => {
                    if let Some(ptr) = ptr {
                        a.free(ptr).map_err(fail)?;
                    }
                    live = live.saturating_sub(size);
                }
                None => orphan_frees += 1,
            },
            Action::Unknown(_) => unknown += 1,
            _ => {}
        }
        let reserved = tracker.apply(e);
        pytorch_peak = pytorch_peak.max(reserved);
        if i % every == 0 || i + 1 == total {
            series.push(SeriesPoint {
                event: i + 1,
                live_bytes: live,
                reserved_bytes: a.total_allocated() as u64,
                pytorch_reserved_bytes: reserved,
            });
        }
        if i % 8192 == 0 {
            progress(i, total);
        }
    }
    progress(total, total);
    let stats = a.stats();
    let final_reserved = a.total_allocated() as u64;
    let ratio = |x: f64| {
        if peak_live == 0 {
            0.0
        } else {
            x / peak_live as f64
        }
    };
    Ok(ReplayReport {
        device,
        policy: options.policy,
        backend: options.backend,
        events: total,
        allocs,
        initial_live_blocks: initial.len() as u64,
        initial_live_bytes: initial_bytes,
        peak_live_bytes: peak_live,
        peak_reserved_bytes: peak_reserved,
        reserved_over_live: ratio(peak_reserved as f64),
        final_reserved_bytes: final_reserved,
        pytorch_reserved_bytes: pytorch_peak,
        pytorch_over_live: ratio(pytorch_peak as f64),
        device_allocs: stats.num_device_alloc,
        device_frees: stats.num_device_free,
        map_calls: stats.num_map_calls,
        unmap_calls: stats.num_unmap_calls,
        map_unmap_per_1000_allocs: if allocs == 0 {
            0.0
        } else {
            (stats.num_map_calls + stats.num_unmap_calls) as f64 * 1000.0 / allocs as f64
        },
        physical_allocs: stats.num_physical_allocs,
        alloc_retries: stats.num_alloc_retries,
        orphan_frees,
        replaced_allocs: replaced,
        unknown_actions: unknown,
        replay_seconds: start.elapsed().as_secs_f64(),
        series,
    })
}
