//! [`CudaBackend`]: the `Backend` of one CUDA device.
//!
//! Invariants:
//! - each region handed out has an entry in the backend's table under `Region::handle` (a
//!   token never reused); every call that takes a region checks that the token, base and size
//!   match an entry, so a stale or foreign `Region` is an error, not a double free;
//! - the table lock is held for the whole of a call that changes a region, so a region cannot
//!   be released while another call maps, unmaps or writes it;
//! - every call that touches the driver first makes the device's primary context current and
//!   restores the caller's context afterwards (callers come from any thread, and a process may
//!   hold one backend per device);
//! - region bases are aligned to `caps().granularity`: VMM reservations ask the driver for that
//!   alignment; plain and pinned allocations that come back less aligned are made again with one
//!   granule of slack and aligned inside it.

use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use bufferheap_core::{
    Backend, BackendCaps, BackendError, BackendOp, MemoryInfo, Region, Storage, StreamId,
};
use cudarc::driver::sys::{self, CUresult};
use parking_lot::Mutex;

use crate::driver::{self, PrimaryContext, call, driver_error, status_of};
use crate::events::{CudaEvent, EventPool};
use crate::memory::{
    Counters, DevicePages, alloc_aligned, allocation_prop, attribute, device_name, host_alloc,
    host_free, mem_get_info, plain_alloc, plain_free,
};
use crate::vmm::{PageTable, PhysicalGranularity};

/// Page size used when the device has no VMM support (then only for alignment of regions).
const FALLBACK_GRANULARITY: usize = 2 << 20;

/// Choices a caller can make when building a [`CudaBackend`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaOptions {
    /// How many physical allocations back the pages of one `map` call (see
    /// [`PhysicalGranularity`]). Default: [`PhysicalGranularity::PerBlock`] of 16 MiB: one
    /// allocation per 16 MiB piece of a `map` call, and the engine gives pieces back whole.
    pub physical: PhysicalGranularity,
    /// Synchronise the context (`cuCtxSynchronize`) before unmapping VMM pages. Default:
    /// false.
    ///
    /// `cuMemUnmap` does not reliably wait for kernels still using the pages, so *someone* must
    /// make sure no queued device work uses a page when it is unmapped. The bufferheap engine
    /// does: when it decides to unmap pages it records an event on the pool's stream, and it
    /// calls `unmap` only once that event has completed (or after waiting on it). With that
    /// contract a context-wide synchronisation would only stall every other stream. Turn this
    /// on when the backend is used outside the engine by a caller that cannot guarantee it
    /// (PyTorch's expandable segments make the same choice and synchronise before unmapping).
    pub sync_before_unmap: bool,
}

/// Counts of driver calls and figures of the page-mapped memory, for tests and statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// `cuMemCreate` calls that succeeded (physical allocations made).
    pub mem_create: u64,
    /// `cuMemMap` calls that succeeded (one per physical allocation).
    pub mem_map: u64,
    /// `cuMemSetAccess` calls that succeeded (one per contiguous run of new mappings of a
    /// `map` call: one per call when nothing in its range was backed).
    pub mem_set_access: u64,
    /// `cuMemUnmap` calls that succeeded (one per run of adjacent mappings unmapped together,
    /// or one per mapping once [`DriverStats::unmap_runs_refused`]).
    pub mem_unmap: u64,
    /// `cuMemRelease` calls that succeeded (one per physical allocation given back).
    pub mem_release: u64,
    /// `cuCtxSynchronize` calls made before unmapping.
    pub sync: u64,
    /// True once the driver refused to unmap several adjacent mappings with one call; the
    /// backend then unmaps each mapping with its own call.
    pub unmap_runs_refused: bool,
    /// Bytes the engine has mapped, over all page-mapped regions.
    pub mapped_bytes: usize,
    /// Bytes of physical allocations mapped, over all page-mapped regions (`>= mapped_bytes`).
    pub physical_bytes: usize,
    /// `physical_bytes - mapped_bytes`: unmapped by the engine, still backed. Always 0 with
    /// [`PhysicalGranularity::PerPage`] (unless a driver call failed); with
    /// [`PhysicalGranularity::PerMap`] the deferred partial unmaps.
    pub held_bytes: usize,
    /// Physical allocations currently mapped.
    pub handles: usize,
    /// Live regions of each kind: page-mapped, plain device, pinned shared.
    pub regions: [usize; 3],
    /// Idle events in the pool.
    pub idle_events: usize,
}

#[derive(Debug)]
enum Kind {
    /// Address space from `cuMemAddressReserve`, pages mapped on demand.
    Pages(PageTable),
    /// `cuMemAlloc_v2`; `raw` is the pointer to free.
    Plain { raw: sys::CUdeviceptr },
    /// `cuMemHostAlloc`; `raw_host` is the pointer to free.
    Shared { raw_host: u64 },
}

#[derive(Debug)]
struct Entry {
    base: u64,
    size: usize,
    host_base: Option<u64>,
    kind: Kind,
}

#[derive(Debug, Default)]
struct Table {
    next_token: u64,
    entries: HashMap<u64, Entry>,
}

/// The [`Backend`] of one CUDA device: device memory through the driver API, VMM page-mapped
/// regions, pinned host memory mapped into the device for shared storage, pooled CUDA events.
///
/// One per device ordinal; it retains the device's primary context (the one PyTorch's runtime
/// uses) for as long as it lives.
#[derive(Debug)]
pub struct CudaBackend {
    ordinal: usize,
    name: String,
    ctx: Arc<PrimaryContext>,
    caps: BackendCaps,
    options: CudaOptions,
    total: usize,
    last_free: AtomicUsize,
    shared_needs_slack: AtomicBool,
    table: Mutex<Table>,
    events: Arc<EventPool>,
    counters: Counters,
    /// Other devices that can reach this one's memory as peers: page-mapped memory is made
    /// accessible to them too, so that cross-device copies and peer kernels work on it, as
    /// they do on `cuMemAlloc` memory.
    peers: Vec<sys::CUdevice>,
}

impl CudaBackend {
    /// The backend of device `ordinal`, with default [`CudaOptions`]. An error (never a panic)
    /// when there is no CUDA driver, no such device, or the driver fails to start.
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        Self::with_options(ordinal, CudaOptions::default())
    }

    /// [`CudaBackend::new`] with explicit options.
    pub fn with_options(ordinal: usize, options: CudaOptions) -> Result<Self, BackendError> {
        driver::init()?;
        match catch_unwind(AssertUnwindSafe(|| Self::open(ordinal, options))) {
            Ok(result) => result,
            Err(_) => Err(BackendError::new(
                BackendOp::Init,
                format!("CUDA device {ordinal}: the driver could not be used (it panicked)"),
            )),
        }
    }

    fn open(ordinal: usize, options: CudaOptions) -> Result<Self, BackendError> {
        let count = driver::device_count()?;
        if ordinal >= count {
            return Err(BackendError::new(
                BackendOp::Init,
                format!("no CUDA device {ordinal}: the driver sees {count} device(s)"),
            ));
        }
        let ordinal_c = std::ffi::c_int::try_from(ordinal).unwrap_or(std::ffi::c_int::MAX);
        let mut device: sys::CUdevice = 0;
        call(BackendOp::Init, "cuDeviceGet", || {
            // SAFETY: `device` is a valid out-pointer; the ordinal was checked against the count.
            unsafe { sys::cuDeviceGet(&mut device, ordinal_c) }
        })?;
        let name = device_name(device)?;
        let mut total = 0usize;
        call(BackendOp::Init, "cuDeviceTotalMem", || {
            // SAFETY: `total` is a valid out-pointer; `device` came from `cuDeviceGet`.
            unsafe { sys::cuDeviceTotalMem_v2(&mut total, device) }
        })?;
        let vmm = attribute(
            device,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
        )? != 0;
        let granularity = if vmm {
            let prop = allocation_prop(device);
            let mut g = 0usize;
            call(BackendOp::Init, "cuMemGetAllocationGranularity", || {
                // SAFETY: `g` is a valid out-pointer and `prop` a fully initialised property
                // struct on this stack frame.
                unsafe {
                    sys::cuMemGetAllocationGranularity(
                        &mut g,
                        &prop,
                        sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
                    )
                }
            })?;
            if g == 0 || !g.is_power_of_two() {
                return Err(BackendError::new(
                    BackendOp::Init,
                    format!("CUDA device {ordinal}: odd VMM granularity {g}"),
                ));
            }
            g
        } else {
            FALLBACK_GRANULARITY
        };
        let mut peers = Vec::new();
        for other in 0..count {
            if other == ordinal {
                continue;
            }
            let other_c = std::ffi::c_int::try_from(other).unwrap_or(std::ffi::c_int::MAX);
            let mut peer: sys::CUdevice = 0;
            call(BackendOp::Init, "cuDeviceGet", || {
                // SAFETY: `peer` is a valid out-pointer; `other` is below the device count.
                unsafe { sys::cuDeviceGet(&mut peer, other_c) }
            })?;
            let mut can: std::ffi::c_int = 0;
            call(BackendOp::Init, "cuDeviceCanAccessPeer", || {
                // SAFETY: `can` is a valid out-pointer; both devices came from `cuDeviceGet`.
                unsafe { sys::cuDeviceCanAccessPeer(&mut can, peer, device) }
            })?;
            if can != 0 {
                peers.push(peer);
            }
        }
        let ctx = Arc::new(PrimaryContext::retain(device)?);
        let free = {
            let _guard = ctx.enter(BackendOp::Init)?;
            mem_get_info(BackendOp::Init)?.0
        };
        Ok(CudaBackend {
            ordinal,
            name,
            caps: BackendCaps {
                shared_storage: true,
                unified_memory: false,
                page_mapping: vmm,
                granularity,
                physical_block: if vmm {
                    crate::vmm::physical_block(options.physical, granularity)
                } else {
                    granularity
                },
                max_buffer_size: total,
            },
            options,
            total,
            last_free: AtomicUsize::new(free),
            shared_needs_slack: AtomicBool::new(false),
            table: Mutex::new(Table {
                next_token: 1,
                entries: HashMap::new(),
            }),
            events: EventPool::new(Arc::clone(&ctx)),
            ctx,
            counters: Counters::default(),
            peers,
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The options the backend was built with.
    pub fn options(&self) -> CudaOptions {
        self.options
    }

    /// Makes this device's primary context current on the calling thread and leaves it there
    /// (for callers that then use the driver or runtime themselves).
    pub fn bind_to_thread(&self) -> Result<(), BackendError> {
        self.ctx.bind(BackendOp::Init)
    }

    /// The primary context's handle. Valid while the backend lives.
    pub fn raw_context(&self) -> sys::CUcontext {
        self.ctx.raw()
    }

    /// Driver-call counters and page-mapping figures.
    pub fn stats(&self) -> DriverStats {
        let c = &self.counters;
        let mut s = DriverStats {
            mem_create: c.create.load(Relaxed),
            mem_map: c.map.load(Relaxed),
            mem_set_access: c.set_access.load(Relaxed),
            mem_unmap: c.unmap.load(Relaxed),
            mem_release: c.release.load(Relaxed),
            sync: c.sync.load(Relaxed),
            unmap_runs_refused: c.unmap_runs_refused.load(Relaxed),
            idle_events: self.events.idle(),
            ..DriverStats::default()
        };
        for entry in self.table.lock().entries.values() {
            match &entry.kind {
                Kind::Pages(t) => {
                    s.regions[0] += 1;
                    s.mapped_bytes += t.logical_bytes();
                    s.physical_bytes += t.physical_bytes();
                    s.held_bytes += t.held_bytes();
                    s.handles += t.handles();
                }
                Kind::Plain { .. } => s.regions[1] += 1,
                Kind::Shared { .. } => s.regions[2] += 1,
            }
        }
        s
    }

    /// Copies `out.len()` bytes at `offset` of `region` to the host with `cuMemcpyDtoH`,
    /// through the region's *device* address (also for shared regions). For page-mapped
    /// regions the bytes must lie in mapped pages. Errors carry [`BackendOp::Write`] (the
    /// trait's operations have no read).
    pub fn read(&self, region: &Region, offset: usize, out: &mut [u8]) -> Result<(), BackendError> {
        let op = BackendOp::Write;
        let table = self.table.lock();
        let entry = lookup(&table, region, op)?;
        check_span(entry, offset, out.len(), op)?;
        if out.is_empty() {
            return Ok(());
        }
        let _guard = self.ctx.enter(op)?;
        let src = entry.base + offset as u64;
        call(op, "cuMemcpyDtoH", || {
            // SAFETY: `out` is a writable host buffer of exactly `out.len()` bytes; the source
            // span lies inside the region, whose memory is live (the table lock is held) and,
            // for page-mapped regions, mapped (checked above).
            unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast::<c_void>(), src, out.len()) }
        })
    }

    fn next_token(table: &mut Table) -> u64 {
        let token = table.next_token;
        table.next_token += 1;
        token
    }

    fn reserve_pages(&self, size: usize) -> Result<(u64, Kind), BackendError> {
        let g = self.caps.granularity;
        let mut base: sys::CUdeviceptr = 0;
        call(BackendOp::Reserve, "cuMemAddressReserve", || {
            // SAFETY: `base` is a valid out-pointer; size and alignment are multiples of the
            // granularity (checked by the caller); no fixed address is requested.
            unsafe { sys::cuMemAddressReserve(&mut base, size, g, 0, 0) }
        })?;
        Ok((
            base,
            Kind::Pages(PageTable::new(size, g, self.options.physical)),
        ))
    }

    fn reserve_plain(&self, size: usize) -> Result<(u64, Kind), BackendError> {
        let (raw, base, _) =
            alloc_aligned(size, self.caps.granularity, false, plain_alloc, |raw| {
                plain_free(raw, BackendOp::Reserve)
            })?;
        Ok((base, Kind::Plain { raw }))
    }

    fn reserve_shared(&self, size: usize) -> Result<(u64, u64, Kind), BackendError> {
        let slack = self.shared_needs_slack.load(Relaxed);
        let (raw, base, host) =
            alloc_aligned(size, self.caps.granularity, slack, host_alloc, |raw| {
                host_free(raw, BackendOp::Reserve)
            })?;
        if host.1 {
            self.shared_needs_slack.store(true, Relaxed);
        }
        Ok((base, host.0, Kind::Shared { raw_host: raw }))
    }

    fn pages<'a>(&'a self, base: u64) -> DevicePages<'a> {
        DevicePages {
            base,
            device: self.ctx.device,
            peers: &self.peers,
            counters: &self.counters,
            sync: self.options.sync_before_unmap,
        }
    }

    /// Frees an entry's memory. On error the entry is still valid and may be freed again.
    fn free_entry(&self, entry: &mut Entry) -> Result<(), BackendError> {
        let op = BackendOp::Release;
        match &mut entry.kind {
            Kind::Pages(table) => {
                table.clear(&mut self.pages(entry.base))?;
                let (base, size) = (entry.base, entry.size);
                call(op, "cuMemAddressFree", || {
                    // SAFETY: `[base, base + size)` is exactly one reservation made by
                    // `cuMemAddressReserve` and nothing is mapped in it any more.
                    unsafe { sys::cuMemAddressFree(base, size) }
                })
            }
            Kind::Plain { raw } => plain_free(*raw, op),
            Kind::Shared { raw_host } => host_free(*raw_host, op),
        }
    }
}

impl Drop for CudaBackend {
    /// Frees every region still held (best effort) and the idle events. Events still held by
    /// callers are destroyed when the last of them comes back.
    fn drop(&mut self) {
        let entries: Vec<Entry> = self
            .table
            .get_mut()
            .entries
            .drain()
            .map(|(_, e)| e)
            .collect();
        if !entries.is_empty()
            && let Ok(_guard) = self.ctx.enter(BackendOp::Release)
        {
            for mut entry in entries {
                let _ = self.free_entry(&mut entry);
            }
        }
        self.events.drain();
    }
}

impl Backend for CudaBackend {
    type Event = CudaEvent;

    fn caps(&self) -> BackendCaps {
        self.caps
    }

    fn reserve(&self, size: usize, storage: Storage, mapped: bool) -> Result<Region, BackendError> {
        let op = BackendOp::Reserve;
        if size == 0 {
            return Err(BackendError::new(op, "cannot reserve 0 bytes"));
        }
        let page_mapped = storage == Storage::Private && !mapped;
        if page_mapped && !self.caps.page_mapping {
            return Err(BackendError::new(
                op,
                format!(
                    "CUDA device {} has no virtual memory management: reserve private regions \
                     mapped",
                    self.ordinal
                ),
            ));
        }
        if page_mapped && !size.is_multiple_of(self.caps.granularity) {
            return Err(BackendError::new(
                op,
                format!(
                    "{size} bytes is not a multiple of the {}-byte granularity",
                    self.caps.granularity
                ),
            ));
        }
        let _guard = self.ctx.enter(op)?;
        let (base, host_base, kind) = match (storage, page_mapped) {
            (Storage::Private, true) => {
                let (b, k) = self.reserve_pages(size)?;
                (b, None, k)
            }
            (Storage::Private, false) => {
                let (b, k) = self.reserve_plain(size)?;
                (b, None, k)
            }
            (Storage::Shared, _) => {
                let (b, h, k) = self.reserve_shared(size)?;
                (b, Some(h), k)
            }
        };
        let mut table = self.table.lock();
        let handle = Self::next_token(&mut table);
        table.entries.insert(
            handle,
            Entry {
                base,
                size,
                host_base,
                kind,
            },
        );
        Ok(Region {
            base,
            size,
            host_base,
            handle,
        })
    }

    fn release(&self, region: &Region) -> Result<(), BackendError> {
        let op = BackendOp::Release;
        let mut table = self.table.lock();
        let entry = lookup_mut(&mut table, region, op)?;
        let _guard = self.ctx.enter(op)?;
        self.free_entry(entry)?;
        table.entries.remove(&region.handle);
        Ok(())
    }

    fn map(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        let op = BackendOp::Map;
        let mut table = self.table.lock();
        let entry = lookup_mut(&mut table, region, op)?;
        let Kind::Pages(pages) = &mut entry.kind else {
            return Err(not_page_mapped(op));
        };
        let _guard = self.ctx.enter(op)?;
        pages.map(&mut self.pages(entry.base), offset, len)
    }

    /// Unmaps `[offset, offset + len)`. With [`PhysicalGranularity::PerPage`] its pages are
    /// unmapped and released at once, whatever `map` calls they came from; with
    /// [`PhysicalGranularity::PerMap`] see [`PartialUnmap`](crate::PartialUnmap) for ranges
    /// that cover an earlier `map` call only in part. No queued device work may use the pages
    /// any more, unless the backend was built with [`CudaOptions::sync_before_unmap`].
    fn unmap(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        let op = BackendOp::Unmap;
        let mut table = self.table.lock();
        let entry = lookup_mut(&mut table, region, op)?;
        let Kind::Pages(pages) = &mut entry.kind else {
            return Err(not_page_mapped(op));
        };
        let _guard = self.ctx.enter(op)?;
        pages.unmap(&mut self.pages(entry.base), offset, len)
    }

    fn record_event(&self, stream: StreamId) -> Result<CudaEvent, BackendError> {
        let op = BackendOp::RecordEvent;
        let _guard = self.ctx.enter(op)?;
        let event = self.events.take()?;
        let raw = event.as_raw();
        let stream = stream as usize as sys::CUstream;
        call(op, "cuEventRecord", || {
            // SAFETY: `raw` is a live event owned by `event`; `stream` is the caller's stream
            // handle (0 is the legacy default stream), which the trait requires to be valid.
            unsafe { sys::cuEventRecord(raw, stream) }
        })?;
        Ok(event)
    }

    fn event_complete(&self, event: &CudaEvent) -> Result<bool, BackendError> {
        let op = BackendOp::QueryEvent;
        let _guard = self.ctx.enter(op)?;
        let raw = event.as_raw();
        let status = status_of(op, "cuEventQuery", || {
            // SAFETY: `raw` is a live event owned by `event`, borrowed for this call.
            unsafe { sys::cuEventQuery(raw) }
        })?;
        match status {
            CUresult::CUDA_SUCCESS => Ok(true),
            CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(driver_error(op, "cuEventQuery", other)),
        }
    }

    fn wait_event(&self, event: &CudaEvent) -> Result<(), BackendError> {
        let op = BackendOp::WaitEvent;
        let _guard = self.ctx.enter(op)?;
        let raw = event.as_raw();
        call(op, "cuEventSynchronize", || {
            // SAFETY: `raw` is a live event owned by `event`, borrowed for this call.
            unsafe { sys::cuEventSynchronize(raw) }
        })
    }

    fn memory_info(&self) -> MemoryInfo {
        let fresh = self
            .ctx
            .enter(BackendOp::Init)
            .and_then(|_guard| mem_get_info(BackendOp::Init));
        let (free, total) = match fresh {
            Ok((free, total)) => {
                self.last_free.store(free, Relaxed);
                (free, total)
            }
            // The trait has no error here: report the last figures the driver gave.
            Err(_) => (self.last_free.load(Relaxed), self.total),
        };
        MemoryInfo {
            total,
            free,
            recommended_max: total,
        }
    }

    fn write(&self, region: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError> {
        let op = BackendOp::Write;
        let table = self.table.lock();
        let entry = lookup(&table, region, op)?;
        check_span(entry, offset, bytes.len(), op)?;
        if bytes.is_empty() {
            return Ok(());
        }
        if let (Kind::Shared { .. }, Some(host)) = (&entry.kind, entry.host_base) {
            let dst = (host + offset as u64) as usize as *mut u8;
            // SAFETY: the region is a live pinned host allocation of `size` bytes at
            // `host_base` (its entry exists and the table lock keeps it from being released);
            // `offset + bytes.len() <= size` was checked; `bytes` is a Rust slice, so it does
            // not overlap memory this backend allocated. No Rust reference to the destination
            // exists (the device may read it concurrently; ordering that is the engine's job).
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len()) };
            return Ok(());
        }
        let _guard = self.ctx.enter(op)?;
        let dst = entry.base + offset as u64;
        call(op, "cuMemcpyHtoD", || {
            // SAFETY: `bytes` is a readable host buffer of `bytes.len()` bytes; the destination
            // span lies inside the region's live device memory and, for page-mapped regions,
            // inside mapped pages (checked above).
            unsafe { sys::cuMemcpyHtoD_v2(dst, bytes.as_ptr().cast::<c_void>(), bytes.len()) }
        })
    }
}

// --- helpers -------------------------------------------------------------------------------

fn lookup<'t>(table: &'t Table, region: &Region, op: BackendOp) -> Result<&'t Entry, BackendError> {
    match table.entries.get(&region.handle) {
        Some(e) if e.base == region.base && e.size == region.size => Ok(e),
        _ => Err(unknown_region(region, op)),
    }
}

fn lookup_mut<'t>(
    table: &'t mut Table,
    region: &Region,
    op: BackendOp,
) -> Result<&'t mut Entry, BackendError> {
    match table.entries.get_mut(&region.handle) {
        Some(e) if e.base == region.base && e.size == region.size => Ok(e),
        _ => Err(unknown_region(region, op)),
    }
}

fn unknown_region(region: &Region, op: BackendOp) -> BackendError {
    BackendError::new(
        op,
        format!(
            "region {:#x}+{:#x} (token {}) is not a live region of this backend",
            region.base, region.size, region.handle
        ),
    )
}

fn not_page_mapped(op: BackendOp) -> BackendError {
    BackendError::new(op, "the region was not reserved for page mapping")
}

/// Checks that `[offset, offset + len)` lies in the region and, for page-mapped regions, in
/// mapped pages.
fn check_span(entry: &Entry, offset: usize, len: usize, op: BackendOp) -> Result<(), BackendError> {
    let in_bounds = offset.checked_add(len).is_some_and(|end| end <= entry.size);
    if !in_bounds {
        return Err(BackendError::new(
            op,
            format!(
                "bytes [{offset:#x}, +{len:#x}) fall outside the {:#x}-byte region",
                entry.size
            ),
        ));
    }
    if let Kind::Pages(pages) = &entry.kind
        && !pages.is_mapped(offset, len)
    {
        return Err(BackendError::new(
            op,
            format!("bytes [{offset:#x}, +{len:#x}) are not in mapped pages"),
        ));
    }
    Ok(())
}
