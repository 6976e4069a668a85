//! Expensive reports: per-pool and per-heap figures, PyTorch-shaped segment snapshots, and
//! the leak report at drop.
//!
//! Invariants: reports are built under the lock from the same state the counters describe,
//! so their totals agree with [`crate::Usage`]; nothing here changes the state except
//! [`release_everything`], which runs only when the engine is dropped.

use std::fmt;

use crate::backend::{Backend, StreamId};
use crate::format::format_size;
use crate::pool::PoolKind;
use crate::stats::Usage;

use super::state::{BufState, State};
use super::{Allocator, Engine};

/// One heap.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeapReport {
    pub id: u64,
    pub base: u64,
    pub size: usize,
    pub reserved: usize,
    pub buffers: u32,
    pub largest_free: usize,
    pub split: bool,
    pub page_mapped: bool,
}

/// One pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolReport {
    pub kind: PoolKind,
    pub stream: StreamId,
    pub reserved: usize,
    pub placed: usize,
    pub cached_buffers: usize,
    pub cached_bytes: usize,
    pub idle_mapped_bytes: usize,
    /// What the idle-page budget is scaled by now (1: as configured; more while the pool
    /// was unmapping pages it mapped again soon after).
    pub idle_budget_scale: u32,
    pub free_ranges: usize,
    pub largest_free: usize,
    pub heaps: Vec<HeapReport>,
}

/// The expensive report: every pool and heap.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub policy: crate::Policy,
    pub usage: Usage,
    pub pending_buffers: usize,
    pub low_watermark_limit: usize,
    pub high_watermark_limit: usize,
    pub pools: Vec<PoolReport>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = &self.usage;
        let limit = |l: usize| {
            if l == usize::MAX {
                "unlimited".to_string()
            } else {
                format_size(l)
            }
        };
        writeln!(f, "bufferheap ({} policy)", self.policy)?;
        writeln!(
            f,
            "  in use: {} in {} buffers (requested {}); cached: {}; reserved: {} in {} heaps",
            format_size(u.allocated),
            u.buffers,
            format_size(u.requested),
            format_size(u.cached),
            format_size(u.reserved),
            u.heaps
        )?;
        if u.reserved > 0 {
            writeln!(
                f,
                "  efficiency (in use / reserved): {:.1}%",
                100.0 * u.allocated as f64 / u.reserved as f64
            )?;
        }
        writeln!(
            f,
            "  watermarks: low {}, high {}; buffers waiting on events: {}",
            limit(self.low_watermark_limit),
            limit(self.high_watermark_limit),
            self.pending_buffers
        )?;
        for p in self.pools.iter().filter(|p| !p.heaps.is_empty()) {
            writeln!(
                f,
                "  {} pool (stream {:#x}): reserved {}, placed {}, cached {} in {} buffers, idle pages {} (budget x{}), {} free ranges (largest {})",
                p.kind.name(),
                p.stream,
                format_size(p.reserved),
                format_size(p.placed),
                format_size(p.cached_bytes),
                p.cached_buffers,
                format_size(p.idle_mapped_bytes),
                p.idle_budget_scale,
                p.free_ranges,
                format_size(p.largest_free)
            )?;
            for h in &p.heaps {
                writeln!(
                    f,
                    "    heap {} at {:#x}: size {}, reserved {}, {} buffers, largest free {}{}",
                    h.id,
                    h.base,
                    format_size(h.size),
                    format_size(h.reserved),
                    h.buffers,
                    format_size(h.largest_free),
                    if h.page_mapped {
                        ", page-mapped"
                    } else if h.split {
                        ""
                    } else {
                        ", dedicated"
                    }
                )?;
            }
        }
        Ok(())
    }
}

/// State of a block in a segment snapshot (PyTorch's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockState {
    ActiveAllocated,
    ActivePendingFree,
    Inactive,
}

/// A block of a segment snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlockInfo {
    pub address: u64,
    pub size: usize,
    pub requested_size: usize,
    pub state: BlockState,
}

/// A heap, or a run of mapped pages of a page-mapped heap, as a PyTorch snapshot segment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentInfo {
    pub address: u64,
    pub total_size: usize,
    pub allocated_size: usize,
    pub active_size: usize,
    pub requested_size: usize,
    pub stream: StreamId,
    pub segment_type: &'static str,
    pub is_expandable: bool,
    pub blocks: Vec<BlockInfo>,
}

impl<B: Backend> Allocator<B> {
    /// Every pool and heap, with fragmentation figures. Takes the lock for a while.
    pub fn report(&self) -> Report {
        let mut st = self.engine.lock();
        // Per-heap figures need every buffer where the engine sees it.
        st.return_fronts(true, false);
        let pools = st
            .pools
            .iter()
            .map(|p| PoolReport {
                kind: p.kind,
                stream: p.stream,
                reserved: p.reserved,
                placed: p.placed,
                cached_buffers: p.cache.len(),
                cached_bytes: p.cache.bytes(),
                idle_mapped_bytes: p.idle_mapped_bytes(),
                idle_budget_scale: p.churn.scale,
                free_ranges: p.free_ranges(),
                largest_free: p.largest_free(),
                heaps: p
                    .heaps
                    .iter()
                    .flatten()
                    .map(|h| HeapReport {
                        id: h.id,
                        base: h.region.base,
                        size: h.region.size,
                        reserved: h.reserved_bytes(),
                        buffers: h.n_buffers,
                        largest_free: h.largest_free(),
                        split: h.split,
                        page_mapped: h.pages.is_some(),
                    })
                    .collect(),
            })
            .collect();
        // Under the same hold of the lock, so that the totals agree with the pools' figures
        // (the fronts were folded when they were emptied above).
        Report {
            policy: st.policy,
            usage: Usage {
                allocated: st.stats.allocated_bytes[0].current as usize,
                requested: st.stats.requested_bytes[0].current as usize,
                reserved: st.stats.reserved_bytes[0].current as usize,
                active: st.stats.active_bytes[0].current as usize,
                cached: st.stats.cached_bytes[0].current as usize,
                buffers: st.stats.allocation[0].current as usize,
                heaps: st.stats.segment[0].current as usize,
            },
            pending_buffers: st.pending.len(),
            low_watermark_limit: st.limits.low_limit,
            high_watermark_limit: st.limits.high_limit,
            pools,
        }
    }

    /// Heaps as PyTorch snapshot segments, with their blocks (buffers and free ranges) in
    /// address order. A page-mapped heap is reported up to its last mapped page.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        segments_of(&mut self.engine.lock())
    }

    /// [`Allocator::segments`] and [`Allocator::history`] read under one hold of the lock, so
    /// that they agree while other threads allocate: every address's last history entry
    /// matches its block's state (a snapshot's segments and traces).
    pub fn segments_and_history(&self) -> (Vec<SegmentInfo>, Vec<crate::TraceEntry>) {
        let mut st = self.engine.lock();
        let segments = segments_of(&mut st);
        let history = st.history_entries();
        (segments, history)
    }
}

/// The heaps of `st` as snapshot segments (see [`Allocator::segments`]).
fn segments_of<B: Backend>(st: &mut State<B>) -> Vec<SegmentInfo> {
    st.return_fronts(true, false);
    let mut by_heap: std::collections::HashMap<(u32, u32), Vec<BlockInfo>> = Default::default();
    for rec in st.records.iter().filter(|r| r.state != BufState::Vacant) {
        let state = match rec.state {
            BufState::InUse => BlockState::ActiveAllocated,
            BufState::Pending => BlockState::ActivePendingFree,
            _ => BlockState::Inactive,
        };
        let requested_size = if rec.state == BufState::InUse {
            rec.requested
        } else {
            0
        };
        by_heap
            .entry((rec.pool, rec.heap))
            .or_default()
            .push(BlockInfo {
                address: rec.ptr,
                size: rec.size,
                requested_size,
                state,
            });
    }
    let mut out = Vec::new();
    for (p, pool) in st.pools.iter().enumerate() {
        for h in pool.heap_slots() {
            let heap = pool.heap(h);
            let mut blocks = by_heap.remove(&(p as u32, h)).unwrap_or_default();
            blocks.extend(heap.free.iter().map(|(off, len)| BlockInfo {
                address: heap.region.base + off as u64,
                size: len,
                requested_size: 0,
                state: BlockState::Inactive,
            }));
            blocks.sort_by_key(|b| b.address);
            // A page-mapped heap shows one segment per run of mapped pages, as PyTorch
            // shows its expandable segments: the segments add up to the reserved bytes.
            // Every buffer lies on mapped pages; free ranges are cut at the runs' ends.
            let ranges = match &heap.pages {
                Some(pages) => pages.mapped_byte_runs(),
                None => vec![(0, heap.region.size)],
            };
            for (offset, len) in ranges {
                let start = heap.region.base + offset as u64;
                let end = start + len as u64;
                // Blocks do not overlap, so their ends are sorted like their starts.
                let first = blocks.partition_point(|b| b.address + b.size as u64 <= start);
                let inside: Vec<BlockInfo> = blocks[first..]
                    .iter()
                    .take_while(|b| b.address < end)
                    .map(|b| {
                        let from = b.address.max(start);
                        let to = (b.address + b.size as u64).min(end);
                        BlockInfo {
                            address: from,
                            size: (to - from) as usize,
                            ..b.clone()
                        }
                    })
                    .collect();
                out.push(segment_info(pool, start, len, heap.pages.is_some(), inside));
            }
        }
    }
    out
}

/// A segment of `pool` at `address` holding `blocks` (which tile it), with its sums;
/// `is_expandable` for a run of mapped pages.
fn segment_info(
    pool: &crate::pool::Pool,
    address: u64,
    total_size: usize,
    is_expandable: bool,
    blocks: Vec<BlockInfo>,
) -> SegmentInfo {
    let sum = |f: &dyn Fn(&BlockInfo) -> bool| blocks.iter().filter(|b| f(b)).map(|b| b.size).sum();
    SegmentInfo {
        address,
        total_size,
        allocated_size: sum(&|b| b.state == BlockState::ActiveAllocated),
        active_size: sum(&|b| b.state != BlockState::Inactive),
        requested_size: blocks.iter().map(|b| b.requested_size).sum(),
        stream: pool.stream,
        segment_type: if pool.kind.is_small() {
            "small"
        } else {
            "large"
        },
        is_expandable,
        blocks,
    }
}

/// Logs the buffers still in use when the engine goes away.
pub(super) fn report_leaks<B: Backend>(st: &State<B>) {
    let live: Vec<_> = st
        .records
        .iter()
        .filter(|r| r.state == BufState::InUse)
        .collect();
    if live.is_empty() {
        return;
    }
    let bytes: usize = live.iter().map(|r| r.size).sum();
    tracing::warn!(
        target: "bufferheap",
        "bufferheap dropped with {} buffers still in use ({}); their memory is released now",
        live.len(),
        format_size(bytes)
    );
    for r in live.iter().take(16) {
        tracing::warn!(
            target: "bufferheap",
            "  leaked buffer id {} at {:#x}: {} (requested {})",
            r.id,
            r.ptr,
            format_size(r.size),
            format_size(r.requested)
        );
    }
}

/// Gives every heap back to the backend (engine drop).
pub(super) fn release_everything<B: Backend>(st: &mut State<B>, backend: &B) {
    for p in 0..st.pools.len() {
        let heaps: Vec<u32> = st.pools[p].heap_slots().collect();
        for h in heaps {
            let region = st.pools[p].heap(h).region.clone();
            if let Err(e) = backend.release(&region) {
                tracing::warn!(target: "bufferheap", "releasing heap at {:#x} failed: {e}", region.base);
            }
        }
        st.pools[p].heaps.clear();
    }
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine").field("caps", &self.caps).finish()
    }
}
