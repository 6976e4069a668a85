//! Device memory through the driver: the page driver of page-mapped regions (`cuMemCreate`,
//! `cuMemMap`, `cuMemSetAccess`, `cuMemUnmap`, `cuMemRelease`) and the allocations behind plain
//! and shared regions.
//!
//! Invariants:
//! - every function here expects the backend's context to be current on the calling thread
//!   (the backend enters it before calling);
//! - [`alloc_aligned`] returns device addresses aligned to the granularity it is given, and
//!   the pointer to free separately, since alignment may move the base inside the allocation;
//! - page-mapped memory is made accessible to the owning device only.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use bufferheap_core::{BackendError, BackendOp};
use cudarc::driver::sys::{self, CUresult};

use crate::driver::{call, driver_error, status_of};
use crate::vmm::PageDriver;

/// Driver calls made, counted for statistics and tests, and what the driver was found to
/// refuse.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) create: AtomicU64,
    pub(crate) map: AtomicU64,
    pub(crate) set_access: AtomicU64,
    pub(crate) unmap: AtomicU64,
    pub(crate) release: AtomicU64,
    pub(crate) sync: AtomicU64,
    /// Set once the driver refused one `cuMemUnmap` over several adjacent mappings; from then
    /// on each mapping is unmapped with its own call.
    pub(crate) unmap_runs_refused: AtomicBool,
}

/// `cuMemCreate`/`cuMemMap`/`cuMemSetAccess`/`cuMemUnmap`/`cuMemRelease` at offsets of one
/// page-mapped region.
pub(crate) struct DevicePages<'a> {
    pub(crate) base: u64,
    pub(crate) device: sys::CUdevice,
    /// Devices granted access besides `device` (its peers).
    pub(crate) peers: &'a [sys::CUdevice],
    pub(crate) counters: &'a Counters,
    pub(crate) sync: bool,
}

impl DevicePages<'_> {
    fn unmap_one(&self, offset: usize, len: usize) -> Result<(), BackendError> {
        let ptr = self.base + offset as u64;
        call(BackendOp::Unmap, "cuMemUnmap", || {
            // SAFETY: `[ptr, ptr + len)` is exactly one earlier `cuMemMap` of this region (the
            // page table passes whole mappings only).
            unsafe { sys::cuMemUnmap(ptr, len) }
        })?;
        self.counters.unmap.fetch_add(1, Relaxed);
        Ok(())
    }
}

impl PageDriver for DevicePages<'_> {
    fn create(&mut self, len: usize) -> Result<u64, BackendError> {
        let prop = allocation_prop(self.device);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        call(BackendOp::Map, "cuMemCreate", || {
            // SAFETY: `handle` is a valid out-pointer; `prop` is fully initialised; `len` is a
            // multiple of the granularity (the page table checks ranges).
            unsafe { sys::cuMemCreate(&mut handle, len, &prop, 0) }
        })?;
        self.counters.create.fetch_add(1, Relaxed);
        Ok(handle)
    }

    fn map(&mut self, offset: usize, len: usize, handle: u64) -> Result<(), BackendError> {
        let ptr = self.base + offset as u64;
        call(BackendOp::Map, "cuMemMap", || {
            // SAFETY: `[ptr, ptr + len)` lies inside this region's reservation and is unmapped
            // (the page table maps only its gaps); `handle` is a live allocation of exactly
            // `len` bytes, mapped whole (offset 0).
            unsafe { sys::cuMemMap(ptr, len, 0, handle, 0) }
        })?;
        self.counters.map.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Grants this device, and the devices that can reach it as peers, read/write access with
    /// one call, however many mappings the range spans: the driver takes any fully mapped range
    /// ("The range must be a fully mapped address range containing all allocations created by
    /// cuMemMap / cuMemCreate") and one descriptor per device. Peers get access so that
    /// PyTorch's cross-device copies and peer kernels work on these pages, as expandable
    /// segments grant them.
    fn set_access(&mut self, offset: usize, len: usize) -> Result<(), BackendError> {
        let ptr = self.base + offset as u64;
        let descs: Vec<sys::CUmemAccessDesc> = std::iter::once(self.device)
            .chain(self.peers.iter().copied())
            .map(|d| sys::CUmemAccessDesc {
                location: device_location(d),
                flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
            })
            .collect();
        call(BackendOp::Map, "cuMemSetAccess", || {
            // SAFETY: `[ptr, ptr + len)` is fully mapped (whole, adjacent mappings of this
            // region, just made); `descs` holds `descs.len()` initialised descriptors.
            unsafe { sys::cuMemSetAccess(ptr, len, descs.as_ptr(), descs.len()) }
        })?;
        self.counters.set_access.fetch_add(1, Relaxed);
        Ok(())
    }

    /// A run of several mappings is unmapped with one `cuMemUnmap` over all of it, as
    /// NVIDIA's `vectorAddMMAP` sample does with its per-device stripes. Should the driver
    /// refuse such a range (`CUDA_ERROR_INVALID_VALUE` or `CUDA_ERROR_NOT_SUPPORTED`, argument
    /// checks, taken to have changed nothing), the mappings are unmapped one by one, now and
    /// from then on (`DriverStats::unmap_runs_refused`).
    fn unmap(&mut self, offset: usize, lens: &[usize]) -> Result<(), (usize, BackendError)> {
        let op = BackendOp::Unmap;
        if lens.len() > 1 && !self.counters.unmap_runs_refused.load(Relaxed) {
            let ptr = self.base + offset as u64;
            let total: usize = lens.iter().sum();
            let status = status_of(op, "cuMemUnmap", || {
                // SAFETY: `[ptr, ptr + total)` is a run of whole, adjacent mappings of this
                // region (earlier `cuMemMap` calls), nothing else.
                unsafe { sys::cuMemUnmap(ptr, total) }
            })
            .map_err(|err| (0, err))?;
            match status {
                CUresult::CUDA_SUCCESS => {
                    self.counters.unmap.fetch_add(1, Relaxed);
                    return Ok(());
                }
                CUresult::CUDA_ERROR_INVALID_VALUE | CUresult::CUDA_ERROR_NOT_SUPPORTED => {
                    self.counters.unmap_runs_refused.store(true, Relaxed);
                }
                other => return Err((0, driver_error(op, "cuMemUnmap", other))),
            }
        }
        let mut at = offset;
        for (i, &len) in lens.iter().enumerate() {
            self.unmap_one(at, len).map_err(|err| (i, err))?;
            at += len;
        }
        Ok(())
    }

    fn release(&mut self, handle: u64) -> Result<(), BackendError> {
        call(BackendOp::Unmap, "cuMemRelease", || {
            // SAFETY: `handle` came from `cuMemCreate`, is no longer mapped, and is released
            // once (the page table forgets it).
            unsafe { sys::cuMemRelease(handle) }
        })?;
        self.counters.release.fetch_add(1, Relaxed);
        Ok(())
    }

    fn quiesce(&mut self) -> Result<(), BackendError> {
        if !self.sync {
            return Ok(());
        }
        call(BackendOp::Unmap, "cuCtxSynchronize", || {
            // SAFETY: takes no arguments; the backend's context is current.
            unsafe { sys::cuCtxSynchronize() }
        })?;
        self.counters.sync.fetch_add(1, Relaxed);
        Ok(())
    }
}

pub(crate) fn device_location(device: sys::CUdevice) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: device,
    }
}

/// Pinned device memory on `device`, no exportable handle.
pub(crate) fn allocation_prop(device: sys::CUdevice) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: device_location(device),
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

pub(crate) fn attribute(
    device: sys::CUdevice,
    attr: sys::CUdevice_attribute,
) -> Result<i32, BackendError> {
    let mut value = 0;
    call(BackendOp::Init, "cuDeviceGetAttribute", || {
        // SAFETY: `value` is a valid out-pointer; `device` came from `cuDeviceGet`.
        unsafe { sys::cuDeviceGetAttribute(&mut value, attr, device) }
    })?;
    Ok(value)
}

pub(crate) fn device_name(device: sys::CUdevice) -> Result<String, BackendError> {
    let mut buf = [0u8; 256];
    call(BackendOp::Init, "cuDeviceGetName", || {
        // SAFETY: the driver writes at most `buf.len()` bytes, NUL-terminated, into `buf`.
        unsafe { sys::cuDeviceGetName(buf.as_mut_ptr().cast(), buf.len() as i32, device) }
    })?;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// `(free, total)` of the current context's device.
pub(crate) fn mem_get_info(op: BackendOp) -> Result<(usize, usize), BackendError> {
    let (mut free, mut total) = (0usize, 0usize);
    call(op, "cuMemGetInfo", || {
        // SAFETY: both are valid out-pointers; the caller made a context current.
        unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }
    })?;
    Ok((free, total))
}

/// One allocation attempt: `(pointer to free, device address, host address)`.
pub(crate) type Alloc = (u64, u64, Option<u64>);

/// Allocates `size` bytes whose device address is aligned to `g`. Tries the exact size first
/// (unless `slack_first`); an allocation that comes back less aligned is freed and made again
/// `g` bytes larger, then aligned inside. Returns the pointer to free, the aligned device
/// address, and `(aligned host address, whether slack was needed)`.
pub(crate) fn alloc_aligned(
    size: usize,
    g: usize,
    slack_first: bool,
    alloc: impl Fn(usize) -> Result<Alloc, BackendError>,
    free: impl Fn(u64) -> Result<(), BackendError>,
) -> Result<(u64, u64, (u64, bool)), BackendError> {
    if !slack_first {
        let (raw, dev, host) = alloc(size)?;
        if dev % g as u64 == 0 {
            return Ok((raw, dev, (host.unwrap_or(0), false)));
        }
        free(raw)?;
    }
    let padded = size.checked_add(g).ok_or_else(|| {
        BackendError::new(BackendOp::Reserve, format!("{size} bytes is too large"))
    })?;
    let (raw, dev, host) = alloc(padded)?;
    let delta = dev.next_multiple_of(g as u64) - dev;
    Ok((raw, dev + delta, (host.map_or(0, |h| h + delta), true)))
}

pub(crate) fn plain_alloc(size: usize) -> Result<Alloc, BackendError> {
    let mut ptr: sys::CUdeviceptr = 0;
    call(BackendOp::Reserve, "cuMemAlloc", || {
        // SAFETY: `ptr` is a valid out-pointer; the caller made the context current.
        unsafe { sys::cuMemAlloc_v2(&mut ptr, size) }
    })?;
    Ok((ptr, ptr, None))
}

pub(crate) fn plain_free(ptr: u64, op: BackendOp) -> Result<(), BackendError> {
    call(op, "cuMemFree", || {
        // SAFETY: `ptr` came from `cuMemAlloc_v2` and is freed once (its entry goes with it).
        unsafe { sys::cuMemFree_v2(ptr) }
    })
}

pub(crate) fn host_alloc(size: usize) -> Result<Alloc, BackendError> {
    let mut host: *mut c_void = std::ptr::null_mut();
    let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
    call(BackendOp::Reserve, "cuMemHostAlloc", || {
        // SAFETY: `host` is a valid out-pointer; the flags are valid; the context is current.
        unsafe { sys::cuMemHostAlloc(&mut host, size, flags) }
    })?;
    let raw = host as usize as u64;
    let mut dev: sys::CUdeviceptr = 0;
    let mapped = call(BackendOp::Reserve, "cuMemHostGetDevicePointer", || {
        // SAFETY: `host` is a live allocation made with `CU_MEMHOSTALLOC_DEVICEMAP`; `dev` is
        // a valid out-pointer; flags must be 0.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) }
    });
    if let Err(err) = mapped {
        let _ = host_free(raw, BackendOp::Reserve);
        return Err(err);
    }
    Ok((raw, dev, Some(raw)))
}

pub(crate) fn host_free(raw: u64, op: BackendOp) -> Result<(), BackendError> {
    let host = raw as usize as *mut c_void;
    call(op, "cuMemFreeHost", || {
        // SAFETY: `host` came from `cuMemHostAlloc` and is freed once (its entry goes with it).
        unsafe { sys::cuMemFreeHost(host) }
    })
}
