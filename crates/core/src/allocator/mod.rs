//! The allocator: the seed's whole interface over one device's engine.
//!
//! One engine per device holds every pool, heap and buffer under one lock. Front-ends
//! ([`Allocator`]) are cheap handles on it that differ only in the storage they allocate —
//! private or shared — exactly as the seed's two `IMPSAllocator` objects share one
//! `MPSHeapAllocatorImpl`.
//!
//! Invariants: the lock is never held while callbacks run or while the engine waits for
//! events of `wait_for_events`; every public method takes it at most once per step, so a
//! callback may call any method. Unknown pointers give `None`/an error, never a panic.

mod devices;
mod front;
mod limits;
mod mapping;
mod policy;
mod report;
mod settings;
mod state;

use std::sync::Arc;

use crate::backend::{Backend, BackendCaps, Storage, StreamId};
use crate::callbacks::{Callback, CallbackEvent, Notes, Registry};
use crate::config::{Config, debug};
use crate::error::{Error, OutOfMemory, Result};
use crate::format::format_size;
use crate::pool::ALIGN;
use crate::sync::{AtomicBool, Mutex, MutexGuard, Ordering};

pub use devices::Devices;
pub use limits::{DEFAULT_HIGH, DEFAULT_LOW_DISCRETE, DEFAULT_LOW_UNIFIED, MAX_RATIO};
pub use policy::MPS_REUSE_SLACK;
pub use report::{BlockInfo, BlockState, HeapReport, PoolReport, Report, SegmentInfo};

use front::Freed;
use limits::Limits;
use policy::Phase;
use state::{BufState, State};

/// A buffer handed out by the allocator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Device address (the key for every other call).
    pub ptr: u64,
    /// Rounded size: the bytes the buffer really occupies.
    pub size: usize,
    /// What the caller asked for.
    pub requested: usize,
    /// Unique id, increasing, never reused, starting at 1.
    pub id: u64,
    /// Where it lives.
    pub storage: Storage,
    /// Host address, for shared buffers.
    pub host_ptr: Option<u64>,
}

pub(crate) struct Engine<B: Backend> {
    backend: B,
    caps: BackendCaps,
    state: Mutex<State<B>>,
    callbacks: Registry,
    /// Unique among engines of the process: the key of threads' front caches.
    id: u64,
    policy: crate::Policy,
    /// Bytes a thread's front cache may hold cached (0: no front caches).
    front_capacity: usize,
    /// True while threads may use front caches (see [`Engine::front_allowed`]).
    front_on: AtomicBool,
}

impl<B: Backend> Engine<B> {
    /// The engine's state, locked, with the calling thread's front cache folded in (see
    /// `State::fold_on_entry`).
    fn lock(&self) -> MutexGuard<'_, State<B>> {
        let mut guard = self.state.lock();
        if !guard.fronts.is_empty() {
            guard.fold_on_entry();
        }
        guard
    }

    /// True if a buffer of `size` bytes may be in (or go to) a thread's front cache.
    #[inline]
    fn front_may_hold(&self, size: usize) -> bool {
        size <= front::largest_delegated(self.front_capacity)
            && self.front_on.load(Ordering::Relaxed)
    }

    /// Front caches are used only where they cannot hide anything: no callbacks (which see
    /// every event), no history, no per-allocation logging.
    fn front_allowed(&self, st: &State<B>) -> bool {
        !cfg!(loom)
            && self.front_capacity > 0
            && !self.callbacks.active()
            && st.history.is_none()
            && st.debug & (debug::ALLOCATIONS | debug::RECYCLES) == 0
    }

    /// Turns front caches on or off after a change of the conditions above; turning them
    /// off takes back every buffer they hold.
    fn refresh_front(&self) {
        let mut st = self.lock();
        let allowed = self.front_allowed(&st);
        self.front_on.store(allowed, Ordering::Relaxed);
        if !allowed {
            st.return_fronts(true, true);
        }
    }
}

/// A front-end on one device's engine: allocates private or shared buffers; every other
/// method sees the whole engine.
pub struct Allocator<B: Backend> {
    engine: Arc<Engine<B>>,
    storage: Storage,
}

/// A handle that does not keep the engine alive: for callbacks that call back into the
/// allocator. A callback capturing an [`Allocator`] would form a cycle (engine -> callback ->
/// engine) and the engine, with all its memory, would outlive every user handle.
pub struct WeakAllocator<B: Backend> {
    engine: std::sync::Weak<Engine<B>>,
    storage: Storage,
}

impl<B: Backend> WeakAllocator<B> {
    /// The allocator, while any strong handle on its engine exists.
    pub fn upgrade(&self) -> Option<Allocator<B>> {
        self.engine.upgrade().map(|engine| Allocator {
            engine,
            storage: self.storage,
        })
    }
}

impl<B: Backend> Clone for WeakAllocator<B> {
    fn clone(&self) -> Self {
        WeakAllocator {
            engine: self.engine.clone(),
            storage: self.storage,
        }
    }
}

impl<B: Backend> std::fmt::Debug for WeakAllocator<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeakAllocator")
            .field("alive", &(self.engine.strong_count() > 0))
            .finish()
    }
}

impl<B: Backend> Clone for Allocator<B> {
    fn clone(&self) -> Self {
        Allocator {
            engine: self.engine.clone(),
            storage: self.storage,
        }
    }
}

impl<B: Backend> std::fmt::Debug for Allocator<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocator")
            .field("storage", &self.storage)
            .field("usage", &self.usage())
            .finish()
    }
}

fn round_up(size: usize) -> Option<usize> {
    size.checked_add(ALIGN - 1).map(|s| s / ALIGN * ALIGN)
}

impl<B: Backend> Allocator<B> {
    /// An engine over `backend`; returns its private front-end.
    pub fn new(backend: B, config: Config) -> Result<Self> {
        let caps = backend.caps();
        let info = backend.memory_info();
        let limits = Limits::new(
            info.recommended_max,
            caps.unified_memory,
            config.low_watermark_ratio,
            config.high_watermark_ratio,
        )?;
        if caps.granularity == 0 || !caps.granularity.is_power_of_two() {
            return Err(Error::Unsupported(format!(
                "backend granularity {} is not a power of two",
                caps.granularity
            )));
        }
        // Region bases are aligned to the granularity only: below the buffer alignment, buffer
        // addresses (base + offset) would not be aligned.
        if caps.granularity < ALIGN {
            return Err(Error::Unsupported(format!(
                "backend granularity {} is below the buffer alignment of {ALIGN} bytes",
                caps.granularity
            )));
        }
        static NEXT_ENGINE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let debug_mask = config.debug;
        let (policy, front_capacity) = (config.policy, config.front_cache_bytes);
        let state = State::new(caps, config, limits, info.total);
        let engine = Arc::new(Engine {
            backend,
            caps,
            state: Mutex::new(state),
            callbacks: Registry::default(),
            id: NEXT_ENGINE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            policy,
            front_capacity,
            front_on: AtomicBool::new(false),
        });
        engine.refresh_front();
        let allocator = Allocator {
            engine,
            storage: Storage::Private,
        };
        if debug_mask != 0 {
            tracing::info!(
                target: "bufferheap",
                "Initializing heap allocator on {} device memory of size {} ({} policy)",
                if caps.unified_memory { "unified" } else { "discrete" },
                format_size(info.recommended_max),
                allocator.engine.policy
            );
            if debug_mask & debug::PROFILING != 0 {
                allocator.log_limits();
            }
        }
        Ok(allocator)
    }

    /// The shared (host-visible) front-end of the same engine; `None` where the backend has no
    /// shared storage.
    pub fn shared(&self) -> Option<Allocator<B>> {
        self.engine.caps.shared_storage.then(|| Allocator {
            engine: self.engine.clone(),
            storage: Storage::Shared,
        })
    }

    /// The private front-end of the same engine.
    pub fn private(&self) -> Allocator<B> {
        Allocator {
            engine: self.engine.clone(),
            storage: Storage::Private,
        }
    }

    /// A handle that does not keep the engine alive (see [`WeakAllocator`]).
    pub fn downgrade(&self) -> WeakAllocator<B> {
        WeakAllocator {
            engine: Arc::downgrade(&self.engine),
            storage: self.storage,
        }
    }

    /// The storage this front-end allocates.
    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// The backend under the engine.
    pub fn backend(&self) -> &B {
        &self.engine.backend
    }

    /// The backend's capabilities.
    pub fn caps(&self) -> BackendCaps {
        self.engine.caps
    }

    fn fire(&self, notes: Notes) {
        if !notes.events.is_empty() {
            self.engine.callbacks.fire(&notes.events);
        }
    }

    // ---- allocation ----------------------------------------------------------------------

    /// Allocates `size` bytes on the default stream. 0 bytes: no allocation, `Ok(None)`.
    #[inline]
    pub fn alloc(&self, size: usize) -> Result<Option<Buffer>> {
        self.alloc_on(size, 0)
    }

    /// Allocates `size` bytes for use on `stream`. A buffer freed on a stream is reused at once
    /// by that stream; other streams get it only after the events recorded for it complete.
    #[inline]
    pub fn alloc_on(&self, size: usize, stream: StreamId) -> Result<Option<Buffer>> {
        self.alloc_inner(size, stream, false)
    }

    #[inline]
    fn alloc_inner(&self, size: usize, stream: StreamId, scalar: bool) -> Result<Option<Buffer>> {
        if size == 0 {
            return Ok(None);
        }
        let max = self.engine.caps.max_buffer_size;
        let aligned = match round_up(size) {
            Some(a) if size < max => a,
            _ => {
                // No device memory could hold it: an out-of-memory event, as PyTorch counts one.
                let mut st = self.engine.lock();
                st.stats.num_ooms += 1;
                let free = self.engine.backend.memory_info().free;
                st.trace(crate::TraceAction::Oom, free as u64, size, stream);
                return Err(Error::InvalidSize {
                    requested: size,
                    max,
                });
            }
        };
        let storage = if scalar {
            Storage::Shared
        } else {
            self.storage
        };
        if !scalar && self.engine.front_may_hold(aligned) {
            // The hot path: this thread's front cache, without the engine's lock.
            let kind = state::select_kind(
                self.engine.policy,
                &self.engine.caps,
                size,
                aligned,
                storage,
                false,
            );
            if let Some(Some(buffer)) =
                front::with_own(self.engine.id, |fr| fr.alloc(stream, kind, aligned, size))
            {
                return Ok(Some(buffer));
            }
        }
        self.alloc_in_engine(size, aligned, stream, storage, scalar)
    }

    /// Everything but the front cache: the engine's cache, placement, growth, the fallback
    /// chain. Kept out of line so the hot path above stays small.
    #[inline(never)]
    fn alloc_in_engine(
        &self,
        size: usize,
        aligned: usize,
        stream: StreamId,
        storage: Storage,
        scalar: bool,
    ) -> Result<Option<Buffer>> {
        let backend = &self.engine.backend;
        let mut notes = Notes::new(self.engine.callbacks.active());
        // The engine's hot path: a cached buffer that serves this size. On a miss the lock is
        // kept for the first phase below.
        let mut held = self.engine.lock();
        // Pools are never removed, so `p` stays this request's pool across the phases below,
        // each of which may take the lock anew.
        let kind = held.select_kind(size, aligned, storage, scalar);
        let p = held.pool_for(kind, stream);
        if let Some(slot) = held.take_cached(p, aligned) {
            held.recycle(slot, size, &mut notes);
            let buffer = self.describe(&held, slot);
            drop(held);
            self.fire(notes);
            return Ok(Some(buffer));
        }
        let mut held = Some(held);
        for phase in [
            Phase::Normal,
            Phase::AfterCallbacks,
            Phase::ReleasePool,
            Phase::ReleaseAll,
        ] {
            let result = {
                let mut st = held.take().unwrap_or_else(|| self.engine.lock());
                if phase == Phase::Normal {
                    st.shortfall = None;
                } else {
                    // Memory is short: what threads' front caches hold is needed too.
                    st.return_fronts(false, false);
                    if phase == Phase::AfterCallbacks {
                        st.stats.num_alloc_retries += 1;
                    }
                }
                match st.alloc_step(backend, p, aligned, size, phase, &mut notes) {
                    Ok(Some(slot)) => Ok(Some(self.describe(&st, slot))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                }
            };
            match result {
                Ok(Some(buffer)) => {
                    self.fire(notes);
                    return Ok(Some(buffer));
                }
                Ok(None) => {}
                Err(e) => {
                    self.fire(notes);
                    return Err(e);
                }
            }
            if phase == Phase::Normal {
                // Callbacks may free memory: run them now, outside the lock.
                notes.push(0, CallbackEvent::AllocationFailed);
                let fired =
                    std::mem::replace(&mut notes, Notes::new(self.engine.callbacks.active()));
                self.fire(fired);
            }
        }
        let oom = {
            let mut st = self.engine.lock();
            st.stats.num_ooms += 1;
            let free = self.engine.backend.memory_info().free;
            st.trace(crate::TraceAction::Oom, free as u64, aligned, stream);
            // The pool's storage, as the seed names it ("shared" for tiny requests routed to
            // the shared small pool on unified memory).
            self.out_of_memory(&mut st, aligned, kind.storage())
        };
        self.fire(notes);
        Err(Error::OutOfMemory(Box::new(oom)))
    }

    fn out_of_memory(&self, st: &mut State<B>, aligned: usize, storage: Storage) -> OutOfMemory {
        let info = self.engine.backend.memory_info();
        let reserved = st.reserved_total();
        let oom = OutOfMemory {
            allocator_reserved: reserved,
            allocator_in_use: st.stats.allocated_bytes[0].current as usize,
            other_allocations: info.driver_allocated().saturating_sub(reserved),
            max_allowed: (st.limits.high_limit != usize::MAX).then_some(st.limits.high_limit),
            requested: aligned,
            storage,
            device_free: info.free,
            device_total: info.total,
            cause: st
                .shortfall
                .clone()
                .unwrap_or(crate::error::OomCause::Backend("no memory left".into())),
        };
        tracing::warn!(target: "bufferheap", "{oom}");
        oom
    }

    fn describe(&self, st: &State<B>, slot: u32) -> Buffer {
        let rec = &st.records[slot as usize];
        let storage = st.pools[rec.pool as usize].kind.storage();
        let host_ptr = match storage {
            Storage::Private => None,
            Storage::Shared => {
                let (region, offset) = st.region_of(slot);
                region.host_base.map(|h| h + offset as u64)
            }
        };
        Buffer {
            ptr: rec.ptr,
            size: rec.size,
            requested: rec.requested,
            id: rec.id,
            storage,
            host_ptr,
        }
    }

    /// Frees a buffer: it goes back to its pool's cache, or waits there for its events.
    #[inline]
    pub fn free(&self, ptr: u64) -> Result<()> {
        self.free_sized(ptr, 0)
    }

    /// Frees a buffer whose requested size the caller knows (PyTorch passes it): buffers too
    /// large for a thread's front cache skip looking there. The size is only a hint; a wrong
    /// one still frees the right buffer. 0: unknown.
    #[inline]
    pub fn free_sized(&self, ptr: u64, size: usize) -> Result<()> {
        let engine = &*self.engine;
        if engine.front_may_hold(size) {
            match front::with_own(engine.id, |fr| fr.free(ptr)) {
                Some(Freed::Done) => return Ok(()),
                Some(Freed::DoubleFree) => return Err(Error::DoubleFree(ptr)),
                Some(Freed::Miss) | None => {}
            }
        }
        self.free_in_engine(ptr)
    }

    /// A free that the front cache could not take.
    #[inline(never)]
    fn free_in_engine(&self, ptr: u64) -> Result<()> {
        let engine = &*self.engine;
        let mut notes = Notes::new(engine.callbacks.active());
        let result = {
            let mut st = engine.lock();
            let slot = st.slot_of(ptr);
            match slot.and_then(|slot| st.free_to_owner(slot, ptr)) {
                Some(Freed::Done) => return Ok(()),
                Some(Freed::DoubleFree) => return Err(Error::DoubleFree(ptr)),
                Some(Freed::Miss) | None => {}
            }
            match slot.inspect(|&slot| st.reclaim(slot)) {
                None => Err(st.not_placed(ptr)),
                Some(slot) if st.records[slot as usize].state != BufState::InUse => {
                    Err(Error::DoubleFree(ptr))
                }
                Some(slot) => {
                    let cached = st.retire(&engine.backend, slot, &mut notes);
                    if matches!(cached, Ok(true)) && engine.front_on.load(Ordering::Relaxed) {
                        st.delegate(slot, engine.id, engine.front_capacity);
                    }
                    cached.map(|_| ())
                }
            }
        };
        self.fire(notes);
        result
    }

    /// Allocates a shared scalar buffer holding `bytes` (the seed's
    /// `allocScalarBufferWithValue`). It is reused only after the device consumed it: an event
    /// is recorded on its stream when it is freed.
    pub fn alloc_scalar(&self, bytes: &[u8]) -> Result<Option<Buffer>> {
        if !self.engine.caps.shared_storage {
            return Err(Error::Unsupported(
                "scalar buffers need shared storage, which this backend lacks".into(),
            ));
        }
        let Some(buffer) = self.alloc_inner(bytes.len(), 0, true)? else {
            return Ok(None);
        };
        let region = {
            let st = self.engine.lock();
            st.slot_of(buffer.ptr).map(|slot| {
                let (region, offset) = st.region_of(slot);
                (region.clone(), offset)
            })
        };
        if let Some((region, offset)) = region
            && let Err(e) = self.engine.backend.write(&region, offset, bytes)
        {
            let _ = self.free(buffer.ptr);
            return Err(e.into());
        }
        Ok(Some(buffer))
    }

    // ---- cache control -------------------------------------------------------------------

    /// Waits for pending events, then releases every cached buffer and every heap (and idle
    /// page) left empty back to the backend.
    pub fn empty_cache(&self) -> Result<()> {
        let mut notes = Notes::new(self.engine.callbacks.active());
        let result = {
            let mut st = self.engine.lock();
            let backend = &self.engine.backend;
            st.return_fronts(false, false);
            st.wait_all_pending(backend, &mut notes);
            let mut result = Ok(());
            for q in 0..st.pools.len() as u32 {
                let r = match st.policy {
                    crate::Policy::Mps => st.mps_release_pool(backend, q, &mut notes),
                    crate::Policy::Default => st.release_cached_in(backend, q, true, &mut notes),
                };
                if r.is_err() && result.is_ok() {
                    result = r;
                }
            }
            result
        };
        self.fire(notes);
        result
    }

    /// Returns buffers whose guarding events have completed to their pools.
    pub fn free_inactive_buffers(&self) {
        let mut notes = Notes::new(self.engine.callbacks.active());
        self.engine
            .lock()
            .poll_pending(&self.engine.backend, &mut notes);
        self.fire(notes);
    }

    // ---- per-buffer queries --------------------------------------------------------------

    fn with_record<T>(&self, ptr: u64, f: impl FnOnce(&State<B>, u32) -> T) -> Option<T> {
        let mut st = self.engine.lock();
        st.resolve(ptr).map(|slot| f(&st, slot))
    }

    /// What the caller asked for (not the rounded size), of a known buffer.
    pub fn requested_size(&self, ptr: u64) -> Option<usize> {
        self.with_record(ptr, |st, s| st.records[s as usize].requested)
    }

    /// The rounded size of a known buffer.
    pub fn buffer_size(&self, ptr: u64) -> Option<usize> {
        self.with_record(ptr, |st, s| st.records[s as usize].size)
    }

    /// The shape stored with a buffer (empty if none was set); cleared when it is freed.
    pub fn shape(&self, ptr: u64) -> Option<Vec<i64>> {
        self.with_record(ptr, |st, s| st.records[s as usize].shape.clone())
    }

    /// Stores a shape with a buffer in use.
    pub fn set_shape(&self, ptr: u64, shape: &[i64]) -> Result<()> {
        // Not on a freed buffer: kept, the shape would come back with its next allocation.
        let mut st = self.engine.lock();
        let slot = st.in_use(ptr)?;
        st.records[slot as usize].shape = shape.to_vec();
        Ok(())
    }

    /// The buffer's unique id.
    pub fn buffer_id(&self, ptr: u64) -> Option<u64> {
        self.with_record(ptr, |st, s| st.records[s as usize].id)
    }

    /// True if the buffer is known and lives in shared storage.
    pub fn is_shared(&self, ptr: u64) -> bool {
        self.with_record(ptr, |st, s| {
            st.pools[st.records[s as usize].pool as usize]
                .kind
                .storage()
                == Storage::Shared
        })
        .unwrap_or(false)
    }

    /// True if the backend has host-visible storage.
    pub fn shared_storage_supported(&self) -> bool {
        self.engine.caps.shared_storage
    }

    /// The host address of a shared buffer and the number of its uses still in flight
    /// (events not yet complete). `None` for unknown or private buffers.
    pub fn shared_host_ptr(&self, ptr: u64) -> Option<(u64, u32)> {
        let st = self.engine.lock();
        let slot = st.slot_of(ptr)?;
        // Private buffers have no host pointer, even where the backend maps them on the host.
        let pool = st.records[slot as usize].pool;
        if st.pools[pool as usize].kind.storage() != Storage::Shared {
            return None;
        }
        let (region, offset) = st.region_of(slot);
        let host = region.host_base? + offset as u64;
        let backend = &self.engine.backend;
        let in_flight = st.records[slot as usize]
            .events
            .iter()
            .filter(|e| !matches!(backend.event_complete(e), Ok(true)))
            .count();
        Some((host, in_flight as u32))
    }

    /// The heap a pointer lies in: (heap base, heap size). Any address inside a buffer works.
    pub fn base_allocation(&self, ptr: u64) -> Option<(u64, usize)> {
        let st = self.engine.lock();
        st.pools
            .iter()
            .flat_map(|p| p.heaps.iter().flatten())
            .find_map(|h| {
                let r = &h.region;
                (ptr >= r.base && ptr < r.base + r.size as u64).then_some((r.base, r.size))
            })
    }

    // ---- events ----------------------------------------------------------------------------

    /// Records an event on `stream` for each known buffer; the buffer is not reused until the
    /// event completes. A freed buffer still in its pool's cache leaves it until then; one
    /// whose space went back to free space (large buffers on page-mapped heaps) is no known
    /// buffer any more and is skipped. Returns true if any event was recorded.
    pub fn record_events(&self, ptrs: &[u64], stream: StreamId) -> Result<bool> {
        let mut st = self.engine.lock();
        let backend = &self.engine.backend;
        let mut recorded = false;
        for &ptr in ptrs {
            let Some(slot) = st.resolve(ptr) else {
                continue;
            };
            let event = backend.record_event(stream)?;
            let rec = &mut st.records[slot as usize];
            rec.events
                .retain(|e| !matches!(backend.event_complete(e), Ok(true)));
            rec.events.push(Arc::new(event));
            if rec.state == BufState::Cached {
                st.hold_cached(slot);
            }
            recorded = true;
        }
        Ok(recorded)
    }

    /// Blocks until the events recorded for these buffers complete. Returns true if it really
    /// waited and the buffers are now idle.
    pub fn wait_for_events(&self, ptrs: &[u64]) -> Result<bool> {
        let backend = &self.engine.backend;
        let events: Vec<_> = {
            let st = self.engine.lock();
            ptrs.iter()
                .filter_map(|&p| st.slot_of(p))
                .flat_map(|slot| st.records[slot as usize].events.to_vec())
                .collect()
        };
        let mut waited = false;
        for e in &events {
            if !backend.event_complete(e)? {
                backend.wait_event(e)?;
                waited = true;
            }
        }
        if waited {
            self.free_inactive_buffers();
        }
        Ok(waited)
    }

    /// Marks a buffer as used by another stream (PyTorch's `record_stream`): when it is freed,
    /// an event is recorded on that stream and the buffer waits for it before reuse.
    pub fn record_stream(&self, ptr: u64, stream: StreamId) -> Result<()> {
        let mut st = self.engine.lock();
        let slot = st.in_use(ptr)?;
        let rec = &mut st.records[slot as usize];
        if stream != rec.stream && !rec.streams.contains(&stream) {
            rec.streams.push(stream);
        }
        Ok(())
    }

    // ---- callbacks ---------------------------------------------------------------------------

    /// Registers a callback under `name` (replacing one of the same name; returns true then).
    /// A callback that calls back into the allocator should capture [`Allocator::downgrade`],
    /// not a clone: a clone inside the engine's own registry keeps the engine alive.
    pub fn register_callback(
        &self,
        name: &str,
        callback: impl Fn(u64, CallbackEvent) + Send + Sync + 'static,
    ) -> bool {
        let callback: Callback = Arc::new(callback);
        // Off first, so no front-cache event can slip past the new callback for long.
        self.engine.front_on.store(false, Ordering::Relaxed);
        let replaced = self.engine.callbacks.register(name, callback);
        self.engine.refresh_front();
        replaced
    }

    /// Removes the callback called `name`; returns true if there was one.
    pub fn unregister_callback(&self, name: &str) -> bool {
        let removed = self.engine.callbacks.unregister(name);
        self.engine.refresh_front();
        removed
    }

    /// Names of the registered callbacks.
    pub fn callback_names(&self) -> Vec<String> {
        self.engine.callbacks.names()
    }
}

impl<B: Backend> Allocator<B> {
    /// Formats a byte count like the seed's `formatSize` ("1.50 KiB").
    pub fn format_size(&self, size: usize) -> String {
        format_size(size)
    }
}

impl<B: Backend> Drop for Engine<B> {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.return_fronts(true, true);
        let st = &mut *st;
        report::report_leaks(st);
        report::release_everything(st, &self.backend);
    }
}
