//! Simulated backend: address ranges only, no memory touched.
//!
//! It models a discrete device of a given size with page mapping, so the engine can replay a
//! real training trace at full scale on any machine and count exactly what it would reserve,
//! map and unmap. It also checks the backend contract the engine must keep: a map of a page
//! already mapped, an unmap of a page not mapped or of part of an earlier map call's range, a
//! range outside its region or unaligned, or a release of an unknown region is an error (the
//! tests rely on this to catch engine bugs).
//!
//! Invariants: regions never overlap (addresses are handed out by a bump pointer and never
//! reused); `held` = committed regions + mapped pages and never exceeds `total`; events
//! complete at once unless manual events are on, in which case they complete when
//! [`SimBackend::complete_events`] is called or when waited on.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bufferheap_core::{
    Backend, BackendCaps, BackendError, BackendOp, MemoryInfo, Region, Storage, StreamId,
    check_page_range, physical_pieces,
};
use parking_lot::Mutex;

/// Counters of backend calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimCounters {
    pub reserves: u64,
    pub releases: u64,
    pub maps: u64,
    pub unmaps: u64,
    /// Physical allocations the maps would make on a device backing each piece of a map call
    /// (see [`SimBackend::with_physical_block`]) with one.
    pub allocations: u64,
    pub events_recorded: u64,
    /// Bytes held now (committed regions + mapped pages).
    pub held: usize,
    /// Largest `held` seen.
    pub peak_held: usize,
}

#[derive(Debug)]
struct SimRegion {
    /// Where it was handed out: a region is known by its handle, base and size together.
    base: u64,
    size: usize,
    committed: bool,
    mapped: BTreeSet<usize>,
    /// The pieces of the map calls still mapped: first page -> pages.
    mappings: BTreeMap<usize, usize>,
}

#[derive(Debug, Default)]
struct SimState {
    next_base: u64,
    next_handle: u64,
    regions: HashMap<u64, SimRegion>,
    counters: SimCounters,
}

impl SimState {
    /// The live region `region` names, as a driver checks it: its handle, base and size.
    fn region(&self, region: &Region, op: BackendOp) -> Result<&SimRegion, BackendError> {
        match self.regions.get(&region.handle) {
            Some(r) if r.base == region.base && r.size == region.size => Ok(r),
            _ => Err(BackendError::new(
                op,
                format!("unknown region at {:#x}", region.base),
            )),
        }
    }
}

/// A simulated device.
#[derive(Debug)]
pub struct SimBackend {
    total: usize,
    granularity: usize,
    physical_block: usize,
    page_mapping: bool,
    manual_events: bool,
    state: Mutex<SimState>,
    event_clock: Arc<AtomicU64>,
    completed: Arc<AtomicU64>,
}

/// A simulated event: complete once the backend's completed clock reaches its sequence number.
#[derive(Debug)]
pub struct SimEvent {
    seq: u64,
    stream: StreamId,
}

impl SimEvent {
    /// The stream it was recorded on.
    pub fn stream(&self) -> StreamId {
        self.stream
    }
}

/// Default page size: NVIDIA's VMM granularity.
pub const DEFAULT_GRANULARITY: usize = 2 << 20;
/// Default piece of a map call backed by one physical allocation: the CUDA backend's.
pub const DEFAULT_PHYSICAL_BLOCK: usize = 16 << 20;

impl SimBackend {
    /// A device of `total` bytes with 2 MiB pages and page mapping, each map call backed by
    /// one physical allocation per 16 MiB block it touches (as the CUDA backend does).
    pub fn new(total: usize) -> SimBackend {
        SimBackend {
            total,
            granularity: DEFAULT_GRANULARITY,
            physical_block: DEFAULT_PHYSICAL_BLOCK,
            page_mapping: true,
            manual_events: false,
            state: Mutex::new(SimState {
                next_base: 1 << 40,
                next_handle: 1,
                ..Default::default()
            }),
            event_clock: Arc::new(AtomicU64::new(0)),
            completed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Sets the page size: a power of two of at least 512 bytes (the buffer alignment; the
    /// engine refuses a backend with smaller pages).
    pub fn with_granularity(mut self, granularity: usize) -> SimBackend {
        self.granularity = granularity;
        self
    }

    /// Sets the physical block (see [`BackendCaps::physical_block`]): unmaps must cover whole
    /// pieces of map calls cut at its multiples. `usize::MAX`: whole map calls.
    pub fn with_physical_block(mut self, bytes: usize) -> SimBackend {
        self.physical_block = bytes;
        self
    }

    /// The physical block in bytes: a whole number of pages (at least one), or `usize::MAX`.
    fn block(&self) -> usize {
        match self.physical_block {
            usize::MAX => usize::MAX,
            b => b.div_ceil(self.granularity).max(1) * self.granularity,
        }
    }

    /// Turns page mapping off: every region is committed when reserved.
    pub fn without_page_mapping(mut self) -> SimBackend {
        self.page_mapping = false;
        self
    }

    /// Events complete only when [`SimBackend::complete_events`] is called (or when waited on).
    pub fn with_manual_events(mut self) -> SimBackend {
        self.manual_events = true;
        self
    }

    /// Completes every event recorded so far.
    pub fn complete_events(&self) {
        self.completed
            .store(self.event_clock.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// Counters of calls and bytes.
    pub fn counters(&self) -> SimCounters {
        self.state.lock().counters
    }

    /// Number of live regions.
    pub fn live_regions(&self) -> usize {
        self.state.lock().regions.len()
    }

    fn check_range(
        &self,
        region: &SimRegion,
        offset: usize,
        len: usize,
        op: BackendOp,
    ) -> Result<(), BackendError> {
        check_page_range(region.size, offset, len, self.granularity, op)?;
        Ok(())
    }
}

fn add_held(c: &mut SimCounters, bytes: usize) {
    c.held += bytes;
    c.peak_held = c.peak_held.max(c.held);
}

impl Backend for SimBackend {
    type Event = SimEvent;

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            shared_storage: true,
            unified_memory: false,
            page_mapping: self.page_mapping,
            granularity: self.granularity,
            physical_block: self.block(),
            max_buffer_size: self.total,
        }
    }

    fn reserve(&self, size: usize, storage: Storage, mapped: bool) -> Result<Region, BackendError> {
        let g = self.granularity;
        if size == 0 || !size.is_multiple_of(g) {
            return Err(BackendError::new(
                BackendOp::Reserve,
                format!("size {size} is not a multiple of {g}"),
            ));
        }
        if !mapped && (!self.page_mapping || storage == Storage::Shared) {
            return Err(BackendError::new(
                BackendOp::Reserve,
                "address-only reservation needs page mapping of private storage",
            ));
        }
        let mut st = self.state.lock();
        if mapped && st.counters.held + size > self.total {
            return Err(BackendError::out_of_memory(
                BackendOp::Reserve,
                format!(
                    "device of {} bytes has {} free, {size} asked",
                    self.total,
                    self.total - st.counters.held
                ),
            ));
        }
        let base = st.next_base;
        // One unused page between regions, so that an overrun never lands in a neighbour.
        st.next_base += (size + g) as u64;
        let handle = st.next_handle;
        st.next_handle += 1;
        st.regions.insert(
            handle,
            SimRegion {
                base,
                size,
                committed: mapped,
                mapped: BTreeSet::new(),
                mappings: BTreeMap::new(),
            },
        );
        st.counters.reserves += 1;
        if mapped {
            add_held(&mut st.counters, size);
        }
        let host_base = (storage == Storage::Shared).then_some(base);
        Ok(Region {
            base,
            size,
            host_base,
            handle,
        })
    }

    fn release(&self, region: &Region) -> Result<(), BackendError> {
        let mut st = self.state.lock();
        st.region(region, BackendOp::Release)?;
        let r = st
            .regions
            .remove(&region.handle)
            .expect("looked up just above");
        let held = if r.committed {
            r.size
        } else {
            r.mapped.len() * self.granularity
        };
        st.counters.held -= held;
        st.counters.releases += 1;
        Ok(())
    }

    fn map(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        let g = self.granularity;
        let mut st = self.state.lock();
        let free = self.total - st.counters.held;
        let r = st.region(region, BackendOp::Map)?;
        if r.committed {
            return Err(BackendError::new(
                BackendOp::Map,
                "region is committed, not page-mapped",
            ));
        }
        self.check_range(r, offset, len, BackendOp::Map)?;
        if (offset / g..(offset + len) / g).any(|p| r.mapped.contains(&p)) {
            return Err(BackendError::new(
                BackendOp::Map,
                format!("page in [{offset:#x}, +{len:#x}) is already mapped"),
            ));
        }
        if len > free {
            return Err(BackendError::out_of_memory(
                BackendOp::Map,
                format!("{free} bytes free, {len} asked"),
            ));
        }
        let r = st.regions.get_mut(&region.handle).expect("checked above");
        r.mapped.extend(offset / g..(offset + len) / g);
        let block = (self.block() / g).max(1);
        let mut pieces = 0;
        for (first, end) in physical_pieces(offset / g, (offset + len) / g, block) {
            r.mappings.insert(first, end - first);
            pieces += 1;
        }
        st.counters.allocations += pieces;
        st.counters.maps += 1;
        add_held(&mut st.counters, len);
        Ok(())
    }

    fn unmap(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        let g = self.granularity;
        let mut st = self.state.lock();
        let r = st.region(region, BackendOp::Unmap)?;
        self.check_range(r, offset, len, BackendOp::Unmap)?;
        if !(offset / g..(offset + len) / g).all(|p| r.mapped.contains(&p)) {
            return Err(BackendError::new(
                BackendOp::Unmap,
                format!("page in [{offset:#x}, +{len:#x}) is not mapped"),
            ));
        }
        let (first, end) = (offset / g, (offset + len) / g);
        let mut p = first;
        while p < end {
            match r.mappings.get(&p) {
                Some(&pages) => p += pages,
                None => break,
            }
        }
        if p != end {
            return Err(BackendError::new(
                BackendOp::Unmap,
                format!("[{offset:#x}, +{len:#x}) covers part of a piece of an earlier map call"),
            ));
        }
        let r = st.regions.get_mut(&region.handle).expect("checked above");
        for p in first..end {
            r.mapped.remove(&p);
        }
        let whole: Vec<usize> = r.mappings.range(first..end).map(|(&p, _)| p).collect();
        for p in whole {
            r.mappings.remove(&p);
        }
        st.counters.unmaps += 1;
        st.counters.held -= len;
        Ok(())
    }

    fn record_event(&self, stream: StreamId) -> Result<SimEvent, BackendError> {
        let seq = self.event_clock.fetch_add(1, Ordering::SeqCst) + 1;
        if !self.manual_events {
            self.completed.fetch_max(seq, Ordering::SeqCst);
        }
        self.state.lock().counters.events_recorded += 1;
        Ok(SimEvent { seq, stream })
    }

    fn event_complete(&self, event: &SimEvent) -> Result<bool, BackendError> {
        Ok(self.completed.load(Ordering::SeqCst) >= event.seq)
    }

    fn wait_event(&self, event: &SimEvent) -> Result<(), BackendError> {
        // The simulated device finishes the work the moment someone waits for it.
        self.completed.fetch_max(event.seq, Ordering::SeqCst);
        Ok(())
    }

    fn memory_info(&self) -> MemoryInfo {
        let held = self.state.lock().counters.held;
        MemoryInfo {
            total: self.total,
            free: self.total - held,
            recommended_max: self.total,
        }
    }

    fn write(&self, region: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError> {
        let st = self.state.lock();
        let r = st.region(region, BackendOp::Write)?;
        let end = offset.checked_add(bytes.len()).filter(|&e| e <= r.size);
        let Some(end) = end else {
            return Err(BackendError::new(
                BackendOp::Write,
                "write outside the region",
            ));
        };
        let g = self.granularity;
        if !r.committed && !(offset / g..end.div_ceil(g)).all(|p| r.mapped.contains(&p)) {
            return Err(BackendError::new(
                BackendOp::Write,
                "write to pages that are not mapped",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmaps_must_cover_whole_pieces_of_map_calls() {
        let g = DEFAULT_GRANULARITY;
        let sim = SimBackend::new(1 << 30).with_physical_block(4 * g);
        assert_eq!(sim.caps().physical_block, 4 * g);
        let r = sim.reserve(16 * g, Storage::Private, false).unwrap();
        // Pages [2, 10) cut at multiples of 4 pages: [2, 4), [4, 8), [8, 10).
        sim.map(&r, 2 * g, 8 * g).unwrap();
        assert_eq!((sim.counters().maps, sim.counters().allocations), (1, 3));
        assert!(sim.unmap(&r, 4 * g, 2 * g).is_err(), "half a piece");
        assert!(sim.unmap(&r, 3 * g, 5 * g).is_err(), "a piece and a half");
        sim.unmap(&r, 4 * g, 4 * g).unwrap();
        sim.unmap(&r, 8 * g, 2 * g).unwrap();
        sim.unmap(&r, 2 * g, 2 * g).unwrap();
        assert_eq!(sim.counters().held, 0);
        // Whole map calls when the block is unbounded.
        let sim = SimBackend::new(1 << 30).with_physical_block(usize::MAX);
        let r = sim.reserve(16 * g, Storage::Private, false).unwrap();
        sim.map(&r, 0, 12 * g).unwrap();
        assert!(sim.unmap(&r, 0, 8 * g).is_err());
        sim.unmap(&r, 0, 12 * g).unwrap();
    }

    #[test]
    fn regions_are_known_by_handle_base_and_size_and_writes_need_live_memory() {
        let g = DEFAULT_GRANULARITY;
        let sim = SimBackend::new(1 << 30);
        let r = sim.reserve(8 * g, Storage::Private, false).unwrap();
        let moved = Region {
            base: r.base + g as u64,
            size: 4 * g,
            ..r.clone()
        };
        assert!(sim.map(&moved, 0, g).is_err());
        assert!(sim.release(&moved).is_err());
        assert!(sim.write(&r, 0, &[1]).is_err(), "not mapped yet");
        sim.map(&r, 0, g).unwrap();
        sim.write(&r, 0, &[1]).unwrap();
        assert!(
            sim.write(&r, g - 1, &[1, 2]).is_err(),
            "crosses into an unmapped page"
        );
        let s = sim.reserve(g, Storage::Shared, true).unwrap();
        sim.write(&s, 0, &[1, 2, 3]).unwrap();
        sim.release(&s).unwrap();
        assert!(sim.write(&s, 0, &[1, 2, 3]).is_err(), "released");
    }
}
