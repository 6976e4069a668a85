//! Watermarks, figures and history of an allocator: the seed's getters and setters and the
//! statistics reads.
//!
//! Invariant: every read of a counter folds the threads' front caches first (see `front`), so
//! the figures are exact, not the engine's partial view.

use super::Allocator;
use super::state::{TINY_LIMIT, one_private_range};
use crate::Storage;
use crate::backend::Backend;
use crate::config::debug;
use crate::error::Result;
use crate::format::format_size;
use crate::pool::PoolKind;
use crate::stats::{Stats, Usage};

impl<B: Backend> Allocator<B> {
    // ---- watermarks --------------------------------------------------------------------------

    /// Sets the low watermark ratio (0 disables; at most the high ratio).
    pub fn set_low_watermark_ratio(&self, ratio: f64) -> Result<()> {
        self.engine.lock().limits.set_low(ratio)?;
        self.log_limits();
        Ok(())
    }

    /// Sets the high watermark ratio (0 disables; at most 2.0; not below the low ratio).
    pub fn set_high_watermark_ratio(&self, ratio: f64) -> Result<()> {
        self.engine.lock().limits.set_high(ratio)?;
        self.log_limits();
        Ok(())
    }

    /// Sets both ratios at once, validated together.
    pub fn set_watermark_ratios(&self, low: f64, high: f64) -> Result<()> {
        self.engine.lock().limits.set_both(low, high)?;
        self.log_limits();
        Ok(())
    }

    /// (low, high) ratios.
    pub fn watermark_ratios(&self) -> (f64, f64) {
        let st = self.engine.lock();
        (st.limits.low_ratio, st.limits.high_ratio)
    }

    pub(super) fn log_limits(&self) {
        let st = self.engine.lock();
        if st.debug & debug::PROFILING != 0 {
            let show = |l: usize| {
                if l == usize::MAX {
                    "unlimited".to_string()
                } else {
                    format_size(l)
                }
            };
            tracing::info!(
                target: "bufferheap",
                "High watermark memory allocation limit: {}; low watermark limit: {}",
                show(st.limits.high_limit),
                show(st.limits.low_limit)
            );
        }
    }

    /// MiB of headroom below the low limit; `usize::MAX` when the low watermark is disabled.
    pub fn low_watermark_value(&self) -> usize {
        let st = self.engine.lock();
        if st.limits.low_ratio == 0.0 {
            return usize::MAX;
        }
        let driver = self.engine.backend.memory_info().driver_allocated();
        st.limits.low_limit.saturating_sub(driver) / (1 << 20)
    }

    /// Low limit in bytes; `usize::MAX` when disabled.
    pub fn low_watermark_limit(&self) -> usize {
        self.engine.lock().limits.low_limit
    }

    /// High limit in bytes; `usize::MAX` when disabled.
    pub fn high_watermark_limit(&self) -> usize {
        self.engine.lock().limits.high_limit
    }

    // ---- figures ---------------------------------------------------------------------------

    /// Bytes held from the backend (in use + cached; mapped bytes on page-mapped heaps).
    pub fn total_allocated(&self) -> usize {
        self.engine.lock().reserved_total()
    }

    /// Bytes of buffers in use (rounded sizes).
    pub fn current_allocated(&self) -> usize {
        let mut st = self.engine.lock();
        st.fold_fronts(true);
        st.stats.allocated_bytes[0].current as usize
    }

    /// What the driver says the process holds.
    pub fn driver_allocated(&self) -> usize {
        self.engine.backend.memory_info().driver_allocated()
    }

    /// The largest buffer one request could get now without failing, what PyTorch's
    /// `cacheInfo` tells cuDNN when it sizes the workspaces of its benchmark: the largest cached
    /// buffer or free range of a pool that a request of this front-end's storage on the default
    /// stream reaches, or the device's free memory within the high watermark's headroom,
    /// whichever is larger. A free range of a page-mapped heap counts
    /// only as far as its pool's idle mapped pages and that growth can back it.
    pub fn largest_available(&self) -> usize {
        let device_free = self.engine.backend.memory_info().free;
        let mut st = self.engine.lock();
        // The limit counts what other allocations hold, as every growth does.
        st.refresh_external(&self.engine.backend);
        let headroom = match st.limits.high_limit {
            usize::MAX => usize::MAX,
            limit => limit.saturating_sub(st.driver_estimate()),
        };
        // Memory grows by whole pages, and committed heaps by 2 MiB: a request of the
        // headroom itself would round up past it.
        let unit = self.engine.caps.granularity.max(2 << 20);
        let growth = device_free.min(headroom) / unit * unit;
        // Only pools a request of this front-end on the default stream can reach count, each
        // for the sizes that go to it: a small pool serves requests up to the small limit,
        // and a large pool none below it.
        let storage = self.storage;
        let small_max = if storage == Storage::Private && one_private_range(st.policy, &st.caps) {
            TINY_LIMIT
        } else {
            crate::cache::SMALL_LIMIT
        };
        let held = st
            .pools
            .iter()
            .filter(|p| p.stream == 0 && p.kind.storage() == storage && p.kind != PoolKind::Scalar)
            .map(|p| {
                let page_mapped = p.heaps.iter().flatten().any(|h| h.pages.is_some());
                let range = if page_mapped {
                    p.largest_free().min(p.idle_mapped_bytes() + growth)
                } else {
                    p.largest_free()
                };
                let most = range.max(p.cache.largest());
                match (p.kind.is_small(), most <= small_max) {
                    (true, _) => most.min(small_max),
                    (false, true) => 0,
                    (false, false) => most,
                }
            })
            .max()
            .unwrap_or(0);
        // A request must stay below the largest buffer the device supports.
        let largest_buffer = self.engine.caps.max_buffer_size.saturating_sub(1);
        held.max(growth).min(largest_buffer)
    }

    /// The device's recommended working set.
    pub fn recommended_max_memory(&self) -> usize {
        self.engine.lock().limits.recommended
    }

    /// The cheap figures.
    pub fn usage(&self) -> Usage {
        let mut st = self.engine.lock();
        st.fold_fronts(true);
        let s = &st.stats;
        Usage {
            allocated: s.allocated_bytes[0].current as usize,
            requested: s.requested_bytes[0].current as usize,
            reserved: s.reserved_bytes[0].current as usize,
            active: s.active_bytes[0].current as usize,
            cached: s.cached_bytes[0].current as usize,
            buffers: s.allocation[0].current as usize,
            heaps: s.segment[0].current as usize,
        }
    }

    /// Keeps the last `max_entries` allocator events from now on (0: none; replaces any
    /// history kept so far).
    pub fn set_history(&self, max_entries: usize) {
        self.record_history(max_entries, true);
    }

    /// PyTorch's `_record_memory_history`: keeps the last `max_entries` allocator events (0
    /// stops recording and drops what was kept). A history already kept goes on, trimmed to
    /// the new limit, unless `clear` starts it afresh.
    pub fn record_history(&self, max_entries: usize, clear: bool) {
        // Threads' fronts serve buffers without the engine seeing them: off while it records.
        self.engine
            .front_on
            .store(false, crate::sync::Ordering::Relaxed);
        {
            let mut st = self.engine.lock();
            match (max_entries, st.history.as_mut()) {
                (0, _) => st.history = None,
                (max, Some(h)) if !clear => h.set_max(max),
                (max, _) => st.history = Some(crate::history::History::new(max)),
            }
        }
        self.engine.refresh_front();
    }

    /// The most history entries kept (0: no history is recorded).
    pub fn history_limit(&self) -> usize {
        self.engine.lock().history.as_ref().map_or(0, |h| h.max())
    }

    /// The allocation history, oldest first (empty unless one is kept): PyTorch's
    /// `device_traces` entries, so `bufferheap replay` can replay a snapshot taken here.
    pub fn history(&self) -> Vec<crate::TraceEntry> {
        self.engine.lock().history_entries()
    }

    /// Every counter.
    pub fn stats(&self) -> Stats {
        let mut st = self.engine.lock();
        st.fold_fronts(true);
        st.stats.clone()
    }

    /// Resets every peak counter to its current value.
    pub fn reset_peak(&self) {
        let mut st = self.engine.lock();
        st.fold_fronts(true);
        st.stats.reset_peak();
    }

    /// Zeroes the cumulative counters; current values and peaks stay (see
    /// [`Stats::reset_accumulated`]).
    pub fn reset_accumulated(&self) {
        let mut st = self.engine.lock();
        st.fold_fronts(true);
        st.stats.reset_accumulated();
    }

    /// The policy in force.
    pub fn policy(&self) -> crate::Policy {
        self.engine.lock().policy
    }
}
