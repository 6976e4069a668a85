//! A front's contents: the entries of the buffers delegated to it, its cached ones filed by
//! (stream, pool kind) and size class, and its judgement of whether it earns its keep.
//!
//! Invariants: every entry in `index` is delegated to this front; a cached entry is in
//! exactly one class of its bins and counts in `cached_bytes`, an entry in use in none; a
//! bit of a [`Bins`]' `nonempty` is set exactly when its class holds an entry; `vacant`
//! lists the slab slots that hold no entry.

use super::Delta;
use crate::allocator::state::AddrMap;
use crate::backend::StreamId;
use crate::pool::{ALIGN, PoolKind};

/// A delegated buffer, as its front knows it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub ptr: u64,
    pub slot: u32,
    pub size: usize,
    pub requested: usize,
    pub id: u64,
    pub use_count: u32,
    pub kind: PoolKind,
    pub host_ptr: Option<u64>,
    pub in_use: bool,
    /// Index of its (stream, kind) in the front's bins.
    pub(super) bins: u32,
}

/// Cached entries of one (stream, pool kind), by size class, with a bitmap of the classes
/// that hold any (so emptying a front visits only those).
#[derive(Debug)]
pub(super) struct Bins {
    pub(super) stream: StreamId,
    pub(super) kind: PoolKind,
    pub(super) by_class: Vec<Vec<u32>>,
    pub(super) nonempty: Vec<u64>,
}

impl Bins {
    #[inline]
    pub(super) fn pop(&mut self, class: usize) -> Option<u32> {
        let stack = self.by_class.get_mut(class)?;
        let idx = stack.pop()?;
        if stack.is_empty() {
            self.nonempty[class / 64] &= !(1 << (class % 64));
        }
        Some(idx)
    }

    #[inline]
    pub(super) fn push(&mut self, class: usize, idx: u32) {
        if self.by_class.len() <= class {
            self.by_class.resize_with(class + 1, Vec::new);
            self.nonempty.resize(class / 64 + 1, 0);
        }
        self.by_class[class].push(idx);
        self.nonempty[class / 64] |= 1 << (class % 64);
    }

    /// The smallest class in `(class, last]` that holds a buffer.
    pub(super) fn next_nonempty(&self, class: usize, last: usize) -> Option<usize> {
        let last = last.min(self.by_class.len().checked_sub(1)?);
        let mut c = class + 1;
        while c <= last {
            let bits = self.nonempty[c / 64] >> (c % 64);
            if bits != 0 {
                let found = c + bits.trailing_zeros() as usize;
                return (found <= last).then_some(found);
            }
            c = (c / 64 + 1) * 64;
        }
        None
    }

    pub(super) fn remove(&mut self, class: usize, idx: u32) {
        if let Some(stack) = self.by_class.get_mut(class) {
            stack.retain(|&i| i != idx);
            if stack.is_empty() {
                self.nonempty[class / 64] &= !(1 << (class % 64));
            }
        }
    }

    /// Empties every class; calls `f` on each entry.
    pub(super) fn drain(&mut self, mut f: impl FnMut(u32)) {
        for w in 0..self.nonempty.len() {
            let mut bits = std::mem::take(&mut self.nonempty[w]);
            while bits != 0 {
                let class = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                for idx in self.by_class[class].drain(..) {
                    f(idx);
                }
            }
        }
    }
}

/// A front's contents, under its mutex.
#[derive(Debug, Default)]
pub(super) struct Magazine {
    /// Slab of entries; `index` maps a delegated buffer's address to its entry.
    pub(super) entries: Vec<Entry>,
    pub(super) vacant: Vec<u32>,
    pub(super) index: AddrMap<u32>,
    pub(super) bins: Vec<Bins>,
    pub(super) cached_bytes: usize,
    pub(super) delta: Delta,
    pub(super) usage: Usefulness,
}

/// Whether a front earns its keep: of the buffers that entered its cache in a window, how
/// many were allocated from it again. A thread whose sizes rarely repeat (a front that only
/// fills and evicts) makes every free slower for nothing; such a front stops taking new
/// buffers from the engine, except one in [`PROBE_EVERY`] to notice when sizes repeat again.
#[derive(Debug)]
pub(super) struct Usefulness {
    entered: u32,
    reused: u32,
    taking: bool,
    probe: u32,
}

/// Buffers that enter a front per judgement of its usefulness.
const WINDOW: u32 = 256;
/// A front takes new buffers while at least 1 in this many of those entering it is reused.
const REUSE_RATIO: u32 = 2;
/// A front that does not take new buffers still takes one in this many.
const PROBE_EVERY: u32 = 8;

impl Default for Usefulness {
    fn default() -> Self {
        Usefulness {
            entered: 0,
            reused: 0,
            taking: true,
            probe: 0,
        }
    }
}

impl Usefulness {
    #[inline]
    pub(super) fn entered(&mut self) {
        self.entered += 1;
        if self.entered >= WINDOW {
            self.taking = self.reused * REUSE_RATIO >= self.entered;
            self.entered = 0;
            self.reused = 0;
        }
    }

    /// A buffer that entered the front was allocated from it again.
    #[inline]
    pub(super) fn reused(&mut self) {
        self.reused += 1;
    }

    /// Whether to take one more buffer from the engine.
    pub(super) fn take(&mut self) -> bool {
        if self.taking {
            return true;
        }
        self.probe += 1;
        self.probe.is_multiple_of(PROBE_EVERY)
    }
}

impl Magazine {
    pub(super) fn bins_index(&mut self, stream: StreamId, kind: PoolKind) -> u32 {
        let i = match self
            .bins
            .iter()
            .position(|b| b.stream == stream && b.kind == kind)
        {
            Some(i) => i,
            None => {
                self.bins.push(Bins {
                    stream,
                    kind,
                    by_class: Vec::new(),
                    nonempty: Vec::new(),
                });
                self.bins.len() - 1
            }
        };
        i as u32
    }

    #[inline(always)]
    pub(super) fn push_cached(&mut self, idx: u32) {
        let e = &self.entries[idx as usize];
        let (bins, class, size) = (e.bins, e.size / ALIGN, e.size);
        self.bins[bins as usize].push(class, idx);
        self.cached_bytes += size;
    }

    /// Removes every entry (cached ones, and those in use too with `in_use`).
    pub(super) fn remove_all(&mut self, in_use: bool) -> Vec<Entry> {
        let mut out = Vec::new();
        let (entries, index, vacant) = (&self.entries, &mut self.index, &mut self.vacant);
        for bins in &mut self.bins {
            bins.drain(|idx| {
                let e = &entries[idx as usize];
                index.remove(&e.ptr);
                vacant.push(idx);
                out.push(e.clone());
            });
        }
        self.cached_bytes = 0;
        if in_use {
            for (_, idx) in self.index.drain() {
                self.vacant.push(idx);
                out.push(self.entries[idx as usize].clone());
            }
        }
        out
    }
}
