//! Pooled CUDA events.
//!
//! Invariants:
//! - every `CUevent` here was created with `CU_EVENT_DISABLE_TIMING` in the pool's context, and
//!   is owned either by exactly one [`CudaEvent`] or by the pool's idle list, never both;
//! - dropping a [`CudaEvent`] makes no driver call unless the idle list is full: it only pushes
//!   the event back, so the engine may drop events anywhere, under its lock or not;
//! - the pool holds an `Arc` to the primary context, so the context is still retained when the
//!   last event (which may outlive the backend) comes back and the pool destroys its events.

use std::sync::Arc;

use bufferheap_core::{BackendError, BackendOp};
use cudarc::driver::sys;
use parking_lot::Mutex;

use crate::driver::{PrimaryContext, call};

/// Idle events kept for reuse; more than this are destroyed when they come back.
const MAX_IDLE: usize = 1024;

/// A raw event handle.
#[derive(Debug)]
struct RawEvent(sys::CUevent);

// SAFETY: a `CUevent` is an opaque driver handle; the driver allows recording, querying,
// synchronizing and destroying it from any thread. Ownership rules above keep it from being
// destroyed while another owner uses it.
unsafe impl Send for RawEvent {}
// SAFETY: shared references only pass the handle to driver functions that are thread-safe.
unsafe impl Sync for RawEvent {}

/// The idle events of one backend.
#[derive(Debug)]
pub(crate) struct EventPool {
    ctx: Arc<PrimaryContext>,
    idle: Mutex<Vec<RawEvent>>,
}

impl EventPool {
    pub(crate) fn new(ctx: Arc<PrimaryContext>) -> Arc<Self> {
        Arc::new(EventPool {
            ctx,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// An idle event, or a new one. The caller has made the pool's context current.
    pub(crate) fn take(self: &Arc<Self>) -> Result<CudaEvent, BackendError> {
        let raw = match self.idle.lock().pop() {
            Some(raw) => raw,
            None => {
                let mut ev: sys::CUevent = std::ptr::null_mut();
                call(BackendOp::RecordEvent, "cuEventCreate", || {
                    // SAFETY: `ev` is a valid out-pointer on this stack frame; the flags are a
                    // valid `CUevent_flags` value.
                    unsafe {
                        sys::cuEventCreate(
                            &mut ev,
                            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
                        )
                    }
                })?;
                RawEvent(ev)
            }
        };
        Ok(CudaEvent {
            raw: Some(raw),
            pool: Arc::clone(self),
        })
    }

    /// Number of idle events.
    pub(crate) fn idle(&self) -> usize {
        self.idle.lock().len()
    }

    /// Destroys every idle event.
    pub(crate) fn drain(&self) {
        let events = std::mem::take(&mut *self.idle.lock());
        if events.is_empty() {
            return;
        }
        let Ok(_guard) = self.ctx.enter(BackendOp::Release) else {
            return; // the driver is gone (process exit): nothing left to free
        };
        for ev in events {
            destroy(ev);
        }
    }

    fn give_back(&self, raw: RawEvent) {
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(raw);
            return;
        }
        drop(idle);
        if let Ok(_guard) = self.ctx.enter(BackendOp::Release) {
            destroy(raw);
        }
    }
}

impl Drop for EventPool {
    fn drop(&mut self) {
        self.drain();
    }
}

fn destroy(ev: RawEvent) {
    let _ = call(BackendOp::Release, "cuEventDestroy", || {
        // SAFETY: the pool owned `ev` alone (it was idle or just given back), so no one else
        // uses it; it is destroyed once, here.
        unsafe { sys::cuEventDestroy_v2(ev.0) }
    });
}

/// A CUDA event recorded by [`record_event`](bufferheap_core::Backend::record_event).
/// Dropping it gives it back to its backend's pool.
#[derive(Debug)]
pub struct CudaEvent {
    /// `Some` until drop.
    raw: Option<RawEvent>,
    pool: Arc<EventPool>,
}

impl CudaEvent {
    /// The driver's handle, e.g. for `cuStreamWaitEvent`. Valid while `self` lives.
    pub fn as_raw(&self) -> sys::CUevent {
        self.raw.as_ref().map_or(std::ptr::null_mut(), |r| r.0)
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.pool.give_back(raw);
        }
    }
}
