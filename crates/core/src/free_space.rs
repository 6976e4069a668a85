//! Free space of a pool: the free ranges of each heap, and one index over all of them that
//! answers best-fit queries.
//!
//! [`FreeRanges`] (one per heap) maps each free range's start to its length and its end to its
//! start, so the two neighbours of a range given back are found by two hash lookups rather
//! than by searching an ordered map, and a split or merge updates entries in place. [`SizeIndex`] (one per pool) holds one `(len, heap,
//! offset)` entry per free range in the exact order of that tuple; it files them in bins of
//! lengths (one bin per length below 16 units of [`ALIGN`], then eight bins per doubling), each
//! a sorted vector, with a bitmap of the non-empty bins. A best-fit lookup is one binary search
//! in the request's bin and, when that bin has nothing long enough, one bitmap scan to the next
//! non-empty bin: the same answer as a search in one ordered set of all entries, without the
//! pointer chasing. The price: an insert or remove shifts the entries after it in its bin. A
//! bin holds ranges within 1/8 of one length, a few dozen in most pools, and shifting that
//! many is cheaper than a tree's node walk; a bin past 256 entries (a pool cut into thousands
//! of equal holes) becomes a B-tree until it shrinks below 64, so no operation is linear.
//!
//! Invariants: ranges of one heap are disjoint and never adjacent (the pool merges neighbours);
//! `by_end` holds exactly the ends of the ranges in `by_start`; a [`SizeIndex`] bin holds only
//! entries whose length maps to it, sorted, without duplicates; its bit in `nonempty` is set
//! exactly when it holds an entry; `len` counts the entries.

use std::collections::BTreeSet;

use crate::addr_map::AddrMap;
use crate::pool::ALIGN;

/// The free ranges of one heap: start -> length and end -> start.
#[derive(Debug, Default)]
pub(crate) struct FreeRanges {
    by_start: AddrMap<usize>,
    by_end: AddrMap<usize>,
}

impl FreeRanges {
    /// One free range covering `[0, size)`.
    pub fn whole(size: usize) -> FreeRanges {
        let mut ranges = FreeRanges::default();
        ranges.insert(0, size);
        ranges
    }

    fn insert(&mut self, start: usize, len: usize) {
        self.by_start.insert(start as u64, len);
        self.by_end.insert((start + len) as u64, start);
    }

    /// Takes `[start, start + len)` from the front of the range starting at `start`; returns
    /// that range's length (its rest stays free). None, changing nothing, if no range starts
    /// there or it is shorter than `len`.
    pub fn take_front(&mut self, start: usize, len: usize) -> Option<usize> {
        // Removed first, put back in the rare refusal: one lookup fewer on the hot path.
        let range_len = self.by_start.remove(&(start as u64))?;
        if range_len < len {
            self.by_start.insert(start as u64, range_len);
            return None;
        }
        let end = (start + range_len) as u64;
        if range_len == len {
            self.by_end.remove(&end);
        } else {
            self.by_start.insert((start + len) as u64, range_len - len);
            *self
                .by_end
                .get_mut(&end)
                .expect("every range's end is filed") = start + len;
        }
        Some(range_len)
    }

    /// Frees `[start, start + len)` (not free now), merged with the free ranges touching it.
    /// Returns the neighbours it absorbed, as (start, length), before and after it.
    pub fn give(&mut self, start: usize, len: usize) -> [Option<(usize, usize)>; 2] {
        let end = start + len;
        // The range ending at `start` is `[s, start)`: its length needs no lookup.
        let before = self.by_end.remove(&(start as u64)).map(|s| (s, start - s));
        let after = self.by_start.remove(&(end as u64)).map(|l| (end, l));
        let merged_start = before.map_or(start, |(s, _)| s);
        let merged_end = after.map_or(end, |(e, l)| e + l);
        let merged_len = merged_end - merged_start;
        match before {
            Some((s, _)) => *self.by_start.get_mut(&(s as u64)).expect("filed above") = merged_len,
            None => {
                self.by_start.insert(start as u64, merged_len);
            }
        }
        match after {
            Some(_) => {
                *self
                    .by_end
                    .get_mut(&(merged_end as u64))
                    .expect("every range's end is filed") = merged_start
            }
            None => {
                self.by_end.insert(merged_end as u64, merged_start);
            }
        }
        [before, after]
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_start.len()
    }

    /// Every range as (start, length), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.by_start
            .iter()
            .map(|(&start, &len)| (start as usize, len))
    }

    pub fn largest(&self) -> usize {
        self.by_start.values().copied().max().unwrap_or(0)
    }
}

/// An entry of a [`SizeIndex`]: ordered, with a length leading its order.
pub(crate) trait Entry: Ord + Copy {
    fn length(&self) -> usize;
    /// The least entry of length `len`.
    fn first_of_length(len: usize) -> Self;
}

/// A free range: (length, heap slot, offset).
pub(crate) type FreeEntry = (usize, u32, usize);

impl Entry for FreeEntry {
    fn length(&self) -> usize {
        self.0
    }
    fn first_of_length(len: usize) -> Self {
        (len, 0, 0)
    }
}

/// A cached buffer: (size, order of arrival, record slot).
impl Entry for (usize, u64, u32) {
    fn length(&self) -> usize {
        self.0
    }
    fn first_of_length(len: usize) -> Self {
        (len, 0, 0)
    }
}

/// Lengths below this many [`ALIGN`] units have a bin each.
const EXACT_BINS: usize = 16;
/// Bins per doubling of length above [`EXACT_BINS`] units (a power of two).
const SUB_BINS: usize = 8;
const SUB_BITS: u32 = SUB_BINS.trailing_zeros();
const BINS: usize = EXACT_BINS
    + (usize::BITS - ALIGN.trailing_zeros() - EXACT_BINS.trailing_zeros()) as usize * SUB_BINS;
const WORDS: usize = BINS.div_ceil(64);
/// A sorted bin holding more entries than this becomes a tree (a shift would move too many).
const TREE_ABOVE: usize = 256;
/// A tree bin holding fewer entries than this becomes sorted again.
const SORTED_BELOW: usize = 64;

/// The bin of a range of `len` bytes; bins grow with length, so the order of bins and the
/// order of lengths agree.
fn bin_of(len: usize) -> usize {
    let units = len / ALIGN;
    if units < EXACT_BINS {
        return units;
    }
    let top = usize::BITS - 1 - units.leading_zeros();
    let sub = (units >> (top - SUB_BITS)) & (SUB_BINS - 1);
    EXACT_BINS + (top - EXACT_BINS.trailing_zeros()) as usize * SUB_BINS + sub
}

/// One bin: a sorted vector while short, a B-tree when many ranges share a length (a pool
/// fragmented into thousands of equal holes), so no operation ever shifts a long vector.
#[derive(Debug)]
enum Bin<E> {
    Sorted(Vec<E>),
    Tree(BTreeSet<E>),
}

impl<E: Entry> Bin<E> {
    fn len(&self) -> usize {
        match self {
            Bin::Sorted(v) => v.len(),
            Bin::Tree(t) => t.len(),
        }
    }

    /// Inserts `entry`; false if it was there.
    #[inline]
    fn insert(&mut self, entry: E) -> bool {
        match self {
            Bin::Sorted(v) => {
                let at = v.partition_point(|e| *e < entry);
                if v.get(at) == Some(&entry) {
                    return false;
                }
                v.insert(at, entry);
                if v.len() > TREE_ABOVE {
                    self.become_tree();
                }
                true
            }
            Bin::Tree(t) => t.insert(entry),
        }
    }

    /// Removes `entry`; false if it was not there.
    #[inline]
    fn remove(&mut self, entry: &E) -> bool {
        match self {
            Bin::Sorted(v) => match v.binary_search(entry) {
                Ok(at) => {
                    v.remove(at);
                    true
                }
                Err(_) => false,
            },
            Bin::Tree(t) => {
                let removed = t.remove(entry);
                if t.len() < SORTED_BELOW {
                    self.become_sorted();
                }
                removed
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn become_tree(&mut self) {
        if let Bin::Sorted(v) = self {
            *self = Bin::Tree(std::mem::take(v).into_iter().collect());
        }
    }

    #[cold]
    #[inline(never)]
    fn become_sorted(&mut self) {
        if let Bin::Tree(t) = self {
            *self = Bin::Sorted(std::mem::take(t).into_iter().collect());
        }
    }

    /// Entries of length at least `from` and below `to` (none: to the bin's end).
    #[inline]
    fn lengths(&self, from: usize, to: Option<usize>) -> BinIter<'_, E> {
        match self {
            Bin::Sorted(v) => {
                let start = v.partition_point(|e| e.length() < from);
                let end = to.map_or(v.len(), |to| {
                    start + v[start..].partition_point(|e| e.length() < to)
                });
                BinIter::Sorted(v[start..end].iter())
            }
            Bin::Tree(t) => {
                let first = E::first_of_length(from);
                BinIter::Tree(match to {
                    Some(to) => t.range(first..E::first_of_length(to.max(from))),
                    None => t.range(first..),
                })
            }
        }
    }

    #[inline]
    fn all(&self) -> BinIter<'_, E> {
        match self {
            Bin::Sorted(v) => BinIter::Sorted(v.iter()),
            Bin::Tree(t) => BinIter::Tree(t.range(..)),
        }
    }

    fn last(&self) -> Option<E> {
        match self {
            Bin::Sorted(v) => v.last().copied(),
            Bin::Tree(t) => t.last().copied(),
        }
    }

    fn clear(&mut self) {
        match self {
            Bin::Sorted(v) => v.clear(),
            Bin::Tree(_) => *self = Bin::Sorted(Vec::new()),
        }
    }
}

/// Entries of one bin, in order, from either end.
pub(crate) enum BinIter<'a, E> {
    Sorted(std::slice::Iter<'a, E>),
    Tree(std::collections::btree_set::Range<'a, E>),
}

impl<E: Copy> Iterator for BinIter<'_, E> {
    type Item = E;

    #[inline]
    fn next(&mut self) -> Option<E> {
        match self {
            BinIter::Sorted(i) => i.next().copied(),
            BinIter::Tree(i) => i.next().copied(),
        }
    }
}

impl<E: Copy> DoubleEndedIterator for BinIter<'_, E> {
    #[inline]
    fn next_back(&mut self) -> Option<E> {
        match self {
            BinIter::Sorted(i) => i.next_back().copied(),
            BinIter::Tree(i) => i.next_back().copied(),
        }
    }
}

/// Entries ordered as their tuples (every free range of a pool by (length, heap, offset);
/// the large buffers of a cache by (size, arrival)), binned by length.
#[derive(Debug)]
pub(crate) struct SizeIndex<E> {
    bins: Vec<Bin<E>>,
    nonempty: [u64; WORDS],
    len: usize,
}

impl<E> Default for SizeIndex<E> {
    fn default() -> Self {
        SizeIndex {
            bins: (0..BINS).map(|_| Bin::Sorted(Vec::new())).collect(),
            nonempty: [0; WORDS],
            len: 0,
        }
    }
}

impl<E: Entry> SizeIndex<E> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn insert(&mut self, entry: E) {
        let b = bin_of(entry.length());
        if self.bins[b].insert(entry) {
            self.nonempty[b / 64] |= 1 << (b % 64);
            self.len += 1;
        }
    }

    /// Removes `entry`; false if it is not there.
    pub fn remove(&mut self, entry: &E) -> bool {
        let b = bin_of(entry.length());
        let bin = &mut self.bins[b];
        if !bin.remove(entry) {
            return false;
        }
        if bin.len() == 0 {
            self.nonempty[b / 64] &= !(1 << (b % 64));
        }
        self.len -= 1;
        true
    }

    /// The first non-empty bin at or after `from`.
    fn next_bin(&self, from: usize) -> Option<usize> {
        let mut word = from / 64;
        if word >= WORDS {
            return None;
        }
        let mut bits = self.nonempty[word] & (!0u64 << (from % 64));
        loop {
            if bits != 0 {
                return Some(word * 64 + bits.trailing_zeros() as usize);
            }
            word += 1;
            if word == WORDS {
                return None;
            }
            bits = self.nonempty[word];
        }
    }

    /// Entries of length at least `len`, in order.
    #[inline]
    pub fn at_least(&self, len: usize) -> AtLeast<'_, E> {
        let bin = bin_of(len);
        AtLeast {
            index: self,
            bin,
            entries: self.bins[bin].lengths(len, None),
        }
    }

    /// The entries of length exactly `len`, in order.
    #[inline]
    pub fn of_length(&self, len: usize) -> BinIter<'_, E> {
        self.bins[bin_of(len)].lengths(len, len.checked_add(1))
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        for w in 0..WORDS {
            let mut bits = self.nonempty[w];
            while bits != 0 {
                self.bins[w * 64 + bits.trailing_zeros() as usize].clear();
                bits &= bits - 1;
            }
            self.nonempty[w] = 0;
        }
        self.len = 0;
    }

    /// The greatest entry.
    pub fn last(&self) -> Option<E> {
        let w = self.nonempty.iter().rposition(|&w| w != 0)?;
        let b = w * 64 + 63 - self.nonempty[w].leading_zeros() as usize;
        self.bins[b].last()
    }
}

/// Iterator of [`SizeIndex::at_least`].
pub(crate) struct AtLeast<'a, E> {
    index: &'a SizeIndex<E>,
    bin: usize,
    entries: BinIter<'a, E>,
}

impl<E: Entry> Iterator for AtLeast<'_, E> {
    type Item = E;

    #[inline]
    fn next(&mut self) -> Option<E> {
        loop {
            if let Some(e) = self.entries.next() {
                return Some(e);
            }
            self.bin = self.index.next_bin(self.bin + 1)?;
            self.entries = self.index.bins[self.bin].all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_longest_possible_range_is_found_by_its_length() {
        let mut index = SizeIndex::<FreeEntry>::default();
        index.insert((usize::MAX, 0, 0));
        assert_eq!(index.of_length(usize::MAX).next(), Some((usize::MAX, 0, 0)));
        assert_eq!(index.at_least(usize::MAX).next(), Some((usize::MAX, 0, 0)));
    }

    #[test]
    fn bins_follow_lengths() {
        let mut last = 0;
        for units in 1..100_000usize {
            let b = bin_of(units * ALIGN);
            assert!(b >= last && b < BINS, "length {} units", units);
            last = b;
        }
        assert!(bin_of(usize::MAX / ALIGN * ALIGN) < BINS);
        assert_eq!(bin_of(15 * ALIGN), 15);
        assert_eq!(bin_of(16 * ALIGN), EXACT_BINS);
    }

    fn sorted(r: &FreeRanges) -> Vec<(usize, usize)> {
        let mut v: Vec<_> = r.iter().collect();
        v.sort();
        for &(s, l) in &v {
            assert_eq!(
                r.by_end.get(&((s + l) as u64)),
                Some(&s),
                "end of {s}+{l} filed"
            );
        }
        assert_eq!(r.by_end.len(), v.len());
        v
    }

    #[test]
    fn ranges_split_and_merge_with_both_neighbours() {
        let mut r = FreeRanges::whole(8192);
        assert_eq!(r.take_front(0, 1024), Some(8192));
        assert_eq!(r.take_front(1024, 1024), Some(7168));
        assert_eq!(r.take_front(2048, 1024), Some(6144));
        assert_eq!(r.take_front(512, 512), None, "no range starts there");
        assert_eq!(r.take_front(3072, 8192), None, "too short");
        assert_eq!(sorted(&r), vec![(3072, 5120)]);
        assert_eq!(r.give(0, 1024), [None, None]);
        assert_eq!(r.give(2048, 1024), [None, Some((3072, 5120))]);
        assert_eq!(sorted(&r), vec![(0, 1024), (2048, 6144)]);
        assert_eq!(r.give(1024, 1024), [Some((0, 1024)), Some((2048, 6144))]);
        assert_eq!(sorted(&r), vec![(0, 8192)]);
        assert_eq!(r.take_front(0, 8192), Some(8192));
        assert_eq!(sorted(&r), vec![]);
        assert_eq!(r.give(4096, 512), [None, None]);
        assert_eq!(r.give(3584, 512), [None, Some((4096, 512))]);
        assert_eq!(r.give(4608, 512), [Some((3584, 1024)), None]);
        assert_eq!((r.len(), r.largest()), (1, 1536));
        assert_eq!(sorted(&r), vec![(3584, 1536)]);
    }

    /// Checks every query of `index` against `model`.
    fn agree(index: &SizeIndex<FreeEntry>, model: &BTreeSet<FreeEntry>, lens: &[usize]) {
        assert_eq!(index.len(), model.len());
        assert_eq!(index.last(), model.iter().next_back().copied());
        let lengths = model.iter().map(|e| e.0).step_by(model.len() / 8 + 1);
        for len in lens.iter().copied().chain(lengths) {
            let got: Vec<FreeEntry> = index.at_least(len).collect();
            let want: Vec<FreeEntry> = model.range((len, 0, 0)..).copied().collect();
            assert_eq!(got, want, "at least {len}");
            let exact: Vec<FreeEntry> =
                model.range((len, 0, 0)..(len + 1, 0, 0)).copied().collect();
            assert_eq!(
                index.of_length(len).collect::<Vec<_>>(),
                exact,
                "of length {len}"
            );
            assert_eq!(index.of_length(len).next_back(), exact.last().copied());
        }
    }

    proptest! {
        /// The index answers exactly as one ordered set of all entries would: lengths spread
        /// over many doublings, or crowded into three lengths so that bins turn into trees
        /// and back.
        #[test]
        fn the_index_orders_like_an_ordered_set(
            crowded in any::<bool>(),
            ops in prop::collection::vec((0u8..3, 1usize..5000, 0u32..3, 0usize..2000), 1..1500),
            queries in prop::collection::vec(1usize..6000, 1..20),
        ) {
            let mut index = SizeIndex::<FreeEntry>::default();
            let mut model = BTreeSet::new();
            for (op, units, heap, slot) in ops {
                let len = if crowded {
                    (units % 3 + 1) * ALIGN
                } else {
                    units * units * ALIGN / 8 / ALIGN * ALIGN + ALIGN
                };
                let entry = (len, heap, slot * ALIGN);
                // Two inserts for one remove, so crowded bins grow past the tree threshold.
                if op < 2 {
                    index.insert(entry);
                    model.insert(entry);
                } else {
                    prop_assert_eq!(index.remove(&entry), model.remove(&entry));
                }
            }
            let lens: Vec<usize> = queries.iter().map(|q| q * q * ALIGN / 8 / ALIGN * ALIGN).collect();
            agree(&index, &model, &lens);
            // Emptied again, entry by entry: crowded bins go back to sorted vectors.
            let all: Vec<FreeEntry> = model.iter().copied().collect();
            for (i, e) in all.iter().enumerate() {
                prop_assert!(index.remove(e));
                model.remove(e);
                if i % 97 == 0 {
                    agree(&index, &model, &lens);
                }
            }
            agree(&index, &model, &lens);
            for e in all.iter().take(300) {
                index.insert(*e);
            }
            index.clear();
            prop_assert_eq!((index.len(), index.last(), index.at_least(0).next()), (0, None, None));
        }
    }

    #[test]
    fn crowded_bins_become_trees_and_sorted_again() {
        let mut index = SizeIndex::<FreeEntry>::default();
        for off in 0..1000 {
            index.insert((ALIGN, 0, off * ALIGN));
        }
        assert!(matches!(index.bins[1], Bin::Tree(_)));
        assert_eq!(index.at_least(ALIGN).next(), Some((ALIGN, 0, 0)));
        for off in 0..990 {
            assert!(index.remove(&(ALIGN, 0, off * ALIGN)));
        }
        assert!(matches!(index.bins[1], Bin::Sorted(_)));
        assert_eq!(index.of_length(ALIGN).count(), 10);
    }
}
