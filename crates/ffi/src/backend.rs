//! The backend under the C ABI, chosen at run time: CUDA devices or host memory.
//!
//! [`AnyBackend`] is an enum over the two backends with `match` dispatch (a closed set of
//! variants, no `dyn`), so one build of the library serves both: `BUFFERHEAP_BACKEND=host`
//! selects host memory even in the default (CUDA) build, which is how tests and machines
//! without a GPU run it.
//!
//! Invariants: an [`AnyEvent`] is only ever handed back to the backend variant that made it
//! (each allocator owns exactly one backend), so the mismatched arms below are unreachable in
//! practice and answer with an error rather than a panic. Nothing here panics on bad
//! environment values: [`BackendChoice::from_lookup`] returns a message naming the variable.

use std::fmt;

use bufferheap_core::{
    Backend, BackendCaps, BackendError, BackendOp, MemoryInfo, Region, Storage, StreamId,
};
use bufferheap_cuda::{CudaBackend, CudaEvent, CudaOptions, PartialUnmap, PhysicalGranularity};
use bufferheap_host::{HostBackend, HostEvent};

/// Selects the backend: `host`, `cuda`, or unset/`auto`.
pub const ENV_BACKEND: &str = "BUFFERHEAP_BACKEND";
/// Number of pretend devices of the host backend (default 1).
pub const ENV_HOST_DEVICES: &str = "BUFFERHEAP_HOST_DEVICES";
/// Memory budget of each host device in bytes (default: the machine's RAM).
pub const ENV_HOST_MEMORY: &str = "BUFFERHEAP_HOST_MEMORY";

/// Largest number of pretend host devices accepted.
pub const MAX_HOST_DEVICES: usize = 64;

/// Which memory the allocators run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// NVIDIA devices through the CUDA driver.
    Cuda,
    /// System memory, pretending to be one or more devices.
    Host,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Cuda => "cuda",
            BackendKind::Host => "host",
        })
    }
}

/// What the process asked for: a backend (or automatic choice) and the host backend's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    /// `None`: CUDA if a driver is present (host with the `host-backend` feature).
    pub kind: Option<BackendKind>,
    /// Devices the host backend pretends to have.
    pub host_devices: usize,
    /// Memory budget of each host device; `None` = the machine's RAM.
    pub host_memory: Option<usize>,
}

impl Default for BackendChoice {
    fn default() -> Self {
        BackendChoice {
            kind: None,
            host_devices: 1,
            host_memory: None,
        }
    }
}

impl BackendChoice {
    /// The choice the environment makes.
    pub fn from_env() -> Result<BackendChoice, String> {
        BackendChoice::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`BackendChoice::from_env`], reading variables through `lookup`.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<BackendChoice, String> {
        let mut choice = BackendChoice::default();
        if let Some(value) = lookup(ENV_BACKEND) {
            choice.kind = match value.trim().to_ascii_lowercase().as_str() {
                "" | "auto" => None,
                "cuda" => Some(BackendKind::Cuda),
                "host" => Some(BackendKind::Host),
                _ => {
                    return Err(format!(
                        "invalid value {value:?} for {ENV_BACKEND}: expected \"cuda\", \"host\" \
                         or \"auto\""
                    ));
                }
            };
        }
        if let Some(value) = lookup(ENV_HOST_DEVICES) {
            choice.host_devices = match value.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_HOST_DEVICES).contains(&n) => n,
                _ => {
                    return Err(format!(
                        "invalid value {value:?} for {ENV_HOST_DEVICES}: expected a device count \
                         from 1 to {MAX_HOST_DEVICES}"
                    ));
                }
            };
        }
        if let Some(value) = lookup(ENV_HOST_MEMORY) {
            choice.host_memory = match value.trim().parse::<usize>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    return Err(format!(
                        "invalid value {value:?} for {ENV_HOST_MEMORY}: expected a number of \
                         bytes greater than 0"
                    ));
                }
            };
        }
        Ok(choice)
    }

    /// The backend kind and the number of devices it has, or why none can be used.
    pub fn resolve(&self) -> Result<(BackendKind, usize), String> {
        let kind = match self.kind {
            Some(kind) => kind,
            None if cfg!(feature = "host-backend") => BackendKind::Host,
            None if bufferheap_cuda::driver_present() => BackendKind::Cuda,
            None => return Err(no_driver_message()),
        };
        match kind {
            BackendKind::Host => Ok((kind, self.host_devices)),
            BackendKind::Cuda => {
                if !bufferheap_cuda::driver_present() {
                    return Err(no_driver_message());
                }
                match bufferheap_cuda::device_count() {
                    Ok(0) => Err(format!(
                        "bufferheap: the CUDA driver sees no device (CUDA_VISIBLE_DEVICES={}); \
                         set {ENV_BACKEND}=host to use host memory",
                        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into())
                    )),
                    Ok(n) => Ok((kind, n)),
                    Err(e) => Err(format!("bufferheap: the CUDA driver failed to start: {e}")),
                }
            }
        }
    }

    /// A backend for device `ordinal` of `kind`.
    pub fn create(&self, kind: BackendKind, ordinal: usize) -> Result<AnyBackend, String> {
        match kind {
            BackendKind::Host => Ok(AnyBackend::Host(match self.host_memory {
                Some(bytes) => HostBackend::with_memory(bytes),
                None => HostBackend::new(),
            })),
            BackendKind::Cuda => CudaBackend::with_options(ordinal, cuda_options()?)
                .map(AnyBackend::Cuda)
                .map_err(|e| format!("bufferheap: cannot start CUDA device {ordinal}: {e}")),
        }
    }
}

/// CUDA backend options from the environment, for diagnosis:
/// `BUFFERHEAP_CUDA_SYNC_UNMAP=1` synchronises the device before every unmap, and
/// `BUFFERHEAP_CUDA_PHYSICAL` chooses the physical allocations behind a map call: `per_block`
/// (the default: one per 16 MiB piece), `per_page` or `per_map` (one per call).
fn cuda_options() -> Result<CudaOptions, String> {
    let mut options = CudaOptions::default();
    if let Ok(v) = std::env::var("BUFFERHEAP_CUDA_SYNC_UNMAP") {
        options.sync_before_unmap = match v.trim() {
            "1" | "true" => true,
            "0" | "false" => false,
            other => {
                return Err(format!(
                    "bufferheap: invalid BUFFERHEAP_CUDA_SYNC_UNMAP {other:?} (expected 0 or 1)"
                ));
            }
        };
    }
    if let Ok(v) = std::env::var("BUFFERHEAP_CUDA_PHYSICAL") {
        options.physical = match v.trim() {
            "per_block" => PhysicalGranularity::default(),
            "per_page" => PhysicalGranularity::PerPage,
            "per_map" => PhysicalGranularity::PerMap(PartialUnmap::Defer),
            other => {
                return Err(format!(
                    "bufferheap: invalid BUFFERHEAP_CUDA_PHYSICAL {other:?} (expected per_block, per_page or per_map)"
                ));
            }
        };
    }
    Ok(options)
}

fn no_driver_message() -> String {
    format!(
        "bufferheap: no CUDA driver found (libcuda.so / libcuda.so.1 could not be loaded); \
         set {ENV_BACKEND}=host to use host memory"
    )
}

/// One device's backend.
#[derive(Debug)]
pub enum AnyBackend {
    Cuda(CudaBackend),
    Host(HostBackend),
}

/// An event of either backend.
#[derive(Debug)]
pub enum AnyEvent {
    Cuda(CudaEvent),
    Host(HostEvent),
}

fn foreign_event(op: BackendOp) -> BackendError {
    BackendError::new(op, "event belongs to another backend")
}

impl Backend for AnyBackend {
    type Event = AnyEvent;

    fn caps(&self) -> BackendCaps {
        match self {
            AnyBackend::Cuda(b) => b.caps(),
            AnyBackend::Host(b) => b.caps(),
        }
    }

    fn reserve(&self, size: usize, storage: Storage, mapped: bool) -> Result<Region, BackendError> {
        match self {
            AnyBackend::Cuda(b) => b.reserve(size, storage, mapped),
            AnyBackend::Host(b) => b.reserve(size, storage, mapped),
        }
    }

    fn release(&self, region: &Region) -> Result<(), BackendError> {
        match self {
            AnyBackend::Cuda(b) => b.release(region),
            AnyBackend::Host(b) => b.release(region),
        }
    }

    fn map(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        match self {
            AnyBackend::Cuda(b) => b.map(region, offset, len),
            AnyBackend::Host(b) => b.map(region, offset, len),
        }
    }

    fn unmap(&self, region: &Region, offset: usize, len: usize) -> Result<(), BackendError> {
        match self {
            AnyBackend::Cuda(b) => b.unmap(region, offset, len),
            AnyBackend::Host(b) => b.unmap(region, offset, len),
        }
    }

    fn record_event(&self, stream: StreamId) -> Result<AnyEvent, BackendError> {
        match self {
            AnyBackend::Cuda(b) => b.record_event(stream).map(AnyEvent::Cuda),
            AnyBackend::Host(b) => b.record_event(stream).map(AnyEvent::Host),
        }
    }

    fn event_complete(&self, event: &AnyEvent) -> Result<bool, BackendError> {
        match (self, event) {
            (AnyBackend::Cuda(b), AnyEvent::Cuda(e)) => b.event_complete(e),
            (AnyBackend::Host(b), AnyEvent::Host(e)) => b.event_complete(e),
            _ => Err(foreign_event(BackendOp::QueryEvent)),
        }
    }

    fn wait_event(&self, event: &AnyEvent) -> Result<(), BackendError> {
        match (self, event) {
            (AnyBackend::Cuda(b), AnyEvent::Cuda(e)) => b.wait_event(e),
            (AnyBackend::Host(b), AnyEvent::Host(e)) => b.wait_event(e),
            _ => Err(foreign_event(BackendOp::WaitEvent)),
        }
    }

    fn memory_info(&self) -> MemoryInfo {
        match self {
            AnyBackend::Cuda(b) => b.memory_info(),
            AnyBackend::Host(b) => b.memory_info(),
        }
    }

    fn write(&self, region: &Region, offset: usize, bytes: &[u8]) -> Result<(), BackendError> {
        match self {
            AnyBackend::Cuda(b) => b.write(region, offset, bytes),
            AnyBackend::Host(b) => b.write(region, offset, bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment_choices() {
        assert_eq!(
            BackendChoice::from_lookup(lookup(&[])).unwrap(),
            BackendChoice::default()
        );
        let c = BackendChoice::from_lookup(lookup(&[
            (ENV_BACKEND, " Host "),
            (ENV_HOST_DEVICES, "3"),
            (ENV_HOST_MEMORY, "1048576"),
        ]))
        .unwrap();
        assert_eq!(c.kind, Some(BackendKind::Host));
        assert_eq!((c.host_devices, c.host_memory), (3, Some(1 << 20)));
        assert_eq!(c.resolve().unwrap(), (BackendKind::Host, 3));
        let auto = BackendChoice::from_lookup(lookup(&[(ENV_BACKEND, "auto")])).unwrap();
        assert_eq!(auto.kind, None);
    }

    #[test]
    fn bad_environment_values_name_the_variable() {
        for (var, value) in [
            (ENV_BACKEND, "gpu"),
            (ENV_HOST_DEVICES, "0"),
            (ENV_HOST_DEVICES, "many"),
            (ENV_HOST_MEMORY, "-5"),
        ] {
            let err = BackendChoice::from_lookup(lookup(&[(var, value)])).unwrap_err();
            assert!(err.contains(var) && err.contains(value), "{err}");
        }
    }

    #[test]
    fn cuda_without_driver_says_how_to_use_host_memory() {
        if bufferheap_cuda::driver_present() {
            return;
        }
        let choice = BackendChoice {
            kind: Some(BackendKind::Cuda),
            ..Default::default()
        };
        let err = choice.resolve().unwrap_err();
        assert!(err.contains("no CUDA driver found"), "{err}");
        assert!(err.contains("BUFFERHEAP_BACKEND=host"), "{err}");
    }
}
