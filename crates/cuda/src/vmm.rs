//! Page tables of page-mapped (VMM) regions: which pages the engine has mapped, and which
//! physical allocations back them.
//!
//! CUDA maps a physical allocation only whole (`cuMemMap` with offset 0) and unmaps whole
//! mappings only (`cuMemUnmap` cannot split one). The engine maps a run of pages with one
//! `map` call and later unmaps whatever sub-range has become free. How the two meet depends on
//! [`PhysicalGranularity`]:
//! - [`PhysicalGranularity::PerBlock`] (the default, 16 MiB): one allocation per piece of a
//!   `map` call's run cut at multiples of the block; the engine unmaps only whole pieces
//!   (`BackendCaps::physical_block`), so its memory goes back to the device at once;
//! - [`PhysicalGranularity::PerPage`]: one allocation per page, so every range the engine
//!   unmaps covers whole allocations, at ten times the driver time of 16 MiB pieces;
//! - [`PhysicalGranularity::PerMap`]: one allocation per unbacked run of a `map` call; an
//!   `unmap` that covers such an allocation only in part follows [`PartialUnmap`].
//!
//! A [`PageTable`] keeps two sets per region:
//! - the *logical* set: the pages the engine has mapped (what `map` added and `unmap` has not
//!   removed). The engine may use exactly these pages.
//! - the *physical* set: the allocations mapped in the region, each `(offset, len, handle)`.
//!
//! Driver calls are batched where the driver allows it: a `map` call sets access once per
//! contiguous run of new mappings (`cuMemSetAccess` accepts any fully mapped range, spanning
//! several mappings), and allocations that go away together are unmapped with one call per
//! run of adjacent mappings.
//!
//! Invariants (checked by the unit tests against a model of the driver's rules):
//! - physical mappings are disjoint, granularity-aligned, and each is exactly one handle mapped
//!   whole; with `PerPage` each is exactly one page;
//! - every logical page lies inside a physical mapping that the device may access (the engine
//!   never touches an unbacked or inaccessible page);
//! - a physical mapping with no logical page left is unmapped and released at once (unless the
//!   driver refused, in which case it is kept, counted as held, and retried by `clear`);
//! - a physical mapping that still has logical pages is never torn down in a way that loses
//!   their contents, unless the table uses `PerMap(PartialUnmap::Recreate)`.

use std::collections::BTreeMap;

use bufferheap_core::{BackendError, BackendOp};

/// How many physical allocations (`cuMemCreate` handles) back the pages of a `map` call.
///
/// - [`PhysicalGranularity::PerBlock`] (the default, 16 MiB): one allocation per piece of the
///   run cut at multiples of the block (from the region's base). The backend reports the block
///   as [`BackendCaps::physical_block`](bufferheap_core::BackendCaps::physical_block), and the
///   engine unmaps only whole pieces, so nothing is ever covered in part. Each allocation costs
///   about as much driver time as a one-page allocation (on an H100, 32 MiB mapped and
///   unmapped as one allocation: ~0.17 ms; as 16 pages: ~1.9 ms).
/// - [`PhysicalGranularity::PerPage`]: one allocation per page (per VMM
///   granule). A `map` of `n` pages makes `n` allocations and maps each at its page, then
///   grants access with one `cuMemSetAccess` over the whole range. Any later `unmap` covers
///   whole allocations, so its pages are unmapped and released at once, whatever earlier `map`
///   calls they came from: the backend never holds memory the engine gave back, and the
///   contents of the pages that stay mapped are untouched. The cost is one `cuMemCreate` per
///   page when mapping and one `cuMemRelease` per page when unmapping.
/// - [`PhysicalGranularity::PerMap`]: one allocation per unbacked run of a `map` call (fewer
///   driver calls), at the price of partial unmaps: an `unmap` that covers such an allocation
///   only in part follows the [`PartialUnmap`] given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysicalGranularity {
    /// One allocation per piece of a run cut at multiples of this many bytes (rounded up to
    /// whole pages); partly unmapped pieces (which the engine never makes) are deferred.
    PerBlock(usize),
    /// One allocation per page: every unmapped page goes back to the device at once.
    PerPage,
    /// One allocation per `map` call; partly unmapped allocations follow the given mode.
    PerMap(PartialUnmap),
}

impl Default for PhysicalGranularity {
    fn default() -> Self {
        PhysicalGranularity::PerBlock(DEFAULT_PHYSICAL_BLOCK)
    }
}

/// The default physical block. Training GPT-2 on an H100 it kept the peak GPU memory used
/// at 13.791-13.793 GiB, under expandable segments' 13.795 (8 and 32 MiB blocks: 13.799-13.803)
/// with a tenth of the driver time of one allocation per page.
pub const DEFAULT_PHYSICAL_BLOCK: usize = 16 << 20;

/// The piece size in bytes that `mode` backs with one allocation, for pages of `granularity`
/// bytes: `usize::MAX` for whole map calls.
pub fn physical_block(mode: PhysicalGranularity, granularity: usize) -> usize {
    match mode {
        PhysicalGranularity::PerBlock(b) => {
            b.div_ceil(granularity).max(1).saturating_mul(granularity)
        }
        PhysicalGranularity::PerPage => granularity,
        PhysicalGranularity::PerMap(_) => usize::MAX,
    }
}

/// What [`unmap`](bufferheap_core::Backend::unmap) does with a physical allocation that the
/// range covers only in part, with [`PhysicalGranularity::PerMap`]: the partial-unmap contract.
///
/// CUDA unmaps a physical allocation only whole. When an `unmap` covers only part of an
/// allocation made by one `map` call, the rest of it may hold live buffers: the engine unmaps
/// ranges that hold no live data, but the pages just outside the range are usually outside it
/// precisely because a live buffer sits there.
///
/// - [`PartialUnmap::Defer`]: the allocation stays mapped whole. The unmapped pages are *held*
///   (still backed, no longer the engine's: `write`/`read` refuse them) until the last page of
///   the allocation is unmapped; then the allocation is unmapped and released. The contents of
///   the pages that stay are preserved. Mapping held pages again costs no driver call. The
///   cost: device memory comes back later than the engine asked; `DriverStats::held_bytes`
///   says how much is held.
/// - [`PartialUnmap::Recreate`]: the parts that stay get new physical allocations at once: new
///   handles are created first (where they cannot be, out of memory or not, the allocation is
///   deferred as above), then the old mapping is unmapped and released and the new handles are
///   mapped in its place. **The contents of the pages that stay are lost**, so this is correct
///   only for an engine that guarantees: whenever it unmaps part of a range it mapped with one
///   call, the rest of that range holds no live data either (and no queued device work uses
///   it).
///
/// Either way, a range spanning several earlier `map` calls unmaps and releases every
/// allocation it covers whole, and treats the ones at its ends as above.
/// [`PhysicalGranularity::PerPage`] makes this choice moot: no allocation is ever covered in
/// part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PartialUnmap {
    /// Keep the allocation mapped (contents preserved) until all its pages are unmapped.
    #[default]
    Defer,
    /// Replace the pages that stay with new allocations now; their contents are lost.
    Recreate,
}

/// The driver operations a page table needs. The real one calls `cuMemCreate`, `cuMemMap`,
/// `cuMemSetAccess`, `cuMemUnmap` and `cuMemRelease`; the tests use a model.
pub(crate) trait PageDriver {
    /// Creates a physical allocation of `len` bytes; returns its handle.
    fn create(&mut self, len: usize) -> Result<u64, BackendError>;
    /// Maps a whole allocation at `offset` of the region, without access yet. On failure
    /// nothing is mapped at `offset`.
    fn map(&mut self, offset: usize, len: usize, handle: u64) -> Result<(), BackendError>;
    /// Grants this device read/write access to `[offset, offset + len)`: one or more whole
    /// mappings, adjacent (the range is fully mapped).
    fn set_access(&mut self, offset: usize, len: usize) -> Result<(), BackendError>;
    /// Unmaps a run of whole mappings, adjacent and in address order: the first starts at
    /// `offset`, and `lens` are their lengths. On failure, says how many of the leading
    /// mappings are unmapped all the same.
    fn unmap(&mut self, offset: usize, lens: &[usize]) -> Result<(), (usize, BackendError)>;
    /// Releases a handle that is no longer mapped.
    fn release(&mut self, handle: u64) -> Result<(), BackendError>;
    /// Waits until the device no longer uses memory about to be unmapped (where the backend
    /// was asked to); called once before the first `unmap` of an operation.
    fn quiesce(&mut self) -> Result<(), BackendError>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Physical {
    len: usize,
    handle: u64,
    /// The device was granted access (false only for a mapping a failed `map` could not
    /// undo: it is granted access before its pages are the engine's again).
    access: bool,
}

/// A mapping made by the current operation: `(start, end, handle)`.
type Made = (usize, usize, u64);

/// The logical and physical page sets of one page-mapped region (see the module docs).
#[derive(Debug)]
pub(crate) struct PageTable {
    size: usize,
    granularity: usize,
    mode: PhysicalGranularity,
    /// start -> end (exclusive); disjoint and coalesced (no two touch).
    logical: BTreeMap<usize, usize>,
    /// start -> allocation mapped there; disjoint.
    physical: BTreeMap<usize, Physical>,
    /// Handles unmapped whose release the driver refused, retried by `clear`.
    unreleased: Vec<u64>,
}

impl PageTable {
    pub(crate) fn new(size: usize, granularity: usize, mode: PhysicalGranularity) -> Self {
        PageTable {
            size,
            granularity,
            mode,
            logical: BTreeMap::new(),
            physical: BTreeMap::new(),
            unreleased: Vec::new(),
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

    /// Bytes still backed although the engine unmapped them (deferred partial unmaps, or
    /// mappings the driver refused to unmap).
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

    /// The allocations that back the unbacked run `[s, e)`: one per page, per block, or one
    /// for the run.
    fn pieces(&self, s: usize, e: usize) -> Vec<(usize, usize)> {
        bufferheap_core::physical_pieces(s, e, physical_block(self.mode, self.granularity))
            .collect()
    }

    /// Commits pages to `[offset, offset + len)`. Each unbacked run of the range gets its
    /// allocations (see [`PhysicalGranularity`]), mapped one by one, and then one
    /// `set_access` over the run. Pages still backed by a deferred allocation (`PerMap` only)
    /// are taken back without a driver call. On failure nothing changes.
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
        let gaps = self.physical_gaps(offset, end);
        let mut done: Vec<Made> = Vec::new();
        let mut failure = None;
        'gaps: for &(s, e) in &gaps {
            for (ps, pe) in self.pieces(s, e) {
                let handle = match drv.create(pe - ps) {
                    Ok(handle) => handle,
                    Err(err) => {
                        failure = Some(err);
                        break 'gaps;
                    }
                };
                if let Err(err) = drv.map(ps, pe - ps, handle) {
                    self.release_or_keep(drv, handle);
                    failure = Some(err);
                    break 'gaps;
                }
                done.push((ps, pe, handle));
            }
        }
        if failure.is_none() {
            // Every gap is fully mapped now: one access call per gap.
            for &(s, e) in &gaps {
                if let Err(err) = drv.set_access(s, e - s) {
                    failure = Some(err);
                    break;
                }
            }
        }
        if failure.is_none() {
            // Held mappings taken back that never got access (left by a failed `map`).
            for start in self.physical_touching(offset, end) {
                let phys = self.physical[&start];
                if phys.access {
                    continue;
                }
                if let Err(err) = drv.set_access(start, phys.len) {
                    failure = Some(err);
                    break;
                }
                self.physical.insert(
                    start,
                    Physical {
                        access: true,
                        ..phys
                    },
                );
            }
        }
        if let Some(err) = failure {
            self.roll_back(drv, &done);
            return Err(err);
        }
        for (s, e, handle) in done {
            self.physical.insert(
                s,
                Physical {
                    len: e - s,
                    handle,
                    access: true,
                },
            );
        }
        self.logical_insert(offset, end);
        Ok(())
    }

    /// Releases `handle`; one the driver refuses is kept for `clear` to retry, so that no
    /// physical allocation is lost on an error path.
    fn release_or_keep(&mut self, drv: &mut impl PageDriver, handle: u64) {
        if drv.release(handle).is_err() {
            self.unreleased.push(handle);
        }
    }

    fn release_all(&mut self, drv: &mut impl PageDriver, made: &[Made]) {
        for &(_, _, handle) in made {
            self.release_or_keep(drv, handle);
        }
    }

    /// Creates one handle per range; `None` (those already created released) when one
    /// cannot be created.
    fn create_all(
        &mut self,
        drv: &mut impl PageDriver,
        ranges: &[(usize, usize)],
    ) -> Option<Vec<Made>> {
        let mut made = Vec::with_capacity(ranges.len());
        for &(s, e) in ranges {
            match drv.create(e - s) {
                Ok(handle) => made.push((s, e, handle)),
                Err(_) => {
                    self.release_all(drv, &made);
                    return None;
                }
            }
        }
        Some(made)
    }

    /// Undoes the mappings a failed `map` made (nothing has used them, so no `quiesce`). A
    /// mapping that cannot be undone stays in the table as held memory, so that `release`
    /// frees it later.
    fn roll_back(&mut self, drv: &mut impl PageDriver, done: &[Made]) {
        let spans: Vec<(usize, usize)> = done.iter().map(|&(s, e, _)| (s, e - s)).collect();
        let (unmapped, _) = unmap_runs(drv, &spans);
        for (&(s, e, handle), ok) in done.iter().zip(unmapped) {
            if ok {
                self.release_or_keep(drv, handle);
            } else {
                self.physical.insert(
                    s,
                    Physical {
                        len: e - s,
                        handle,
                        access: false,
                    },
                );
            }
        }
    }

    /// Returns `[offset, offset + len)` (all of it mapped) to the device. Allocations left
    /// with no mapped page are unmapped (one driver call per run of adjacent ones) and
    /// released; with `PerMap`, allocations the range covers only in part follow its
    /// [`PartialUnmap`].
    ///
    /// As the engine expects of a failed call, an error means nothing changed: the range is
    /// still mapped and the engine's (the driver refused the wait for the device, or to unmap
    /// anything at all). Once some mapping is unmapped the range is the engine's no more and
    /// the call succeeds: mappings the driver then refused to unmap stay backed, as held
    /// memory that `map` takes back or `clear` retries, and handles it refused to release
    /// are retried by `clear`. With [`PartialUnmap::Recreate`] an error can also mean that
    /// pages outside the range lost their mapping (the message names them).
    pub(crate) fn unmap(
        &mut self,
        drv: &mut impl PageDriver,
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
        // Allocations to unmap, in address order, each with the allocations replacing its
        // pages that stay (`Recreate` only).
        let mut doomed: Vec<(usize, Physical, Vec<Made>)> = Vec::new();
        for start in self.physical_touching(offset, end) {
            let phys = self.physical[&start];
            let live = self.logical_parts(start, start + phys.len);
            if live.is_empty() {
                doomed.push((start, phys, Vec::new()));
            } else if self.mode == PhysicalGranularity::PerMap(PartialUnmap::Recreate) {
                // Replacements that cannot be made (out of memory, or any other refusal):
                // this allocation is deferred instead, kept until all of it is free. An
                // error here would break the contract: the range is already the device's.
                if let Some(handles) = self.create_all(drv, &live) {
                    doomed.push((start, phys, handles));
                }
            }
            // Otherwise `Defer`: keep the allocation until all of it is free. (`PerPage`
            // allocations are single pages: never covered in part.)
        }
        if doomed.is_empty() {
            return Ok(());
        }
        // Nothing is unmapped yet: a failure here leaves the range as it was.
        let undo = |table: &mut Self, drv: &mut _, doomed: &[(usize, Physical, Vec<Made>)]| {
            for (_, _, replacements) in doomed {
                table.release_all(drv, replacements);
            }
            table.logical_insert(offset, end);
        };
        if let Err(err) = drv.quiesce() {
            undo(self, drv, &doomed);
            return Err(err);
        }
        let spans: Vec<(usize, usize)> = doomed.iter().map(|(s, p, _)| (*s, p.len)).collect();
        let (unmapped, err) = unmap_runs(drv, &spans);
        if let Some(err) = err
            && !unmapped.contains(&true)
        {
            undo(self, drv, &doomed);
            return Err(err);
        }
        for ((start, phys, replacements), ok) in doomed.into_iter().zip(unmapped) {
            if !ok {
                // Held (see above); its replacements are not needed.
                self.release_all(drv, &replacements);
                continue;
            }
            self.physical.remove(&start);
            if drv.release(phys.handle).is_err() {
                self.unreleased.push(phys.handle);
            }
            for (s, e, handle) in replacements {
                if let Err(err) = self.map_with_access(drv, s, e, handle) {
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
        first_error.map_or(Ok(()), Err)
    }

    /// Maps `handle` whole at `[s, e)` and grants access. On failure the handle is unmapped
    /// and released again or, where it cannot be unmapped, kept as held memory.
    fn map_with_access(
        &mut self,
        drv: &mut impl PageDriver,
        s: usize,
        e: usize,
        handle: u64,
    ) -> Result<(), BackendError> {
        if let Err(err) = drv.map(s, e - s, handle) {
            self.release_or_keep(drv, handle);
            return Err(err);
        }
        if let Err(err) = drv.set_access(s, e - s) {
            self.roll_back(drv, &[(s, e, handle)]);
            return Err(err);
        }
        self.physical.insert(
            s,
            Physical {
                len: e - s,
                handle,
                access: true,
            },
        );
        Ok(())
    }

    /// Unmaps and releases everything (the region is being given back). On error the
    /// mappings that could not be undone stay in the table, so the call can be repeated.
    pub(crate) fn clear(&mut self, drv: &mut impl PageDriver) -> Result<(), BackendError> {
        self.logical.clear();
        let mut refused = None;
        for handle in std::mem::take(&mut self.unreleased) {
            if let Err(err) = drv.release(handle) {
                self.unreleased.push(handle);
                refused.get_or_insert(err);
            }
        }
        if self.physical.is_empty() {
            return refused.map_or(Ok(()), Err);
        }
        drv.quiesce()?;
        let all: Vec<(usize, Physical)> = self.physical.iter().map(|(&s, &p)| (s, p)).collect();
        let spans: Vec<(usize, usize)> = all.iter().map(|&(s, p)| (s, p.len)).collect();
        let (unmapped, mut first_error) = unmap_runs(drv, &spans);
        for ((start, phys), ok) in all.into_iter().zip(unmapped) {
            if ok {
                self.physical.remove(&start);
                if let Err(err) = drv.release(phys.handle) {
                    self.unreleased.push(phys.handle);
                    first_error.get_or_insert(err);
                }
            }
        }
        first_error.or(refused).map_or(Ok(()), Err)
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

/// Unmaps `spans` (whole mappings as `(start, len)`, in address order) with one driver call
/// per run of adjacent ones. Returns, for each, whether it is unmapped now, and the first
/// error.
fn unmap_runs(
    drv: &mut impl PageDriver,
    spans: &[(usize, usize)],
) -> (Vec<bool>, Option<BackendError>) {
    let mut unmapped = vec![false; spans.len()];
    let mut first_error = None;
    let mut i = 0;
    while i < spans.len() {
        let (start, first_len) = spans[i];
        let mut end = start + first_len;
        let mut j = i + 1;
        while j < spans.len() && spans[j].0 == end {
            end += spans[j].1;
            j += 1;
        }
        let lens: Vec<usize> = spans[i..j].iter().map(|&(_, l)| l).collect();
        match drv.unmap(start, &lens) {
            Ok(()) => unmapped[i..j].fill(true),
            Err((done, err)) => {
                unmapped[i..i + done.min(j - i)].fill(true);
                first_error.get_or_insert(err);
            }
        }
        i = j;
    }
    (unmapped, first_error)
}

#[cfg(test)]
#[path = "vmm_tests.rs"]
mod tests;
