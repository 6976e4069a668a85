//! The engine's state under the allocator's lock, and the primitive moves on it.
//!
//! A buffer record lives in a slab; `by_ptr` maps every address handed out to its slot for as
//! long as the buffer is placed (in use, cached or pending), like the seed's
//! `m_allocated_buffers`. A record moves `InUse -> Cached` (or `InUse -> Pending -> Cached`
//! when events guard its reuse), `Cached -> InUse` when recycled, and `Cached -> Vacant` when
//! dissolved back into its heap's free space (at once for a buffer over 1 MiB on a page-mapped
//! heap under the default policy: see `State::cache`). `Cached <-> Delegated` while a thread's
//! front cache holds it (`front`).
//!
//! Invariants (checked by the property tests against a shadow model):
//! - placed buffers never overlap and lie inside their heap; `ptr = heap.base + offset`;
//! - with every front folded (`State::fold_fronts`), and counting each delegated buffer as its
//!   front says: `stats.allocated_bytes.all.current` = sum of sizes of `InUse` records; `active_bytes` =
//!   `InUse` + `Pending`; `cached_bytes` = `Cached`; `reserved_bytes` = sum of heaps'
//!   reserved bytes (mapped bytes on page-mapped heaps);
//! - a `Cached` record is in its pool's cache exactly once; a `Pending` record is in
//!   `pending` exactly once.

use std::sync::Arc;

pub(crate) use crate::addr_map::AddrMap;
use crate::backend::{Backend, BackendCaps, Region, Storage, StreamId};
use crate::callbacks::{CallbackEvent, Notes};
use crate::config::{Config, Policy, debug};
use crate::error::{Error, OomCause, Result};
use crate::format::format_size;
use crate::history::{History, TraceAction};
use crate::pages::PageRun;
use crate::pool::{Pool, PoolKind};
use crate::stats::Stats;

use super::limits::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BufState {
    Vacant,
    InUse,
    Cached,
    Pending,
    /// Handed to a thread's front cache, which knows whether it is in use (see `front`).
    Delegated,
}

#[derive(Debug)]
pub(crate) struct Record<E> {
    pub ptr: u64,
    pub size: usize,
    pub requested: usize,
    pub pool: u32,
    pub heap: u32,
    pub offset: usize,
    pub id: u64,
    pub state: BufState,
    pub shape: Vec<i64>,
    pub stream: StreamId,
    /// Other streams that use the buffer (`record_stream`); events are recorded on them at free.
    pub streams: Vec<StreamId>,
    /// Events that must complete before the buffer may be reused.
    pub events: Vec<Arc<E>>,
    /// The pool's clock when the buffer was cached (its age is measured from here).
    pub cached_at: u64,
    pub use_count: u32,
    /// The front cache holding a `Delegated` buffer (0 otherwise).
    pub front: u64,
    /// Its free completed already (callback fired, traced): it went back from the cache to
    /// wait for an event (`record_events` after the free), and its return to the cache is not
    /// a second free.
    pub free_completed: bool,
}

impl<E> Record<E> {
    /// Records the events that failed to record at free time (see `retire`), on their streams.
    fn record_missing_events<B: Backend<Event = E>>(&mut self, backend: &B) {
        let events = &mut self.events;
        self.streams
            .retain(|&stream| match backend.record_event(stream) {
                Ok(e) => {
                    events.push(Arc::new(e));
                    false
                }
                Err(_) => true,
            });
    }
}

/// True where private buffers larger than [`TINY_LIMIT`] share the large private pool (see
/// [`select_kind`]).
pub(crate) fn one_private_range(policy: Policy, caps: &BackendCaps) -> bool {
    policy == Policy::Default && caps.page_mapping
}

/// Private buffers up to this size keep a small pool of their own even where the others
/// share one range (see [`select_kind`]): they are the most numerous, and spread through
/// the large range they keep its physical pieces from going idle whole. Measured on the
/// replays (GPT-2 recorded twice, ResNet-50): sharing the range from 16 KiB up improves all
/// three; sharing it for every size improves the shipped traces but makes a second GPT-2
/// recording, and the live run on a GPU, reserve more. It is also the largest size threads'
/// front caches hold at their default capacity, so what they keep stays out of the large range.
pub(crate) const TINY_LIMIT: usize = 16 << 10;

/// The seed's pool selection (with its unified-memory rule for tiny tensors under `mps`),
/// except that under the default policy on a page-mapped backend private buffers larger than
/// [`TINY_LIMIT`] share one pool: one address range whose pages are mapped where buffers lie.
/// Small buffers then fill the holes between large ones, pages the pool has mapped anyway,
/// instead of a second range whose own peak and idle pages add to the first's (see `pool`).
pub(crate) fn select_kind(
    policy: Policy,
    caps: &BackendCaps,
    requested: usize,
    aligned: usize,
    storage: Storage,
    scalar: bool,
) -> PoolKind {
    if scalar {
        return PoolKind::Scalar;
    }
    if policy == Policy::Mps && requested <= 8 && caps.unified_memory && caps.shared_storage {
        return PoolKind::SharedSmall;
    }
    let small = aligned <= crate::cache::SMALL_LIMIT;
    match (storage, small) {
        (Storage::Private, true) if !one_private_range(policy, caps) || aligned <= TINY_LIMIT => {
            PoolKind::PrivateSmall
        }
        (Storage::Private, _) => PoolKind::PrivateLarge,
        (Storage::Shared, true) => PoolKind::SharedSmall,
        (Storage::Shared, false) => PoolKind::SharedLarge,
    }
}

/// Pages chosen to be unmapped, waiting for the device to finish the work queued before.
#[derive(Debug)]
pub(crate) struct Retiring<E> {
    pub pool: u32,
    pub heap: u32,
    pub run: PageRun,
    pub ticket: u64,
    pub event: E,
}

/// Why a step could not find memory; the last one becomes the out-of-memory cause.
pub(crate) type Shortfall = OomCause;

pub(crate) struct State<B: Backend> {
    pub policy: Policy,
    pub caps: BackendCaps,
    pub debug: u32,
    pub config: Config,
    pub pools: Vec<Pool>,
    /// Pools of non-default streams: one slot per kind (`u32::MAX` until created).
    pool_index: AddrMap<[u32; 5]>,
    pub records: Vec<Record<B::Event>>,
    free_slots: Vec<u32>,
    /// Scratch space for emptying a cache (kept, so the hot path does not allocate).
    dissolving: Vec<(usize, u32)>,
    pub by_ptr: AddrMap<u32>,
    pub pending: Vec<u32>,
    /// Page runs to unmap once their event completes.
    pub retiring: Vec<Retiring<B::Event>>,
    /// Epoch events of page-mapped pools, by pool (see `mapping`).
    pub(super) epochs: AddrMap<super::mapping::Epochs<B::Event>>,
    pub stats: Stats,
    /// Front caches of the threads using this engine (see `front`).
    pub fronts: Vec<Arc<super::front::Front>>,
    /// Allocations since this engine was made (the engine's, and fronts' as of their last
    /// fold): the clock that ages idle pages. Never reset, unlike the statistics.
    pub(super) alloc_clock: u64,
    /// The allocation history, when asked for.
    pub history: Option<History>,
    pub limits: Limits,
    /// Driver-reported memory in use that is not ours, sampled on slow paths.
    pub external: usize,
    pub total_memory: usize,
    pub shortfall: Option<Shortfall>,
    next_buffer_id: u64,
    pub(super) next_heap_id: u64,
    pub(super) next_ticket: u64,
}

impl<B: Backend> std::fmt::Debug for State<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("policy", &self.policy)
            .field("pools", &self.pools.len())
            .field("buffers", &self.by_ptr.len())
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<B: Backend> State<B> {
    pub fn new(caps: BackendCaps, config: Config, limits: Limits, total_memory: usize) -> Self {
        let pools = PoolKind::ALL.iter().map(|&k| Pool::new(k, 0)).collect();
        let history = (config.history > 0).then(|| History::new(config.history));
        State {
            policy: config.policy,
            caps,
            debug: config.debug,
            config,
            pools,
            pool_index: AddrMap::default(),
            records: Vec::new(),
            free_slots: Vec::new(),
            dissolving: Vec::new(),
            by_ptr: AddrMap::default(),
            pending: Vec::new(),
            retiring: Vec::new(),
            epochs: AddrMap::default(),
            stats: Stats::default(),
            fronts: Vec::new(),
            alloc_clock: 0,
            history,
            limits,
            external: 0,
            total_memory,
            shortfall: None,
            next_buffer_id: 1,
            next_heap_id: 1,
            next_ticket: 1,
        }
    }

    /// The pool for `kind` on `stream`, created on first use.
    #[inline]
    pub fn pool_for(&mut self, kind: PoolKind, stream: StreamId) -> u32 {
        let k = kind as usize;
        if stream == 0 {
            return k as u32;
        }
        let slots = self.pool_index.entry(stream).or_insert([u32::MAX; 5]);
        if slots[k] != u32::MAX {
            return slots[k];
        }
        self.pools.push(Pool::new(kind, stream));
        let p = (self.pools.len() - 1) as u32;
        self.pool_index.get_mut(&stream).expect("inserted above")[k] = p;
        p
    }

    /// The seed's pool selection (see [`select_kind`]).
    pub fn select_kind(
        &self,
        requested: usize,
        aligned: usize,
        storage: Storage,
        scalar: bool,
    ) -> PoolKind {
        select_kind(self.policy, &self.caps, requested, aligned, storage, scalar)
    }

    /// Appends to the history, when one is kept.
    #[inline]
    pub fn trace(&mut self, action: TraceAction, addr: u64, size: usize, stream: StreamId) {
        if let Some(h) = self.history.as_mut() {
            h.push(action, addr, size, stream);
        }
    }

    /// The history's entries, oldest first (empty unless one is kept).
    pub fn history_entries(&self) -> Vec<crate::TraceEntry> {
        self.history
            .as_ref()
            .map(|h| h.entries())
            .unwrap_or_default()
    }

    /// A clock that ticks once per allocation: ages idle pages.
    pub fn clock(&self) -> u64 {
        self.alloc_clock
    }

    pub fn reserved_total(&self) -> usize {
        self.stats.reserved_bytes[0].current as usize
    }

    /// Our estimate of what the driver holds for the process: our heaps plus others' memory.
    pub fn driver_estimate(&self) -> usize {
        self.reserved_total() + self.external
    }

    /// True if `extra` more bytes keep the process under the high watermark.
    pub fn within_high(&mut self, extra: usize) -> bool {
        if self.limits.high_limit == usize::MAX
            || self.driver_estimate() + extra <= self.limits.high_limit
        {
            return true;
        }
        self.shortfall = Some(OomCause::HighWatermark);
        false
    }

    pub fn refresh_external(&mut self, backend: &B) {
        let info = backend.memory_info();
        self.external = info
            .driver_allocated()
            .saturating_sub(self.reserved_total());
    }

    /// True if events of `bit` are logged for a buffer of `size` bytes in a `kind` pool.
    fn logs(&self, bit: u32, kind: PoolKind, size: usize) -> bool {
        self.debug & bit != 0
            && !(self.debug & debug::LARGE_ONLY != 0 && kind.buffer_group(size) != 2)
    }

    // ---- records -------------------------------------------------------------------------

    /// Hands out a cached record again.
    #[inline]
    pub fn recycle(&mut self, slot: u32, requested: usize, notes: &mut Notes) {
        let rec = &mut self.records[slot as usize];
        debug_assert_eq!(rec.state, BufState::Cached);
        rec.state = BufState::InUse;
        rec.requested = requested;
        rec.use_count += 1;
        let (size, ptr, pool) = (rec.size as u64, rec.ptr, rec.pool);
        let kind = self.pools[pool as usize].kind;
        let g = kind.buffer_group(size as usize);
        self.alloc_clock += 1;
        let s = &mut self.stats;
        for i in [0, g] {
            s.cached_bytes[i].sub(size);
            s.allocated_bytes[i].add(size);
            s.active_bytes[i].add(size);
            s.requested_bytes[i].add(requested as u64);
            s.allocation[i].add(1);
            s.active[i].add(1);
        }
        notes.push(ptr, CallbackEvent::Recycled);
        if self.history.is_some() {
            let stream = self.records[slot as usize].stream;
            self.trace(TraceAction::Alloc, ptr, requested, stream);
        }
        if self.logs(debug::RECYCLES, kind, size as usize) {
            let rec = &self.records[slot as usize];
            tracing::info!(
                target: "bufferheap",
                "Reusing {} buffer id {} of size {} at {:#x} (requested size: {}, use count: {})",
                kind.name(), rec.id, format_size(rec.size), rec.ptr, format_size(requested), rec.use_count
            );
        }
    }

    /// Places a new buffer at `[off, off + size)` of heap `h` in pool `p`; the pages under it
    /// must be mapped already.
    pub fn place(
        &mut self,
        p: u32,
        h: u32,
        off: usize,
        size: usize,
        requested: usize,
        notes: &mut Notes,
    ) -> u32 {
        self.pools[p as usize].take(h, off, size);
        self.place_taken(p, h, off, size, requested, notes)
    }

    /// The rest of [`State::place`], for space already taken out of the heap's free space.
    pub fn place_taken(
        &mut self,
        p: u32,
        h: u32,
        off: usize,
        size: usize,
        requested: usize,
        notes: &mut Notes,
    ) -> u32 {
        let pool = &mut self.pools[p as usize];
        let heap = pool.heap_mut(h);
        let cancelled = match heap.pages.as_mut() {
            Some(pages) => pages.occupy(off, size) * pages.granularity,
            None => 0,
        };
        pool.retiring -= cancelled;
        let heap = pool.heap(h);
        let ptr = heap.region.base + off as u64;
        let heap_id = heap.id;
        let (kind, stream) = (pool.kind, pool.stream);
        let id = self.next_buffer_id;
        self.next_buffer_id += 1;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                // A vacant record is filled in place: moving a new record over it would drop
                // its three vectors and copy the whole record on every placement.
                let r = &mut self.records[s as usize];
                debug_assert_eq!(r.state, BufState::Vacant);
                r.ptr = ptr;
                r.size = size;
                r.requested = requested;
                r.pool = p;
                r.heap = h;
                r.offset = off;
                r.id = id;
                r.state = BufState::InUse;
                r.shape.clear();
                r.stream = stream;
                r.streams.clear();
                r.events.clear();
                r.cached_at = 0;
                r.use_count = 1;
                r.front = 0;
                r.free_completed = false;
                s
            }
            None => {
                self.records.push(Record {
                    ptr,
                    size,
                    requested,
                    pool: p,
                    heap: h,
                    offset: off,
                    id,
                    state: BufState::InUse,
                    shape: Vec::new(),
                    stream,
                    streams: Vec::new(),
                    events: Vec::new(),
                    cached_at: 0,
                    use_count: 1,
                    front: 0,
                    free_completed: false,
                });
                (self.records.len() - 1) as u32
            }
        };
        self.by_ptr.insert(ptr, slot);
        let g = kind.buffer_group(size);
        self.alloc_clock += 1;
        let s = &mut self.stats;
        for i in [0, g] {
            s.allocated_bytes[i].add(size as u64);
            s.active_bytes[i].add(size as u64);
            s.requested_bytes[i].add(requested as u64);
            s.allocation[i].add(1);
            s.active[i].add(1);
        }
        notes.push(ptr, CallbackEvent::Allocated);
        self.trace(TraceAction::Alloc, ptr, requested, stream);
        if self.logs(debug::ALLOCATIONS, kind, size) {
            tracing::info!(
                target: "bufferheap",
                "Allocated {} buffer id {} of size {} at {:#x} from heap {} (requested size: {}, reserved: {})",
                kind.name(), id, format_size(size), ptr, heap_id, format_size(requested),
                format_size(self.reserved_total())
            );
        }
        slot
    }

    /// Takes a buffer out of use. Returns true if it went to the cache (false: it waits on
    /// events in `pending`).
    pub fn retire(&mut self, backend: &B, slot: u32, notes: &mut Notes) -> Result<bool> {
        if self.history.is_some() {
            let rec = &self.records[slot as usize];
            let (ptr, requested, stream) = (rec.ptr, rec.requested, rec.stream);
            self.trace(TraceAction::FreeRequested, ptr, requested, stream);
        }
        let rec = &mut self.records[slot as usize];
        if rec.streams.is_empty()
            && rec.events.is_empty()
            && self.pools[rec.pool as usize].kind != PoolKind::Scalar
        {
            // The common case: used on its own stream only, nothing to wait for.
            let (size, requested, g) = (
                rec.size as u64,
                rec.requested as u64,
                self.pools[rec.pool as usize].kind.buffer_group(rec.size),
            );
            if !rec.shape.is_empty() {
                rec.shape = Vec::new();
            }
            self.stats.buffer_out_of_use(g, size, requested);
            self.cache(slot, notes);
            return Ok(true);
        }
        let (size, requested, pool) = (rec.size as u64, rec.requested as u64, rec.pool);
        rec.shape = Vec::new();
        let kind = self.pools[pool as usize].kind;
        // Streams that used the buffer besides its own get an event now; a scalar buffer
        // was written by the host, so it waits for the device to consume it.
        let mut record_on = std::mem::take(&mut rec.streams);
        if kind == PoolKind::Scalar {
            record_on.push(rec.stream);
        }
        let mut event_error = None;
        for stream in record_on {
            match backend.record_event(stream) {
                Ok(e) => self.records[slot as usize].events.push(Arc::new(e)),
                Err(e) => {
                    // Without its event the buffer cannot be reused safely: it stays pending
                    // and the event is recorded again when pending buffers are polled.
                    self.records[slot as usize].streams.push(stream);
                    event_error = Some(e);
                }
            }
        }
        self.stats
            .buffer_out_of_use(kind.buffer_group(size as usize), size, requested);
        let rec = &mut self.records[slot as usize];
        rec.state = BufState::Pending;
        let mut idle = true;
        let mut query_error = None;
        rec.events.retain(|e| match backend.event_complete(e) {
            Ok(done) => {
                idle &= done;
                !done
            }
            Err(err) => {
                query_error = Some(err);
                idle = false;
                true
            }
        });
        if idle && event_error.is_none() {
            self.cache(slot, notes);
        } else {
            self.pending.push(slot);
        }
        match event_error.or(query_error) {
            // The buffer is safe in `pending` (it is never reused while an event is unknown);
            // the error still reaches the caller.
            Some(err) => Err(Error::Backend(err)),
            None => Ok(idle),
        }
    }

    /// A cached buffer that was given an event after its free (`record_events`) leaves the
    /// cache and waits for the event in `pending`, as one freed with events does, so that it
    /// is not handed out before the event completes.
    pub fn hold_cached(&mut self, slot: u32) {
        let rec = &mut self.records[slot as usize];
        debug_assert_eq!(rec.state, BufState::Cached);
        rec.state = BufState::Pending;
        rec.free_completed = true;
        let (p, size) = (rec.pool, rec.size);
        let pool = &mut self.pools[p as usize];
        let removed = pool.cache.remove(size, slot);
        debug_assert!(removed, "a cached record is in its pool's cache");
        let g = pool.kind.buffer_group(size);
        for i in [0, g] {
            self.stats.cached_bytes[i].sub(size as u64);
            self.stats.active_bytes[i].add(size as u64);
            self.stats.active[i].add(1);
        }
        self.pending.push(slot);
    }

    /// Puts a `Pending` (or just retired) record into its pool's cache, or, for a large buffer
    /// on a page-mapped heap, its space back into the heap's free space.
    pub fn cache(&mut self, slot: u32, notes: &mut Notes) {
        let rec = &mut self.records[slot as usize];
        let pool = &mut self.pools[rec.pool as usize];
        // On page-mapped heaps a buffer over 1 MiB goes straight back to free space. Kept whole,
        // it would serve only its own size again, while random large sizes nearly always miss
        // the cache, and a miss first dissolves the cache so that placement sees free space
        // coalesced: in the large latency loop the round trip through the cache cost a seventh
        // of the instructions, and the replays reserve about as much without it (less on the
        // GPT-2 traces, more on ViT-B/16; BENCHMARKS.md).
        let direct = self.policy == Policy::Default
            && self.caps.page_mapping
            && rec.size > crate::cache::SMALL_LIMIT;
        if !direct {
            rec.state = BufState::Cached;
            rec.cached_at = pool.clock;
            pool.cache.push(rec.size, slot);
        }
        let (size, ptr) = (rec.size as u64, rec.ptr);
        let g = pool.kind.buffer_group(rec.size);
        let s = &mut self.stats;
        for i in [0, g] {
            s.active_bytes[i].sub(size);
            s.active[i].sub(1);
            if !direct {
                s.cached_bytes[i].add(size);
            }
        }
        // A buffer back from waiting on an event recorded after its free was freed already:
        // no second callback, no second trace entry.
        let rec = &mut self.records[slot as usize];
        let (stream, requested) = (rec.stream, rec.requested);
        let again = std::mem::take(&mut rec.free_completed);
        if !again {
            notes.push(ptr, CallbackEvent::Freed);
            if self.history.is_some() {
                self.trace(TraceAction::FreeCompleted, ptr, requested, stream);
            }
        }
        if direct {
            self.release_space(slot);
        }
    }

    /// Returns a cached buffer's space to its heap (the seed's `release_buffer`); the heap
    /// itself stays. The caller has taken the slot out of the cache.
    pub fn dissolve(&mut self, slot: u32) -> (u32, u32) {
        debug_assert_eq!(self.records[slot as usize].state, BufState::Cached);
        let (p, h, size) = self.release_space(slot);
        let g = self.pools[p as usize].kind.buffer_group(size);
        for i in [0, g] {
            self.stats.cached_bytes[i].sub(size as u64);
        }
        (p, h)
    }

    /// Gives a buffer's space back to its heap's free space and frees its slot; returns its
    /// pool, heap and size. The buffer is out of use (its statistics moved already).
    fn release_space(&mut self, slot: u32) -> (u32, u32, usize) {
        let rec = &mut self.records[slot as usize];
        rec.state = BufState::Vacant;
        rec.events.clear();
        let (p, h, off, size, ptr) = (rec.pool, rec.heap, rec.offset, rec.size, rec.ptr);
        self.by_ptr.remove(&ptr);
        self.free_slots.push(slot);
        let clock = self.clock();
        let pool = &mut self.pools[p as usize];
        pool.give_back(h, off, size);
        if let Some(pages) = pool.heap_mut(h).pages.as_mut() {
            pages.vacate(off, size, clock);
        }
        if self.logs(debug::RELEASES, self.pools[p as usize].kind, size) {
            tracing::info!(target: "bufferheap", "Released buffer at {:#x} of size {}", ptr, format_size(size));
        }
        (p, h, size)
    }

    /// Dissolves every cached buffer of pool `p`; returns the bytes dissolved.
    pub fn dissolve_cache(&mut self, p: u32) -> usize {
        // Large buffers on page-mapped heaps never enter the cache: every large miss asks.
        if self.pools[p as usize].cache.len() == 0 {
            return 0;
        }
        let mut entries = std::mem::take(&mut self.dissolving);
        self.pools[p as usize].cache.drain_into(&mut entries);
        let bytes = entries.iter().map(|&(s, _)| s).sum();
        for &(_, slot) in &entries {
            self.dissolve(slot);
        }
        entries.clear();
        self.dissolving = entries;
        bytes
    }

    // ---- pending events ------------------------------------------------------------------

    /// Moves pending buffers whose events have completed into their caches.
    pub fn poll_pending(&mut self, backend: &B, notes: &mut Notes) {
        let mut i = 0;
        while i < self.pending.len() {
            let slot = self.pending[i];
            let rec = &mut self.records[slot as usize];
            rec.record_missing_events(backend);
            let events = &mut rec.events;
            events.retain(|e| !matches!(backend.event_complete(e), Ok(true)));
            if rec.events.is_empty() && rec.streams.is_empty() {
                self.pending.swap_remove(i);
                self.cache(slot, notes);
            } else {
                i += 1;
            }
        }
    }

    /// Waits for every pending buffer's events (the seed's full synchronisation), then
    /// caches them. A wait that fails leaves its buffer pending.
    pub fn wait_all_pending(&mut self, backend: &B, notes: &mut Notes) {
        if self.pending.is_empty() {
            return;
        }
        self.stats.num_sync_all_streams += 1;
        let start = std::time::Instant::now();
        let mut waited = false;
        for &slot in &self.pending {
            let rec = &mut self.records[slot as usize];
            rec.record_missing_events(backend);
            let events = &mut rec.events;
            // A wait that fails keeps its event (it was still a try at blocking).
            events.retain(|e| match super::mapping::wait_if_pending(backend, e) {
                Ok(w) => {
                    waited |= w;
                    false
                }
                Err(_) => {
                    waited = true;
                    true
                }
            });
        }
        if waited {
            self.stats.note_device_wait(start);
        }
        self.poll_pending(backend, notes);
    }

    /// The storage kind of the region a record lives in, and the region itself.
    pub fn region_of(&self, slot: u32) -> (&Region, usize) {
        let rec = &self.records[slot as usize];
        (
            &self.pools[rec.pool as usize].heap(rec.heap).region,
            rec.offset,
        )
    }

    /// Looks up a placed buffer.
    #[inline]
    pub fn slot_of(&self, ptr: u64) -> Option<u32> {
        self.by_ptr.get(&ptr).copied()
    }

    /// The error for a pointer that is no placed buffer: one inside a heap of this allocator
    /// was handed out and freed already (buffers that go straight back to free space keep no
    /// record to say so), any other is not ours.
    pub fn not_placed(&self, ptr: u64) -> Error {
        let ours = self
            .pools
            .iter()
            .flat_map(|p| p.heaps.iter().flatten())
            .any(|h| ptr >= h.region.base && ptr - h.region.base < h.region.size as u64);
        if ours {
            Error::DoubleFree(ptr)
        } else {
            Error::UnknownPointer(ptr)
        }
    }

    /// The record of the buffer in use at `ptr`, for a call that needs one (`set_shape`,
    /// `record_stream`): a freed buffer is `NotInUse`, a pointer not ours `UnknownPointer`.
    pub fn in_use(&mut self, ptr: u64) -> Result<u32> {
        match self.resolve(ptr) {
            Some(slot) if self.records[slot as usize].state == BufState::InUse => Ok(slot),
            Some(_) => Err(Error::NotInUse(ptr)),
            None => Err(match self.not_placed(ptr) {
                Error::DoubleFree(ptr) => Error::NotInUse(ptr),
                other => other,
            }),
        }
    }
}
