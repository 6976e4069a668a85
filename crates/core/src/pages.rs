//! Page table of a page-mapped heap: which pages are mapped and how many buffers touch each.
//!
//! Invariants: `live[p]` is the number of placed buffers (in use, cached or waiting on events)
//! overlapping page `p`; a page with `live > 0` is mapped; `idle` holds exactly the mapped
//! pages with `live == 0`; `mapped_pages` counts the mapped pages. Nothing here talks to a
//! backend: callers map or unmap first and then record it here, so the table never claims a
//! mapping that failed.

/// A run of pages: first page index and number of pages.
pub(crate) type PageRun = (usize, usize);

/// A set of page indices as a bitmap: O(1) insert and remove, iteration by words.
#[derive(Debug)]
struct IdleSet {
    words: Vec<u64>,
    len: usize,
}

impl IdleSet {
    fn new(pages: usize) -> IdleSet {
        IdleSet {
            words: vec![0; pages.div_ceil(64)],
            len: 0,
        }
    }

    fn insert(&mut self, p: usize) {
        let (w, bit) = (p / 64, 1u64 << (p % 64));
        if self.words[w] & bit == 0 {
            self.words[w] |= bit;
            self.len += 1;
        }
    }

    fn remove(&mut self, p: &usize) {
        let (w, bit) = (p / 64, 1u64 << (p % 64));
        if self.words[w] & bit != 0 {
            self.words[w] &= !bit;
            self.len -= 1;
        }
    }

    #[cfg(test)]
    fn contains(&self, p: usize) -> bool {
        self.words[p / 64] & (1 << (p % 64)) != 0
    }

    /// Members in ascending order.
    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    w * 64 + b
                })
            })
        })
    }

    /// Members in descending order.
    fn iter_rev(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().rev().flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = 63 - bits.leading_zeros() as usize;
                    bits &= !(1u64 << b);
                    w * 64 + b
                })
            })
        })
    }
}

#[derive(Debug)]
pub(crate) struct Pages {
    pub granularity: usize,
    live: Vec<u32>,
    mapped: Vec<bool>,
    /// Bitmap of idle pages (mapped, no buffer on them).
    idle: IdleSet,
    /// For idle pages: the allocation clock when they became idle.
    idle_since: Vec<u64>,
    /// Pages chosen to be unmapped once the device is done with them: the ticket of the
    /// retirement (0: none). A buffer placed on a retiring page cancels its retirement, so a
    /// later, older event can never unmap a page that newer work uses.
    retiring: Vec<u64>,
    mapped_pages: usize,
}

impl Pages {
    pub fn new(size: usize, granularity: usize) -> Pages {
        let n = size / granularity;
        Pages {
            granularity,
            live: vec![0; n],
            mapped: vec![false; n],
            idle: IdleSet::new(n),
            idle_since: vec![0; n],
            retiring: vec![0; n],
            mapped_pages: 0,
        }
    }

    fn page_span(&self, offset: usize, len: usize) -> std::ops::Range<usize> {
        offset / self.granularity..(offset + len).div_ceil(self.granularity)
    }

    pub fn mapped_bytes(&self) -> usize {
        self.mapped_pages * self.granularity
    }

    pub fn idle_bytes(&self) -> usize {
        self.idle.len * self.granularity
    }

    /// Runs of unmapped pages under `[offset, offset + len)`, each extended forward over
    /// unmapped pages that no buffer uses until it spans `min_pages` (so growth maps in
    /// chunks), never beyond the heap.
    pub fn unmapped_runs(&self, offset: usize, len: usize, min_pages: usize) -> Vec<PageRun> {
        let span = self.page_span(offset, len);
        let mut runs: Vec<PageRun> = Vec::new();
        let mut p = span.start;
        while p < span.end {
            if self.mapped[p] {
                p += 1;
                continue;
            }
            let first = p;
            while p < span.end && !self.mapped[p] {
                p += 1;
            }
            runs.push((first, p - first));
        }
        if let Some(last) = runs.last_mut() {
            let mut end = last.0 + last.1;
            while end - last.0 < min_pages
                && end < self.mapped.len()
                && !self.mapped[end]
                && self.live[end] == 0
            {
                end += 1;
            }
            last.1 = end - last.0;
        }
        runs
    }

    pub fn mark_mapped(&mut self, (first, n): PageRun, now: u64) {
        for p in first..first + n {
            debug_assert!(!self.mapped[p]);
            self.mapped[p] = true;
            if self.live[p] == 0 {
                self.idle.insert(p);
                self.idle_since[p] = now;
            }
        }
        self.mapped_pages += n;
    }

    /// Records that a run of idle pages was unmapped. Returns how many of them were retiring:
    /// their retirement is void (the pages are gone already, whatever path unmapped them).
    pub fn mark_unmapped(&mut self, (first, n): PageRun) -> usize {
        let mut cancelled = 0;
        for p in first..first + n {
            debug_assert!(self.mapped[p] && self.live[p] == 0);
            self.mapped[p] = false;
            self.idle.remove(&p);
            if self.retiring[p] != 0 {
                self.retiring[p] = 0;
                cancelled += 1;
            }
        }
        self.mapped_pages -= n;
        cancelled
    }

    /// Records a buffer on `[offset, offset + len)`; its pages must be mapped already.
    /// Returns how many retiring pages this cancelled.
    pub fn occupy(&mut self, offset: usize, len: usize) -> usize {
        let mut cancelled = 0;
        for p in self.page_span(offset, len) {
            debug_assert!(self.mapped[p]);
            if self.live[p] == 0 {
                self.idle.remove(&p);
            }
            if self.retiring[p] != 0 {
                self.retiring[p] = 0;
                cancelled += 1;
            }
            self.live[p] += 1;
        }
        cancelled
    }

    /// Records that a buffer left `[offset, offset + len)`.
    pub fn vacate(&mut self, offset: usize, len: usize, now: u64) {
        for p in self.page_span(offset, len) {
            self.live[p] -= 1;
            if self.live[p] == 0 {
                self.idle.insert(p);
                self.idle_since[p] = now;
            }
        }
    }

    /// When the most recently idled page of `run` fell idle.
    pub fn newest_idle_since(&self, run: PageRun) -> u64 {
        self.idle_since[run.0..run.0 + run.1]
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// Idle pages grouped in runs, highest addresses first, covering at most `max_pages`.
    pub fn idle_runs(&self, max_pages: usize) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        for p in self.idle.iter_rev().take(max_pages) {
            match runs.last_mut() {
                Some((first, n)) if *first == p + 1 => {
                    *first = p;
                    *n += 1;
                }
                _ => runs.push((p, 1)),
            }
        }
        runs
    }

    /// Idle pages to give back, at least `want_pages` where there are enough: whole runs of
    /// neighbouring idle pages (one unmap call each), the runs idle the longest first (a run
    /// idle since before the last peak is the one least likely to be needed again). Pages
    /// idle for less than `min_age` ticks of `now`, and pages of `[keep_offset, +keep_len)`,
    /// are never chosen.
    pub fn surplus_runs(
        &self,
        want_pages: usize,
        keep_offset: usize,
        keep_len: usize,
        now: u64,
        min_age: u64,
    ) -> Vec<PageRun> {
        let keep = self.page_span(keep_offset, keep_len);
        // (first page, pages, most recent idle time in the run)
        let mut runs: Vec<(usize, usize, u64)> = Vec::new();
        for p in self.idle.iter() {
            if keep.contains(&p)
                || self.retiring[p] != 0
                || now.saturating_sub(self.idle_since[p]) < min_age
            {
                continue;
            }
            match runs.last_mut() {
                Some((first, n, newest)) if *first + *n == p => {
                    *n += 1;
                    *newest = (*newest).max(self.idle_since[p]);
                }
                _ => runs.push((p, 1, self.idle_since[p])),
            }
        }
        runs.sort_by_key(|&(first, n, newest)| (newest, std::cmp::Reverse(n), first));
        let mut out = Vec::new();
        let mut got = 0;
        for (first, n, _) in runs {
            if got >= want_pages {
                break;
            }
            out.push((first, n));
            got += n;
        }
        out
    }

    /// Marks a run of idle pages as waiting to be unmapped under `ticket` (non-zero).
    pub fn set_retiring(&mut self, (first, n): PageRun, ticket: u64) {
        for p in first..first + n {
            self.retiring[p] = ticket;
        }
    }

    /// The pages of a run still retiring under `ticket` (none was placed on since), as runs,
    /// clearing their marks.
    pub fn take_retired(&mut self, (first, n): PageRun, ticket: u64) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        for p in first..first + n {
            if self.retiring[p] != ticket {
                continue;
            }
            self.retiring[p] = 0;
            debug_assert!(self.mapped[p] && self.live[p] == 0);
            match runs.last_mut() {
                Some((f, k)) if *f + *k == p => *k += 1,
                _ => runs.push((p, 1)),
            }
        }
        runs
    }

    /// True if every page of `[offset, offset + len)` is mapped.
    pub fn is_mapped(&self, offset: usize, len: usize) -> bool {
        self.page_span(offset, len).all(|p| self.mapped[p])
    }

    /// Number of unmapped pages under `[offset, offset + len)`.
    pub fn unmapped_pages(&self, offset: usize, len: usize) -> usize {
        self.page_span(offset, len)
            .filter(|&p| !self.mapped[p])
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_idle_pages() {
        let g = 4096;
        let mut pages = Pages::new(16 * g, g);
        let runs = pages.unmapped_runs(g / 2, 2 * g, 4);
        assert_eq!(runs, vec![(0, 4)]);
        pages.mark_mapped(runs[0], 0);
        assert_eq!(pages.occupy(g / 2, 2 * g), 0, "no page was retiring");
        assert_eq!(pages.mapped_bytes(), 4 * g);
        assert_eq!(pages.idle_bytes(), g);
        assert!(pages.is_mapped(0, 3 * g));
        pages.vacate(g / 2, 2 * g, 1);
        assert_eq!(pages.idle_bytes(), 4 * g);
        assert_eq!(pages.idle_runs(usize::MAX), vec![(0, 4)]);
        assert_eq!(pages.idle_runs(1), vec![(3, 1)]);
        pages.mark_unmapped((0, 4));
        assert_eq!(pages.mapped_bytes(), 0);
    }

    #[test]
    fn a_buffer_placed_on_a_retiring_page_cancels_its_retirement() {
        let g = 4096;
        let mut pages = Pages::new(8 * g, g);
        pages.mark_mapped((0, 4), 0);
        pages.set_retiring((0, 4), 7);
        // A buffer lands on page 1 while the unmap waits for its event, then leaves again:
        // the old event says nothing about the work that used it meanwhile.
        assert_eq!(pages.occupy(g, g), 1);
        pages.vacate(g, g, 1);
        assert_eq!(pages.take_retired((0, 4), 7), vec![(0, 1), (2, 2)]);
        // A page retired again under a newer ticket is not taken by the older one.
        pages.set_retiring((1, 1), 8);
        assert_eq!(pages.take_retired((0, 4), 7), vec![]);
        assert_eq!(pages.take_retired((1, 1), 8), vec![(1, 1)]);
    }

    #[test]
    fn idle_set_iterates_both_ways() {
        let mut set = IdleSet::new(200);
        for p in [0, 63, 64, 130, 199] {
            set.insert(p);
        }
        set.insert(64);
        set.remove(&63);
        assert_eq!(set.len, 4);
        assert!(set.contains(130) && !set.contains(63));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 64, 130, 199]);
        assert_eq!(set.iter_rev().collect::<Vec<_>>(), vec![199, 130, 64, 0]);
    }
}
