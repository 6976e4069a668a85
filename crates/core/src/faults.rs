//! Fault injection: a backend wrapper that fails chosen operations, for tests of the engine's
//! behaviour when the device misbehaves.
//!
//! Invariants: a call the plan says to fail never reaches the inner backend, so the inner
//! backend's accounting stays the truth to check the engine against; the pseudo-random
//! choice is seeded, so a failing run repeats exactly. Failed reservations and maps report
//! out-of-memory (what a full device says); every other failed call is a plain error.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::backend::{
    Backend, BackendCaps, BackendError, BackendOp, MemoryInfo, Region, Storage, StreamId,
};

/// When an operation fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    Never,
    Always,
    /// Every n-th call (1-based).
    EveryNth(u64),
    /// Each call with probability 1/n.
    OneIn(u64),
}

/// The operations a [`FaultyBackend`] can fail, in the order of its plan.
pub const INJECTABLE: [BackendOp; 7] = [
    BackendOp::Reserve,
    BackendOp::Release,
    BackendOp::Map,
    BackendOp::Unmap,
    BackendOp::RecordEvent,
    BackendOp::QueryEvent,
    BackendOp::WaitEvent,
];

/// The place of `op` in [`INJECTABLE`] (0 for an operation that is never failed).
pub fn op_index(op: BackendOp) -> usize {
    INJECTABLE.iter().position(|&o| o == op).unwrap_or(0)
}

#[derive(Debug)]
struct Plan {
    faults: [Fault; 7],
    calls: [u64; 7],
    rng: u64,
}

/// A backend that fails on purpose.
#[derive(Debug)]
pub struct FaultyBackend<B> {
    inner: B,
    plan: Mutex<Plan>,
    injected: AtomicU64,
}

impl<B: Backend> FaultyBackend<B> {
    /// Wraps `inner`; nothing fails until [`FaultyBackend::set`] says so.
    pub fn new(inner: B, seed: u64) -> Self {
        FaultyBackend {
            inner,
            plan: Mutex::new(Plan {
                faults: [Fault::Never; 7],
                calls: [0; 7],
                rng: seed | 1,
            }),
            injected: AtomicU64::new(0),
        }
    }

    /// Sets when `op` fails.
    pub fn set(&self, op: BackendOp, fault: Fault) {
        self.plan.lock().faults[op_index(op)] = fault;
    }

    /// Stops every fault.
    pub fn heal(&self) {
        self.plan.lock().faults = [Fault::Never; 7];
    }

    /// Faults injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn check(&self, op: BackendOp) -> Result<(), BackendError> {
        let mut plan = self.plan.lock();
        let i = op_index(op);
        plan.calls[i] += 1;
        let n = plan.calls[i];
        let fail = match plan.faults[i] {
            Fault::Never => false,
            Fault::Always => true,
            Fault::EveryNth(k) => k > 0 && n.is_multiple_of(k),
            Fault::OneIn(k) => {
                // xorshift64: deterministic for a given seed and call sequence.
                let mut x = plan.rng;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                plan.rng = x;
                k > 0 && x.is_multiple_of(k)
            }
        };
        if !fail {
            return Ok(());
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        let message = format!("injected fault in call {n}");
        Err(match op {
            BackendOp::Reserve | BackendOp::Map => BackendError::out_of_memory(op, message),
            _ => BackendError::new(op, message),
        })
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    type Event = B::Event;

    fn caps(&self) -> BackendCaps {
        self.inner.caps()
    }
    fn reserve(&self, size: usize, storage: Storage, mapped: bool) -> Result<Region, BackendError> {
        self.check(BackendOp::Reserve)?;
        self.inner.reserve(size, storage, mapped)
    }
    fn release(&self, region: &Region) -> Result<(), BackendError> {
        self.check(BackendOp::Release)?;
        self.inner.release(region)
    }
    fn map(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        self.check(BackendOp::Map)?;
        self.inner.map(region, offset, len)
    }
    fn unmap(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        self.check(BackendOp::Unmap)?;
        self.inner.unmap(region, offset, len)
    }
    fn record_event(&self, stream: StreamId) -> Result<Self::Event, BackendError> {
        self.check(BackendOp::RecordEvent)?;
        self.inner.record_event(stream)
    }
    fn event_complete(&self, event: &Self::Event) -> Result<bool, BackendError> {
        self.check(BackendOp::QueryEvent)?;
        self.inner.event_complete(event)
    }
    fn wait_event(&self, event: &Self::Event) -> Result<(), BackendError> {
        self.check(BackendOp::WaitEvent)?;
        self.inner.wait_event(event)
    }
    fn memory_info(&self) -> MemoryInfo {
        self.inner.memory_info()
    }
    fn write(&self, region: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError> {
        self.inner.write(region, offset, bytes)
    }
}
