//! The two placement policies and the fallback chain's steps.
//!
//! `mps` reproduces the seed: whole-buffer reuse with up to 32 MiB of slack, heaps of
//! 8 MiB / 32 MiB / XLarge / dedicated size, garbage collection of older-than-average cached
//! buffers over the low watermark. `default` is ours: exact-size reuse of cached buffers, then
//! best fit in heap space with coalescing, and — on a backend that maps pages — one large
//! address range per pool whose pages are mapped only where buffers need them (see
//! `grow_paged`); there, buffers over 1 MiB are not cached but go straight back to free
//! space (`State::cache`). Both run the same chain when memory is short: callbacks, trim,
//! release all cached memory, retry.
//!
//! Every step returns `Ok(Some(slot))` when it placed or recycled a buffer, `Ok(None)` when it
//! found no memory (the state's `shortfall` says why), and `Err` only for backend failures
//! that more memory would not cure.

use crate::backend::Backend;
use crate::callbacks::Notes;
use crate::config::{Policy, debug};
use crate::error::Result;
use crate::format::format_size;
use crate::pages::PageRun;

use super::state::{BufState, State};

const MIB: usize = 1 << 20;
/// The seed's slack: a cached buffer up to this much larger than asked is reused whole.
pub const MPS_REUSE_SLACK: usize = 32 * MIB;
/// Candidates examined when looking for mapped space; bounded so a lookup stays cheap.
const FIT_CANDIDATES: usize = 64;
/// A cached buffer up to `size / REUSE_SLACK_DIV` larger than a request may serve it.
const REUSE_SLACK_DIV: usize = 8;
/// The same for small pools (buffers of at most 1 MiB), where a little slack costs little.
pub(crate) const SMALL_SLACK_DIV: usize = 4;
/// Growth events closer than this many allocations form a burst.
const BURST_WINDOW: u64 = 64;
/// Where a trim brings reserved bytes back to, as a fraction of the budget's band.
const TRIM_TO: f64 = 0.5;
/// Over this many times the budget's fraction, the budget gives back pages idle for fewer
/// than `min_idle_age` allocations too (see `grow_paged`).
const FRESH_PAGES_BUDGET: f64 = 3.0;
/// Allocations between two looks for stale pages.
const STALE_CHECK_EVERY: u64 = 256;

/// Steps of an allocation, in the order the fallback chain takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Cache, then heap space, then growth.
    Normal,
    /// After the AllocationFailed callbacks ran: look again.
    AfterCallbacks,
    /// Trim cached memory of the request's kind, then grow.
    ReleasePool,
    /// Wait for every pending event, release all cached memory, then grow.
    ReleaseAll,
}

impl<B: Backend> State<B> {
    /// One step of an allocation of `size` (rounded) bytes from pool `p`.
    pub fn alloc_step(
        &mut self,
        backend: &B,
        p: u32,
        size: usize,
        requested: usize,
        phase: Phase,
        notes: &mut Notes,
    ) -> Result<Option<u32>> {
        match self.policy {
            Policy::Default => self.default_step(backend, p, size, requested, phase, notes),
            Policy::Mps => self.mps_step(backend, p, size, requested, phase, notes),
        }
    }

    /// A cached buffer of pool `p` that serves `size` as the policy reuses them, taken out of
    /// the cache: with `default`, exactly `size` or at most 1/REUSE_SLACK_DIV larger
    /// (1/SMALL_SLACK_DIV for small buffers), so a size seen again with a little variation is
    /// recycled rather than placed anew (its slack is counted as in use, and bounded); with
    /// `mps` none here: its step reuses cached buffers as the seed's `get_free_buffer` does.
    #[inline]
    pub fn take_cached(&mut self, p: u32, size: usize) -> Option<u32> {
        let cache = &mut self.pools[p as usize].cache;
        match self.policy {
            // The seed's get_free_buffer gates every reuse on the high watermark and ages the
            // large pools' cached buffers: its step does both.
            Policy::Mps => None,
            Policy::Default => {
                let div = if size <= crate::cache::SMALL_LIMIT {
                    SMALL_SLACK_DIV
                } else {
                    REUSE_SLACK_DIV
                };
                cache
                    .take_fit(size, size + size / div)
                    .map(|(_, slot)| slot)
            }
        }
    }

    // ---- default policy ------------------------------------------------------------------

    fn default_step(
        &mut self,
        backend: &B,
        p: u32,
        size: usize,
        requested: usize,
        phase: Phase,
        notes: &mut Notes,
    ) -> Result<Option<u32>> {
        match phase {
            Phase::Normal | Phase::AfterCallbacks => {}
            Phase::ReleasePool => {
                let storage = self.pools[p as usize].kind.storage();
                for q in 0..self.pools.len() as u32 {
                    if self.pools[q as usize].kind.storage() == storage {
                        self.release_cached_in(backend, q, false, notes)?;
                    }
                }
            }
            Phase::ReleaseAll => {
                self.wait_all_pending(backend, notes);
                for q in 0..self.pools.len() as u32 {
                    self.release_cached_in(backend, q, false, notes)?;
                }
            }
        }
        if phase != Phase::Normal {
            self.poll_pending(backend, notes);
        }
        if let Some(slot) = self.take_cached(p, size) {
            self.recycle(slot, requested, notes);
            return Ok(Some(slot));
        }
        let small = size <= crate::cache::SMALL_LIMIT;
        if self.caps.page_mapping {
            if self.pools[p as usize].kind.storage() == crate::Storage::Private {
                self.mark_epoch(backend, p);
            }
            if !self.retiring.is_empty() {
                self.process_retiring(backend, None, notes)?;
            }
            self.trim_stale_pages(backend, p, notes)?;
        }
        // A miss. For a large buffer, cached buffers go back to heap space first, so placement
        // sees every free byte coalesced (a cached buffer left in place would split the space
        // around it, and large buffers are what fragmentation is made of). Small buffers share
        // pages by the hundred: for them, free space is tried first and the cache kept warm;
        // then the smallest cached buffer that holds the request is split, as a best-fit heap
        // would, and only then is the whole cache dissolved (emptying it made every request
        // after it miss until frees had filled it again: 15% of the medium latency loop's
        // engine allocations missed, 9.8% now; the replays do not change).
        if !small {
            self.dissolve_cache(p);
        } else if let Some(slot) = self.place_mapped(p, size, requested, notes) {
            return Ok(Some(slot));
        } else {
            if let Some((_, slot)) = self.pools[p as usize].cache.take_fit(size, usize::MAX) {
                self.dissolve(slot);
                if let Some(slot) = self.place_mapped(p, size, requested, notes) {
                    return Ok(Some(slot));
                }
            }
            self.dissolve_cache(p);
        }
        if let Some(slot) = self.place_mapped(p, size, requested, notes) {
            return Ok(Some(slot));
        }
        // Buffers freed while other streams used them (`record_stream`) wait for their events;
        // those whose events have completed since come back before memory grows. PyTorch's own
        // allocator looks at its events on every allocation; here only a miss that would grow
        // pays for the queries, which is where a held-back buffer costs memory.
        if !self.pending.is_empty() && phase == Phase::Normal {
            self.poll_pending(backend, notes);
            if let Some(slot) = self.take_cached(p, size) {
                self.recycle(slot, requested, notes);
                return Ok(Some(slot));
            }
            self.dissolve_cache(p);
            if let Some(slot) = self.place_mapped(p, size, requested, notes) {
                return Ok(Some(slot));
            }
        }
        // Small buffers cached in threads' front caches come back before memory grows (they
        // would pin pages the pool then maps again elsewhere).
        if self.pools[p as usize].kind.is_small() && self.return_fronts(false, false) > 0 {
            self.dissolve_cache(p);
            if let Some(slot) = self.place_mapped(p, size, requested, notes) {
                return Ok(Some(slot));
            }
        }
        // Over the low watermark, growing is the last resort: give back idle memory first.
        if self.limits.low_limit != usize::MAX
            && self.driver_estimate() + size > self.limits.low_limit
        {
            self.garbage_collect_default(backend, notes)?;
            if let Some(slot) = self.place_mapped(p, size, requested, notes) {
                return Ok(Some(slot));
            }
        }
        let paged = self.caps.page_mapping
            && self.pools[p as usize].kind.storage() == crate::Storage::Private;
        if paged {
            if let Some(slot) = self.grow_paged(backend, p, size, requested, notes)? {
                return Ok(Some(slot));
            }
            // Memory cannot grow (the high watermark, or the device is full): mapped pages
            // inside a free range, past an unmapped start, still serve.
            Ok(self.place_mapped_inside(p, size, requested, notes))
        } else {
            self.grow_heap(backend, p, size, requested, notes)
        }
    }

    /// Places in heap space that needs no new memory.
    fn place_mapped(
        &mut self,
        p: u32,
        size: usize,
        requested: usize,
        notes: &mut Notes,
    ) -> Option<u32> {
        let (h, off) = self.pools[p as usize].best_fit(size, true)?;
        Some(self.place(p, h, off, size, requested, notes))
    }

    /// Places on mapped pages anywhere inside a free range (placement otherwise tries only
    /// the start of each range): a scan of every free range, for when memory cannot grow.
    fn place_mapped_inside(
        &mut self,
        p: u32,
        size: usize,
        requested: usize,
        notes: &mut Notes,
    ) -> Option<u32> {
        let (h, start, off) = self.pools[p as usize].mapped_fit_inside(size)?;
        self.shortfall = None;
        if off == start {
            return Some(self.place(p, h, off, size, requested, notes));
        }
        self.pools[p as usize].take_inside(h, start, off, size);
        Some(self.place_taken(p, h, off, size, requested, notes))
    }

    /// Page-mapped growth: the free range needing the fewest new pages gets them mapped, in
    /// runs of at least `map_chunk` bytes; a new address range only when none fits.
    fn grow_paged(
        &mut self,
        backend: &B,
        p: u32,
        size: usize,
        requested: usize,
        notes: &mut Notes,
    ) -> Result<Option<u32>> {
        let g = self.caps.granularity;
        let fit = match self.pools[p as usize].least_unmapped_fit(size, FIT_CANDIDATES) {
            Some((h, off, _)) => (h, off),
            None => {
                let Some(span) = self.total_memory.max(size).div_ceil(g).checked_mul(g) else {
                    self.shortfall = Some(crate::error::OomCause::Backend(format!(
                        "an address range of {} does not fit in the address space",
                        format_size(self.total_memory.max(size))
                    )));
                    return Ok(None);
                };
                let Some(h) = self.new_heap(backend, p, span, true, true)? else {
                    return Ok(None);
                };
                (h, 0)
            }
        };
        let (h, off) = fit;
        // Pages under the request that wait to be unmapped are needed again: their retirement
        // is cancelled before the retirements below are processed, which would otherwise
        // unmap them under the new buffer (they count as mapped in `runs`).
        let pool = &mut self.pools[p as usize];
        if let Some(pages) = pool.heap_mut(h).pages.as_mut() {
            pool.retiring -= pages.cancel_retiring(off, size) * g;
        }
        let mut runs = pages_of(self, p, h).unmapped_runs(off, size, 1);
        let mut need: usize = runs.iter().map(|r| r.1 * g).sum();
        if need > 0 {
            // The budget: reserved may exceed the most bytes ever placed in this pool by the
            // idle fraction (plus two pages). Below it, growth just maps; above it, idle pages
            // elsewhere go back first, those idle the longest first. So nothing is unmapped
            // while memory falls or while it climbs back to an earlier peak, and reserved
            // bytes track live bytes at every new peak.
            // The fraction scales up while the budget keeps unmapping pages that are mapped
            // again soon after (see `Churn`).
            let now = self.clock();
            let pool = &mut self.pools[p as usize];
            let fraction = self.config.idle_page_fraction
                * pool.churn.scale_at(now, self.config.unmap_rate_limit) as f64;
            let placed_peak = pool.peak_placed.max(pool.placed + size);
            let budget = ((placed_peak as f64 * (1.0 + fraction)) as usize).saturating_add(2 * g);
            // When over budget, trim down to the middle of the band so that the next few
            // growths find headroom without another trim (hysteresis).
            let low_mark =
                ((placed_peak as f64 * (1.0 + fraction * TRIM_TO)) as usize).saturating_add(g);
            let kept = pool.reserved - pool.retiring;
            let over = if kept + need > budget {
                (kept + need).saturating_sub(low_mark)
            } else {
                0
            };
            // Consecutive growth (a burst, such as a first forward pass) maps in doubling
            // chunks within the budget's headroom, so a cold start costs few calls.
            let max_burst = self.config.map_chunk.div_ceil(g).max(1);
            pool.burst_pages = if pool
                .last_growth
                .is_some_and(|last| now.saturating_sub(last) <= BURST_WINDOW)
            {
                (pool.burst_pages * 2).clamp(1, max_burst)
            } else {
                1
            };
            pool.last_growth = Some(now);
            let burst_pages = pool.burst_pages;
            if over > 0 {
                // Pages idle for fewer than `min_idle_age` allocations are the holes that
                // temporaries left a moment ago, nearly always filled again within the step:
                // the trim takes older pages only, unless the pool is far over its budget
                // ([`FRESH_PAGES_BUDGET`] times the fraction), where fresh pages go too, down
                // to that bound.
                let min_age = self.config.min_idle_age;
                let surplus =
                    pages_of(self, p, h).surplus_runs(over.div_ceil(g), off, size, now, min_age);
                self.pools[p as usize].churn.unmapped(surplus.len());
                self.retire_pages(backend, p, h, surplus, notes)?;
                self.process_retiring(backend, Some(p), notes)?;
                if min_age > 0 {
                    let pool = &self.pools[p as usize];
                    let bound = ((placed_peak as f64 * (1.0 + FRESH_PAGES_BUDGET * fraction))
                        as usize)
                        .saturating_add(2 * g);
                    let kept = pool.reserved - pool.retiring;
                    if kept + need > bound {
                        let more = (kept + need - bound).div_ceil(g);
                        let fresh = pages_of(self, p, h).surplus_runs(more, off, size, now, 0);
                        self.pools[p as usize].churn.unmapped(fresh.len());
                        self.retire_pages(backend, p, h, fresh, notes)?;
                        self.process_retiring(backend, Some(p), notes)?;
                    }
                }
            }
            let pool = &self.pools[p as usize];
            let headroom = budget.saturating_sub(pool.reserved - pool.retiring + need) / g;
            // Only growth past the most the pool ever placed maps ahead: there the pool climbs
            // into new ground and the next buffers will need pages too. Below that peak it is
            // filling a layout it had before, and pages mapped ahead would be idle pages
            // raising the peak of reserved bytes.
            let climbing = pool.placed + size >= pool.peak_placed;
            let extra = if climbing {
                burst_pages.saturating_sub(1).min(headroom)
            } else {
                0
            };
            if extra > 0 {
                // The chunk extends the last run only (the one at the request's end), by
                // `extra` pages: the headroom bounds what is mapped ahead, whatever the runs
                // before it.
                let last = runs.last().map_or(0, |r| r.1);
                runs = pages_of(self, p, h).unmapped_runs(off, size, last + extra);
                need = runs.iter().map(|r| r.1 * g).sum();
            }
            // Pages still waiting for the device before they can be unmapped count as
            // reserved. Where mapping now would reserve more than ever before, wait for the
            // device to pass them first, in every pool (the peak is the engine's): the lag
            // must not set the peak.
            let reserved = &self.stats.reserved_bytes[0];
            if reserved.current as usize + need > reserved.peak as usize
                && self.pools.iter().any(|q| q.retiring > 0)
            {
                self.wait_retiring(backend, None, notes)?;
            }
        }
        if need > 0 {
            // What other allocations hold now, before the limit is checked.
            self.refresh_external(backend);
        }
        if !self.within_high(need) {
            // Without the chunk extension the request may still fit under the limit.
            runs = pages_of(self, p, h).unmapped_runs(off, size, 1);
            need = runs.iter().map(|r| r.1 * g).sum();
            if !self.within_high(need) {
                return Ok(None);
            }
            self.shortfall = None;
        }
        if !self.map_runs(backend, p, h, runs)? {
            // The device may still hold the request without the pages mapped ahead.
            let exact = pages_of(self, p, h).unmapped_runs(off, size, 1);
            if !self.map_runs(backend, p, h, exact)? {
                return Ok(None);
            }
            self.shortfall = None;
        }
        Ok(Some(self.place(p, h, off, size, requested, notes)))
    }

    /// Maps `runs` in order; false at the first the device has no memory for.
    fn map_runs(&mut self, backend: &B, p: u32, h: u32, runs: Vec<PageRun>) -> Result<bool> {
        for run in runs {
            if !self.map_run(backend, p, h, run)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Growth by a new committed heap, sized like PyTorch's native segments: 2 MiB for small
    /// requests, 20 MiB below 10 MiB, else the request rounded to 2 MiB.
    fn grow_heap(
        &mut self,
        backend: &B,
        p: u32,
        size: usize,
        requested: usize,
        notes: &mut Notes,
    ) -> Result<Option<u32>> {
        let kind = self.pools[p as usize].kind;
        let (heap_size, split) = if kind.is_small() {
            (2 * MIB, true)
        } else if size < 10 * MIB {
            (20 * MIB, true)
        } else {
            (size.div_ceil(2 * MIB) * 2 * MIB, false)
        };
        self.place_in_new_heap(backend, p, (heap_size, split), size, requested, notes)
    }

    /// Places a request of `size` at the start of a new committed heap of `heap.0` bytes
    /// (split into several buffers if `heap.1`). Where the high watermark or the device
    /// refuses that heap, one of the request's own size (rounded to 2 MiB) may still fit, and
    /// a request that fits is not refused (the seed gives up there).
    fn place_in_new_heap(
        &mut self,
        backend: &B,
        p: u32,
        (heap_size, split): (usize, bool),
        size: usize,
        requested: usize,
        notes: &mut Notes,
    ) -> Result<Option<u32>> {
        self.refresh_external(backend);
        let mut heap = self.new_heap(backend, p, heap_size, split, false)?;
        let own = size.div_ceil(2 * MIB) * 2 * MIB;
        if heap.is_none() && heap_size > own {
            heap = self.new_heap(backend, p, own, false, false)?;
        }
        let Some(h) = heap else { return Ok(None) };
        Ok(Some(self.place(p, h, 0, size, requested, notes)))
    }

    /// Gives back pages that no buffer has used for `stale_page_age` allocations (stale
    /// layouts, chunks mapped ahead and never used). Looks at most every
    /// [`STALE_CHECK_EVERY`] allocations.
    fn trim_stale_pages(&mut self, backend: &B, p: u32, notes: &mut Notes) -> Result<()> {
        let now = self.clock();
        let age = self.config.stale_page_age;
        let pool = &mut self.pools[p as usize];
        if age == u64::MAX || now.saturating_sub(pool.last_stale_check) < STALE_CHECK_EVERY {
            return Ok(());
        }
        pool.last_stale_check = now;
        let heaps: Vec<u32> = pool
            .heap_slots()
            .filter(|&h| pool.heap(h).pages.is_some())
            .collect();
        for h in heaps {
            let runs = pages_of(self, p, h).surplus_runs(usize::MAX, 0, 0, now, age);
            self.retire_pages(backend, p, h, runs, notes)?;
        }
        self.process_retiring(backend, Some(p), notes)
    }

    /// Over the low watermark: every cached buffer dissolved, every idle page unmapped,
    /// every empty committed heap released.
    fn garbage_collect_default(&mut self, backend: &B, notes: &mut Notes) -> Result<()> {
        let before = self.reserved_total();
        // Buffers cached in threads' front caches hold pages too.
        self.return_fronts(false, false);
        for q in 0..self.pools.len() as u32 {
            self.release_cached_in(backend, q, false, notes)?;
        }
        let reclaimed = before - self.reserved_total();
        if reclaimed > 0 {
            self.stats.num_gc_passes += 1;
        }
        if self.debug & debug::RELEASES != 0 {
            tracing::info!(target: "bufferheap", "Garbage collected {} over the low watermark", format_size(reclaimed));
        }
        Ok(())
    }

    /// Dissolves pool `q`'s cached buffers, unmaps its idle pages and releases its empty
    /// heaps (page-mapped address ranges too with `paged_too`).
    pub fn release_cached_in(
        &mut self,
        backend: &B,
        q: u32,
        paged_too: bool,
        notes: &mut Notes,
    ) -> Result<()> {
        self.dissolve_cache(q);
        self.trim_idle_pages(backend, q, 0, notes)?;
        self.release_empty_heaps(backend, q, paged_too, notes)
    }

    // ---- mps policy ----------------------------------------------------------------------

    fn mps_step(
        &mut self,
        backend: &B,
        p: u32,
        size: usize,
        requested: usize,
        phase: Phase,
        notes: &mut Notes,
    ) -> Result<Option<u32>> {
        let kind = self.pools[p as usize].kind;
        let mut pressure = !kind.is_small() && self.low_watermark_value() == 0;
        match phase {
            Phase::Normal => {
                // Buffers whose events completed since are back in their pools, as the seed's
                // completion handlers put scalar buffers back on their own.
                if !self.pending.is_empty() {
                    self.poll_pending(backend, notes);
                }
                if let Some(slot) =
                    self.mps_get_free_buffer(p, size, requested, &mut pressure, notes)
                {
                    return Ok(Some(slot));
                }
                if pressure && size < self.pools[p as usize].cache.bytes() {
                    self.mps_garbage_collect(backend, p, notes)?;
                }
                // As under the default policy, small buffers cached in threads' front caches
                // come back before a small pool grows a heap.
                if kind.is_small()
                    && self.pools[p as usize].best_fit(size, false).is_none()
                    && self.return_fronts(false, false) > 0
                    && let Some(slot) =
                        self.mps_get_free_buffer(p, size, requested, &mut pressure, notes)
                {
                    return Ok(Some(slot));
                }
                self.mps_alloc_buffer(backend, p, size, requested, pressure, notes)
            }
            Phase::AfterCallbacks => {
                self.poll_pending(backend, notes);
                Ok(self.mps_get_free_buffer(p, size, requested, &mut pressure, notes))
            }
            Phase::ReleasePool => {
                if !self.mps_release_available(backend, p, size, notes)? {
                    return Ok(None);
                }
                self.mps_alloc_buffer(backend, p, size, requested, pressure, notes)
            }
            Phase::ReleaseAll => {
                self.wait_all_pending(backend, notes);
                for q in 0..self.pools.len() as u32 {
                    self.mps_release_pool(backend, q, notes)?;
                }
                self.mps_alloc_buffer(backend, p, size, requested, pressure, notes)
            }
        }
    }

    /// MiB of headroom below the low limit (`usize::MAX` when disabled).
    pub fn low_watermark_value(&self) -> usize {
        if self.limits.low_ratio == 0.0 {
            return usize::MAX;
        }
        self.limits.low_limit.saturating_sub(self.driver_estimate()) / MIB
    }

    /// The seed's `get_free_buffer`.
    fn mps_get_free_buffer(
        &mut self,
        p: u32,
        size: usize,
        requested: usize,
        pressure: &mut bool,
        notes: &mut Notes,
    ) -> Option<u32> {
        if !self.within_high(size) {
            return None;
        }
        let pool = &mut self.pools[p as usize];
        if self.limits.low_ratio > 0.0 && !pool.kind.is_small() {
            pool.clock += 1;
        }
        let found = pool.cache.smallest_at_least(size)?;
        if found <= size + MPS_REUSE_SLACK {
            let slot = pool.cache.take_exact(found)?;
            self.recycle(slot, requested, notes);
            return Some(slot);
        }
        // Oversize: let a heap with room serve the request, else give the block's space back
        // to its heap so the next step can place there.
        if pool.largest_free() >= size {
            return None;
        }
        let slot = pool.cache.take_exact(found)?;
        self.dissolve(slot);
        *pressure = false;
        None
    }

    /// The seed's `alloc_buffer`: best fit in the pool's heaps, else a new heap.
    fn mps_alloc_buffer(
        &mut self,
        backend: &B,
        p: u32,
        size: usize,
        requested: usize,
        pressure: bool,
        notes: &mut Notes,
    ) -> Result<Option<u32>> {
        if !self.within_high(size) {
            return Ok(None);
        }
        if let Some((h, off)) = self.pools[p as usize].best_fit(size, false) {
            return Ok(Some(self.place(p, h, off, size, requested, notes)));
        }
        let heap = self.mps_heap_size(size, pressure);
        self.place_in_new_heap(backend, p, heap, size, requested, notes)
    }

    /// The seed's heap sizes.
    pub fn mps_heap_size(&self, size: usize, pressure: bool) -> (usize, bool) {
        let xlarge = if self.caps.unified_memory {
            1024 * MIB
        } else {
            128 * MIB
        };
        if size <= MIB {
            (8 * MIB, true)
        } else if size < 10 * MIB {
            (32 * MIB, true)
        } else if size < xlarge / 2 && !pressure {
            (xlarge, true)
        } else {
            (size.div_ceil(2 * MIB) * 2 * MIB, false)
        }
    }

    /// Releases one cached buffer: its space goes back to the heap, and the heap to the
    /// backend if it is left empty and `remove_empty_heap` is set.
    fn mps_release_buffer(
        &mut self,
        backend: &B,
        slot: u32,
        remove_empty_heap: bool,
        notes: &mut Notes,
    ) -> Result<usize> {
        let size = self.records[slot as usize].size;
        let (p, h) = self.dissolve(slot);
        if remove_empty_heap && self.pools[p as usize].heap(h).n_buffers == 0 {
            self.release_heap(backend, p, h, notes)?;
        }
        Ok(size)
    }

    /// The seed's `release_available_cached_buffers`: the smallest cached buffer that covers
    /// the request, or else the largest ones until the request is covered.
    fn mps_release_available(
        &mut self,
        backend: &B,
        p: u32,
        size: usize,
        notes: &mut Notes,
    ) -> Result<bool> {
        let pool = &mut self.pools[p as usize];
        if pool.cache.len() == 0 {
            return Ok(false);
        }
        if let Some(found) = pool.cache.smallest_at_least(size)
            && let Some(slot) = pool.cache.take_exact(found)
        {
            self.mps_release_buffer(backend, slot, true, notes)?;
            return Ok(true);
        }
        let mut entries = self.pools[p as usize].cache.entries();
        let mut released = 0;
        while released < size {
            let Some((s, slot)) = entries.pop() else {
                break;
            };
            self.pools[p as usize].cache.remove(s, slot);
            released += self.mps_release_buffer(backend, slot, true, notes)?;
        }
        Ok(released >= size)
    }

    /// Releases every cached buffer of pool `q` and every heap left empty (including heaps
    /// emptied earlier by garbage collection, which the seed never releases).
    pub fn mps_release_pool(&mut self, backend: &B, q: u32, notes: &mut Notes) -> Result<()> {
        let entries = self.pools[q as usize].cache.drain();
        if !entries.is_empty() && self.debug & debug::RELEASES != 0 {
            let bytes: usize = entries.iter().map(|e| e.0).sum();
            tracing::info!(
                target: "bufferheap",
                "Releasing {} buffers from {} pool (total size: {})",
                entries.len(), self.pools[q as usize].kind.name(), format_size(bytes)
            );
        }
        // Every drained buffer is released even if one heap's release fails: one left out of
        // the cache but still cached would hold its heap for good.
        let mut first_error = None;
        for (_, slot) in entries {
            if let Err(e) = self.mps_release_buffer(backend, slot, true, notes) {
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        self.release_empty_heaps(backend, q, true, notes)
    }

    /// The seed's garbage collection: over the low limit, release cached buffers at least as
    /// old as the average, smallest first, in passes, until the excess is reclaimed.
    fn mps_garbage_collect(&mut self, backend: &B, p: u32, notes: &mut Notes) -> Result<()> {
        let driver = self.driver_estimate();
        if driver < self.limits.low_limit {
            return Ok(());
        }
        let target = driver - self.limits.low_limit;
        // Buffers cached in threads' front caches are candidates too.
        self.return_fronts(false, false);
        let clock = self.pools[p as usize].clock;
        let mut candidates: Vec<(usize, u32, u64)> = self.pools[p as usize]
            .cache
            .entries()
            .into_iter()
            .map(|(size, slot)| (size, slot, clock - self.records[slot as usize].cached_at))
            .collect();
        let mut total_age: u64 = candidates.iter().map(|c| c.2).sum();
        let mut n = candidates.len() as u64;
        let mut reclaimed = 0;
        let mut count = 0;
        while reclaimed < target && n > 0 {
            let mut freed_in_pass = 0;
            let mut i = 0;
            while i < candidates.len() && reclaimed < target {
                let (size, slot, age) = candidates[i];
                // age >= total_age / n, the mean, without rounding it down.
                if age as u128 * n as u128 >= total_age as u128
                    && self.records[slot as usize].state == BufState::Cached
                {
                    self.pools[p as usize].cache.remove(size, slot);
                    let split = self.pools[p as usize]
                        .heap(self.records[slot as usize].heap)
                        .split;
                    reclaimed += self.mps_release_buffer(backend, slot, !split, notes)?;
                    total_age -= age;
                    n -= 1;
                    freed_in_pass += 1;
                    candidates.remove(i);
                    continue;
                }
                i += 1;
            }
            count += freed_in_pass;
            if freed_in_pass == 0 {
                break;
            }
        }
        if count > 0 {
            self.stats.num_gc_passes += 1;
        }
        if self.debug & debug::RELEASES != 0 {
            tracing::info!(
                target: "bufferheap",
                "Garbage collected {} buffers from {} pool (total reclaimed: {})",
                count, self.pools[p as usize].kind.name(), format_size(reclaimed)
            );
        }
        Ok(())
    }
}

fn pages_of<B: Backend>(state: &State<B>, p: u32, h: u32) -> &crate::pages::Pages {
    state.pools[p as usize]
        .heap(h)
        .pages
        .as_ref()
        .expect("paged heap")
}
