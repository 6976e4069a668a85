//! The thin layer over the CUDA driver: one way to call it, one way to turn its failures into
//! [`BackendError`]s, and the device's primary context.
//!
//! Invariants:
//! - every driver call of this crate goes through [`call`], so a failure is a value carrying the
//!   operation and the driver's error name, and a panic inside the loader (a symbol the
//!   installed driver lacks) is caught and becomes an error too;
//! - a [`PrimaryContext`] holds one retain of the device's primary context for as long as it
//!   lives and releases it on drop; everything that needs the context (regions, pooled events)
//!   holds an `Arc` to it, so the context outlives them;
//! - [`PrimaryContext::enter`] makes the context current for the duration of one call and then
//!   restores whatever context the calling thread had before, so a caller (PyTorch's runtime,
//!   another device's backend) never sees its current device change under it.

use std::ffi::CStr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;

use bufferheap_core::{BackendError, BackendOp};
use cudarc::driver::sys::{self, CUresult};

/// Calls the driver: `f` performs one driver function and returns its status. `what` names
/// that function in the error message.
pub(crate) fn call(
    op: BackendOp,
    what: &'static str,
    f: impl FnOnce() -> CUresult,
) -> Result<(), BackendError> {
    match status_of(op, what, f)? {
        CUresult::CUDA_SUCCESS => Ok(()),
        status => Err(driver_error(op, what, status)),
    }
}

/// Like [`call`], but hands back the driver's status for the caller to judge (for functions
/// where a status other than success is an answer, such as `cuEventQuery`). Errs only when the
/// driver could not be called at all.
pub(crate) fn status_of(
    op: BackendOp,
    what: &'static str,
    f: impl FnOnce() -> CUresult,
) -> Result<CUresult, BackendError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        BackendError::new(
            op,
            format!(
                "{what}: the CUDA driver could not be used: {}",
                panic_text(&payload)
            ),
        )
    })
}

/// The one place a driver status becomes a [`BackendError`]: the operation, the driver
/// function, the driver's own error name and its number. `CUDA_ERROR_OUT_OF_MEMORY` is marked
/// `out_of_memory` so the engine may free cached memory and try again.
pub(crate) fn driver_error(op: BackendOp, what: &str, status: CUresult) -> BackendError {
    let message = format!("{what} returned {} ({})", error_name(status), status as u32);
    if status == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        BackendError::out_of_memory(op, message)
    } else {
        BackendError::new(op, message)
    }
}

/// The driver's name for a status (`cuGetErrorName`), or `CUresult(<n>)` where it has none.
pub(crate) fn error_name(status: CUresult) -> String {
    let mut name: *const std::ffi::c_char = ptr::null();
    let looked_up = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `cuGetErrorName` writes a pointer to a static, NUL-terminated string into
        // `name`, which is a valid `*const c_char` slot on this stack frame.
        unsafe { sys::cuGetErrorName(status, &mut name) }
    }));
    match looked_up {
        Ok(CUresult::CUDA_SUCCESS) if !name.is_null() => {
            // SAFETY: on success the driver set `name` to a static NUL-terminated string that
            // lives as long as the loaded driver (for the rest of the process).
            unsafe { CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        }
        _ => format!("CUresult({})", status as u32),
    }
}

fn panic_text(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic while loading the driver".to_owned()
    }
}

/// True when the CUDA driver library (`libcuda.so`) can be loaded. Without it no driver call
/// may be made (the loader would panic).
pub fn driver_present() -> bool {
    catch_unwind(|| {
        // SAFETY: `is_culib_present` only tries to `dlopen` the candidate library names and
        // drops the handles; it touches no other state.
        unsafe { sys::is_culib_present() }
    })
    .unwrap_or(false)
}

/// Initialises the driver (`cuInit`), after checking that it can be loaded at all.
pub(crate) fn init() -> Result<(), BackendError> {
    if !driver_present() {
        return Err(BackendError::new(
            BackendOp::Init,
            "no CUDA driver: libcuda.so (libcuda.so.1) was not found by the dynamic loader",
        ));
    }
    call(BackendOp::Init, "cuInit", || {
        // SAFETY: `cuInit(0)` takes no pointers; calling it more than once is allowed.
        unsafe { sys::cuInit(0) }
    })
}

/// The number of CUDA devices: `Ok(0)` when there is no driver or the driver sees no device,
/// an error when the driver is present but cannot start. Never panics.
pub fn device_count() -> Result<usize, BackendError> {
    if !driver_present() {
        return Ok(0);
    }
    let status = status_of(BackendOp::Init, "cuInit", || {
        // SAFETY: `cuInit(0)` takes no pointers.
        unsafe { sys::cuInit(0) }
    })?;
    match status {
        CUresult::CUDA_SUCCESS => {}
        CUresult::CUDA_ERROR_NO_DEVICE => return Ok(0),
        other => return Err(driver_error(BackendOp::Init, "cuInit", other)),
    }
    let mut count: std::ffi::c_int = 0;
    call(BackendOp::Init, "cuDeviceGetCount", || {
        // SAFETY: `count` is a valid, writable `c_int` on this stack frame.
        unsafe { sys::cuDeviceGetCount(&mut count) }
    })?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// A retained primary context of one device (the context PyTorch's runtime uses as well, so
/// pointers from either side are valid on the other).
#[derive(Debug)]
pub(crate) struct PrimaryContext {
    pub(crate) device: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a `CUcontext` is an opaque driver handle; the driver allows it to be made current on
// and used from any thread, and `PrimaryContext` never dereferences it. The retain it holds is
// released exactly once, in `Drop`.
unsafe impl Send for PrimaryContext {}
// SAFETY: all methods take `&self` and only pass the handle to thread-safe driver functions.
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    /// Retains the primary context of `device` (`cuDevicePrimaryCtxRetain`).
    pub(crate) fn retain(device: sys::CUdevice) -> Result<Self, BackendError> {
        let mut ctx: sys::CUcontext = ptr::null_mut();
        call(BackendOp::Init, "cuDevicePrimaryCtxRetain", || {
            // SAFETY: `ctx` is a valid out-pointer on this stack frame; `device` came from
            // `cuDeviceGet`.
            unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, device) }
        })?;
        Ok(PrimaryContext { device, ctx })
    }

    /// Makes the context current on the calling thread until the guard drops, then restores
    /// the thread's previous context (none included).
    pub(crate) fn enter(&self, op: BackendOp) -> Result<ContextGuard, BackendError> {
        let mut previous: sys::CUcontext = ptr::null_mut();
        call(op, "cuCtxGetCurrent", || {
            // SAFETY: `previous` is a valid out-pointer on this stack frame.
            unsafe { sys::cuCtxGetCurrent(&mut previous) }
        })?;
        if previous == self.ctx {
            return Ok(ContextGuard { restore: None });
        }
        self.bind(op)?;
        Ok(ContextGuard {
            restore: Some(previous),
        })
    }

    /// Makes the context current on the calling thread and leaves it there.
    pub(crate) fn bind(&self, op: BackendOp) -> Result<(), BackendError> {
        call(op, "cuCtxSetCurrent", || {
            // SAFETY: `self.ctx` is a live context: this value holds a retain on it.
            unsafe { sys::cuCtxSetCurrent(self.ctx) }
        })
    }

    pub(crate) fn raw(&self) -> sys::CUcontext {
        self.ctx
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        let device = self.device;
        // A failure here (the driver already shut down at process exit) leaves nothing to undo.
        let _ = call(BackendOp::Release, "cuDevicePrimaryCtxRelease", || {
            // SAFETY: this value holds exactly one retain of `device`'s primary context,
            // given back here once.
            unsafe { sys::cuDevicePrimaryCtxRelease_v2(device) }
        });
    }
}

/// Restores the calling thread's previous context when dropped (see [`PrimaryContext::enter`]).
#[derive(Debug)]
pub(crate) struct ContextGuard {
    restore: Option<sys::CUcontext>,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        if let Some(previous) = self.restore {
            // Nothing sensible can be done if restoring fails; the call itself succeeded.
            let _ = call(BackendOp::Init, "cuCtxSetCurrent", || {
                // SAFETY: `previous` was the thread's current context (or null, meaning none)
                // when the guard was made, a moment ago. CUDA lets a context be destroyed while
                // current somewhere, but makes whoever destroys it responsible for no call using
                // it meanwhile; the thread's own code cannot do so during this call, so it is
                // live unless another thread broke that rule for a context this thread uses.
                unsafe { sys::cuCtxSetCurrent(previous) }
            });
        }
    }
}
