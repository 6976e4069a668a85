//! Host-memory backend: system memory, unified (shared storage is the same memory), events
//! complete at once. The embedded default: runs anywhere.
//!
//! Regions are anonymous memory mappings. A region reserved unmapped is address space only
//! (`PROT_NONE`); `map` makes pages readable and writable, and `unmap` hands their contents
//! back to the kernel (`MADV_DONTNEED`) and seals them again. So the host backend does real
//! page mapping, like CUDA's virtual memory API, and the engine's page-mapped heaps run on it
//! unchanged. Memory is committed lazily by the kernel: a region nobody writes costs no RAM,
//! which lets a replay run at full scale here.
//!
//! Invariants: every region's base is aligned to the granularity; `held` counts committed
//! regions plus mapped pages and never exceeds the configured total (checked and updated
//! under one lock hold); a page is mapped at most once, and only mapped pages are unmapped
//! (a region's bitmap says which; other calls are refused, as the CUDA backend refuses them); a region handle is unique in the process, and a call acts on a
//! region only if its handle, base and size are those this backend handed out, so a region
//! made up or taken from another backend is refused, never touched; the only `unsafe` code
//! is the system calls and the copy in `write`, each with its argument.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use bufferheap_core::{
    Backend, BackendCaps, BackendError, BackendOp, MemoryInfo, Region, Storage, StreamId,
    check_page_range,
};
use parking_lot::Mutex;

/// Page size for mapping: 2 MiB, as on NVIDIA devices, so replays match the other backends.
pub const DEFAULT_GRANULARITY: usize = 2 << 20;

/// Region handles, unique across every backend of the process.
static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
struct HostRegion {
    /// Start of the whole mapping (before alignment).
    map_start: usize,
    map_len: usize,
    /// The region as handed out: its aligned base and size.
    base: u64,
    size: usize,
    committed: bool,
    mapped_bytes: usize,
    /// One bit per page, set while the page is mapped (page-mapped regions only).
    mapped: Vec<u64>,
}

impl HostRegion {
    /// Pages `[first, first + n)` whose mapped bit is `set`: all of them, or not.
    fn pages_are(&self, first: usize, n: usize, set: bool) -> bool {
        (first..first + n).all(|p| (self.mapped[p / 64] >> (p % 64)) & 1 == u64::from(set))
    }

    fn mark(&mut self, first: usize, n: usize, set: bool) {
        for p in first..first + n {
            if set {
                self.mapped[p / 64] |= 1 << (p % 64);
            } else {
                self.mapped[p / 64] &= !(1 << (p % 64));
            }
        }
    }
}

#[derive(Debug, Default)]
struct HostState {
    regions: HashMap<u64, HostRegion>,
    held: usize,
}

impl HostState {
    /// The live region `region` names: its handle is this backend's and its base and size
    /// are those handed out with it.
    fn region(&self, region: &Region, op: BackendOp) -> Result<&HostRegion, BackendError> {
        match self.regions.get(&region.handle) {
            Some(r) if r.base == region.base && r.size == region.size => Ok(r),
            _ => Err(BackendError::new(
                op,
                format!(
                    "unknown region at {:#x} of {} bytes (not one this backend holds)",
                    region.base, region.size
                ),
            )),
        }
    }

    fn region_mut(
        &mut self,
        region: &Region,
        op: BackendOp,
    ) -> Result<&mut HostRegion, BackendError> {
        self.region(region, op)?;
        Ok(self
            .regions
            .get_mut(&region.handle)
            .expect("looked up just above"))
    }
}

/// System memory as a device.
#[derive(Debug)]
pub struct HostBackend {
    total: usize,
    granularity: usize,
    /// What the engine is told it may unmap at least (see [`HostBackend::with_physical_block`]).
    physical_block: usize,
    unified: bool,
    state: Mutex<HostState>,
}

/// Host events are complete when recorded: the host has no queue of work.
#[derive(Debug, Clone, Copy)]
pub struct HostEvent;

fn physical_memory() -> usize {
    // SAFETY: sysconf only reads system configuration values; no pointers are involved.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && page_size > 0 {
        pages as usize * page_size as usize
    } else {
        8 << 30
    }
}

fn os_error(op: BackendOp, what: &str) -> BackendError {
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOMEM) {
        BackendError::out_of_memory(op, format!("{what}: {err}"))
    } else {
        BackendError::new(op, format!("{what}: {err}"))
    }
}

impl Default for HostBackend {
    fn default() -> Self {
        HostBackend::new()
    }
}

impl HostBackend {
    /// The machine's RAM as the device.
    pub fn new() -> HostBackend {
        HostBackend::with_memory(physical_memory())
    }

    /// A device of `total` bytes (a budget, not a reservation: for replays at a chosen size).
    pub fn with_memory(total: usize) -> HostBackend {
        HostBackend {
            total,
            granularity: DEFAULT_GRANULARITY,
            physical_block: DEFAULT_GRANULARITY,
            unified: true,
            state: Mutex::new(HostState::default()),
        }
    }

    /// Reports itself as a discrete device (recommended working set = total, the seed's
    /// discrete heap sizes and watermark defaults), so that a replay of a GPU trace on host
    /// memory takes the same decisions as on the simulated device.
    pub fn discrete(mut self) -> HostBackend {
        self.unified = false;
        self
    }

    /// Announces a physical block (see [`BackendCaps::physical_block`]) of `bytes`: the engine
    /// then unmaps only whole pieces of its map calls, as it does on a device that backs each
    /// piece with one allocation, so that a replay on host memory takes that device's
    /// decisions. Host pages themselves can be unmapped one by one whatever this says.
    pub fn with_physical_block(mut self, bytes: usize) -> HostBackend {
        self.physical_block = bytes;
        self
    }

    /// Bytes held now (committed regions plus mapped pages).
    pub fn held(&self) -> usize {
        self.state.lock().held
    }

    /// Number of live regions.
    pub fn live_regions(&self) -> usize {
        self.state.lock().regions.len()
    }

    /// Changes the protection of `[offset, offset + len)` of `r`, a live region of this
    /// backend (the caller holds the table's lock, so it stays live meanwhile).
    /// The pages `[offset, offset + len)` of the page-mapped region `r`, as (first, count),
    /// when all of them are mapped (`mapped`) or none is: as the CUDA backend, a page is
    /// mapped once and only mapped pages are unmapped.
    fn pages_all(
        &self,
        r: &HostRegion,
        offset: usize,
        len: usize,
        op: BackendOp,
        mapped: bool,
    ) -> Result<(usize, usize), BackendError> {
        if r.committed {
            return Err(BackendError::new(
                op,
                "region is committed, not page-mapped",
            ));
        }
        check_page_range(r.size, offset, len, self.granularity, op)?;
        let (first, n) = (offset / self.granularity, len / self.granularity);
        if !r.pages_are(first, n, mapped) {
            let state = if mapped {
                "is not wholly mapped"
            } else {
                "is already mapped in part or whole"
            };
            return Err(BackendError::new(
                op,
                format!("range [{offset:#x}, {:#x}) {state}", offset + len),
            ));
        }
        Ok((first, n))
    }

    fn protect(
        &self,
        r: &HostRegion,
        offset: usize,
        len: usize,
        op: BackendOp,
        prot: libc::c_int,
    ) -> Result<(), BackendError> {
        check_page_range(r.size, offset, len, self.granularity, op)?;
        let addr = (r.base as usize + offset) as *mut libc::c_void;
        if prot == libc::PROT_NONE {
            // SAFETY: [addr, addr+len) lies inside the mapping this backend created for `r`
            // (range checked against its recorded size above; `r` comes from the table, whose
            // lock the caller holds); the engine unmaps only pages no buffer uses, so
            // discarding their contents is what it asks for.
            if unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) } != 0 {
                return Err(os_error(op, "madvise"));
            }
        }
        // SAFETY: same range as above, inside our own live mapping; changing its protection
        // affects no memory outside it.
        if unsafe { libc::mprotect(addr, len, prot) } != 0 {
            return Err(os_error(op, "mprotect"));
        }
        Ok(())
    }
}

impl Backend for HostBackend {
    type Event = HostEvent;

    fn caps(&self) -> BackendCaps {
        BackendCaps {
            shared_storage: true,
            unified_memory: self.unified,
            page_mapping: true,
            granularity: self.granularity,
            // mprotect changes any page on its own; a larger block is announced only to take
            // the decisions of a device that allocates whole pieces.
            physical_block: self.physical_block,
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
        let committed = mapped || storage == Storage::Shared;
        // Held from the budget check to the count's update, so that concurrent calls cannot
        // all pass the check.
        let mut st = self.state.lock();
        if committed && st.held + size > self.total {
            return Err(BackendError::out_of_memory(
                BackendOp::Reserve,
                format!(
                    "host budget of {} bytes has {} free, {size} asked",
                    self.total,
                    self.total.saturating_sub(st.held)
                ),
            ));
        }
        let map_len = size
            .checked_add(g)
            .ok_or_else(|| BackendError::new(BackendOp::Reserve, "size overflows"))?;
        let prot = if committed {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_NONE
        };
        // SAFETY: an anonymous private mapping at an address the kernel chooses; no existing
        // memory is touched. The result is checked against MAP_FAILED below.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if start == libc::MAP_FAILED {
            return Err(os_error(BackendOp::Reserve, "mmap"));
        }
        let start = start as usize;
        let base = (start.div_ceil(g) * g) as u64;
        let handle = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
        st.regions.insert(
            handle,
            HostRegion {
                map_start: start,
                map_len,
                base,
                size,
                committed,
                mapped_bytes: 0,
                mapped: if committed {
                    Vec::new()
                } else {
                    vec![0; (size / g).div_ceil(64)]
                },
            },
        );
        if committed {
            st.held += size;
        }
        Ok(Region {
            base,
            size,
            host_base: Some(base),
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
        // SAFETY: exactly the mapping mmap returned for this region, removed from the table
        // above so it cannot be released twice; the engine releases a region only when no
        // buffer lives in it.
        if unsafe { libc::munmap(r.map_start as *mut libc::c_void, r.map_len) } != 0 {
            let err = os_error(BackendOp::Release, "munmap");
            st.regions.insert(region.handle, r);
            return Err(err);
        }
        st.held -= if r.committed { r.size } else { r.mapped_bytes };
        Ok(())
    }

    fn map(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        // One lock hold from the checks to the counts' update (see `reserve`).
        let mut st = self.state.lock();
        let held = st.held;
        let r = st.region(region, BackendOp::Map)?;
        let (first, n) = self.pages_all(r, offset, len, BackendOp::Map, false)?;
        if held + len > self.total {
            return Err(BackendError::out_of_memory(
                BackendOp::Map,
                format!(
                    "host budget has {} free, {len} asked",
                    self.total.saturating_sub(held)
                ),
            ));
        }
        self.protect(
            r,
            offset,
            len,
            BackendOp::Map,
            libc::PROT_READ | libc::PROT_WRITE,
        )?;
        let r = st.region_mut(region, BackendOp::Map)?;
        r.mapped_bytes += len;
        r.mark(first, n, true);
        st.held += len;
        Ok(())
    }

    fn unmap(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        let mut st = self.state.lock();
        let r = st.region(region, BackendOp::Unmap)?;
        let (first, n) = self.pages_all(r, offset, len, BackendOp::Unmap, true)?;
        self.protect(r, offset, len, BackendOp::Unmap, libc::PROT_NONE)?;
        let r = st.region_mut(region, BackendOp::Unmap)?;
        r.mapped_bytes -= len;
        r.mark(first, n, false);
        st.held -= len;
        Ok(())
    }

    fn record_event(&self, _stream: StreamId) -> Result<HostEvent, BackendError> {
        Ok(HostEvent)
    }

    fn event_complete(&self, _event: &HostEvent) -> Result<bool, BackendError> {
        Ok(true)
    }

    fn wait_event(&self, _event: &HostEvent) -> Result<(), BackendError> {
        Ok(())
    }

    fn memory_info(&self) -> MemoryInfo {
        let held = self.state.lock().held;
        MemoryInfo {
            total: self.total,
            free: self.total.saturating_sub(held),
            recommended_max: if self.unified {
                self.total / 4 * 3
            } else {
                self.total
            },
        }
    }

    fn write(&self, region: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError> {
        let st = self.state.lock();
        let r = st.region(region, BackendOp::Write)?;
        if offset.checked_add(bytes.len()).is_none_or(|e| e > r.size) {
            return Err(BackendError::new(
                BackendOp::Write,
                "write outside the region",
            ));
        }
        if !r.committed {
            return Err(BackendError::new(
                BackendOp::Write,
                "writes go to committed (shared) regions only",
            ));
        }
        let dst = (r.base as usize + offset) as *mut u8;
        // SAFETY: dst..dst+len lies inside a live, committed, read-write mapping of this
        // backend (the region and its bounds come from the table, checked above; the table
        // lock keeps it from being released meanwhile); `bytes` is a distinct Rust slice, so
        // the ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
        Ok(())
    }
}

impl Drop for HostBackend {
    fn drop(&mut self) {
        for (_, r) in self.state.get_mut().regions.drain() {
            // SAFETY: the mapping came from mmap in `reserve` and was never unmapped (it is
            // still in the table); nothing can use it once the backend is gone.
            unsafe { libc::munmap(r.map_start as *mut libc::c_void, r.map_len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_mapped_once_and_unmapped_only_while_mapped() {
        // As the CUDA backend and the sim refuse them: held must count each page once.
        let g = DEFAULT_GRANULARITY;
        let b = HostBackend::with_memory(2 * g);
        let r = b.reserve(8 * g, Storage::Private, false).unwrap();
        b.map(&r, 0, 2 * g).unwrap();
        let never_mapped = b.unmap(&r, 4 * g, 2 * g).unwrap_err();
        assert!(
            never_mapped.message.contains("not wholly mapped"),
            "{never_mapped:?}"
        );
        assert!(b.unmap(&r, g, 2 * g).is_err(), "half of it is mapped");
        assert_eq!(b.held(), 2 * g, "pages 0 and 1 are still mapped");
        // The budget of two pages grants no third.
        assert!(b.map(&r, 2 * g, g).is_err(), "held {}", b.held());
        let again = b.map(&r, g, g).unwrap_err();
        assert!(again.message.contains("already mapped"), "{again:?}");
        assert_eq!(b.held(), 2 * g);
        b.unmap(&r, 0, 2 * g).unwrap();
        assert_eq!(b.held(), 0);
        b.map(&r, 6 * g, 2 * g).unwrap();
        assert_eq!(b.held(), 2 * g);
    }

    #[test]
    fn page_mapping_round_trip() {
        let b = HostBackend::with_memory(1 << 30);
        let g = DEFAULT_GRANULARITY;
        let r = b.reserve(8 * g, Storage::Private, false).unwrap();
        assert_eq!(r.base as usize % g, 0);
        assert_eq!(b.held(), 0);
        b.map(&r, 2 * g, 2 * g).unwrap();
        assert_eq!(b.held(), 2 * g);
        b.unmap(&r, 2 * g, 2 * g).unwrap();
        assert_eq!(b.held(), 0);
        assert!(b.map(&r, 1, g).is_err());
        b.release(&r).unwrap();
        assert!(b.release(&r).is_err());
    }

    #[test]
    fn a_physical_block_is_announced_not_enforced() {
        let g = DEFAULT_GRANULARITY;
        let b = HostBackend::with_memory(1 << 30).with_physical_block(8 * g);
        assert_eq!(b.caps().physical_block, 8 * g);
        assert_eq!(HostBackend::with_memory(1 << 30).caps().physical_block, g);
        let r = b.reserve(8 * g, Storage::Private, false).unwrap();
        b.map(&r, 0, 8 * g).unwrap();
        // The host still unmaps any page on its own.
        b.unmap(&r, 2 * g, g).unwrap();
        assert_eq!(b.held(), 7 * g);
        b.release(&r).unwrap();
    }

    #[test]
    fn shared_region_is_writable_and_readable() {
        let b = HostBackend::with_memory(1 << 30);
        let r = b
            .reserve(DEFAULT_GRANULARITY, Storage::Shared, true)
            .unwrap();
        b.write(&r, 128, &[1, 2, 3]).unwrap();
        assert!(b.write(&r, r.size - 1, &[1, 2]).is_err());
        b.release(&r).unwrap();
    }

    #[test]
    fn budget_is_enforced() {
        let b = HostBackend::with_memory(4 << 20);
        let err = b.reserve(8 << 20, Storage::Shared, true).unwrap_err();
        assert!(err.out_of_memory);
    }

    #[test]
    fn a_region_this_backend_did_not_hand_out_is_refused_and_untouched() {
        let g = DEFAULT_GRANULARITY;
        let b = HostBackend::with_memory(1 << 30);
        let r = b.reserve(g, Storage::Shared, true).unwrap();
        let victim = [0u8; 64];
        let forged = Region {
            base: victim.as_ptr() as u64,
            size: victim.len(),
            ..r.clone()
        };
        let err = b.write(&forged, 0, &[0xAB; 8]).unwrap_err();
        assert!(err.to_string().contains("unknown region"), "{err}");
        assert!(
            victim.iter().all(|&x| x == 0),
            "memory outside the backend was written"
        );
        assert!(b.release(&forged).is_err());
        // Another backend's region, even with a handle of the same number in its own table.
        let other = HostBackend::with_memory(1 << 30);
        let theirs = other.reserve(2 * g, Storage::Private, false).unwrap();
        let _ours = b.reserve(2 * g, Storage::Private, false).unwrap();
        assert!(b.map(&theirs, 0, g).is_err());
        assert!(b.unmap(&theirs, 0, g).is_err());
        assert!(b.write(&r, 0, &[1, 2, 3]).is_ok());
        assert!(other.write(&r, 0, &[1, 2, 3]).is_err());
        assert_eq!((b.held(), other.held()), (g, 0));
    }

    #[test]
    fn concurrent_reserves_and_maps_stay_within_the_budget() {
        let g = DEFAULT_GRANULARITY;
        for _ in 0..20 {
            let b = std::sync::Arc::new(HostBackend::with_memory(4 * g));
            let space = b.reserve(16 * g, Storage::Private, false).unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(16));
            let threads: Vec<_> = (0..16)
                .map(|i| {
                    let (b, start, space) = (b.clone(), start.clone(), space.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        if i % 2 == 0 {
                            b.reserve(g, Storage::Shared, true).is_ok()
                        } else {
                            b.map(&space, i * g, g).is_ok()
                        }
                    })
                })
                .collect();
            let granted = threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .filter(|&ok| ok)
                .count();
            assert_eq!(granted, 4, "a budget of four pages grants four");
            assert_eq!(b.held(), 4 * g);
        }
    }
}
