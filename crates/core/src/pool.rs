//! Pools and heaps: where buffers are placed.
//!
//! A pool serves one kind of request (private/shared x small/large, or scalars) on one stream.
//! It owns heaps (regions from the backend) and places buffers in them by best fit with
//! coalescing, keeping all metadata out of band.
//!
//! Invariants:
//! - each heap's `free` ranges are disjoint and non-adjacent (neighbours are always merged);
//!   ranges and offsets are multiples of [`ALIGN`];
//! - the pool's `free_index` holds exactly one `(len, heap, offset)` entry per free range of
//!   every heap of the pool, so a best-fit lookup across heaps is one search
//!   ([`crate::free_space`]);
//! - a heap's `n_buffers` counts the buffers placed in it (in use, cached or pending); a heap
//!   with `n_buffers == 0` has one free range covering it all;
//! - for page-mapped heaps, the page table records exactly the pages the backend has mapped,
//!   and `reserved` (the pool's share of reserved bytes) counts mapped bytes; for other heaps
//!   it counts their whole size.

use crate::backend::{Region, Storage, StreamId};
use crate::cache::BufferCache;
use crate::free_space::{FreeEntry, FreeRanges, SizeIndex};
use crate::pages::Pages;

/// Alignment and rounding of every buffer.
pub const ALIGN: usize = 512;
/// Near best fit (see [`Pool::best_fit`]): free ranges up to 3/4 longer than the best one
/// compete on address.
const NEAR_FIT_SLACK_MUL: usize = 3;
const NEAR_FIT_SLACK_DIV: usize = 4;
/// Candidates of the size index a near best fit looks at before falling back to the first
/// mapped range (bounds the lookup; the replays are the same from 4 to 256).
const NEAR_FIT_CANDIDATES: usize = 8;

/// The five kinds of pool of the seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum PoolKind {
    PrivateSmall,
    PrivateLarge,
    SharedSmall,
    SharedLarge,
    Scalar,
}

impl PoolKind {
    pub const ALL: [PoolKind; 5] = [
        PoolKind::PrivateSmall,
        PoolKind::PrivateLarge,
        PoolKind::SharedSmall,
        PoolKind::SharedLarge,
        PoolKind::Scalar,
    ];

    pub fn storage(self) -> Storage {
        match self {
            PoolKind::PrivateSmall | PoolKind::PrivateLarge => Storage::Private,
            _ => Storage::Shared,
        }
    }

    pub fn is_small(self) -> bool {
        matches!(
            self,
            PoolKind::PrivateSmall | PoolKind::SharedSmall | PoolKind::Scalar
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            PoolKind::PrivateSmall => "small private",
            PoolKind::PrivateLarge => "large private",
            PoolKind::SharedSmall => "small shared",
            PoolKind::SharedLarge => "large shared",
            PoolKind::Scalar => "small shared scalar",
        }
    }

    /// The `torch.cuda.memory_stats()` pool group this kind reports under.
    pub fn stat_group(self) -> usize {
        match self {
            PoolKind::PrivateSmall | PoolKind::SharedSmall => 1,
            PoolKind::PrivateLarge | PoolKind::SharedLarge => 2,
            PoolKind::Scalar => 3,
        }
    }

    /// The group a buffer of `size` (rounded) bytes in a pool of this kind counts under:
    /// small buffers (up to [`crate::cache::SMALL_LIMIT`]) count as `small_pool` wherever
    /// they live, since a page-mapped large private pool holds small buffers too. Heaps and
    /// their reserved bytes count under the pool's own group ([`PoolKind::stat_group`]).
    pub fn buffer_group(self, size: usize) -> usize {
        match self {
            PoolKind::PrivateLarge if size <= crate::cache::SMALL_LIMIT => 1,
            _ => self.stat_group(),
        }
    }
}

/// One region from the backend, sub-allocated by the pool.
#[derive(Debug)]
pub(crate) struct Heap {
    pub id: u64,
    pub region: Region,
    /// Holds many buffers (false: dedicated to one large buffer).
    pub split: bool,
    pub free: FreeRanges,
    pub n_buffers: u32,
    pub pages: Option<Pages>,
}

impl Heap {
    pub fn reserved_bytes(&self) -> usize {
        match &self.pages {
            Some(p) => p.mapped_bytes(),
            None => self.region.size,
        }
    }

    pub fn largest_free(&self) -> usize {
        self.free.largest()
    }
}

/// Allocations over which a pool's unmap rate is measured.
const CHURN_WINDOW: u64 = 4096;
/// The most the idle-page budget of a pool is scaled up.
const MAX_BUDGET_SCALE: u32 = 64;
/// Quiet windows (a quarter of the tolerated unmap rate at most) before the scale halves.
const QUIET_WINDOWS: u32 = 64;

/// The idle-page budget's feedback on map/unmap churn. A pool whose budget unmaps more than
/// the configured rate is trading calls for bytes it then maps again (layouts that differ a
/// little from one step to the next, sizes that wander): its budget doubles, up to
/// [`MAX_BUDGET_SCALE`] times the configured fraction, until the unmaps stop; after
/// [`QUIET_WINDOWS`] quiet windows it halves again, so a phase of churn does not hold memory
/// for ever. Windows close at growth (the only time the budget is read), so one spanning a
/// long quiet spell counts as the windows it covers.
#[derive(Debug, Clone)]
pub(crate) struct Churn {
    /// The budget's multiplier: a power of two in `1..=MAX_BUDGET_SCALE`.
    pub scale: u32,
    window_start: u64,
    window_unmaps: u64,
    quiet_windows: u32,
}

impl Default for Churn {
    fn default() -> Self {
        Churn {
            scale: 1,
            window_start: 0,
            window_unmaps: 0,
            quiet_windows: 0,
        }
    }
}

impl Churn {
    /// The scale at allocation clock `now`, closing the window if it is over. `limit` is
    /// the unmaps per 1000 allocations tolerated (0: the scale stays 1).
    pub fn scale_at(&mut self, now: u64, limit: f64) -> u32 {
        if limit <= 0.0 {
            self.scale = 1;
            return 1;
        }
        let elapsed = now.saturating_sub(self.window_start);
        if elapsed >= CHURN_WINDOW {
            let rate = self.window_unmaps as f64 * 1000.0 / elapsed as f64;
            if rate > limit {
                self.scale = (self.scale * 2).min(MAX_BUDGET_SCALE);
                self.quiet_windows = 0;
            } else if rate <= limit / 4.0 {
                // A long spell without growth counts as the windows it spans.
                let windows = (elapsed / CHURN_WINDOW).min(u32::MAX as u64) as u32;
                self.quiet_windows = self.quiet_windows.saturating_add(windows);
                while self.quiet_windows >= QUIET_WINDOWS && self.scale > 1 {
                    self.scale /= 2;
                    self.quiet_windows -= QUIET_WINDOWS;
                }
            }
            self.window_start = now;
            self.window_unmaps = 0;
        }
        self.scale
    }

    /// Counts runs the budget chose to unmap.
    pub fn unmapped(&mut self, runs: usize) {
        self.window_unmaps += runs as u64;
    }
}

#[derive(Debug)]
pub(crate) struct Pool {
    pub kind: PoolKind,
    pub stream: StreamId,
    pub heaps: Vec<Option<Heap>>,
    free_heap_slots: Vec<u32>,
    free_index: SizeIndex<FreeEntry>,
    pub cache: BufferCache,
    /// Allocation attempts on this pool: the clock that ages cached buffers for GC.
    pub clock: u64,
    /// Reserved bytes of this pool's heaps (mapped bytes for page-mapped heaps).
    pub reserved: usize,
    /// Bytes of buffers placed in this pool's heaps (in use, cached, pending).
    pub placed: usize,
    /// The most bytes ever placed at once.
    pub peak_placed: usize,
    /// Allocation clock of the last growth (none yet: the first growth is no burst's
    /// continuation), and the pages the current burst maps at a time.
    pub last_growth: Option<u64>,
    pub burst_pages: usize,
    /// Allocation clock of the last look for stale pages.
    pub last_stale_check: u64,
    /// Mapped bytes scheduled to be unmapped (retiring pages).
    pub retiring: usize,
    /// How often the idle-page budget made this pool unmap, and the budget's scale.
    pub churn: Churn,
}

impl Pool {
    pub fn new(kind: PoolKind, stream: StreamId) -> Pool {
        Pool {
            kind,
            stream,
            heaps: Vec::new(),
            free_heap_slots: Vec::new(),
            free_index: SizeIndex::default(),
            cache: BufferCache::default(),
            clock: 0,
            reserved: 0,
            placed: 0,
            peak_placed: 0,
            last_growth: None,
            burst_pages: 1,
            last_stale_check: 0,
            retiring: 0,
            churn: Churn::default(),
        }
    }

    pub fn heap(&self, h: u32) -> &Heap {
        self.heaps[h as usize].as_ref().expect("heap slot in use")
    }

    pub fn heap_mut(&mut self, h: u32) -> &mut Heap {
        self.heaps[h as usize].as_mut().expect("heap slot in use")
    }

    pub fn heap_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.heaps
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_some())
            .map(|(i, _)| i as u32)
    }

    pub fn heap_count(&self) -> usize {
        self.heaps.len() - self.free_heap_slots.len()
    }

    /// Adds a heap whose whole range is free.
    pub fn add_heap(&mut self, id: u64, region: Region, split: bool, pages: Option<Pages>) -> u32 {
        let size = region.size;
        let heap = Heap {
            id,
            region,
            split,
            free: FreeRanges::whole(size),
            n_buffers: 0,
            pages,
        };
        self.reserved += heap.reserved_bytes();
        let slot = match self.free_heap_slots.pop() {
            Some(s) => {
                self.heaps[s as usize] = Some(heap);
                s
            }
            None => {
                self.heaps.push(Some(heap));
                (self.heaps.len() - 1) as u32
            }
        };
        self.free_index.insert((size, slot, 0));
        slot
    }

    /// Removes a heap that holds no buffer and returns it.
    pub fn remove_heap(&mut self, h: u32) -> Heap {
        let heap = self.heaps[h as usize].take().expect("heap slot in use");
        debug_assert_eq!(heap.n_buffers, 0);
        for (off, len) in heap.free.iter() {
            self.free_index.remove(&(len, h, off));
        }
        self.reserved -= heap.reserved_bytes();
        self.free_heap_slots.push(h);
        heap
    }

    /// The best free range of at least `len` bytes: the smallest one; among equals, the
    /// lowest heap slot and offset. With `mapped_only`, only ranges whose first `len` bytes
    /// lie on mapped pages (or in heaps without a page table) qualify, and the fit is a near
    /// best fit: among the qualifying ranges at most 3/4 longer than the smallest one (within
    /// the first [`NEAR_FIT_CANDIDATES`] of the index), the lowest heap slot and offset.
    ///
    /// Why near best, lowest address: pure best fit scatters buffers over whichever holes
    /// happen to fit them best, all over the range; taking the lowest of the nearly-as-good
    /// holes packs the range toward its start, so the holes that buffers freed together
    /// leave are neighbours more often and merge, and the top of the range stays free for
    /// the large buffers that fit no hole (replays of the recorded training traces: reserved
    /// over live 0.1% lower on average, 0.2% on GPT-2, ResNet-50 1.0101 -> 1.0088;
    /// BENCHMARKS.md). Address order alone, without the bound, was much worse (ResNet-50
    /// 1.0154): it splits large holes for small buffers.
    pub fn best_fit(&self, len: usize, mapped_only: bool) -> Option<(u32, usize)> {
        if !mapped_only {
            return self
                .free_index
                .at_least(len)
                .next()
                .map(|(_, h, off)| (h, off));
        }
        let qualifies = |h: u32, off: usize| match &self.heap(h).pages {
            Some(p) => p.is_mapped(off, len),
            None => true,
        };
        let mut bound = usize::MAX;
        let mut pick: Option<(u32, usize)> = None;
        let mut candidates = self.free_index.at_least(len);
        for (range, h, off) in candidates.by_ref().take(NEAR_FIT_CANDIDATES) {
            if range > bound {
                break;
            }
            // Only a lower address than the pick so far can replace it.
            if pick.is_some_and(|best| (h, off) >= best) || !qualifies(h, off) {
                continue;
            }
            if pick.is_none() {
                bound = range.saturating_add(range / NEAR_FIT_SLACK_DIV * NEAR_FIT_SLACK_MUL);
            }
            pick = Some((h, off));
        }
        if pick.is_some() {
            return pick;
        }
        // Mapped space lies in holes between buffers, which are few compared with the
        // index; stop at the first range whose start is mapped.
        candidates.find_map(|(_, h, off)| qualifies(h, off).then_some((h, off)))
    }

    /// A place for `len` bytes on mapped pages anywhere inside a free range, not only at its
    /// start: `(heap, range start, offset)`, the lowest offset of the smallest such range.
    /// Scans every free range of page-mapped heaps: for when memory cannot grow.
    pub fn mapped_fit_inside(&self, len: usize) -> Option<(u32, usize, usize)> {
        let mut best: Option<(usize, u32, usize, usize)> = None;
        for h in self.heap_slots() {
            let heap = self.heap(h);
            let Some(pages) = heap.pages.as_ref() else {
                continue;
            };
            for (start, range) in heap.free.iter() {
                if range < len || best.is_some_and(|(b, _, _, _)| range >= b) {
                    continue;
                }
                if let Some(off) = pages.mapped_window(start, start + range, len) {
                    best = Some((range, h, start, off));
                }
            }
        }
        best.map(|(_, h, start, off)| (h, start, off))
    }

    /// Takes `[at, at + len)` out of the middle of the free range starting at `start` in
    /// heap `h`: what lies before `at` stays free as a range of its own.
    pub fn take_inside(&mut self, h: u32, start: usize, at: usize, len: usize) {
        debug_assert!(at > start, "a window at the range's start is `take`");
        let heap = self.heaps[h as usize].as_mut().expect("heap slot in use");
        let range_len = heap
            .free
            .take_front(start, at - start + len)
            .expect("a window inside a free range");
        // Nothing free touches `[start, at)` now: it comes back as a range of its own.
        heap.free.give(start, at - start);
        self.free_index.remove(&(range_len, h, start));
        self.free_index.insert((at - start, h, start));
        if range_len > at - start + len {
            self.free_index
                .insert((range_len - (at - start) - len, h, at + len));
        }
        heap.n_buffers += 1;
        self.placed += len;
        self.peak_placed = self.peak_placed.max(self.placed);
    }

    /// Among free ranges of at least `len`, the one needing the fewest unmapped pages at its
    /// start (ties: smallest range), looking at no more than `limit` candidates.
    pub fn least_unmapped_fit(&self, len: usize, limit: usize) -> Option<(u32, usize, usize)> {
        let mut best: Option<(usize, u32, usize)> = None;
        for (_, h, off) in self.free_index.at_least(len).take(limit) {
            let heap = self.heap(h);
            let missing = heap
                .pages
                .as_ref()
                .map_or(0, |p| p.unmapped_pages(off, len));
            if best.is_none_or(|(m, _, _)| missing < m) {
                best = Some((missing, h, off));
                if missing == 0 {
                    break;
                }
            }
        }
        best.map(|(m, h, off)| (h, off, m))
    }

    /// Takes `[off, off + len)` out of the free range starting at `off` in heap `h`.
    pub fn take(&mut self, h: u32, off: usize, len: usize) {
        let heap = self.heaps[h as usize].as_mut().expect("heap slot in use");
        let range_len = heap
            .free
            .take_front(off, len)
            .expect("placement at the start of a free range long enough");
        self.free_index.remove(&(range_len, h, off));
        if range_len > len {
            self.free_index.insert((range_len - len, h, off + len));
        }
        heap.n_buffers += 1;
        self.placed += len;
        self.peak_placed = self.peak_placed.max(self.placed);
    }

    /// Returns `[off, off + len)` of heap `h` to its free space, merging neighbours.
    pub fn give_back(&mut self, h: u32, off: usize, len: usize) {
        let heap = self.heaps[h as usize].as_mut().expect("heap slot in use");
        let (mut start, mut merged) = (off, len);
        for (s, l) in heap.free.give(off, len).into_iter().flatten() {
            self.free_index.remove(&(l, h, s));
            start = start.min(s);
            merged += l;
        }
        self.free_index.insert((merged, h, start));
        heap.n_buffers -= 1;
        self.placed -= len;
    }

    /// Heaps holding no buffer.
    pub fn empty_heaps(&self) -> Vec<u32> {
        self.heap_slots()
            .filter(|&h| self.heap(h).n_buffers == 0)
            .collect()
    }

    /// The largest free range over all heaps.
    pub fn largest_free(&self) -> usize {
        self.free_index.last().map_or(0, |(len, _, _)| len)
    }

    /// Mapped bytes with no buffer on them, over the page-mapped heaps.
    pub fn idle_mapped_bytes(&self) -> usize {
        self.heaps
            .iter()
            .flatten()
            .filter_map(|h| h.pages.as_ref())
            .map(Pages::idle_bytes)
            .sum()
    }

    /// Number of free ranges (a fragmentation figure).
    pub fn free_ranges(&self) -> usize {
        self.free_index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(size: usize) -> Region {
        Region {
            base: 1 << 20,
            size,
            host_base: None,
            handle: 0,
        }
    }

    #[test]
    fn best_fit_and_coalescing() {
        let mut pool = Pool::new(PoolKind::PrivateLarge, 0);
        let h = pool.add_heap(1, region(8192), true, None);
        pool.take(h, 0, 1024);
        pool.take(h, 1024, 1024);
        pool.take(h, 2048, 1024);
        assert_eq!(pool.best_fit(512, false), Some((h, 3072)));
        pool.give_back(h, 0, 1024);
        assert_eq!(
            pool.best_fit(512, false),
            Some((h, 0)),
            "smallest range wins"
        );
        pool.give_back(h, 2048, 1024);
        pool.give_back(h, 1024, 1024);
        assert_eq!(pool.heap(h).free.len(), 1, "all neighbours merged");
        assert_eq!(pool.largest_free(), 8192);
        assert_eq!(pool.empty_heaps(), vec![h]);
        pool.remove_heap(h);
        assert_eq!(pool.best_fit(512, false), None);
    }
}
