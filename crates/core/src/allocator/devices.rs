//! Allocators of several devices, one engine each, as the seed's per-device allocator
//! table.
//!
//! Invariant: the allocator at index `d` serves device `d` (backends are given in device
//! order) and is never replaced.

use super::Allocator;
use crate::backend::Backend;
use crate::config::Config;
use crate::error::Result;

/// Allocators of several devices: `allocator(device, shared)` as the seed's
/// `getIMPSAllocator`.
#[derive(Debug)]
pub struct Devices<B: Backend> {
    allocators: Vec<Allocator<B>>,
}

impl<B: Backend> Devices<B> {
    /// One engine per backend (one backend per device, in device order).
    pub fn new(backends: Vec<B>, config: &Config) -> Result<Self> {
        let allocators = backends
            .into_iter()
            .map(|b| Allocator::new(b, config.clone()))
            .collect::<Result<_>>()?;
        Ok(Devices { allocators })
    }

    /// Private front-end of `device`, or its shared front-end with `shared` (`None` where the
    /// backend has no shared storage or the device does not exist).
    pub fn allocator(&self, device: usize, shared: bool) -> Option<Allocator<B>> {
        let a = self.allocators.get(device)?;
        if shared { a.shared() } else { Some(a.clone()) }
    }

    pub fn len(&self) -> usize {
        self.allocators.len()
    }

    pub fn is_empty(&self) -> bool {
        self.allocators.is_empty()
    }
}
