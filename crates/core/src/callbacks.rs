//! Named callbacks fired on every allocator event.
//!
//! Invariants: the engine collects events while it holds its lock and fires them only after
//! releasing it, so a callback may call back into the allocator (free, empty_cache, stats)
//! without deadlock. Callbacks fire in registration order; registering an existing name
//! replaces it. When no callback is registered, the engine records nothing (one relaxed
//! atomic load on the hot path).

use std::sync::Arc;

use crate::sync::{AtomicBool, Ordering, RwLock};

/// What happened, in the seed's five kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackEvent {
    /// A new buffer was carved from heap space for immediate use.
    Allocated,
    /// A cached buffer was handed out again.
    Recycled,
    /// A buffer was returned to the cache for future reuse.
    Freed,
    /// Memory was given back to the backend (a heap released or pages unmapped); the
    /// address is the start of the range.
    Released,
    /// A request could not be served at once; fired before the fallback chain runs, so a
    /// callback can free memory (address 0).
    AllocationFailed,
}

/// A callback: receives the buffer (or range) address and the event.
pub type Callback = Arc<dyn Fn(u64, CallbackEvent) + Send + Sync>;

#[derive(Default)]
pub(crate) struct Registry {
    entries: RwLock<Vec<(String, Callback)>>,
    active: AtomicBool,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.entries.read().iter().map(|(n, _)| n.clone()).collect();
        f.debug_struct("Registry")
            .field("callbacks", &names)
            .finish()
    }
}

impl Registry {
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Registers `callback` under `name`; returns true if it replaced one.
    pub fn register(&self, name: &str, callback: Callback) -> bool {
        let mut entries = self.entries.write();
        let replaced = match entries.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => {
                entry.1 = callback;
                true
            }
            None => {
                entries.push((name.to_string(), callback));
                false
            }
        };
        self.active.store(true, Ordering::Relaxed);
        replaced
    }

    /// Removes the callback called `name`; returns true if there was one.
    pub fn unregister(&self, name: &str) -> bool {
        let mut entries = self.entries.write();
        let before = entries.len();
        entries.retain(|(n, _)| n != name);
        self.active.store(!entries.is_empty(), Ordering::Relaxed);
        entries.len() != before
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.read().iter().map(|(n, _)| n.clone()).collect()
    }

    /// Fires `events` on every callback. Must be called without the allocator's lock held.
    pub fn fire(&self, events: &[(u64, CallbackEvent)]) {
        if events.is_empty() {
            return;
        }
        let callbacks: Vec<Callback> = self.entries.read().iter().map(|(_, c)| c.clone()).collect();
        for &(ptr, event) in events {
            for callback in &callbacks {
                callback(ptr, event);
            }
        }
    }
}

/// Events gathered under the lock, to fire after it is released.
#[derive(Debug, Default)]
pub(crate) struct Notes {
    pub enabled: bool,
    pub events: Vec<(u64, CallbackEvent)>,
}

impl Notes {
    pub fn new(enabled: bool) -> Notes {
        Notes {
            enabled,
            events: Vec::new(),
        }
    }

    #[inline]
    pub fn push(&mut self, ptr: u64, event: CallbackEvent) {
        if self.enabled {
            self.events.push((ptr, event));
        }
    }
}
