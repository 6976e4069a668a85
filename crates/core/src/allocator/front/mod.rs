//! Front caches: the hot path of a thread that frees and reallocates small buffers, in front
//! of the engine's lock.
//!
//! The engine serialises every call on one lock, so threads allocating at once would take
//! turns and bounce its cache lines between cores. Instead, a small buffer freed in the plain
//! way (small pool, used on its own stream only, no events to wait for) is *delegated* to the
//! freeing thread's front cache for this engine: a cache of exact sizes behind a mutex that
//! only its own thread takes on the hot path, so that lock is uncontended and no two threads
//! touch the same memory. The buffer is then allocated again from the front and freed into it
//! without the engine, until the engine takes it back.
//!
//! Invariants:
//! - A delegated buffer's record has state `Delegated` and names its front; the front's entry
//!   holds its true state (in use or cached), requested size and use count. Every engine path
//!   that acts on a record takes a delegated one back first (`State::reclaim`), so the engine
//!   never acts on stale fields; the one exception is a free from another thread, which the
//!   owning front performs itself (`State::free_to_owner`). A delegated buffer is never in a
//!   pool's cache.
//! - Counters: the engine's statistics plus every front's [`Delta`] are the true statistics.
//!   Delegating and reclaiming move a buffer without changing any counter; the hot path
//!   changes only its front's delta; [`State::fold_fronts`] adds deltas into the engine's
//!   statistics. Every read of the statistics folds every front first, so currents and
//!   cumulative counts are exact. An engine call folds only the calling thread's *window*
//!   (currents, peaks, the allocation clock): the engine decides nothing on cumulative
//!   counts.
//! - Peaks: a delta keeps the extremes it reached since its last fold; the fold adds them to
//!   the engine's counters as they are then. Every engine call first folds every front whose
//!   window changed (a flag read without the lock says which), and a change the engine makes
//!   to another thread's front is folded at once. So a peak is exact while every thread's
//!   front hits are followed by an engine call before another thread's front hits (one thread,
//!   or threads taking turns that reach the engine); otherwise, and while threads call at once
//!   (a front busy in its thread's hot path is skipped), a peak can be off by what other
//!   threads' fronts changed meanwhile, bounded by their capacity: the windows' changes are
//!   folded one front after another, not in the order they happened.
//! - A front's cached bytes never exceed its capacity; buffers it hands out are not limited
//!   (they are the caller's).
//! - Lock order: engine state, then a front. The hot path holds only its own front and never
//!   waits for the engine while holding it.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::Buffer;
use super::policy::SMALL_SLACK_DIV;
use super::state::{BufState, State};
use crate::backend::{Backend, StreamId};
use crate::pool::{ALIGN, PoolKind};
use crate::stats::Stats;

mod magazine;

pub(crate) use magazine::Entry;
use magazine::Magazine;

/// The pool groups a front's counters are kept for: "all" and "small_pool" (only small
/// buffers are delegated).
const GROUPS: [usize; 2] = [0, 1];
/// A buffer is delegated only if at least this many of its size fit in a front: a front
/// must hold several buffers of each size it serves to be hit, and larger buffers are fewer
/// and do more work per call, so the engine's lock costs them relatively little.
const DELEGATED_PER_CAPACITY: usize = 64;

/// The largest buffer a front of `capacity` bytes takes.
#[inline]
pub(crate) fn largest_delegated(capacity: usize) -> usize {
    capacity / DELEGATED_PER_CAPACITY
}

/// What a front's hot path did since its last fold. Every hot-path move is a cached buffer
/// going into use or back, so three running sums say it all: bytes, buffers and requested
/// bytes that went into use (negative: back to the cache). Allocated and active bytes move
/// with `bytes`, cached bytes against it; buffers in use and active buffers with `buffers`.
///
/// Two parts are folded at different times. The *window* (currents, their extremes, and the
/// number of allocations for the engine's clock) is folded on every engine call of the
/// owning thread, so that peaks stay exact; the *cumulative counts* only when the statistics
/// are read or the front is emptied, since nothing in the engine depends on them and adding
/// them costs as much again.
#[derive(Debug, Default)]
struct Delta {
    /// Running sums: bytes, buffers, requested bytes.
    now: [i64; 3],
    /// Their highest values since the last fold; `bytes_low` the lowest of `now[0]` (where
    /// cached bytes peaked). The engine's counters do not change between folds while this
    /// thread alone calls (every engine call folds first), so the engine's value at the fold
    /// plus these is the true peak of the window.
    high: [i64; 3],
    bytes_low: i64,
    /// True when the window changed since its last fold.
    dirty: bool,
    /// Cumulative: into use (bytes, buffers, requested), back to the cache (the same).
    taken: [u64; 3],
    returned: [u64; 3],
    /// `taken[1]` at the last fold of the window: the buffers taken since are the window's
    /// allocations, for the engine's clock.
    taken_at_window: u64,
}

/// Moves a counter by a window's change `now`, with `high` (>= `now`) the window's highest
/// change. Plain wrapping arithmetic: the true value never leaves `0..=u64::MAX`, and this is
/// on every engine call (saturating adds were half of the fold's instructions).
#[inline(always)]
fn shift(s: &mut crate::stats::Stat, now: i64, high: i64) {
    debug_assert!(high >= now && s.current.checked_add_signed(now).is_some());
    s.peak = s.peak.max(s.current.wrapping_add_signed(high));
    s.current = s.current.wrapping_add_signed(now);
}

impl Delta {
    /// A cached buffer of `size` bytes goes into use for `requested`. True if the window was
    /// clean before.
    #[inline(always)]
    fn take(&mut self, size: u64, requested: u64) -> bool {
        for (i, moved) in [size, 1, requested].into_iter().enumerate() {
            self.now[i] += moved as i64;
            self.taken[i] += moved;
            self.high[i] = self.high[i].max(self.now[i]);
        }
        !std::mem::replace(&mut self.dirty, true)
    }

    /// A buffer in use goes back to the cache. True if the window was clean before.
    #[inline(always)]
    fn give(&mut self, size: u64, requested: u64) -> bool {
        for (i, moved) in [size, 1, requested].into_iter().enumerate() {
            self.now[i] -= moved as i64;
            self.returned[i] += moved;
        }
        self.bytes_low = self.bytes_low.min(self.now[0]);
        !std::mem::replace(&mut self.dirty, true)
    }

    /// Adds the window into the engine's currents and peaks, and its allocations to the
    /// engine's `clock`; clears the window.
    #[inline]
    fn fold_window(&mut self, stats: &mut Stats, clock: &mut u64) {
        if !self.dirty {
            return;
        }
        let [bytes, buffers, requested] = self.now;
        let [bytes_high, buffers_high, requested_high] = self.high;
        for &g in &GROUPS {
            shift(&mut stats.allocated_bytes[g], bytes, bytes_high);
            shift(&mut stats.active_bytes[g], bytes, bytes_high);
            shift(&mut stats.requested_bytes[g], requested, requested_high);
            shift(&mut stats.allocation[g], buffers, buffers_high);
            shift(&mut stats.active[g], buffers, buffers_high);
            shift(&mut stats.cached_bytes[g], -bytes, -self.bytes_low);
        }
        *clock += self.taken[1] - self.taken_at_window;
        self.taken_at_window = self.taken[1];
        self.now = [0; 3];
        self.high = [0; 3];
        self.bytes_low = 0;
        self.dirty = false;
    }

    /// Adds the cumulative counts into the engine's and clears them; the window must have
    /// been folded first (its clock mark restarts with the counts).
    fn fold_counts(&mut self, stats: &mut Stats) {
        if self.taken == [0; 3] && self.returned == [0; 3] {
            return;
        }
        let ([bytes, buffers, requested], [bytes_back, buffers_back, requested_back]) =
            (self.taken, self.returned);
        for &g in &GROUPS {
            let moves = [
                (&mut stats.allocated_bytes[g], bytes, bytes_back),
                (&mut stats.active_bytes[g], bytes, bytes_back),
                (&mut stats.requested_bytes[g], requested, requested_back),
                (&mut stats.allocation[g], buffers, buffers_back),
                (&mut stats.active[g], buffers, buffers_back),
                (&mut stats.cached_bytes[g], bytes_back, bytes),
            ];
            for (s, up, down) in moves {
                s.allocated += up;
                s.freed += down;
            }
        }
        self.taken = [0; 3];
        self.returned = [0; 3];
        self.taken_at_window = 0;
    }
}

/// What the hot path of `free` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Freed {
    /// Freed into the front.
    Done,
    /// The buffer is delegated here and already free.
    DoubleFree,
    /// Not this front's to free (or the front is full or closed): ask the engine.
    Miss,
}

/// One thread's front cache on one engine.
#[derive(Debug)]
pub(crate) struct Front {
    pub engine: u64,
    pub id: u64,
    capacity: usize,
    closed: AtomicBool,
    /// The lowest and highest address ever delegated here (they only widen, under the
    /// engine's lock, by this front's own thread). A free outside them is not this front's
    /// and is told so without the lock: on page-mapped heaps the small buffers fronts hold
    /// come from an address range of their own, apart from the larger ones that go to the
    /// engine, whose frees would otherwise pay the lock and a lookup here first.
    lowest: AtomicU64,
    highest: AtomicU64,
    /// True while the window holds changes not folded into the engine: set by the owner,
    /// under the magazine's lock, when the window goes from clean to changed; cleared by the
    /// engine's fold. Read without the lock, so an engine call need not take every front's.
    window_changed: AtomicBool,
    /// A spin lock: its owner holds it for tens of nanoseconds, and unlocking it is a plain
    /// store, not an atomic read-modify-write (half the cost of the uncontended hot path).
    magazine: spin::mutex::SpinMutex<Magazine>,
}

impl Front {
    pub fn new(engine: u64, capacity: usize) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Front {
            engine,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            capacity,
            closed: AtomicBool::new(false),
            lowest: AtomicU64::new(u64::MAX),
            highest: AtomicU64::new(0),
            window_changed: AtomicBool::new(false),
            magazine: spin::mutex::SpinMutex::new(Magazine::default()),
        }
    }

    /// Folds the window of this front's delta (and with `counts`, its cumulative counts too)
    /// into the engine's statistics and clock; `m` is this front's magazine, locked by the
    /// caller. Every fold goes through here, so the changed flag is cleared with it.
    #[inline(always)]
    fn fold(&self, m: &mut Magazine, stats: &mut Stats, clock: &mut u64, counts: bool) {
        m.delta.fold_window(stats, clock);
        if counts {
            m.delta.fold_counts(stats);
        }
        self.window_changed.store(false, Ordering::Relaxed);
    }

    /// Widens the address bounds to `ptr` (before the buffer can be freed into this front).
    fn cover(&self, ptr: u64) {
        if ptr < self.lowest.load(Ordering::Relaxed) {
            self.lowest.store(ptr, Ordering::Relaxed);
        }
        if ptr > self.highest.load(Ordering::Relaxed) {
            self.highest.store(ptr, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    /// The hot path of an allocation: a cached buffer of exactly `aligned` bytes.
    #[inline]
    pub fn alloc(
        &self,
        stream: StreamId,
        kind: PoolKind,
        aligned: usize,
        requested: usize,
    ) -> Option<Buffer> {
        let mut guard = self.magazine.lock();
        let m = &mut *guard;
        let bins = m
            .bins
            .iter_mut()
            .find(|b| b.stream == stream && b.kind == kind)?;
        // Exactly this size, or one at most 1/SMALL_SLACK_DIV larger, as the engine's small
        // pools serve.
        let class = aligned / ALIGN;
        let idx = match bins.pop(class) {
            Some(idx) => idx,
            None => {
                let larger = bins.next_nonempty(class, class + class / SMALL_SLACK_DIV)?;
                bins.pop(larger)?
            }
        };
        m.usage.reused();
        let e = &mut m.entries[idx as usize];
        e.in_use = true;
        e.requested = requested;
        e.use_count += 1;
        let size = e.size;
        let buffer = Buffer {
            ptr: e.ptr,
            size: e.size,
            requested,
            id: e.id,
            storage: e.kind.storage(),
            host_ptr: e.host_ptr,
        };
        m.cached_bytes -= size;
        if m.delta.take(size as u64, requested as u64) {
            self.window_changed.store(true, Ordering::Release);
        }
        Some(buffer)
    }

    /// The hot path of a free: a buffer delegated to this front goes back into it.
    #[inline]
    pub fn free(&self, ptr: u64) -> Freed {
        if ptr < self.lowest.load(Ordering::Relaxed) || ptr > self.highest.load(Ordering::Relaxed) {
            return Freed::Miss;
        }
        let mut guard = self.magazine.lock();
        let m = &mut *guard;
        // Closed (under this lock, so no entry can come back after): the engine's now.
        if self.is_closed() {
            return Freed::Miss;
        }
        let Some(&idx) = m.index.get(&ptr) else {
            return Freed::Miss;
        };
        let e = &mut m.entries[idx as usize];
        if !e.in_use {
            return Freed::DoubleFree;
        }
        if m.cached_bytes + e.size > self.capacity {
            return Freed::Miss;
        }
        e.in_use = false;
        let (size, requested) = (e.size as u64, e.requested as u64);
        m.push_cached(idx);
        m.usage.entered();
        if m.delta.give(size, requested) {
            self.window_changed.store(true, Ordering::Release);
        }
        Freed::Done
    }
}

thread_local! {
    /// This thread's fronts, one per engine it freed small buffers on.
    static FRONTS: RefCell<Vec<Arc<Front>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's front for `engine`, if it has one.
#[inline]
pub(crate) fn with_own<R>(engine: u64, f: impl FnOnce(&Front) -> R) -> Option<R> {
    FRONTS
        .try_with(|fronts| {
            let fronts = fronts.try_borrow().ok()?;
            fronts.iter().find(|fr| fr.engine == engine).map(|fr| f(fr))
        })
        .ok()
        .flatten()
}

/// This thread's open front for `engine`, created (and returned as new) if it has none.
/// `None` while the thread is exiting.
fn own_or_new(engine: u64, capacity: usize) -> Option<(Arc<Front>, bool)> {
    FRONTS
        .try_with(|fronts| {
            let mut fronts = fronts.try_borrow_mut().ok()?;
            if let Some(fr) = fronts
                .iter()
                .find(|fr| fr.engine == engine && !fr.is_closed())
            {
                return Some((fr.clone(), false));
            }
            fronts.retain(|fr| !fr.is_closed());
            let fr = Arc::new(Front::new(engine, capacity));
            fronts.push(fr.clone());
            Some((fr, true))
        })
        .ok()
        .flatten()
}

impl<B: Backend> State<B> {
    /// Adds every front's delta into the statistics; with `wait`, waits for fronts in use by
    /// their threads, otherwise skips them.
    pub fn fold_fronts(&mut self, wait: bool) {
        for fr in &self.fronts {
            let guard = if wait {
                Some(fr.magazine.lock())
            } else {
                fr.magazine.try_lock()
            };
            if let Some(mut m) = guard {
                fr.fold(&mut m, &mut self.stats, &mut self.alloc_clock, true);
            }
        }
    }

    /// On the way into an engine call: folds the window of every front that changed since
    /// its last fold and is not busy (the calling thread's own never is), so that the engine
    /// changes its counters on top of everything done before (see the module's note on
    /// peaks). A front idle since its last fold costs one load here.
    pub fn fold_on_entry(&mut self) {
        let (stats, clock) = (&mut self.stats, &mut self.alloc_clock);
        for fr in &self.fronts {
            if !fr.window_changed.load(Ordering::Acquire) {
                continue;
            }
            if let Some(mut m) = fr.magazine.try_lock() {
                fr.fold(&mut m, stats, clock, false);
            }
        }
    }

    /// Takes a delegated buffer back from its front: it becomes an engine record again, in
    /// use or cached as it was there.
    pub fn reclaim(&mut self, slot: u32) {
        let rec = &self.records[slot as usize];
        if rec.state != BufState::Delegated {
            return;
        }
        let (ptr, front) = (rec.ptr, rec.front);
        let entry = self.fronts.iter().find(|fr| fr.id == front).and_then(|fr| {
            let mut guard = fr.magazine.lock();
            let m = &mut *guard;
            fr.fold(m, &mut self.stats, &mut self.alloc_clock, true);
            let idx = m.index.remove(&ptr)?;
            m.vacant.push(idx);
            let e = m.entries[idx as usize].clone();
            if !e.in_use {
                m.bins[e.bins as usize].remove(e.size / ALIGN, idx);
                m.cached_bytes -= e.size;
            }
            Some(e)
        });
        match entry {
            Some(e) => self.take_back(e),
            None => {
                // Not found: never hand the memory out again on a guess; keep it in use.
                debug_assert!(false, "delegated buffer {ptr:#x} missing from its front");
                self.records[slot as usize].state = BufState::InUse;
            }
        }
    }

    /// Makes a front's entry an engine record again.
    fn take_back(&mut self, e: Entry) {
        let rec = &mut self.records[e.slot as usize];
        rec.requested = e.requested;
        rec.use_count = e.use_count;
        rec.front = 0;
        if e.in_use {
            rec.state = BufState::InUse;
        } else {
            let pool = &mut self.pools[rec.pool as usize];
            rec.state = BufState::Cached;
            rec.cached_at = pool.clock;
            pool.cache.push(rec.size, e.slot);
        }
    }

    /// A buffer delegated to another thread's front and freed here goes back into that
    /// front: the thread that allocated it is the likeliest to ask for its size again (in a
    /// training step, the Python thread allocates activations that the autograd thread frees).
    /// `None` if the buffer is not delegated, or its owner's thread has exited: then every
    /// exited thread's front is emptied and forgotten first, so that what they held comes
    /// back now rather than when a thread next makes a front.
    #[inline]
    pub fn free_to_owner(&mut self, slot: u32, ptr: u64) -> Option<Freed> {
        let rec = &self.records[slot as usize];
        if rec.state != BufState::Delegated {
            return None;
        }
        let front = rec.front;
        let owner = self.fronts.iter().find(|fr| fr.id == front)?;
        if Arc::strong_count(owner) == 1 {
            self.forget_orphans();
            return None;
        }
        let freed = owner.free(ptr);
        // Folded at once: this change happens now, between engine calls of other threads,
        // and must not be folded later out of order with theirs.
        let mut m = owner.magazine.lock();
        owner.fold(&mut m, &mut self.stats, &mut self.alloc_clock, false);
        Some(freed)
    }

    /// Looks a pointer up, taking a delegated buffer back from its front first.
    pub fn resolve(&mut self, ptr: u64) -> Option<u32> {
        let slot = self.slot_of(ptr)?;
        self.reclaim(slot);
        Some(slot)
    }

    /// Takes back everything the fronts hold cached (and, with `in_use`, in use too; with
    /// `close`, the fronts are closed and forgotten: their threads go to the engine again).
    /// Returns the number of buffers taken back.
    pub fn return_fronts(&mut self, in_use: bool, close: bool) -> usize {
        if self.fronts.is_empty() {
            return 0;
        }
        let fronts = if close {
            std::mem::take(&mut self.fronts)
        } else {
            self.fronts.clone()
        };
        fronts
            .iter()
            .map(|fr| self.empty_front(fr, in_use, close))
            .sum()
    }

    /// Takes back what one front holds (see [`State::return_fronts`]); returns the count.
    fn empty_front(&mut self, fr: &Front, in_use: bool, close: bool) -> usize {
        let entries = {
            let mut m = fr.magazine.lock();
            // Buffers it handed out may be freed by the engine next: their allocation must
            // be in the engine's counters first.
            fr.fold(&mut m, &mut self.stats, &mut self.alloc_clock, true);
            if close {
                fr.closed.store(true, Ordering::Relaxed);
            }
            m.remove_all(in_use)
        };
        let returned = entries.len();
        for e in entries {
            self.take_back(e);
        }
        returned
    }

    /// Delegates a buffer just cached by `retire` to the calling thread's front.
    pub fn delegate(&mut self, slot: u32, engine: u64, capacity: usize) {
        let rec = &self.records[slot as usize];
        let (size, pool) = (rec.size, rec.pool);
        let kind = self.pools[pool as usize].kind;
        if rec.state != BufState::Cached
            || kind.buffer_group(size) != GROUPS[1]
            || size > largest_delegated(capacity)
        {
            return;
        }
        let Some((fr, new)) = own_or_new(engine, capacity) else {
            return;
        };
        if new {
            self.forget_orphans();
            self.fronts.push(fr.clone());
        }
        if !fr.magazine.lock().usage.take() || !self.pools[pool as usize].cache.remove(size, slot) {
            return;
        }
        let (region, offset) = self.region_of(slot);
        // As the engine describes a buffer: a host address for shared storage only.
        let host_ptr = (kind.storage() == crate::Storage::Shared)
            .then_some(region.host_base)
            .flatten()
            .map(|h| h + offset as u64);
        let rec = &mut self.records[slot as usize];
        rec.state = BufState::Delegated;
        rec.front = fr.id;
        let evicted = {
            let mut guard = fr.magazine.lock();
            let m = &mut *guard;
            // Full: the front's cached buffers go back to the engine (sizes in use change
            // over a program's phases; the new one is the likeliest to be asked for again).
            // Cached buffers move without changing any counter.
            let evicted = if m.cached_bytes + size > capacity {
                m.remove_all(false)
            } else {
                Vec::new()
            };
            let entry = Entry {
                ptr: rec.ptr,
                slot,
                size,
                requested: rec.requested,
                id: rec.id,
                use_count: rec.use_count,
                kind,
                host_ptr,
                in_use: false,
                bins: m.bins_index(rec.stream, kind),
            };
            let idx = match m.vacant.pop() {
                Some(i) => {
                    m.entries[i as usize] = entry;
                    i
                }
                None => {
                    m.entries.push(entry);
                    (m.entries.len() - 1) as u32
                }
            };
            m.index.insert(rec.ptr, idx);
            fr.cover(rec.ptr);
            m.push_cached(idx);
            m.usage.entered();
            evicted
        };
        for e in evicted {
            self.take_back(e);
        }
    }

    /// Forgets the fronts of threads that have exited (only the engine holds them now),
    /// taking back everything they held.
    #[cold]
    #[inline(never)]
    fn forget_orphans(&mut self) {
        let (orphans, live): (Vec<_>, Vec<_>) = std::mem::take(&mut self.fronts)
            .into_iter()
            .partition(|fr| Arc::strong_count(fr) == 1);
        self.fronts = live;
        for fr in orphans {
            self.empty_front(&fr, true, true);
        }
    }
}
