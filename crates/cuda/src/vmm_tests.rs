//! Page-table tests against a model of the driver that enforces CUDA's VMM rules: a handle is
//! mapped whole at one place, an unmap removes exactly one earlier mapping, a handle is
//! released only when unmapped. Each physical page carries a value so lost contents show.

use std::collections::{BTreeMap, HashMap};

use super::*;

const G: usize = 2 << 20;

#[derive(Debug, Default)]
struct Model {
    next: u64,
    /// handle -> contents, one value per page.
    handles: HashMap<u64, Vec<u32>>,
    /// offset -> (len, handle)
    mapped: BTreeMap<usize, (usize, u64)>,
    /// `create` fails with out-of-memory once this many more creates have succeeded.
    creates_left: Option<usize>,
    creates: usize,
    maps: usize,
    unmaps: usize,
    releases: usize,
    quiesces: usize,
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
            self.mapped.values().all(|&(_, h)| h != handle),
            "handle mapped twice"
        );
        assert!(
            self.mapped
                .iter()
                .all(|(&o, &(l, _))| o + l <= offset || offset + len <= o),
            "map over a mapped range"
        );
        self.maps += 1;
        self.mapped.insert(offset, (len, handle));
        Ok(())
    }

    fn unmap(&mut self, offset: usize, len: usize) -> Result<(), BackendError> {
        assert!(self.quiesces > 0, "unmap before quiesce");
        let (l, _) = self
            .mapped
            .remove(&offset)
            .expect("unmap must start at a mapping");
        assert_eq!(l, len, "unmap must cover exactly one whole mapping");
        self.unmaps += 1;
        Ok(())
    }

    fn release(&mut self, handle: u64) -> Result<(), BackendError> {
        assert!(
            self.mapped.values().all(|&(_, h)| h != handle),
            "release of a mapped handle"
        );
        self.handles
            .remove(&handle)
            .expect("release of unknown handle");
        self.releases += 1;
        Ok(())
    }

    fn quiesce(&mut self) -> Result<(), BackendError> {
        self.quiesces += 1;
        Ok(())
    }
}

impl Model {
    fn slot(&mut self, page: usize) -> Option<&mut u32> {
        let off = page * G;
        let (&start, &(_, handle)) = self
            .mapped
            .range(..=off)
            .next_back()
            .filter(|(s, (l, _))| **s + *l > off)?;
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
}

fn pages(n: usize) -> usize {
    n * G
}

fn table(n: usize) -> PageTable {
    PageTable::new(pages(n), G)
}

#[test]
fn whole_map_and_unmap_is_one_call_each() {
    let (mut t, mut m) = (table(16), Model::default());
    t.map(&mut m, pages(2), pages(4)).unwrap();
    assert_eq!((m.creates, m.maps), (1, 1));
    assert_eq!(t.logical_bytes(), pages(4));
    t.unmap(&mut m, PartialUnmap::Defer, pages(2), pages(4))
        .unwrap();
    assert_eq!((m.unmaps, m.releases), (1, 1));
    assert_eq!((t.physical_bytes(), t.handles()), (0, 0));
    assert!(m.handles.is_empty());
}

#[test]
fn deferred_partial_unmap_keeps_live_contents() {
    let (mut t, mut m) = (table(8), Model::default());
    t.map(&mut m, 0, pages(8)).unwrap();
    for p in 0..8 {
        m.write(p, 100 + p as u32);
    }
    t.unmap(&mut m, PartialUnmap::Defer, pages(2), pages(2))
        .unwrap();
    assert_eq!(m.unmaps, 0, "nothing can be unmapped yet");
    assert_eq!(t.held_bytes(), pages(2));
    assert!(!t.is_mapped(pages(2), 1));
    assert!(t.is_mapped(pages(1), pages(1)));
    for p in [0, 1, 4, 5, 6, 7] {
        assert_eq!(m.read(p), 100 + p as u32, "page {p}");
    }
    t.unmap(&mut m, PartialUnmap::Defer, 0, pages(2)).unwrap();
    assert_eq!(m.unmaps, 0);
    t.unmap(&mut m, PartialUnmap::Defer, pages(4), pages(4))
        .unwrap();
    assert_eq!((m.unmaps, m.releases), (1, 1));
    assert_eq!((t.physical_bytes(), t.held_bytes()), (0, 0));
}

#[test]
fn held_pages_are_taken_back_without_a_driver_call() {
    let (mut t, mut m) = (table(8), Model::default());
    t.map(&mut m, 0, pages(4)).unwrap();
    m.write(3, 7);
    t.unmap(&mut m, PartialUnmap::Defer, pages(2), pages(2))
        .unwrap();
    t.map(&mut m, pages(2), pages(4)).unwrap();
    assert_eq!(m.creates, 2, "only pages 4..6 need a new handle");
    assert_eq!(m.mapped[&pages(4)].0, pages(2));
    assert_eq!(t.held_bytes(), 0);
    assert_eq!(m.read(3), 7, "held page kept its bytes");
    assert!(t.is_mapped(0, pages(6)));
}

#[test]
fn recreate_replaces_the_rest_and_loses_its_contents() {
    let (mut t, mut m) = (table(8), Model::default());
    t.map(&mut m, 0, pages(8)).unwrap();
    for p in 0..8 {
        m.write(p, 1);
    }
    t.unmap(&mut m, PartialUnmap::Recreate, pages(2), pages(2))
        .unwrap();
    assert_eq!((m.creates, m.unmaps, m.releases), (3, 1, 1));
    assert_eq!(t.physical_bytes(), pages(6));
    assert_eq!(t.held_bytes(), 0);
    assert_eq!(m.mapped[&0].0, pages(2));
    assert_eq!(m.mapped[&pages(4)].0, pages(4));
    for p in [0, 1, 4, 7] {
        assert_eq!(m.read(p), 0, "page {p}: new memory, old bytes gone");
    }
}

#[test]
fn recreate_without_memory_defers() {
    let (mut t, mut m) = (table(8), Model::default());
    t.map(&mut m, 0, pages(8)).unwrap();
    m.write(0, 5);
    m.write(7, 6);
    m.creates_left = Some(1); // the second replacement fails
    t.unmap(&mut m, PartialUnmap::Recreate, pages(2), pages(2))
        .unwrap();
    assert_eq!(m.unmaps, 0);
    assert_eq!(m.handles.len(), 1, "the one replacement made was released");
    assert_eq!(t.held_bytes(), pages(2));
    assert_eq!((m.read(0), m.read(7)), (5, 6));
}

#[test]
fn unmap_across_several_map_calls() {
    let (mut t, mut m) = (table(8), Model::default());
    for i in 0..3 {
        t.map(&mut m, pages(2 * i), pages(2)).unwrap();
    }
    t.unmap(&mut m, PartialUnmap::Defer, pages(1), pages(4))
        .unwrap();
    assert_eq!((m.unmaps, m.releases), (1, 1), "the middle mapping only");
    assert_eq!(t.logical_bytes(), pages(2));
    assert_eq!(t.held_bytes(), pages(2));
    t.unmap(&mut m, PartialUnmap::Defer, 0, pages(1)).unwrap();
    t.unmap(&mut m, PartialUnmap::Defer, pages(5), pages(1))
        .unwrap();
    assert_eq!(m.unmaps, 3);
    assert!(m.mapped.is_empty() && m.handles.is_empty());
}

#[test]
fn bad_ranges_are_errors() {
    let (mut t, mut m) = (table(4), Model::default());
    for (o, l) in [
        (0, 0),
        (1, G),
        (0, G + 1),
        (pages(3), pages(2)),
        (usize::MAX - G + 1, G),
    ] {
        let e = t.map(&mut m, o, l).unwrap_err();
        assert_eq!(e.op, BackendOp::Map);
        assert!(
            t.unmap(&mut m, PartialUnmap::Defer, o, l).is_err(),
            "{o:#x} {l:#x}"
        );
    }
    t.map(&mut m, 0, pages(2)).unwrap();
    assert!(t.map(&mut m, pages(1), pages(2)).is_err(), "overlap");
    assert!(
        t.unmap(&mut m, PartialUnmap::Defer, pages(1), pages(2))
            .is_err(),
        "not wholly mapped"
    );
    assert_eq!(t.logical_bytes(), pages(2), "failed calls change nothing");
    assert_eq!(m.creates, 1);
}

#[test]
fn failed_map_changes_nothing() {
    let (mut t, mut m) = (table(8), Model::default());
    t.map(&mut m, pages(2), pages(3)).unwrap();
    t.unmap(&mut m, PartialUnmap::Defer, pages(2), pages(2))
        .unwrap();
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

#[test]
fn clear_frees_held_and_mapped() {
    let (mut t, mut m) = (table(8), Model::default());
    t.map(&mut m, 0, pages(4)).unwrap();
    t.map(&mut m, pages(4), pages(2)).unwrap();
    t.unmap(&mut m, PartialUnmap::Defer, 0, pages(1)).unwrap();
    t.clear(&mut m).unwrap();
    assert!(m.mapped.is_empty() && m.handles.is_empty());
    assert_eq!((t.logical_bytes(), t.physical_bytes()), (0, 0));
}

/// Random map/unmap sequences: the table and the model agree, every logical page is backed,
/// no mapping without a logical page survives, and with `Defer` no live page loses its bytes.
#[test]
fn random_sequences_keep_the_invariants() {
    const N: usize = 24;
    for mode in [PartialUnmap::Defer, PartialUnmap::Recreate] {
        for seed in 1..=40u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let (mut t, mut m) = (table(N), Model::default());
            let mut live = [None::<u32>; N];
            for step in 0..200u32 {
                let a = (next() % N as u64) as usize;
                let b = a + 1 + (next() % (N - a) as u64) as usize;
                let all_free = live[a..b].iter().all(Option::is_none);
                let all_live = live[a..b].iter().all(Option::is_some);
                if all_free {
                    t.map(&mut m, pages(a), pages(b - a)).unwrap();
                    for (p, slot) in live.iter_mut().enumerate().take(b).skip(a) {
                        m.write(p, step);
                        *slot = Some(step);
                    }
                } else if all_live {
                    t.unmap(&mut m, mode, pages(a), pages(b - a)).unwrap();
                    live[a..b].fill(None);
                }
                let backed: usize = m.mapped.values().map(|(l, _)| l).sum();
                assert_eq!(backed, t.physical_bytes());
                let n_live = live.iter().filter(|v| v.is_some()).count();
                assert_eq!(t.logical_bytes(), pages(n_live));
                for (&start, &(len, _)) in &m.mapped {
                    let pages_live = (start / G..(start + len) / G).any(|p| live[p].is_some());
                    assert!(pages_live, "seed {seed} step {step}: dead mapping kept");
                }
                for (p, v) in live.iter().enumerate() {
                    if let Some(v) = v {
                        assert!(t.is_mapped(pages(p), 1));
                        let got = m.read(p);
                        if mode == PartialUnmap::Defer {
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
