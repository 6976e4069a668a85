//! Cached buffers of one pool: freed buffers kept whole for reuse, indexed by size.
//!
//! Invariants: every entry is the slot of a buffer record in the `Cached` state whose rounded
//! size is the key it is filed under; a slot appears at most once; `len`/`bytes` equal the
//! number and total size of the entries. Sizes are multiples of [`crate::pool::ALIGN`].
//! Small sizes (up to [`SMALL_LIMIT`]) live in an array of bins with a bitmap of non-empty
//! bins, so exact and best-fit lookups are O(1)/O(bins/64); larger sizes live in a B-tree.

use std::collections::BTreeMap;

use crate::pool::ALIGN;

/// Largest size kept in the array of bins.
pub(crate) const SMALL_LIMIT: usize = 1 << 20;
const SMALL_BINS: usize = SMALL_LIMIT / ALIGN + 1;
const WORDS: usize = SMALL_BINS.div_ceil(64);

#[derive(Debug)]
pub(crate) struct BufferCache {
    small: Vec<Vec<u32>>,
    nonempty: [u64; WORDS],
    large: BTreeMap<usize, Vec<u32>>,
    len: usize,
    bytes: usize,
}

impl Default for BufferCache {
    fn default() -> Self {
        BufferCache {
            small: vec![Vec::new(); SMALL_BINS],
            nonempty: [0; WORDS],
            large: BTreeMap::new(),
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

    pub fn push(&mut self, size: usize, slot: u32) {
        if size <= SMALL_LIMIT {
            let bin = size / ALIGN;
            self.small[bin].push(slot);
            self.nonempty[bin / 64] |= 1 << (bin % 64);
        } else {
            self.large.entry(size).or_default().push(slot);
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
            let stack = self.large.get_mut(&size)?;
            let slot = stack.pop()?;
            if stack.is_empty() {
                self.large.remove(&size);
            }
            slot
        };
        self.len -= 1;
        self.bytes -= size;
        Some(slot)
    }

    /// The size of the smallest cached buffer of at least `size` bytes.
    pub fn smallest_at_least(&self, size: usize) -> Option<usize> {
        if size <= SMALL_LIMIT {
            let start = size / ALIGN;
            let mut word = start / 64;
            let mut bits = self.nonempty[word] & (!0u64 << (start % 64));
            loop {
                if bits != 0 {
                    return Some((word * 64 + bits.trailing_zeros() as usize) * ALIGN);
                }
                word += 1;
                if word == WORDS {
                    break;
                }
                bits = self.nonempty[word];
            }
        }
        self.large
            .range(size.max(SMALL_LIMIT + 1)..)
            .next()
            .map(|(&s, _)| s)
    }

    /// Removes a given slot filed under `size`; false if it is not there.
    pub fn remove(&mut self, size: usize, slot: u32) -> bool {
        let removed = if size <= SMALL_LIMIT {
            let bin = size / ALIGN;
            let stack = &mut self.small[bin];
            match stack.iter().position(|&s| s == slot) {
                Some(i) => {
                    stack.swap_remove(i);
                    if stack.is_empty() {
                        self.nonempty[bin / 64] &= !(1 << (bin % 64));
                    }
                    true
                }
                None => false,
            }
        } else {
            match self.large.get_mut(&size) {
                Some(stack) => match stack.iter().position(|&s| s == slot) {
                    Some(i) => {
                        stack.swap_remove(i);
                        if stack.is_empty() {
                            self.large.remove(&size);
                        }
                        true
                    }
                    None => false,
                },
                None => false,
            }
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
        if self.len == 0 {
            return out;
        }
        for (w, &word) in self.nonempty.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let bin = w * 64 + bits.trailing_zeros() as usize;
                out.extend(self.small[bin].iter().map(|&s| (bin * ALIGN, s)));
                bits &= bits - 1;
            }
        }
        for (&size, stack) in &self.large {
            out.extend(stack.iter().map(|&s| (size, s)));
        }
        out
    }

    /// Removes and returns every entry.
    pub fn drain(&mut self) -> Vec<(usize, u32)> {
        let out = self.entries();
        if self.len > 0 {
            for w in 0..WORDS {
                let mut bits = self.nonempty[w];
                while bits != 0 {
                    let bin = w * 64 + bits.trailing_zeros() as usize;
                    self.small[bin].clear();
                    bits &= bits - 1;
                }
                self.nonempty[w] = 0;
            }
            self.large.clear();
        }
        self.len = 0;
        self.bytes = 0;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
