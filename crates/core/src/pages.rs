//! Page table of a page-mapped heap: which pages are mapped and how many buffers touch each.
//!
//! Invariants: `live[p]` is the number of placed buffers (in use, cached or waiting on events)
//! overlapping page `p`; a page with `live > 0` is mapped; `idle` holds exactly the mapped
//! pages with `live == 0`; `mapped_pages` counts the mapped pages; `retiring_pages` counts
//! the pages with a retirement mark. Nothing here talks to a backend: callers map or unmap
//! first and then record it here, so the table never claims a mapping that failed.
//!
//! Extents: every run mapped with one call, cut at multiples of `block` pages, is a set of
//! *extents* (`extent[first]` = its pages, 0 on its other pages and on unmapped ones): the
//! pieces a backend may back with one physical allocation each (on CUDA, one `cuMemCreate`
//! per 16 MiB instead of one per 2 MiB page: about ten times less driver time). Only whole
//! extents are ever unmapped: a run given to unmap covers whole extents, and every run this
//! table proposes for unmapping is made of whole, fully idle extents.

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

    /// Sets (`on`) or clears every member of `range` by words: a large buffer spans dozens
    /// of pages, and this runs for each one placed and freed.
    fn set_range(&mut self, range: std::ops::Range<usize>, on: bool) {
        let mut p = range.start;
        while p < range.end {
            let (w, bit) = (p / 64, p % 64);
            let n = (range.end - p).min(64 - bit);
            let mask = (u64::MAX >> (64 - n)) << bit;
            let before = self.words[w];
            let after = if on { before | mask } else { before & !mask };
            self.len = self.len + after.count_ones() as usize - before.count_ones() as usize;
            self.words[w] = after;
            p += n;
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
}

#[derive(Debug)]
pub(crate) struct Pages {
    pub granularity: usize,
    /// log2 of `granularity` (a power of two: the allocator checks the backend's).
    shift: u32,
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
    /// On the first page of each extent, its length in pages; 0 elsewhere.
    extent: Vec<u32>,
    /// Extents never cross a multiple of this many pages.
    block: usize,
    mapped_pages: usize,
    /// Pages with a retirement mark (`retiring[p] != 0`): while none has, placing a buffer
    /// skips looking for marks to cancel.
    retiring_pages: usize,
}

impl Pages {
    /// The table of a heap of `size` bytes in pages of `granularity` bytes, whose map calls
    /// are cut into extents at multiples of `block` bytes (`usize::MAX`: never cut).
    pub fn new(size: usize, granularity: usize, block: usize) -> Pages {
        debug_assert!(granularity.is_power_of_two());
        let n = size / granularity;
        Pages {
            granularity,
            shift: granularity.trailing_zeros(),
            live: vec![0; n],
            mapped: vec![false; n],
            idle: IdleSet::new(n),
            idle_since: vec![0; n],
            retiring: vec![0; n],
            extent: vec![0; n],
            block: (block / granularity).max(1),
            mapped_pages: 0,
            retiring_pages: 0,
        }
    }

    fn page_span(&self, offset: usize, len: usize) -> std::ops::Range<usize> {
        // Shifts, not divisions: this runs twice for every large buffer placed and freed.
        offset >> self.shift..(offset + len + self.granularity - 1) >> self.shift
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

    /// Records a run mapped with one call: its extents, cut at multiples of `block` pages.
    /// Returns how many extents it made.
    pub fn mark_mapped(&mut self, (first, n): PageRun, now: u64) -> usize {
        let mut extents = 0;
        for (start, end) in crate::backend::physical_pieces(first, first + n, self.block) {
            self.extent[start] = (end - start) as u32;
            extents += 1;
        }
        for p in first..first + n {
            debug_assert!(!self.mapped[p]);
            self.mapped[p] = true;
            if self.live[p] == 0 {
                self.idle.insert(p);
                self.idle_since[p] = now;
            }
        }
        self.mapped_pages += n;
        extents
    }

    /// Records that a run of idle pages was unmapped. Returns how many of them were retiring:
    /// their retirement is void (the pages are gone already, whatever path unmapped them).
    pub fn mark_unmapped(&mut self, (first, n): PageRun) -> usize {
        debug_assert!(self.whole_extents((first, n)), "unmap of part of an extent");
        let cancelled = self.cancel_retiring(first * self.granularity, n * self.granularity);
        for p in first..first + n {
            debug_assert!(self.mapped[p] && self.live[p] == 0);
            self.extent[p] = 0;
            self.mapped[p] = false;
            self.idle.remove(&p);
        }
        self.mapped_pages -= n;
        cancelled
    }

    /// Records a buffer on `[offset, offset + len)`; its pages must be mapped already.
    /// Returns how many retiring pages this cancelled.
    pub fn occupy(&mut self, offset: usize, len: usize) -> usize {
        let span = self.page_span(offset, len);
        debug_assert!(self.mapped[span.clone()].iter().all(|&m| m));
        let cancelled = self.cancel_retiring(offset, len);
        for live in &mut self.live[span.clone()] {
            *live += 1;
        }
        if span.len() <= 2 {
            // Buffers up to a page or so (most of them): bit by bit is cheaper.
            for p in span {
                self.idle.remove(&p);
            }
        } else {
            self.idle.set_range(span, false);
        }
        cancelled
    }

    /// Cancels the retirement of the pages under `[offset, offset + len)` (a buffer is about
    /// to go there): their extents are then not unmapped when the retirement is taken.
    /// Returns how many pages were retiring.
    pub fn cancel_retiring(&mut self, offset: usize, len: usize) -> usize {
        if self.retiring_pages == 0 {
            return 0;
        }
        let span = self.page_span(offset, len);
        let mut cancelled = 0;
        for mark in &mut self.retiring[span] {
            if *mark != 0 {
                *mark = 0;
                cancelled += 1;
            }
        }
        self.retiring_pages -= cancelled;
        cancelled
    }

    /// Records that a buffer left `[offset, offset + len)`.
    pub fn vacate(&mut self, offset: usize, len: usize, now: u64) {
        let span = self.page_span(offset, len);
        let (first, last) = (span.start, span.end - 1);
        if last > first + 1 {
            // Pages strictly inside the span lie wholly under this buffer, and buffers do
            // not overlap: no other buffer is on them, so they all fall idle now.
            let inner = first + 1..last;
            debug_assert!(self.live[inner.clone()].iter().all(|&l| l == 1));
            self.live[inner.clone()].fill(0);
            self.idle_since[inner.clone()].fill(now);
            self.idle.set_range(inner, true);
        }
        for p in [first, last] {
            self.live[p] -= 1;
            if self.live[p] == 0 {
                self.idle.insert(p);
                self.idle_since[p] = now;
            }
            if last == first {
                break;
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

    /// True if `[first, first + n)` is a sequence of whole extents.
    fn whole_extents(&self, (first, n): PageRun) -> bool {
        let mut p = first;
        while p < first + n {
            let len = self.extent[p] as usize;
            if len == 0 {
                return false;
            }
            p += len;
        }
        p == first + n
    }

    /// The extents whose pages are all idle and pass `ok`, lowest addresses first, as
    /// `(first page, pages, most recent idle time)`.
    fn idle_extents(&self, ok: impl Fn(usize) -> bool) -> Vec<(usize, usize, u64)> {
        let mut out = Vec::new();
        for p in self.idle.iter() {
            let len = self.extent[p] as usize;
            if len == 0 {
                continue; // not the first page of its extent
            }
            let pages = p..p + len;
            if pages.clone().all(|q| self.live[q] == 0 && ok(q)) {
                let newest = pages.map(|q| self.idle_since[q]).max().unwrap_or(0);
                out.push((p, len, newest));
            }
        }
        out
    }

    /// Whole idle extents grouped in runs of adjacent ones, highest addresses first, covering
    /// at least `max_pages` where there are enough (the last extent taken may go beyond).
    pub fn idle_runs(&self, max_pages: usize) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut got = 0;
        for (p, len, _) in self.idle_extents(|_| true).into_iter().rev() {
            if got >= max_pages {
                break;
            }
            got += len;
            match runs.last_mut() {
                Some((first, n)) if *first == p + len => {
                    *first = p;
                    *n += len;
                }
                _ => runs.push((p, len)),
            }
        }
        runs
    }

    /// Idle pages to give back, at least `want_pages` where there are enough: runs of
    /// neighbouring idle pages (one unmap call each), the runs idle the longest first (a run
    /// idle since before the last peak is the one least likely to be needed again). The last
    /// run needed goes only in part, its highest whole extents: unmapping a whole gigabyte
    /// run to cover a few pages would make the pool map it again soon after and move its
    /// layout. Pages idle for less than `min_age` ticks of `now`, and pages of
    /// `[keep_offset, +keep_len)`, are never chosen.
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
        let extents = self.idle_extents(|p| {
            !keep.contains(&p)
                && self.retiring[p] == 0
                && now.saturating_sub(self.idle_since[p]) >= min_age
        });
        for &(p, len, idle_since) in &extents {
            match runs.last_mut() {
                Some((first, n, newest)) if *first + *n == p => {
                    *n += len;
                    *newest = (*newest).max(idle_since);
                }
                _ => runs.push((p, len, idle_since)),
            }
        }
        runs.sort_by_key(|&(first, n, newest)| (newest, std::cmp::Reverse(n), first));
        let mut out = Vec::new();
        let mut got = 0;
        for (first, n, _) in runs {
            if got >= want_pages {
                break;
            }
            if got + n <= want_pages {
                out.push((first, n));
                got += n;
                continue;
            }
            // The last run needed: only its highest extents, as many as make up the rest.
            // Buffers land at the start of free ranges, so the low end is the part that
            // is used again first.
            let mut start = first + n;
            for &(p, _, _) in extents.iter().rev() {
                if p >= first + n {
                    continue;
                }
                if p < first || got + (first + n - start) >= want_pages {
                    break;
                }
                start = p;
            }
            out.push((start, first + n - start));
            got += first + n - start;
        }
        out
    }

    /// Marks a run of idle pages as waiting to be unmapped under `ticket` (non-zero).
    pub fn set_retiring(&mut self, (first, n): PageRun, ticket: u64) {
        for p in first..first + n {
            if self.retiring[p] == 0 {
                self.retiring_pages += 1;
            }
            self.retiring[p] = ticket;
        }
    }

    /// The extents of a retired run (whole extents) still retiring under `ticket` on every
    /// page (none was placed on since), as runs, and the number of pages whose retirement
    /// ends without an unmap (their extent got a buffer meanwhile, so it stays mapped).
    /// Clears the marks of both.
    pub fn take_retired(&mut self, (first, n): PageRun, ticket: u64) -> (Vec<PageRun>, usize) {
        let mut runs: Vec<PageRun> = Vec::new();
        let mut voided = 0;
        let mut p = first;
        while p < first + n {
            let len = (self.extent[p] as usize).max(1);
            let pages = p..p + len;
            let marked = pages
                .clone()
                .filter(|&q| self.retiring[q] == ticket)
                .count();
            for q in pages {
                if self.retiring[q] == ticket {
                    self.retiring[q] = 0;
                }
            }
            self.retiring_pages -= marked;
            if self.extent[p] != 0 && marked == len {
                debug_assert!((p..p + len).all(|q| self.mapped[q] && self.live[q] == 0));
                match runs.last_mut() {
                    Some((f, k)) if *f + *k == p => *k += len,
                    _ => runs.push((p, len)),
                }
            } else {
                voided += marked;
            }
            p += len;
        }
        (runs, voided)
    }

    /// Every run of contiguous mapped pages, as `(offset, len)` in bytes, in address order:
    /// the segments a snapshot shows (PyTorch reports one per mapped range too).
    pub fn mapped_byte_runs(&self) -> Vec<(usize, usize)> {
        let mut runs = Vec::new();
        let mut p = 0;
        while p < self.mapped.len() {
            if !self.mapped[p] {
                p += 1;
                continue;
            }
            let first = p;
            while p < self.mapped.len() && self.mapped[p] {
                p += 1;
            }
            runs.push((first << self.shift, (p - first) << self.shift));
        }
        runs
    }

    /// True if every page of `[offset, offset + len)` is mapped.
    pub fn is_mapped(&self, offset: usize, len: usize) -> bool {
        self.mapped[self.page_span(offset, len)].iter().all(|&m| m)
    }

    /// The lowest offset in `[start, end)` where `len` bytes lie on mapped pages only, if any
    /// (`start` and `len` are multiples of the buffer alignment, and so is the answer).
    pub fn mapped_window(&self, start: usize, end: usize, len: usize) -> Option<usize> {
        let g = self.granularity;
        let mut run_start: Option<usize> = None;
        for p in self.page_span(start, end - start) {
            if !self.mapped[p] {
                run_start = None;
                continue;
            }
            let from = *run_start.get_or_insert(start.max(p * g));
            if end.min((p + 1) * g) - from >= len {
                return Some(from);
            }
        }
        None
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
        let mut pages = Pages::new(16 * g, g, usize::MAX);
        let runs = pages.unmapped_runs(g / 2, 2 * g, 4);
        assert_eq!(runs, vec![(0, 4)]);
        pages.mark_mapped(runs[0], 0);
        assert_eq!(pages.occupy(g / 2, 2 * g), 0, "no page was retiring");
        assert_eq!(pages.mapped_bytes(), 4 * g);
        assert_eq!(pages.idle_bytes(), g);
        assert!(pages.is_mapped(0, 3 * g));
        assert_eq!(
            pages.idle_runs(usize::MAX),
            vec![],
            "an extent in use in part stays"
        );
        pages.vacate(g / 2, 2 * g, 1);
        assert_eq!(pages.idle_bytes(), 4 * g);
        assert_eq!(pages.idle_runs(usize::MAX), vec![(0, 4)]);
        assert_eq!(pages.idle_runs(1), vec![(0, 4)], "extents go whole");
        pages.mark_unmapped((0, 4));
        assert_eq!(pages.mapped_bytes(), 0);
    }

    #[test]
    fn only_whole_idle_extents_are_proposed_for_unmapping() {
        let g = 4096;
        let mut pages = Pages::new(16 * g, g, usize::MAX);
        for run in [(0, 2), (2, 3), (5, 1), (8, 4)] {
            pages.mark_mapped(run, 0);
        }
        // A buffer on page 3 pins the extent (2, 3); the others are idle.
        pages.occupy(3 * g, 100);
        // Adjacent idle extents merge into one run (one unmap call).
        assert_eq!(pages.idle_runs(usize::MAX), vec![(8, 4), (5, 1), (0, 2)]);
        assert_eq!(pages.idle_runs(2), vec![(8, 4)]);
        assert_eq!(
            pages.surplus_runs(usize::MAX, 0, 0, 10, 0),
            vec![(8, 4), (0, 2), (5, 1)],
            "among runs idle as long, the longest first"
        );
        // Keeping one page of an extent keeps all of it.
        assert_eq!(
            pages.surplus_runs(usize::MAX, 9 * g, 1, 10, 0),
            vec![(0, 2), (5, 1)]
        );
        pages.vacate(3 * g, 100, 5);
        assert_eq!(
            pages.surplus_runs(usize::MAX, 0, 0, 10, 0),
            vec![(8, 4), (0, 6)],
            "runs idle the longest come first"
        );
    }

    #[test]
    fn a_run_larger_than_needed_gives_back_only_its_highest_whole_extents() {
        let g = 4096;
        let mut pages = Pages::new(32 * g, g, 4 * g);
        // One idle run of 16 pages in extents of 4: (0, 4), (4, 4), (8, 4), (12, 4).
        pages.mark_mapped((0, 16), 0);
        assert_eq!(pages.surplus_runs(1, 0, 0, 10, 0), vec![(12, 4)]);
        assert_eq!(pages.surplus_runs(5, 0, 0, 10, 0), vec![(8, 8)]);
        assert_eq!(pages.surplus_runs(16, 0, 0, 10, 0), vec![(0, 16)]);
        // With a second, older run taken whole first, the rest comes from the top of this one.
        pages.mark_mapped((20, 4), 0);
        pages.occupy(0, g);
        pages.vacate(0, g, 3);
        assert_eq!(pages.surplus_runs(6, 0, 0, 10, 0), vec![(20, 4), (12, 4)]);
    }

    #[test]
    fn map_calls_are_cut_into_extents_at_block_boundaries() {
        let g = 4096;
        let mut pages = Pages::new(16 * g, g, 4 * g);
        pages.mark_mapped((2, 8), 0);
        // Extents (2, 2), (4, 4), (8, 2); a buffer on page 5 pins the middle one only.
        pages.occupy(5 * g, g);
        assert_eq!(pages.idle_runs(usize::MAX), vec![(8, 2), (2, 2)]);
        pages.vacate(5 * g, g, 1);
        assert_eq!(pages.idle_runs(usize::MAX), vec![(2, 8)]);
        assert_eq!(pages.idle_runs(1), vec![(8, 2)]);
    }

    #[test]
    fn a_buffer_placed_on_a_retiring_page_cancels_its_extents_retirement() {
        let g = 4096;
        let mut pages = Pages::new(8 * g, g, usize::MAX);
        pages.mark_mapped((0, 4), 0);
        pages.mark_mapped((4, 2), 0);
        pages.set_retiring((0, 6), 7);
        // A buffer lands on page 1 while the unmap waits for its event, then leaves again:
        // the old event says nothing about the work that used it meanwhile, and the page's
        // extent can only go whole.
        assert_eq!(pages.occupy(g, g), 1);
        pages.vacate(g, g, 1);
        assert_eq!(pages.take_retired((0, 6), 7), (vec![(4, 2)], 3));
        // An extent retired again under a newer ticket is not taken by the older one.
        pages.set_retiring((0, 4), 8);
        assert_eq!(pages.take_retired((0, 4), 7), (vec![], 0));
        assert_eq!(pages.take_retired((0, 4), 8), (vec![(0, 4)], 0));
    }

    /// Ops of a random program over a page table: place a buffer at (offset, len) in
    /// units of a quarter page, free the i-th placed buffer, mark the idle extents retiring
    /// under a new ticket, unmap what the oldest retirement still holds.
    #[derive(Debug, Clone)]
    enum Op {
        Place(usize, usize),
        Free(usize),
        Retire,
        Unmap,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (0usize..4 * 300, 1usize..4 * 70).prop_map(|(o, l)| Op::Place(o, l)),
            2 => (0usize..64).prop_map(Op::Free),
            1 => Just(Op::Retire),
            1 => Just(Op::Unmap),
        ]
    }

    proptest::proptest! {
        /// Against a per-page model: the idle set is exactly the mapped pages without a
        /// buffer, each idle page knows when it fell idle, and the retirement marks are
        /// counted (the range updates of placing and freeing span several bitmap words).
        #[test]
        fn page_table_agrees_with_a_per_page_model(ops in proptest::collection::vec(op(), 1..120)) {
            let (g, n) = (4096usize, 300usize);
            let q = g / 4;
            let mut pages = Pages::new(n * g, g, 8 * g);
            let mut placed: Vec<(usize, usize)> = Vec::new();
            let mut live = vec![0u32; n];
            let mut since = vec![0u64; n];
            let mut retirements: std::collections::VecDeque<(PageRun, u64)> = Default::default();
            for (now, op) in ops.into_iter().enumerate() {
                let now = now as u64 + 1;
                match op {
                    Op::Place(o, l) => {
                        let (off, len) = (o * q, l.min(4 * n - o) * q);
                        if len == 0 || placed.iter().any(|&(b, bl)| off < b + bl && b < off + len) {
                            continue;
                        }
                        for run in pages.unmapped_runs(off, len, 1) {
                            pages.mark_mapped(run, now);
                            since[run.0..run.0 + run.1].fill(now);
                        }
                        pages.occupy(off, len);
                        for p in pages.page_span(off, len) {
                            live[p] += 1;
                        }
                        placed.push((off, len));
                    }
                    Op::Free(i) if !placed.is_empty() => {
                        let (off, len) = placed.swap_remove(i % placed.len());
                        pages.vacate(off, len, now);
                        for p in pages.page_span(off, len) {
                            live[p] -= 1;
                            if live[p] == 0 {
                                since[p] = now;
                            }
                        }
                    }
                    Op::Free(_) => {}
                    Op::Retire => {
                        for run in pages.idle_runs(usize::MAX) {
                            pages.set_retiring(run, now);
                            retirements.push_back((run, now));
                        }
                    }
                    Op::Unmap => {
                        if let Some((run, ticket)) = retirements.pop_front() {
                            let (whole, _) = pages.take_retired(run, ticket);
                            for r in whole {
                                pages.mark_unmapped(r);
                            }
                        }
                    }
                }
                let idle: Vec<usize> =
                    (0..n).filter(|&p| pages.mapped[p] && live[p] == 0).collect();
                proptest::prop_assert_eq!(pages.idle.iter().collect::<Vec<_>>(), idle.clone());
                proptest::prop_assert_eq!(pages.idle.len, idle.len());
                proptest::prop_assert_eq!(&pages.live, &live);
                for p in idle {
                    proptest::prop_assert_eq!(pages.idle_since[p], since[p], "page {}", p);
                }
                proptest::prop_assert_eq!(
                    pages.retiring_pages,
                    pages.retiring.iter().filter(|&&t| t != 0).count()
                );
            }
        }
    }

    #[test]
    fn a_mapped_window_is_found_inside_a_range() {
        let g = 4096;
        let mut pages = Pages::new(16 * g, g, usize::MAX);
        pages.mark_mapped((2, 2), 0);
        pages.mark_mapped((5, 3), 0);
        // Range [g/2, 10g): mapped runs [2g, 4g) and [5g, 8g).
        assert_eq!(pages.mapped_window(g / 2, 10 * g, 2 * g), Some(2 * g));
        assert_eq!(pages.mapped_window(g / 2, 10 * g, 3 * g), Some(5 * g));
        assert_eq!(pages.mapped_window(g / 2, 10 * g, 3 * g + 1), None);
        assert_eq!(
            pages.mapped_window(5 * g + 512, 7 * g, g),
            Some(5 * g + 512)
        );
        assert_eq!(pages.mapped_window(5 * g + 512, 7 * g, 2 * g), None);
    }

    #[test]
    fn idle_set_iterates_in_order() {
        let mut set = IdleSet::new(200);
        for p in [0, 63, 64, 130, 199] {
            set.insert(p);
        }
        set.insert(64);
        set.remove(&63);
        assert_eq!(set.len, 4);
        assert!(set.contains(130) && !set.contains(63));
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 64, 130, 199]);
    }
}
