//! Cached buffers of one pool: freed buffers kept whole for reuse, indexed by size.
//!
//! Invariants: every entry is the slot of a buffer record in the `Cached` state whose rounded
//! size is the key it is filed under; a slot appears at most once; `len`/`bytes` equal the
//! number and total size of the entries. Sizes are multiples of [`crate::pool::ALIGN`].
//! Small sizes (up to [`SMALL_LIMIT`]) live in an array of bins with a bitmap of non-empty
//! bins, so exact and best-fit lookups are O(1)/O(bins/64); larger sizes live in a
//! [`SizeIndex`] ordered by (size, order of arrival), one entry per buffer: a size seen for
//! the first time costs no allocation of its own, which matters where large sizes rarely
//! repeat and each buffer passes through the cache once. Within a size, the newest entry goes
//! first.

use crate::free_space::SizeIndex;
use crate::pool::ALIGN;

/// Largest size kept in the array of bins.
pub(crate) const SMALL_LIMIT: usize = 1 << 20;
const SMALL_BINS: usize = SMALL_LIMIT / ALIGN + 1;
const WORDS: usize = SMALL_BINS.div_ceil(64);

#[derive(Debug)]
pub(crate) struct BufferCache {
    small: Vec<Vec<u32>>,
    nonempty: [u64; WORDS],
    /// (size, arrival, slot).
    large: SizeIndex<(usize, u64, u32)>,
    arrivals: u64,
    len: usize,
    bytes: usize,
}

impl Default for BufferCache {
    fn default() -> Self {
        BufferCache {
            small: vec![Vec::new(); SMALL_BINS],
            nonempty: [0; WORDS],
            large: SizeIndex::default(),
            arrivals: 0,
            len: 0,
            bytes: 0,
        }
    }
}

impl BufferCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The size of the largest cached buffer (0 when empty).
    pub fn largest(&self) -> usize {
        if let Some((size, _, _)) = self.large.last() {
            return size;
        }
        self.nonempty.iter().rposition(|&w| w != 0).map_or(0, |w| {
            (w * 64 + 63 - self.nonempty[w].leading_zeros() as usize) * ALIGN
        })
    }

    pub fn push(&mut self, size: usize, slot: u32) {
        if size <= SMALL_LIMIT {
            let bin = size / ALIGN;
            self.small[bin].push(slot);
            self.nonempty[bin / 64] |= 1 << (bin % 64);
        } else {
            self.arrivals += 1;
            self.large.insert((size, self.arrivals, slot));
        }
        self.len += 1;
        self.bytes += size;
    }

    /// The most recently cached buffer of exactly `size` bytes.
    pub fn take_exact(&mut self, size: usize) -> Option<u32> {
        let slot = if size <= SMALL_LIMIT {
            let bin = size / ALIGN;
            let stack = &mut self.small[bin];
            let slot = stack.pop()?;
            if stack.is_empty() {
                self.nonempty[bin / 64] &= !(1 << (bin % 64));
            }
            slot
        } else {
            let newest = self.large.of_length(size).next_back()?;
            self.large.remove(&newest);
            newest.2
        };
        self.len -= 1;
        self.bytes -= size;
        Some(slot)
    }

    /// The most recently cached buffer of the smallest size in `size..=max` (exactly `size`
    /// when one is cached): one lookup where `smallest_at_least` and `take_exact` are two.
    pub fn take_fit(&mut self, size: usize, max: usize) -> Option<(usize, u32)> {
        if self.len == 0 {
            return None;
        }
        if max <= SMALL_LIMIT {
            let found = self.first_small_bin(size / ALIGN, max / ALIGN)? * ALIGN;
            return self.take_exact(found).map(|slot| (found, slot));
        }
        let found = self.smallest_at_least(size).filter(|&f| f <= max)?;
        self.take_exact(found).map(|slot| (found, slot))
    }

    /// The size of the smallest cached buffer of at least `size` bytes.
    pub fn smallest_at_least(&self, size: usize) -> Option<usize> {
        if size <= SMALL_LIMIT
            && let Some(bin) = self.first_small_bin(size / ALIGN, SMALL_BINS - 1)
        {
            return Some(bin * ALIGN);
        }
        if self.large.len() == 0 {
            return None;
        }
        self.large
            .at_least(size.max(SMALL_LIMIT + 1))
            .next()
            .map(|(s, _, _)| s)
    }

    /// The first non-empty small bin in `start..=last`.
    fn first_small_bin(&self, start: usize, last: usize) -> Option<usize> {
        if start > last || start >= WORDS * 64 {
            return None;
        }
        let mut word = start / 64;
        let mut bits = self.nonempty[word] & (!0u64 << (start % 64));
        loop {
            if bits != 0 {
                let bin = word * 64 + bits.trailing_zeros() as usize;
                return (bin <= last).then_some(bin);
            }
            word += 1;
            if word == WORDS || word * 64 > last {
                return None;
            }
            bits = self.nonempty[word];
        }
    }

    /// Removes a given slot filed under `size`; false if it is not there.
    pub fn remove(&mut self, size: usize, slot: u32) -> bool {
        let removed = if size <= SMALL_LIMIT {
            let bin = size / ALIGN;
            let stack = &mut self.small[bin];
            match stack.iter().position(|&s| s == slot) {
                Some(i) => {
                    // Not swap_remove: the newest entry stays on top (newest first).
                    stack.remove(i);
                    if stack.is_empty() {
                        self.nonempty[bin / 64] &= !(1 << (bin % 64));
                    }
                    true
                }
                None => false,
            }
        } else {
            let entry = self.large.of_length(size).find(|e| e.2 == slot);
            entry.is_some_and(|e| self.large.remove(&e))
        };
        if removed {
            self.len -= 1;
            self.bytes -= size;
        }
        removed
    }

    /// All entries as (size, slot), ascending by size. Visits only non-empty bins.
    pub fn entries(&self) -> Vec<(usize, u32)> {
        let mut out = Vec::with_capacity(self.len);
        self.entries_into(&mut out);
        out
    }

    /// Appends every entry to `out`.
    pub fn entries_into(&self, out: &mut Vec<(usize, u32)>) {
        if self.has_small() {
            for (w, &word) in self.nonempty.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bin = w * 64 + bits.trailing_zeros() as usize;
                    out.extend(self.small[bin].iter().map(|&s| (bin * ALIGN, s)));
                    bits &= bits - 1;
                }
            }
        }
        if self.large.len() > 0 {
            out.extend(self.large.at_least(0).map(|(size, _, s)| (size, s)));
        }
    }

    /// True if any small bin holds an entry (emptying a cache of large buffers skips them).
    fn has_small(&self) -> bool {
        self.len > self.large.len()
    }

    /// Removes and returns every entry.
    pub fn drain(&mut self) -> Vec<(usize, u32)> {
        let mut out = Vec::with_capacity(self.len);
        self.drain_into(&mut out);
        out
    }

    /// Removes every entry, appending it to `out` (no allocation when `out` has room).
    pub fn drain_into(&mut self, out: &mut Vec<(usize, u32)>) {
        if self.len == 0 {
            return;
        }
        self.entries_into(out);
        if self.has_small() {
            for w in 0..WORDS {
                let mut bits = self.nonempty[w];
                while bits != 0 {
                    let bin = w * 64 + bits.trailing_zeros() as usize;
                    self.small[bin].clear();
                    bits &= bits - 1;
                }
                self.nonempty[w] = 0;
            }
        }
        self.large.clear();
        self.len = 0;
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_is_the_biggest_cached_buffer_small_or_large() {
        let mut c = BufferCache::default();
        assert_eq!(c.largest(), 0);
        c.push(1024, 1);
        c.push(SMALL_LIMIT, 2);
        c.push(4096, 3);
        assert_eq!(c.largest(), SMALL_LIMIT);
        c.push(8 << 20, 4);
        assert_eq!(c.largest(), 8 << 20);
    }

    #[test]
    fn exact_and_best_fit() {
        let mut c = BufferCache::default();
        c.push(1024, 1);
        c.push(4096, 2);
        c.push(8 << 20, 3);
        assert_eq!(c.smallest_at_least(512), Some(1024));
        assert_eq!(c.smallest_at_least(1536), Some(4096));
        assert_eq!(c.smallest_at_least(8192), Some(8 << 20));
        assert_eq!(c.smallest_at_least(9 << 20), None);
        assert_eq!(c.take_exact(4096), Some(2));
        assert_eq!(c.take_exact(4096), None);
        assert!(c.remove(8 << 20, 3));
        assert!(!c.remove(8 << 20, 3));
        assert_eq!((c.len(), c.bytes()), (1, 1024));
        assert_eq!(c.drain(), vec![(1024, 1)]);
        assert_eq!(c.smallest_at_least(0), None);
    }

    #[test]
    fn take_fit_takes_the_smallest_size_in_range_newest_first() {
        let mut c = BufferCache::default();
        c.push(4096, 1);
        c.push(8192, 2);
        c.push(8192, 3);
        c.push(2 << 20, 4);
        c.push(3 << 20, 5);
        assert_eq!(c.take_fit(1024, 2048), None);
        assert_eq!(c.take_fit(4096, 4096), Some((4096, 1)));
        assert_eq!(c.take_fit(4608, 65536), Some((8192, 3)));
        assert_eq!(c.take_fit(4608, 65536), Some((8192, 2)));
        assert_eq!(c.take_fit(4608, 65536), None);
        // across the small/large boundary
        assert_eq!(c.take_fit(SMALL_LIMIT, 3 << 20), Some((2 << 20, 4)));
        assert_eq!(c.take_fit(2 << 20, (5 << 19) - 1), None);
        assert_eq!(c.take_fit(2 << 20, 3 << 20), Some((3 << 20, 5)));
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn large_buffers_of_one_size_go_newest_first() {
        let mut c = BufferCache::default();
        for slot in [7, 3, 9] {
            c.push(4 << 20, slot);
        }
        c.push(6 << 20, 1);
        assert!(c.remove(4 << 20, 3));
        assert_eq!(c.take_exact(4 << 20), Some(9));
        assert_eq!(c.smallest_at_least(5 << 20), Some(6 << 20));
        let mut out = vec![(0, 0)];
        c.drain_into(&mut out);
        assert_eq!(out, vec![(0, 0), (4 << 20, 7), (6 << 20, 1)]);
        assert_eq!((c.len(), c.bytes()), (0, 0));
        assert_eq!(c.take_exact(4 << 20), None);
    }

    #[test]
    fn small_buffers_of_one_size_go_newest_first_after_a_removal() {
        let mut c = BufferCache::default();
        for slot in [1, 2, 3] {
            c.push(4096, slot);
        }
        assert!(c.remove(4096, 1));
        assert_eq!(c.take_exact(4096), Some(3));
        assert_eq!(c.take_exact(4096), Some(2));
    }

    #[test]
    fn an_empty_size_window_finds_nothing() {
        let mut c = BufferCache::default();
        c.push(4096, 1);
        assert_eq!(c.take_fit(2 << 20, SMALL_LIMIT), None);
        assert_eq!(c.take_fit(8192, 4096), None);
        assert_eq!(c.len(), 1);
    }
}
