//! Page-table tests against a model of the driver that enforces CUDA's VMM rules: a handle is
//! mapped whole at one place; access is set on fully mapped ranges made of whole mappings; an
//! unmap removes whole, adjacent mappings; a handle is released only when unmapped. The model
//! also checks what the table promises on top: pages are accessible before anyone uses them,
//! and a page the device used is unmapped only after a `quiesce`. Each physical page carries a
//! value so lost contents show.

use std::collections::{BTreeMap, HashMap};

use super::*;

const G: usize = 2 << 20;
const PER_PAGE: PhysicalGranularity = PhysicalGranularity::PerPage;
const PER_BLOCK: PhysicalGranularity = PhysicalGranularity::PerBlock(4 * G);
const DEFER: PhysicalGranularity = PhysicalGranularity::PerMap(PartialUnmap::Defer);
const RECREATE: PhysicalGranularity = PhysicalGranularity::PerMap(PartialUnmap::Recreate);

#[derive(Debug)]
struct Mapping {
    len: usize,
    handle: u64,
    /// `set_access` covered it.
    access: bool,
    /// Written since the last `quiesce` (the device may still be using it).
    used: bool,
}

#[derive(Debug, Default)]
struct Model {
    next: u64,
    /// handle -> contents, one value per page.
    handles: HashMap<u64, Vec<u32>>,
    /// offset -> mapping
    mapped: BTreeMap<usize, Mapping>,
    /// `create` fails with out-of-memory once this many more creates have succeeded.
    creates_left: Option<usize>,
    /// `set_access` fails.
    fail_access: bool,
    /// `unmap` fails when it reaches the mapping at this offset (those before it in the run
    /// are unmapped, as when the backend falls back to one call per mapping).
    fail_unmap_at: Option<usize>,
    /// `quiesce` fails.
    fail_quiesce: bool,
    /// `release` fails (the handle stays allocated).
    fail_release: bool,
    creates: usize,
    maps: usize,
    releases: usize,
    quiesces: usize,
    /// `(offset, len)` of each `set_access` call.
    accesses: Vec<(usize, usize)>,
    /// `(offset, total len, mappings)` of each `unmap` call that succeeded.
    unmaps: Vec<(usize, usize, usize)>,
}

impl PageDriver for Model {
    fn create(&mut self, len: usize) -> Result<u64, BackendError> {
        assert!(len > 0 && len.is_multiple_of(G), "create of {len:#x}");
        if let Some(left) = self.creates_left.as_mut() {
            if *left == 0 {
                return Err(BackendError::out_of_memory(
                    BackendOp::Map,
                    "model: no memory",
                ));
            }
            *left -= 1;
        }
        self.next += 1;
        self.creates += 1;
        self.handles.insert(self.next, vec![0; len / G]);
        Ok(self.next)
    }

    fn map(&mut self, offset: usize, len: usize, handle: u64) -> Result<(), BackendError> {
        let pages = self
            .handles
            .get(&handle)
            .expect("map of an unknown handle")
            .len();
        assert_eq!(pages * G, len, "a handle is mapped whole");
        assert!(
            self.mapped.values().all(|m| m.handle != handle),
            "handle mapped twice"
        );
        assert!(
            self.mapped
                .iter()
                .all(|(&o, m)| o + m.len <= offset || offset + len <= o),
            "map over a mapped range"
        );
        self.maps += 1;
        self.mapped.insert(
            offset,
            Mapping {
                len,
                handle,
                access: false,
                used: false,
            },
        );
        Ok(())
    }

    fn set_access(&mut self, offset: usize, len: usize) -> Result<(), BackendError> {
        assert!(len > 0);
        let mut at = offset;
        while at < offset + len {
            let m = self
                .mapped
                .get(&at)
                .expect("set_access over a range that is not fully mapped");
            at += m.len;
        }
        assert_eq!(at, offset + len, "set_access ends inside a mapping");
        if self.fail_access {
            return Err(BackendError::new(BackendOp::Map, "model: access refused"));
        }
        for (_, m) in self.mapped.range_mut(offset..offset + len) {
            m.access = true;
        }
        self.accesses.push((offset, len));
        Ok(())
    }

    fn unmap(&mut self, offset: usize, lens: &[usize]) -> Result<(), (usize, BackendError)> {
        assert!(!lens.is_empty());
        let mut at = offset;
        for (i, &len) in lens.iter().enumerate() {
            if self.fail_unmap_at == Some(at) {
                return Err((
                    i,
                    BackendError::new(BackendOp::Unmap, "model: unmap failed"),
                ));
            }
            let m = self
                .mapped
                .remove(&at)
                .expect("unmap must cover whole mappings");
            assert_eq!(m.len, len, "unmap must cover whole mappings");
            assert!(
                !m.used,
                "page at {at:#x} unmapped while the device may use it"
            );
            at += len;
        }
        self.unmaps.push((offset, at - offset, lens.len()));
        Ok(())
    }

    fn release(&mut self, handle: u64) -> Result<(), BackendError> {
        assert!(
            self.mapped.values().all(|m| m.handle != handle),
            "release of a mapped handle"
        );
        assert!(
            self.handles.contains_key(&handle),
            "release of unknown handle"
        );
        if self.fail_release {
            return Err(BackendError::new(BackendOp::Unmap, "model: release failed"));
        }
        self.handles.remove(&handle);
        self.releases += 1;
        Ok(())
    }

    fn quiesce(&mut self) -> Result<(), BackendError> {
        if self.fail_quiesce {
            return Err(BackendError::new(
                BackendOp::Unmap,
                "model: synchronize failed",
            ));
        }
        self.quiesces += 1;
        for m in self.mapped.values_mut() {
            m.used = false;
        }
        Ok(())
    }
}

impl Model {
    fn slot(&mut self, page: usize) -> Option<&mut u32> {
        let off = page * G;
        let (&start, m) = self
            .mapped
            .range_mut(..=off)
            .next_back()
            .filter(|(s, m)| **s + m.len > off)?;
        assert!(m.access, "page {page} is mapped but not accessible");
        m.used = true;
        let handle = m.handle;
        self.handles
            .get_mut(&handle)
            .map(|v| &mut v[(off - start) / G])
    }

    fn write(&mut self, page: usize, value: u32) {
        *self.slot(page).expect("write to an unmapped page") = value;
    }

    fn read(&mut self, page: usize) -> u32 {
        *self.slot(page).expect("read of an unmapped page")
    }

    fn mapping_lens(&self) -> Vec<(usize, usize)> {
        self.mapped.iter().map(|(&o, m)| (o, m.len)).collect()
    }
}

fn pages(n: usize) -> usize {
    n * G
}

fn table(n: usize, mode: PhysicalGranularity) -> PageTable {
    PageTable::new(pages(n), G, mode)
}

// --- one allocation per block (the default) -------------------------------------------------

#[test]
fn per_block_map_makes_a_handle_per_piece_cut_at_block_boundaries() {
    let (mut t, mut m) = (table(16, PER_BLOCK), Model::default());
    t.map(&mut m, pages(2), pages(8)).unwrap();
    assert_eq!(m.creates, 3, "pieces [2, 4), [4, 8), [8, 10)");
    assert_eq!(
        m.mapping_lens(),
        vec![
            (pages(2), pages(2)),
            (pages(4), pages(4)),
            (pages(8), pages(2))
        ]
    );
    assert_eq!(m.accesses, vec![(pages(2), pages(8))], "one access call");
    // Whole pieces go back at once; the rest keep their bytes.
    for p in 2..10 {
        m.write(p, p as u32);
    }
    t.unmap(&mut m, pages(4), pages(4)).unwrap();
    assert_eq!((t.handles(), t.held_bytes()), (2, 0));
    for p in (2..4).chain(8..10) {
        assert_eq!(m.read(p), p as u32);
    }
}

// --- one allocation per page ------------------------------------------------------------------

#[test]
fn per_page_map_makes_a_handle_per_page_and_sets_access_once() {
    let (mut t, mut m) = (table(16, PER_PAGE), Model::default());
    t.map(&mut m, pages(2), pages(4)).unwrap();
    assert_eq!((m.creates, m.maps), (4, 4));
    assert_eq!(m.accesses, vec![(pages(2), pages(4))], "one access call");
    assert_eq!(t.handles(), 4);
    assert_eq!(t.logical_bytes(), pages(4));
    assert_eq!(t.physical_bytes(), pages(4));
    assert_eq!(m.quiesces, 0, "mapping waits for nothing");
    for p in 2..6 {
        m.write(p, p as u32);
    }
    t.unmap(&mut m, pages(2), pages(4)).unwrap();
    assert_eq!(m.unmaps, vec![(pages(2), pages(4), 4)], "one unmap call");
    assert_eq!((m.releases, m.quiesces), (4, 1));
    assert_eq!((t.physical_bytes(), t.handles()), (0, 0));
    assert!(m.handles.is_empty());
}

#[test]
fn per_page_partial_unmap_gives_memory_back_at_once_and_keeps_the_rest() {
    let (mut t, mut m) = (table(8, PER_PAGE), Model::default());
    t.map(&mut m, 0, pages(8)).unwrap();
    for p in 0..8 {
        m.write(p, 100 + p as u32);
    }
    t.unmap(&mut m, pages(2), pages(3)).unwrap();
    assert_eq!(m.unmaps, vec![(pages(2), pages(3), 3)]);
    assert_eq!(m.releases, 3);
    assert_eq!(m.handles.len(), 5, "the device has the memory back");
    assert_eq!((t.physical_bytes(), t.held_bytes()), (pages(5), 0));
    assert!(!t.is_mapped(pages(2), 1));
    for p in [0, 1, 5, 6, 7] {
        assert_eq!(m.read(p), 100 + p as u32, "page {p} kept its bytes");
    }
    // Mapping the hole again makes new pages for it only.
    t.map(&mut m, pages(2), pages(3)).unwrap();
    assert_eq!(m.creates, 8 + 3);
    assert_eq!(m.accesses.last(), Some(&(pages(2), pages(3))));
    assert!(t.is_mapped(0, pages(8)));
    for p in [0, 7] {
        assert_eq!(m.read(p), 100 + p as u32);
    }
}

#[test]
fn per_page_unmap_across_map_calls_is_one_driver_call() {
    let (mut t, mut m) = (table(8, PER_PAGE), Model::default());
    for i in 0..3 {
        t.map(&mut m, pages(2 * i), pages(2)).unwrap();
    }
    assert_eq!(m.accesses.len(), 3, "one access call per map call");
    t.unmap(&mut m, pages(1), pages(4)).unwrap();
    assert_eq!(m.unmaps, vec![(pages(1), pages(4), 4)]);
    assert_eq!(m.releases, 4);
    assert_eq!((t.logical_bytes(), t.held_bytes()), (pages(2), 0));
    assert_eq!(m.mapping_lens(), vec![(0, G), (pages(5), G)]);
}

#[test]
fn per_page_never_holds_memory() {
    let (mut t, mut m) = (table(16, PER_PAGE), Model::default());
    t.map(&mut m, 0, pages(16)).unwrap();
    // Unmap every other page, then the rest: each call frees exactly its pages.
    for p in (0..16).step_by(2) {
        t.unmap(&mut m, pages(p), pages(1)).unwrap();
        assert_eq!(t.held_bytes(), 0);
        assert_eq!(t.physical_bytes(), t.logical_bytes());
    }
    assert_eq!(m.handles.len(), 8);
    for p in (1..16).step_by(2) {
        t.unmap(&mut m, pages(p), pages(1)).unwrap();
    }
    assert!(m.mapped.is_empty() && m.handles.is_empty());
    assert_eq!(m.releases, 16);
}

#[test]
fn failed_create_rolls_back_without_waiting() {
    let (mut t, mut m) = (table(8, PER_PAGE), Model::default());
    t.map(&mut m, 0, pages(1)).unwrap();
    m.creates_left = Some(2); // the third page of the next call fails
    let e = t.map(&mut m, pages(2), pages(4)).unwrap_err();
    assert!(e.out_of_memory, "{e}");
    assert_eq!(
        m.unmaps,
        vec![(pages(2), pages(2), 2)],
        "both made pages, one call"
    );
    assert_eq!(m.quiesces, 0, "nobody used the new pages");
    assert_eq!(m.handles.len(), 1);
    assert_eq!(
        (t.logical_bytes(), t.physical_bytes()),
        (pages(1), pages(1))
    );
    m.creates_left = None;
    t.map(&mut m, pages(2), pages(4)).unwrap();
    assert!(t.is_mapped(pages(2), pages(4)));
}

#[test]
fn failed_access_rolls_back() {
    for mode in [PER_PAGE, DEFER] {
        let (mut t, mut m) = (table(8, mode), Model::default());
        m.fail_access = true;
        assert!(t.map(&mut m, 0, pages(4)).is_err());
        assert!(m.mapped.is_empty() && m.handles.is_empty(), "{mode:?}");
        assert_eq!((t.logical_bytes(), t.physical_bytes()), (0, 0));
        m.fail_access = false;
        t.map(&mut m, 0, pages(4)).unwrap();
        m.write(3, 1);
    }
}

#[test]
fn a_partly_failed_unmap_succeeds_and_holds_the_rest_until_taken_back_or_cleared() {
    let (mut t, mut m) = (table(8, PER_PAGE), Model::default());
    t.map(&mut m, 0, pages(4)).unwrap();
    m.fail_unmap_at = Some(pages(2));
    // Pages 0 and 1 are gone: the range cannot be the engine's again as it was.
    t.unmap(&mut m, 0, pages(4)).unwrap();
    assert_eq!(m.releases, 2, "pages 0 and 1 went back");
    assert_eq!(t.logical_bytes(), 0, "the pages are the engine's no more");
    assert_eq!(t.held_bytes(), pages(2));
    m.fail_unmap_at = None;
    // Held pages are taken back without a driver call.
    t.map(&mut m, pages(2), pages(1)).unwrap();
    assert_eq!(m.creates, 4);
    assert_eq!(t.held_bytes(), pages(1));
    t.clear(&mut m).unwrap();
    assert!(m.mapped.is_empty() && m.handles.is_empty());
    assert_eq!(m.unmaps.last(), Some(&(pages(2), pages(2), 2)));
}

#[test]
fn an_unmap_that_changes_nothing_fails_and_leaves_the_range_usable() {
    for fail in ["quiesce", "first unmap"] {
        let (mut t, mut m) = (table(8, PER_PAGE), Model::default());
        t.map(&mut m, 0, pages(4)).unwrap();
        m.write(1, 9);
        match fail {
            "quiesce" => m.fail_quiesce = true,
            _ => m.fail_unmap_at = Some(0),
        }
        assert!(t.unmap(&mut m, 0, pages(4)).is_err(), "{fail}");
        // As the engine assumes of a failed call: still mapped, contents and all.
        assert!(t.is_mapped(0, pages(4)), "{fail}");
        assert_eq!(m.read(1), 9, "{fail}");
        (m.fail_quiesce, m.fail_unmap_at) = (false, None);
        t.unmap(&mut m, 0, pages(4)).unwrap();
        assert!(m.mapped.is_empty() && m.handles.is_empty(), "{fail}");
    }
}

#[test]
fn handles_the_driver_would_not_release_are_retried_by_clear() {
    let (mut t, mut m) = (table(8, PER_PAGE), Model::default());
    t.map(&mut m, 0, pages(2)).unwrap();
    m.fail_release = true;
    t.unmap(&mut m, 0, pages(2)).unwrap();
    assert!(!t.is_mapped(0, pages(1)) && m.mapped.is_empty());
    assert!(t.clear(&mut m).is_err(), "still refused");
    m.fail_release = false;
    t.clear(&mut m).unwrap();
    assert!(m.handles.is_empty());
}

#[test]
fn a_mapping_a_failed_map_could_not_undo_gets_access_before_it_is_used() {
    let (mut t, mut m) = (table(8, PER_PAGE), Model::default());
    m.fail_access = true;
    m.fail_unmap_at = Some(pages(1));
    assert!(t.map(&mut m, 0, pages(2)).is_err());
    assert_eq!(t.held_bytes(), pages(1), "page 1 could not be rolled back");
    (m.fail_access, m.fail_unmap_at) = (false, None);
    t.map(&mut m, 0, pages(2)).unwrap();
    assert!(t.is_mapped(0, pages(2)));
    m.write(1, 7); // the model refuses pages without access
    assert_eq!(m.read(1), 7);
}

#[test]
fn a_block_of_usize_max_means_one_allocation_per_run() {
    assert_eq!(
        physical_block(PhysicalGranularity::PerBlock(usize::MAX), G),
        usize::MAX
    );
    let (mut t, mut m) = (
        table(4, PhysicalGranularity::PerBlock(usize::MAX)),
        Model::default(),
    );
    t.map(&mut m, 0, pages(2)).unwrap();
    assert_eq!(m.creates, 1);
}

// --- one allocation per map call ---------------------------------------------------------------

#[test]
fn per_map_whole_map_and_unmap_is_one_call_each() {
    let (mut t, mut m) = (table(16, DEFER), Model::default());
    t.map(&mut m, pages(2), pages(4)).unwrap();
    assert_eq!((m.creates, m.maps, m.accesses.len()), (1, 1, 1));
    assert_eq!(t.logical_bytes(), pages(4));
    t.unmap(&mut m, pages(2), pages(4)).unwrap();
    assert_eq!((m.unmaps.len(), m.releases), (1, 1));
    assert_eq!((t.physical_bytes(), t.handles()), (0, 0));
    assert!(m.handles.is_empty());
}

#[test]
fn deferred_partial_unmap_keeps_live_contents() {
    let (mut t, mut m) = (table(8, DEFER), Model::default());
    t.map(&mut m, 0, pages(8)).unwrap();
    for p in 0..8 {
        m.write(p, 100 + p as u32);
    }
    t.unmap(&mut m, pages(2), pages(2)).unwrap();
    assert!(m.unmaps.is_empty(), "nothing can be unmapped yet");
    assert_eq!(m.quiesces, 0, "nothing to wait for");
    assert_eq!(t.held_bytes(), pages(2));
    assert!(!t.is_mapped(pages(2), 1));
    assert!(t.is_mapped(pages(1), pages(1)));
    for p in [0, 1, 4, 5, 6, 7] {
        assert_eq!(m.read(p), 100 + p as u32, "page {p}");
    }
    t.unmap(&mut m, 0, pages(2)).unwrap();
    assert!(m.unmaps.is_empty());
    t.unmap(&mut m, pages(4), pages(4)).unwrap();
    assert_eq!((m.unmaps.len(), m.releases), (1, 1));
    assert_eq!((t.physical_bytes(), t.held_bytes()), (0, 0));
}

#[test]
fn held_pages_are_taken_back_without_a_driver_call() {
    let (mut t, mut m) = (table(8, DEFER), Model::default());
    t.map(&mut m, 0, pages(4)).unwrap();
    m.write(3, 7);
    t.unmap(&mut m, pages(2), pages(2)).unwrap();
    t.map(&mut m, pages(2), pages(4)).unwrap();
    assert_eq!(m.creates, 2, "only pages 4..6 need a new handle");
    assert_eq!(m.mapped[&pages(4)].len, pages(2));
    assert_eq!(
        m.accesses.last(),
        Some(&(pages(4), pages(2))),
        "access for the new run"
    );
    assert_eq!(t.held_bytes(), 0);
    assert_eq!(m.read(3), 7, "held page kept its bytes");
    assert!(t.is_mapped(0, pages(6)));
}

#[test]
fn per_map_adjacent_whole_mappings_go_in_one_unmap_call() {
    let (mut t, mut m) = (table(8, DEFER), Model::default());
    for i in 0..3 {
        t.map(&mut m, pages(2 * i), pages(2)).unwrap();
    }
    t.unmap(&mut m, 0, pages(6)).unwrap();
    assert_eq!(m.unmaps, vec![(0, pages(6), 3)]);
    assert_eq!(m.releases, 3);
}

#[test]
fn recreate_replaces_the_rest_and_loses_its_contents() {
    let (mut t, mut m) = (table(8, RECREATE), Model::default());
    t.map(&mut m, 0, pages(8)).unwrap();
    for p in 0..8 {
        m.write(p, 1);
    }
    t.unmap(&mut m, pages(2), pages(2)).unwrap();
    assert_eq!((m.creates, m.unmaps.len(), m.releases), (3, 1, 1));
    assert_eq!(m.quiesces, 1);
    assert_eq!(t.physical_bytes(), pages(6));
    assert_eq!(t.held_bytes(), 0);
    assert_eq!(m.mapped[&0].len, pages(2));
    assert_eq!(m.mapped[&pages(4)].len, pages(4));
    for p in [0, 1, 4, 7] {
        assert_eq!(m.read(p), 0, "page {p}: new memory, old bytes gone");
    }
}

#[test]
fn recreate_without_memory_defers() {
    let (mut t, mut m) = (table(8, RECREATE), Model::default());
    t.map(&mut m, 0, pages(8)).unwrap();
    m.write(0, 5);
    m.write(7, 6);
    m.creates_left = Some(1); // the second replacement fails
    t.unmap(&mut m, pages(2), pages(2)).unwrap();
    assert!(m.unmaps.is_empty());
    assert_eq!(m.handles.len(), 1, "the one replacement made was released");
    assert_eq!(t.held_bytes(), pages(2));
    assert_eq!((m.read(0), m.read(7)), (5, 6));
}

#[test]
fn per_map_unmap_across_several_map_calls() {
    let (mut t, mut m) = (table(8, DEFER), Model::default());
    for i in 0..3 {
        t.map(&mut m, pages(2 * i), pages(2)).unwrap();
    }
    t.unmap(&mut m, pages(1), pages(4)).unwrap();
    assert_eq!(
        m.unmaps,
        vec![(pages(2), pages(2), 1)],
        "the middle mapping only"
    );
    assert_eq!(m.releases, 1);
    assert_eq!(t.logical_bytes(), pages(2));
    assert_eq!(t.held_bytes(), pages(2));
    t.unmap(&mut m, 0, pages(1)).unwrap();
    t.unmap(&mut m, pages(5), pages(1)).unwrap();
    assert_eq!(m.unmaps.len(), 3);
    assert!(m.mapped.is_empty() && m.handles.is_empty());
}

#[test]
fn per_map_failed_map_changes_nothing() {
    let (mut t, mut m) = (table(8, DEFER), Model::default());
    t.map(&mut m, pages(2), pages(3)).unwrap();
    t.unmap(&mut m, pages(2), pages(2)).unwrap();
    // [0, 4): gap [0, 2), held [2, 4); the create for the gap fails.
    m.creates_left = Some(0);
    let e = t.map(&mut m, 0, pages(4)).unwrap_err();
    assert!(e.out_of_memory, "{e}");
    assert_eq!((m.mapped.len(), m.handles.len()), (1, 1));
    assert_eq!(t.logical_bytes(), pages(1));
    assert_eq!(t.physical_bytes(), pages(3));
    m.creates_left = None;
    t.map(&mut m, 0, pages(4)).unwrap();
    assert_eq!(
        m.creates, 2,
        "one handle for the gap; held pages taken back"
    );
    assert_eq!(t.held_bytes(), 0);
}

// --- both ---------------------------------------------------------------------------------------

#[test]
fn bad_ranges_are_errors() {
    for mode in [PER_PAGE, DEFER] {
        let (mut t, mut m) = (table(4, mode), Model::default());
        for (o, l) in [
            (0, 0),
            (1, G),
            (0, G + 1),
            (pages(3), pages(2)),
            (usize::MAX - G + 1, G),
        ] {
            let e = t.map(&mut m, o, l).unwrap_err();
            assert_eq!(e.op, BackendOp::Map);
            assert!(t.unmap(&mut m, o, l).is_err(), "{o:#x} {l:#x}");
        }
        t.map(&mut m, 0, pages(2)).unwrap();
        let creates = m.creates;
        assert!(t.map(&mut m, pages(1), pages(2)).is_err(), "overlap");
        assert!(
            t.unmap(&mut m, pages(1), pages(2)).is_err(),
            "not wholly mapped"
        );
        assert_eq!(t.logical_bytes(), pages(2), "failed calls change nothing");
        assert_eq!(m.creates, creates);
        assert!(m.unmaps.is_empty());
    }
}

#[test]
fn clear_frees_held_and_mapped() {
    for mode in [PER_PAGE, DEFER] {
        let (mut t, mut m) = (table(8, mode), Model::default());
        t.map(&mut m, 0, pages(4)).unwrap();
        t.map(&mut m, pages(4), pages(2)).unwrap();
        t.map(&mut m, pages(7), pages(1)).unwrap();
        t.unmap(&mut m, 0, pages(1)).unwrap();
        m.unmaps.clear();
        t.clear(&mut m).unwrap();
        assert!(m.mapped.is_empty() && m.handles.is_empty());
        assert_eq!((t.logical_bytes(), t.physical_bytes()), (0, 0));
        let expect = match mode {
            PER_PAGE => vec![(pages(1), pages(5), 5), (pages(7), pages(1), 1)],
            _ => vec![(0, pages(6), 2), (pages(7), pages(1), 1)],
        };
        assert_eq!(
            m.unmaps, expect,
            "{mode:?}: one call per run of adjacent mappings"
        );
    }
}

/// Random map/unmap sequences: the table and the model agree, every logical page is backed
/// and accessible, no mapping without a logical page survives, no live page loses its bytes
/// (except with `Recreate`), and one allocation per page never holds memory and costs one
/// access call per map and one unmap call per unmap.
#[test]
fn random_sequences_keep_the_invariants() {
    const N: usize = 24;
    for mode in [PER_PAGE, PER_BLOCK, DEFER, RECREATE] {
        for seed in 1..=40u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let (mut t, mut m) = (table(N, mode), Model::default());
            let mut live = [None::<u32>; N];
            for step in 0..200u32 {
                let a = (next() % N as u64) as usize;
                let b = a + 1 + (next() % (N - a) as u64) as usize;
                let all_free = live[a..b].iter().all(Option::is_none);
                let all_live = live[a..b].iter().all(Option::is_some);
                let (accesses, unmaps) = (m.accesses.len(), m.unmaps.len());
                if all_free {
                    t.map(&mut m, pages(a), pages(b - a)).unwrap();
                    for (p, slot) in live.iter_mut().enumerate().take(b).skip(a) {
                        m.write(p, step);
                        *slot = Some(step);
                    }
                    if mode == PER_PAGE {
                        assert_eq!(m.accesses.len(), accesses + 1);
                    }
                } else if all_live {
                    t.unmap(&mut m, pages(a), pages(b - a)).unwrap();
                    live[a..b].fill(None);
                    if mode == PER_PAGE {
                        assert_eq!(m.unmaps.len(), unmaps + 1);
                    }
                }
                let backed: usize = m.mapped.values().map(|m| m.len).sum();
                assert_eq!(backed, t.physical_bytes());
                let n_live = live.iter().filter(|v| v.is_some()).count();
                assert_eq!(t.logical_bytes(), pages(n_live));
                if mode == PER_PAGE {
                    assert_eq!(t.held_bytes(), 0, "seed {seed} step {step}");
                    assert!(m.mapped.values().all(|m| m.len == G));
                }
                if mode == PER_BLOCK {
                    assert!(
                        m.mapped
                            .iter()
                            .all(|(&o, m)| o / (4 * G) == (o + m.len - 1) / (4 * G)),
                        "seed {seed} step {step}: an allocation crosses a block"
                    );
                }
                for (&start, mapping) in &m.mapped {
                    let pages_live =
                        (start / G..(start + mapping.len) / G).any(|p| live[p].is_some());
                    assert!(pages_live, "seed {seed} step {step}: dead mapping kept");
                }
                for (p, v) in live.iter().enumerate() {
                    if let Some(v) = v {
                        assert!(t.is_mapped(pages(p), 1));
                        let got = m.read(p);
                        if mode != RECREATE {
                            assert_eq!(got, *v, "seed {seed} step {step} page {p}");
                        }
                    }
                }
            }
            t.clear(&mut m).unwrap();
            assert!(m.handles.is_empty());
        }
    }
}

/// The model, except that `create` fails with an error other than out-of-memory while
/// `create_fails` is set (as `cuMemCreate` does with `CUDA_ERROR_INVALID_VALUE`, say).
#[derive(Debug, Default)]
struct CreateFails {
    m: Model,
    create_fails: bool,
}

impl PageDriver for CreateFails {
    fn create(&mut self, len: usize) -> Result<u64, BackendError> {
        if self.create_fails {
            return Err(BackendError::new(BackendOp::Map, "cuMemCreate failed"));
        }
        self.m.create(len)
    }
    fn map(&mut self, offset: usize, len: usize, handle: u64) -> Result<(), BackendError> {
        self.m.map(offset, len, handle)
    }
    fn set_access(&mut self, offset: usize, len: usize) -> Result<(), BackendError> {
        self.m.set_access(offset, len)
    }
    fn unmap(&mut self, offset: usize, lens: &[usize]) -> Result<(), (usize, BackendError)> {
        self.m.unmap(offset, lens)
    }
    fn release(&mut self, handle: u64) -> Result<(), BackendError> {
        self.m.release(handle)
    }
    fn quiesce(&mut self) -> Result<(), BackendError> {
        self.m.quiesce()
    }
}

#[test]
fn replacements_that_cannot_be_created_defer_the_allocation_and_the_unmap_succeeds() {
    // One allocation [0, 8); unmapping [2, 4) needs replacements for [0, 2) and [4, 8).
    let (mut t, mut d) = (table(8, RECREATE), CreateFails::default());
    t.map(&mut d, 0, pages(8)).unwrap();
    d.create_fails = true;
    // Deferred, not an error: an error would tell the engine the range is still mapped.
    t.unmap(&mut d, pages(2), pages(2)).unwrap();
    assert!(!t.is_mapped(pages(2), pages(2)));
    assert!(t.is_mapped(0, pages(2)) && t.is_mapped(pages(4), pages(4)));
    // The deferred allocation still backs the pages that stay, and goes once all are free.
    d.create_fails = false;
    t.unmap(&mut d, 0, pages(2)).unwrap();
    t.unmap(&mut d, pages(4), pages(4)).unwrap();
    assert!(d.m.handles.is_empty(), "{:?}", d.m.handles);

    // Two map calls: [0, 2) and [2, 8). Unmapping [0, 4) frees [0, 2) whole; the replacement
    // for [4, 8) cannot be made, so [2, 8) waits, and the call succeeds.
    let (mut t, mut d) = (table(8, RECREATE), CreateFails::default());
    t.map(&mut d, 0, pages(2)).unwrap();
    t.map(&mut d, pages(2), pages(6)).unwrap();
    d.create_fails = true;
    t.unmap(&mut d, 0, pages(4)).unwrap();
    assert!(t.is_mapped(pages(4), pages(4)));
}

#[test]
fn handles_a_failed_map_could_not_release_are_retried_by_clear() {
    let (mut t, mut m) = (table(8, PER_PAGE), Model::default());
    m.fail_access = true; // the map fails after creating and mapping its 2 pages...
    m.fail_release = true; // ...and the driver refuses to release them once unmapped
    assert!(t.map(&mut m, 0, pages(2)).is_err());
    (m.fail_access, m.fail_release) = (false, false);
    t.clear(&mut m).unwrap();
    assert!(
        m.handles.is_empty(),
        "{} physical allocation(s) never released",
        m.handles.len()
    );
}
