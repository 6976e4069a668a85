//! Heaps and pages: reserving and releasing heaps, mapping and unmapping pages of
//! page-mapped heaps, and unmapping safely while the device may still be working.
//!
//! Invariants: the page table and the counters change only after the backend call they
//! describe succeeded; a page is unmapped only once the work queued on its pool's stream
//! before the page fell idle has completed (an event was waited on, or a retirement event
//! completed and no buffer was placed on the page since — the ticket proves it — or an
//! epoch event recorded after the page fell idle completed).
//!
//! Epochs: every [`EPOCH_EVERY`] allocations a page-mapped pool records an event on its
//! stream. A page idle since before a completed epoch event can be unmapped at once: all the
//! work that used it was queued before that event. The device runs behind the host (by up to
//! a training step), so an event recorded when pages are chosen would hold them — mapped and
//! counted — while the growth that chose them maps new ones.

use crate::backend::Backend;
use crate::callbacks::{CallbackEvent, Notes};
use crate::config::debug;
use crate::error::{OomCause, Result};
use crate::format::format_size;
use crate::history::TraceAction;
use crate::pages::{PageRun, Pages};
use crate::pool::ALIGN;

use super::state::{Retiring, State};

/// Allocations between two epoch events of a page-mapped pool.
pub(crate) const EPOCH_EVERY: u64 = 64;
/// Epoch events a pool keeps waiting on at most (older ones are dropped: they only help).
const EPOCHS_PENDING: usize = 64;

/// A pool's epoch events (see the module's note).
#[derive(Debug)]
pub(crate) struct Epochs<E> {
    /// The clock at the last recording.
    last: u64,
    /// The clock of the newest epoch known complete (0: none).
    done: u64,
    /// Recorded, not known complete, oldest first.
    pending: std::collections::VecDeque<(u64, E)>,
}

/// Blocks until `event` completes unless it has already; true if it really waited.
pub(crate) fn wait_if_pending<B: Backend>(
    backend: &B,
    event: &B::Event,
) -> std::result::Result<bool, crate::backend::BackendError> {
    if matches!(backend.event_complete(event), Ok(true)) {
        return Ok(false);
    }
    backend.wait_event(event)?;
    Ok(true)
}

impl<B: Backend> State<B> {
    // ---- heaps and pages -----------------------------------------------------------------

    /// Reserves a heap of `size` bytes for pool `p`. `Ok(None)` when the high watermark or
    /// the backend's lack of memory refuses it (the shortfall says which).
    pub fn new_heap(
        &mut self,
        backend: &B,
        p: u32,
        size: usize,
        split: bool,
        paged: bool,
    ) -> Result<Option<u32>> {
        let g = self.caps.granularity.max(ALIGN);
        let size = size.div_ceil(g).saturating_mul(g);
        if !paged && !self.within_high(size) {
            return Ok(None);
        }
        let kind = self.pools[p as usize].kind;
        let region = match backend.reserve(size, kind.storage(), !paged) {
            Ok(r) => r,
            Err(e) if e.out_of_memory => {
                self.shortfall = Some(OomCause::Backend(e.message));
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let id = self.next_heap_id;
        self.next_heap_id += 1;
        let pages =
            paged.then(|| Pages::new(size, self.caps.granularity, self.caps.physical_block));
        let pool = &mut self.pools[p as usize];
        let h = pool.add_heap(id, region, split, pages);
        let reserved = pool.heap(h).reserved_bytes() as u64;
        let sg = kind.stat_group();
        for i in [0, sg] {
            self.stats.reserved_bytes[i].add(reserved);
            self.stats.segment[i].add(1);
        }
        if !paged {
            self.stats.num_device_alloc += 1;
            let (base, stream) = (
                self.pools[p as usize].heap(h).region.base,
                self.pools[p as usize].stream,
            );
            self.trace(TraceAction::SegmentAlloc, base, size, stream);
        }
        if self.debug & debug::ALLOCATIONS != 0 {
            tracing::info!(
                target: "bufferheap",
                "Allocated {} heap id {} of size {}{} (#heaps: {}, reserved: {})",
                kind.name(), id, format_size(size), if paged { " (address space)" } else { "" },
                self.pools[p as usize].heap_count(), format_size(self.reserved_total())
            );
        }
        Ok(Some(h))
    }

    /// Gives an empty heap back to the backend.
    pub fn release_heap(&mut self, backend: &B, p: u32, h: u32, notes: &mut Notes) -> Result<()> {
        if self.pools[p as usize].heap(h).pages.is_some() {
            self.quiesce(backend, p, notes)?;
        }
        let heap = self.pools[p as usize].heap(h);
        debug_assert_eq!(heap.n_buffers, 0);
        let mapped_runs: Vec<PageRun> = heap
            .pages
            .as_ref()
            .map(|pg| pg.idle_runs(usize::MAX))
            .unwrap_or_default();
        // Unmap first so that a failure leaves the accounting true.
        for run in mapped_runs {
            self.unmap_run(backend, p, h, run, notes)?;
        }
        let region = self.pools[p as usize].heap(h).region.clone();
        backend.release(&region)?;
        let heap = self.pools[p as usize].remove_heap(h);
        // A retirement left in the heap (its event could not be queried) goes with it.
        self.retiring.retain(|r| r.pool != p || r.heap != h);
        let kind = self.pools[p as usize].kind;
        let g = kind.stat_group();
        for i in [0, g] {
            self.stats.reserved_bytes[i].sub(heap.reserved_bytes() as u64);
            self.stats.segment[i].sub(1);
        }
        if heap.pages.is_none() {
            self.stats.num_device_free += 1;
            notes.push(region.base, CallbackEvent::Released);
            let stream = self.pools[p as usize].stream;
            self.trace(TraceAction::SegmentFree, region.base, region.size, stream);
        }
        if self.debug & debug::RELEASES != 0 {
            tracing::info!(
                target: "bufferheap",
                "Released {} heap id {} of size {} (reserved: {})",
                kind.name(), heap.id, format_size(region.size), format_size(self.reserved_total())
            );
        }
        Ok(())
    }

    /// Maps a run of pages of a page-mapped heap. `Ok(false)` when the backend is out of
    /// memory (the shortfall says so).
    pub fn map_run(&mut self, backend: &B, p: u32, h: u32, run: PageRun) -> Result<bool> {
        let pool = &self.pools[p as usize];
        let heap = pool.heap(h);
        let g = heap
            .pages
            .as_ref()
            .map_or(self.caps.granularity, |pg| pg.granularity);
        let start = std::time::Instant::now();
        let mapped = backend.map(&heap.region, run.0 * g, run.1 * g);
        self.stats.page_call_us += start.elapsed().as_micros() as u64;
        match mapped {
            Ok(()) => {}
            Err(e) if e.out_of_memory => {
                self.shortfall = Some(OomCause::Backend(e.message));
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        let clock = self.clock();
        let pool = &mut self.pools[p as usize];
        let extents = match pool.heap_mut(h).pages.as_mut() {
            Some(pages) => pages.mark_mapped(run, clock),
            None => 1,
        };
        let bytes = run.1 * g;
        pool.reserved += bytes;
        let sg = pool.kind.stat_group();
        for i in [0, sg] {
            self.stats.reserved_bytes[i].add(bytes as u64);
        }
        self.stats.num_map_calls += 1;
        self.stats.num_physical_allocs += extents as u64;
        self.stats.num_device_alloc += 1;
        let (base, stream) = (
            self.pools[p as usize].heap(h).region.base,
            self.pools[p as usize].stream,
        );
        self.trace(
            TraceAction::SegmentMap,
            base + (run.0 * g) as u64,
            bytes,
            stream,
        );
        Ok(true)
    }

    /// Unmaps a run of idle pages.
    pub fn unmap_run(
        &mut self,
        backend: &B,
        p: u32,
        h: u32,
        run: PageRun,
        notes: &mut Notes,
    ) -> Result<()> {
        let pool = &self.pools[p as usize];
        let heap = pool.heap(h);
        let g = heap
            .pages
            .as_ref()
            .map_or(self.caps.granularity, |pg| pg.granularity);
        let start = std::time::Instant::now();
        let unmapped = backend.unmap(&heap.region, run.0 * g, run.1 * g);
        self.stats.page_call_us += start.elapsed().as_micros() as u64;
        unmapped?;
        let addr = heap.region.base + (run.0 * g) as u64;
        let pool = &mut self.pools[p as usize];
        if let Some(pages) = pool.heap_mut(h).pages.as_mut() {
            // Pages unmapped while retiring (a trim after a wait whose event query failed)
            // are no longer retiring.
            pool.retiring -= pages.mark_unmapped(run) * g;
        }
        let bytes = run.1 * g;
        pool.reserved -= bytes;
        let sg = pool.kind.stat_group();
        for i in [0, sg] {
            self.stats.reserved_bytes[i].sub(bytes as u64);
        }
        self.stats.num_unmap_calls += 1;
        self.stats.num_device_free += 1;
        notes.push(addr, CallbackEvent::Released);
        let stream = self.pools[p as usize].stream;
        self.trace(TraceAction::SegmentUnmap, addr, bytes, stream);
        Ok(())
    }

    /// Unmaps idle pages of pool `p` until at most `keep` idle bytes remain, highest
    /// addresses first (placement prefers low addresses, so those are reused last).
    pub fn trim_idle_pages(
        &mut self,
        backend: &B,
        p: u32,
        keep: usize,
        notes: &mut Notes,
    ) -> Result<usize> {
        if self.pools[p as usize].idle_mapped_bytes() <= keep {
            return Ok(0);
        }
        self.quiesce(backend, p, notes)?;
        let mut idle = self.pools[p as usize].idle_mapped_bytes();
        let mut unmapped = 0;
        let heaps: Vec<u32> = self.pools[p as usize].heap_slots().collect();
        for h in heaps.into_iter().rev() {
            if idle <= keep {
                break;
            }
            let Some(pages) = self.pools[p as usize].heap(h).pages.as_ref() else {
                continue;
            };
            let g = pages.granularity;
            let surplus_pages = (idle - keep).div_ceil(g);
            for run in pages.idle_runs(surplus_pages) {
                self.unmap_run(backend, p, h, run, notes)?;
                idle -= run.1 * g;
                unmapped += run.1 * g;
            }
        }
        Ok(unmapped)
    }

    /// Waits until the device has finished the work queued on pool `p`'s stream, so that its
    /// idle pages can be unmapped at once, and unmaps what was retiring there.
    pub fn quiesce(&mut self, backend: &B, p: u32, notes: &mut Notes) -> Result<()> {
        let event = backend.record_event(self.pools[p as usize].stream)?;
        let start = std::time::Instant::now();
        if wait_if_pending(backend, &event)? {
            self.stats.note_device_wait(start);
        }
        self.process_retiring(backend, Some(p), notes)
    }

    /// Records an epoch event on pool `p`'s stream if [`EPOCH_EVERY`] allocations passed
    /// since the last one. A failed recording is only a lost opportunity.
    pub fn mark_epoch(&mut self, backend: &B, p: u32) {
        let now = self.clock();
        let epochs = self.epochs.entry(p as u64).or_insert_with(|| Epochs {
            last: 0,
            done: 0,
            pending: Default::default(),
        });
        if now < epochs.last + EPOCH_EVERY {
            return;
        }
        epochs.last = now;
        if let Ok(event) = backend.record_event(self.pools[p as usize].stream) {
            if epochs.pending.len() == EPOCHS_PENDING {
                epochs.pending.pop_front();
            }
            epochs.pending.push_back((now, event));
        }
    }

    /// True if an epoch event of pool `p` recorded after clock `since` has completed.
    fn epoch_passed(&mut self, backend: &B, p: u32, since: u64) -> bool {
        let Some(epochs) = self.epochs.get_mut(&(p as u64)) else {
            return false;
        };
        while let Some((clock, event)) = epochs.pending.front() {
            if epochs.done > since || !matches!(backend.event_complete(event), Ok(true)) {
                break;
            }
            epochs.done = *clock;
            epochs.pending.pop_front();
        }
        epochs.done > since
    }

    /// Schedules page runs of heap `h` for unmapping once the work queued so far on the
    /// pool's stream is done (buffers freed there may still be read or written by it). No
    /// CPU wait: the runs are unmapped by a later [`State::process_retiring`]; runs idle since
    /// before a completed epoch are unmapped now.
    pub fn retire_pages(
        &mut self,
        backend: &B,
        p: u32,
        h: u32,
        runs: Vec<PageRun>,
        notes: &mut Notes,
    ) -> Result<()> {
        let stream = self.pools[p as usize].stream;
        let g = self.caps.granularity;
        for run in runs {
            let idle_since = self.pools[p as usize]
                .heap(h)
                .pages
                .as_ref()
                .map_or(u64::MAX, |pages| pages.newest_idle_since(run));
            if self.epoch_passed(backend, p, idle_since) {
                self.unmap_run(backend, p, h, run, notes)?;
                continue;
            }
            // One event per run keeps the bookkeeping simple; recording is cheap.
            let event = backend.record_event(stream)?;
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            let pool = &mut self.pools[p as usize];
            if let Some(pages) = pool.heap_mut(h).pages.as_mut() {
                pages.set_retiring(run, ticket);
            }
            pool.retiring += run.1 * g;
            self.retiring.push(Retiring {
                pool: p,
                heap: h,
                run,
                ticket,
                event,
            });
        }
        Ok(())
    }

    /// Waits for the events of the retiring runs (of pool `only`, or of every pool), then
    /// unmaps them.
    pub fn wait_retiring(
        &mut self,
        backend: &B,
        only: Option<u32>,
        notes: &mut Notes,
    ) -> Result<()> {
        let start = std::time::Instant::now();
        let mut waited = false;
        for r in self
            .retiring
            .iter()
            .filter(|r| only.is_none_or(|p| p == r.pool))
        {
            waited |= wait_if_pending(backend, &r.event)?;
        }
        if waited {
            self.stats.note_device_wait(start);
        }
        self.process_retiring(backend, only, notes)
    }

    /// Unmaps retiring runs whose event has completed (only in pool `only`, when given),
    /// skipping pages a buffer was placed on meanwhile.
    pub fn process_retiring(
        &mut self,
        backend: &B,
        only: Option<u32>,
        notes: &mut Notes,
    ) -> Result<()> {
        let mut i = 0;
        while i < self.retiring.len() {
            let r = &self.retiring[i];
            let done = only.is_none_or(|p| p == r.pool)
                && matches!(backend.event_complete(&r.event), Ok(true));
            if !done {
                i += 1;
                continue;
            }
            let r = self.retiring.swap_remove(i);
            let g = self.caps.granularity;
            let pool = &mut self.pools[r.pool as usize];
            let (still_idle, voided) = match pool.heap_mut(r.heap).pages.as_mut() {
                Some(pages) => pages.take_retired(r.run, r.ticket),
                None => (Vec::new(), 0),
            };
            pool.retiring -= (still_idle.iter().map(|run| run.1).sum::<usize>() + voided) * g;
            for run in still_idle {
                self.unmap_run(backend, r.pool, r.heap, run, notes)?;
            }
        }
        Ok(())
    }

    /// Releases every empty heap of pool `p` (with `paged_too`, page-mapped ones as well).
    pub fn release_empty_heaps(
        &mut self,
        backend: &B,
        p: u32,
        paged_too: bool,
        notes: &mut Notes,
    ) -> Result<()> {
        for h in self.pools[p as usize].empty_heaps() {
            if paged_too || self.pools[p as usize].heap(h).pages.is_none() {
                self.release_heap(backend, p, h, notes)?;
            }
        }
        Ok(())
    }
}
