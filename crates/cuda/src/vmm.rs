//! Page tables of page-mapped (VMM) regions: which pages the engine has mapped, and which
//! physical allocations back them.
//!
//! CUDA can only unmap a physical allocation whole (`cuMemUnmap` of exactly the range one
//! `cuMemMap` mapped), and `cuMemMap` maps a handle whole (its offset must be 0). The engine,
//! on the other hand, maps a run of pages with one call (one handle: per-handle cost dominates)
//! and later unmaps whatever sub-range has become free. A [`PageTable`] reconciles the two with
//! two sets per region:
//! - the *logical* set: the pages the engine has mapped (what `map` added and `unmap` has not
//!   removed). The engine may use exactly these pages.
//! - the *physical* set: the allocations mapped in the region, each `(offset, len, handle)`.
//!
//! Invariants (checked by the unit tests below against a model of the driver's rules):
//! - physical mappings are disjoint, granularity-aligned, and each is exactly one handle mapped
//!   whole;
//! - every logical page lies inside a physical mapping (the engine never touches an unbacked
//!   page);
//! - a physical mapping with no logical page left is unmapped and released at once;
//! - a physical mapping that still has logical pages is never torn down in a way that loses
//!   their contents, unless the backend was built with [`PartialUnmap::Recreate`].
//!
//! What happens to a physical allocation that `unmap` covers only in part is the contract
//! documented on [`PartialUnmap`].

use std::collections::BTreeMap;

use bufferheap_core::{BackendError, BackendOp};

/// What [`unmap`](bufferheap_core::Backend::unmap) does with a physical allocation that the
/// range covers only in part: the partial-unmap contract.
///
/// CUDA unmaps a physical allocation only whole, and the engine maps a run of pages with one
/// `map` call (one allocation, since per-allocation cost dominates). When a later `unmap`
/// covers only part of such a run, the rest of it may hold live buffers: the engine unmaps
/// ranges that hold no live data, but the pages just outside the range are usually outside it
/// precisely because a live buffer sits there.
///
/// - [`PartialUnmap::Defer`] (the default): the allocation stays mapped whole. The unmapped
///   pages are *held* (still backed, no longer the engine's: `write`/`read` refuse them) until
///   the last page of the allocation is unmapped; then the allocation is unmapped and released.
///   The contents of the pages that stay are preserved. Mapping held pages again costs no
///   driver call. The cost: device memory comes back later than the engine asked;
///   `DriverStats::held_bytes` says how much is held.
/// - [`PartialUnmap::Recreate`]: the parts that stay get new physical allocations at once: new
///   handles are created first (if the device is out of memory, the allocation is deferred as
///   above), then the old mapping is unmapped and released and the new handles are mapped in its
///   place. **The contents of the pages that stay are lost**, so this is correct only for an
///   engine that guarantees: whenever it unmaps part of a range it mapped with one call, the
///   rest of that range holds no live data either (and no queued device work uses it).
///
/// Either way, a range spanning several earlier `map` calls unmaps and releases every
/// allocation it covers whole, and treats the ones at its ends as above.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PartialUnmap {
    /// Keep the allocation mapped (contents preserved) until all its pages are unmapped.
    #[default]
    Defer,
    /// Replace the pages that stay with new allocations now; their contents are lost.
    Recreate,
}

/// The driver operations a page table needs. The real one calls `cuMemCreate`, `cuMemMap` +
/// `cuMemSetAccess`, `cuMemUnmap` and `cuMemRelease`; the tests use a model.
pub(crate) trait PageDriver {
    /// Creates a physical allocation of `len` bytes; returns its handle.
    fn create(&mut self, len: usize) -> Result<u64, BackendError>;
    /// Maps a whole allocation at `offset` of the region and grants access. On failure
    /// nothing is left mapped at `offset`.
    fn map(&mut self, offset: usize, len: usize, handle: u64) -> Result<(), BackendError>;
    /// Unmaps exactly one earlier mapping.
    fn unmap(&mut self, offset: usize, len: usize) -> Result<(), BackendError>;
    /// Releases a handle that is no longer mapped.
    fn release(&mut self, handle: u64) -> Result<(), BackendError>;
    /// Waits until the device no longer uses memory about to be unmapped; called once before
    /// the first `unmap` of an operation.
    fn quiesce(&mut self) -> Result<(), BackendError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Physical {
    len: usize,
    handle: u64,
}

/// The logical and physical page sets of one page-mapped region (see the module docs).
#[derive(Debug)]
pub(crate) struct PageTable {
    size: usize,
    granularity: usize,
    /// start -> end (exclusive); disjoint and coalesced (no two touch).
    logical: BTreeMap<usize, usize>,
    /// start -> allocation mapped there; disjoint.
    physical: BTreeMap<usize, Physical>,
}

impl PageTable {
    pub(crate) fn new(size: usize, granularity: usize) -> Self {
        PageTable {
            size,
            granularity,
            logical: BTreeMap::new(),
            physical: BTreeMap::new(),
        }
    }

    /// Bytes the engine has mapped.
    pub(crate) fn logical_bytes(&self) -> usize {
        self.logical.iter().map(|(s, e)| e - s).sum()
    }

    /// Bytes of physical allocations mapped in the region.
    pub(crate) fn physical_bytes(&self) -> usize {
        self.physical.values().map(|p| p.len).sum()
    }

    /// Bytes still backed although the engine unmapped them (deferred partial unmaps).
    pub(crate) fn held_bytes(&self) -> usize {
        self.physical_bytes() - self.logical_bytes()
    }

    /// Number of physical allocations mapped in the region.
    pub(crate) fn handles(&self) -> usize {
        self.physical.len()
    }

    /// True when every page touched by `[offset, offset + len)` is mapped for the engine.
    pub(crate) fn is_mapped(&self, offset: usize, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        let g = self.granularity;
        let start = offset - offset % g;
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        let end = end.div_ceil(g) * g;
        end <= self.size && self.logical_covers(start, end)
    }

    fn check_range(&self, op: BackendOp, offset: usize, len: usize) -> Result<usize, BackendError> {
        let g = self.granularity;
        let end = offset.checked_add(len);
        match end {
            Some(end)
                if len > 0
                    && offset.is_multiple_of(g)
                    && len.is_multiple_of(g)
                    && end <= self.size =>
            {
                Ok(end)
            }
            _ => Err(BackendError::new(
                op,
                format!(
                    "range [{offset:#x}, +{len:#x}) is not a non-empty run of whole {g:#x}-byte \
                     pages inside the {:#x}-byte region",
                    self.size
                ),
            )),
        }
    }

    /// Commits pages to `[offset, offset + len)`. Pages still backed by a deferred allocation
    /// are taken back without a driver call; the unbacked run gets one new handle. (There is at
    /// most one: an allocation with no mapped page is released at once, so the only backed
    /// pages in a free range belong to allocations sticking out of its ends.) On failure
    /// nothing changes.
    pub(crate) fn map(
        &mut self,
        drv: &mut impl PageDriver,
        offset: usize,
        len: usize,
    ) -> Result<(), BackendError> {
        let end = self.check_range(BackendOp::Map, offset, len)?;
        if self.logical_overlaps(offset, end) {
            return Err(BackendError::new(
                BackendOp::Map,
                format!("range [{offset:#x}, {end:#x}) is already mapped in part or whole"),
            ));
        }
        let mut done: Vec<(usize, usize, u64)> = Vec::new();
        for (s, e) in self.physical_gaps(offset, end) {
            let step = drv
                .create(e - s)
                .and_then(|handle| match drv.map(s, e - s, handle) {
                    Ok(()) => Ok(handle),
                    Err(err) => {
                        let _ = drv.release(handle);
                        Err(err)
                    }
                });
            match step {
                Ok(handle) => done.push((s, e, handle)),
                Err(err) => {
                    self.roll_back(drv, done);
                    return Err(err);
                }
            }
        }
        for (s, e, handle) in done {
            self.physical.insert(s, Physical { len: e - s, handle });
        }
        self.logical_insert(offset, end);
        Ok(())
    }

    /// Undoes the mappings a failed `map` made. A mapping that cannot be undone stays in the
    /// table as held memory, so that `release` frees it later.
    fn roll_back(&mut self, drv: &mut impl PageDriver, done: Vec<(usize, usize, u64)>) {
        for (s, e, handle) in done {
            if drv.unmap(s, e - s).is_ok() {
                let _ = drv.release(handle);
            } else {
                self.physical.insert(s, Physical { len: e - s, handle });
            }
        }
    }

    /// Returns `[offset, offset + len)` (all of it mapped) to the device, following `mode` for
    /// allocations the range covers only in part. The pages are the engine's no more even when
    /// an error is returned; an error means some memory is still backed (held) or, with
    /// [`PartialUnmap::Recreate`], that pages outside the range lost their mapping (the message
    /// names them).
    pub(crate) fn unmap(
        &mut self,
        drv: &mut impl PageDriver,
        mode: PartialUnmap,
        offset: usize,
        len: usize,
    ) -> Result<(), BackendError> {
        let end = self.check_range(BackendOp::Unmap, offset, len)?;
        if !self.logical_covers(offset, end) {
            return Err(BackendError::new(
                BackendOp::Unmap,
                format!("range [{offset:#x}, {end:#x}) is not wholly mapped"),
            ));
        }
        self.logical_remove(offset, end);
        let mut first_error: Option<BackendError> = None;
        let mut quiesced = false;
        for start in self.physical_touching(offset, end) {
            let phys = self.physical[&start];
            let live = self.logical_parts(start, start + phys.len);
            let replacements = if live.is_empty() {
                Vec::new()
            } else if mode == PartialUnmap::Recreate {
                match create_all(drv, &live) {
                    Ok(handles) => handles,
                    Err(err) => {
                        // Out of memory: defer this allocation instead. Anything else is
                        // worth reporting, but deferring is still the safe outcome.
                        if !err.out_of_memory {
                            first_error.get_or_insert(err);
                        }
                        continue;
                    }
                }
            } else {
                continue; // PartialUnmap::Defer: keep the allocation until all of it is free.
            };
            if !quiesced {
                if let Err(err) = drv.quiesce() {
                    release_all(drv, &replacements);
                    first_error.get_or_insert(err);
                    break;
                }
                quiesced = true;
            }
            if let Err(err) = drv.unmap(start, phys.len) {
                release_all(drv, &replacements);
                first_error.get_or_insert(err);
                continue;
            }
            self.physical.remove(&start);
            if let Err(err) = drv.release(phys.handle) {
                first_error.get_or_insert(err);
            }
            for (s, e, handle) in replacements {
                match drv.map(s, e - s, handle) {
                    Ok(()) => {
                        self.physical.insert(s, Physical { len: e - s, handle });
                    }
                    Err(err) => {
                        let _ = drv.release(handle);
                        self.logical_remove_clipped(s, e);
                        first_error.get_or_insert(BackendError {
                            message: format!(
                                "pages [{s:#x}, {e:#x}) outside the unmapped range lost their \
                                 mapping: {}",
                                err.message
                            ),
                            ..err
                        });
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Unmaps and releases everything (the region is being given back). On error the
    /// mappings that could not be undone stay in the table, so the call can be repeated.
    pub(crate) fn clear(&mut self, drv: &mut impl PageDriver) -> Result<(), BackendError> {
        self.logical.clear();
        if self.physical.is_empty() {
            return Ok(());
        }
        drv.quiesce()?;
        let mut first_error = None;
        let starts: Vec<usize> = self.physical.keys().copied().collect();
        for start in starts {
            let phys = self.physical[&start];
            match drv.unmap(start, phys.len) {
                Ok(()) => {
                    self.physical.remove(&start);
                    if let Err(err) = drv.release(phys.handle) {
                        first_error.get_or_insert(err);
                    }
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    // --- interval helpers -------------------------------------------------------------------

    fn logical_overlaps(&self, s: usize, e: usize) -> bool {
        // The interval starting last before `e` is the only one that can reach past `s`.
        self.logical
            .range(..e)
            .next_back()
            .is_some_and(|(_, &end)| end > s)
    }

    fn logical_covers(&self, s: usize, e: usize) -> bool {
        // Coalesced: a covered range lies inside a single interval.
        self.logical
            .range(..=s)
            .next_back()
            .is_some_and(|(_, &end)| end >= e)
    }

    fn logical_insert(&mut self, mut s: usize, mut e: usize) {
        if let Some((&ps, &pe)) = self.logical.range(..s).next_back()
            && pe == s
        {
            self.logical.remove(&ps);
            s = ps;
        }
        if let Some(ne) = self.logical.remove(&e) {
            e = ne;
        }
        self.logical.insert(s, e);
    }

    /// Removes `[s, e)`, which lies inside one interval.
    fn logical_remove(&mut self, s: usize, e: usize) {
        let Some((&is, &ie)) = self.logical.range(..=s).next_back() else {
            return; // callers pass covered ranges only
        };
        self.logical.remove(&is);
        if is < s {
            self.logical.insert(is, s);
        }
        if e < ie {
            self.logical.insert(e, ie);
        }
    }

    /// Removes whatever part of `[s, e)` is in the logical set.
    fn logical_remove_clipped(&mut self, s: usize, e: usize) {
        for (ps, pe) in self.logical_parts(s, e) {
            self.logical_remove(ps, pe);
        }
    }

    /// The logical intervals inside `[s, e)`, clipped to it, in address order.
    fn logical_parts(&self, s: usize, e: usize) -> Vec<(usize, usize)> {
        let mut parts: Vec<(usize, usize)> = self
            .logical
            .range(..e)
            .rev()
            .take_while(|(_, end)| **end > s)
            .map(|(&is, &ie)| (is.max(s), ie.min(e)))
            .collect();
        parts.reverse();
        parts
    }

    /// Starts of the physical mappings that intersect `[s, e)`, in address order.
    fn physical_touching(&self, s: usize, e: usize) -> Vec<usize> {
        let before = self
            .physical
            .range(..s)
            .next_back()
            .filter(|(start, p)| **start + p.len > s)
            .map(|(start, _)| *start);
        before
            .into_iter()
            .chain(self.physical.range(s..e).map(|(start, _)| *start))
            .collect()
    }

    /// The parts of `[s, e)` no physical mapping covers, in address order.
    fn physical_gaps(&self, s: usize, e: usize) -> Vec<(usize, usize)> {
        let mut gaps = Vec::new();
        let mut cursor = s;
        for start in self.physical_touching(s, e) {
            if start > cursor {
                gaps.push((cursor, start));
            }
            cursor = cursor.max(start + self.physical[&start].len);
        }
        if cursor < e {
            gaps.push((cursor, e));
        }
        gaps
    }
}

/// Creates one handle per range; on failure releases those already created.
fn create_all(
    drv: &mut impl PageDriver,
    ranges: &[(usize, usize)],
) -> Result<Vec<(usize, usize, u64)>, BackendError> {
    let mut made = Vec::with_capacity(ranges.len());
    for &(s, e) in ranges {
        match drv.create(e - s) {
            Ok(handle) => made.push((s, e, handle)),
            Err(err) => {
                release_all(drv, &made);
                return Err(err);
            }
        }
    }
    Ok(made)
}

fn release_all(drv: &mut impl PageDriver, made: &[(usize, usize, u64)]) {
    for &(_, _, handle) in made {
        let _ = drv.release(handle);
    }
}

#[cfg(test)]
#[path = "vmm_tests.rs"]
mod tests;
