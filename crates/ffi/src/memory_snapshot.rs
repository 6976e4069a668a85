//! PyTorch's memory snapshot as flat C arrays, and control of the allocation history: what a
//! C++ front needs to build PyTorch's own `SnapshotInfo`, so that `torch.cuda.memory._snapshot()`,
//! `_dump_snapshot()` and `_record_memory_history()` work on bufferheap.
//!
//! Invariants:
//! - one call reads each device's segments and history once, and writes nothing unless all
//!   of it fits the caller's arrays: a caller retries with the counts it was told, and never
//!   sees half of one reading and half of another;
//! - the blocks of a segment tile it: each starts where the one before ended, the first at
//!   the segment's address, and their sizes add up to the segment's size (PyTorch computes a
//!   block's address from the segment's address plus the sizes before it). A gap between the
//!   engine's buffers and free ranges becomes an inactive block;
//! - trace actions and block states carry PyTorch's numbering (`TraceEntry::Action`, and the
//!   three block states of its snapshot), declared in `include/bufferheap.h`.

use std::ffi::c_int;

use bufferheap_core::{BlockState, SegmentInfo, TraceAction, TraceEntry};

use crate::error::{FfiError, FfiResult, status};
use crate::registry::{System, registry};

/// A block of a segment (`bufferheap_block`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    pub address: u64,
    pub size: u64,
    pub requested_size: u64,
    /// `BUFFERHEAP_BLOCK_*`.
    pub state: i32,
}

/// A segment: a heap, or the mapped extent of a page-mapped range (`bufferheap_segment`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentEntry {
    pub device: i32,
    /// 1 for PyTorch's "large" segment type, 0 for "small".
    pub is_large: i32,
    /// 1 where pages are mapped on demand (PyTorch's expandable segments).
    pub is_expandable: i32,
    pub address: u64,
    pub total_size: u64,
    pub allocated_size: u64,
    pub active_size: u64,
    pub requested_size: u64,
    pub stream: u64,
    /// This segment's blocks: `blocks[first_block .. first_block + block_count]`.
    pub first_block: u64,
    pub block_count: u64,
}

/// One history entry (`bufferheap_trace_entry`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRecord {
    /// `BUFFERHEAP_TRACE_*`: PyTorch's `TraceEntry::Action`.
    pub action: i32,
    pub device: i32,
    /// The address; for an out-of-memory entry, the device's free bytes.
    pub addr: u64,
    pub size: u64,
    pub stream: u64,
    /// Microseconds since the Unix epoch.
    pub time_us: i64,
}

pub const BLOCK_INACTIVE: i32 = 0;
pub const BLOCK_ACTIVE_ALLOCATED: i32 = 1;
pub const BLOCK_ACTIVE_PENDING_FREE: i32 = 2;

/// PyTorch's `TraceEntry::Action` value of an action (its `SNAPSHOT`, 7, is never recorded).
fn action_code(action: TraceAction) -> i32 {
    match action {
        TraceAction::Alloc => 0,
        TraceAction::FreeRequested => 1,
        TraceAction::FreeCompleted => 2,
        TraceAction::SegmentAlloc => 3,
        TraceAction::SegmentFree => 4,
        TraceAction::SegmentMap => 5,
        TraceAction::SegmentUnmap => 6,
        TraceAction::Oom => 8,
    }
}

fn state_code(state: BlockState) -> i32 {
    match state {
        BlockState::Inactive => BLOCK_INACTIVE,
        BlockState::ActiveAllocated => BLOCK_ACTIVE_ALLOCATED,
        BlockState::ActivePendingFree => BLOCK_ACTIVE_PENDING_FREE,
    }
}

/// One reading of the segments and histories of some devices.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlatSnapshot {
    pub segments: Vec<SegmentEntry>,
    pub blocks: Vec<BlockEntry>,
    pub trace: Vec<TraceRecord>,
}

impl FlatSnapshot {
    /// Appends `device`'s segments, their blocks tiled (see the module's invariants).
    pub fn add_segments(&mut self, device: usize, segments: &[SegmentInfo]) -> FfiResult<()> {
        for s in segments {
            let first_block = self.blocks.len();
            let mut cursor = s.address;
            for b in &s.blocks {
                if b.address < cursor {
                    return Err(FfiError::new(format!(
                        "bufferheap: the block at {:#x} of the segment at {:#x} on device \
                         {device} overlaps the block before it (ending at {cursor:#x})",
                        b.address, s.address
                    )));
                }
                if b.address > cursor {
                    self.blocks.push(inactive(cursor, b.address - cursor));
                }
                self.blocks.push(BlockEntry {
                    address: b.address,
                    size: b.size as u64,
                    requested_size: b.requested_size as u64,
                    state: state_code(b.state),
                });
                cursor = b.address + b.size as u64;
            }
            let end = s.address + s.total_size as u64;
            if cursor < end {
                self.blocks.push(inactive(cursor, end - cursor));
                cursor = end;
            }
            self.segments.push(SegmentEntry {
                device: device as i32,
                is_large: i32::from(s.segment_type == "large"),
                is_expandable: i32::from(s.is_expandable),
                address: s.address,
                total_size: cursor - s.address,
                allocated_size: s.allocated_size as u64,
                active_size: s.active_size as u64,
                requested_size: s.requested_size as u64,
                stream: s.stream,
                first_block: first_block as u64,
                block_count: (self.blocks.len() - first_block) as u64,
            });
        }
        Ok(())
    }

    /// Appends `device`'s history, oldest first.
    pub fn add_trace(&mut self, device: usize, entries: &[TraceEntry]) {
        self.trace.extend(entries.iter().map(|e| TraceRecord {
            action: action_code(e.action),
            device: device as i32,
            addr: e.addr,
            size: e.size as u64,
            stream: e.stream,
            time_us: e.time_us,
        }));
    }

    fn counts(&self) -> [usize; 3] {
        [self.segments.len(), self.blocks.len(), self.trace.len()]
    }
}

fn inactive(address: u64, size: u64) -> BlockEntry {
    BlockEntry {
        address,
        size,
        requested_size: 0,
        state: BLOCK_INACTIVE,
    }
}

/// The segments (and, with `traces`, the histories) of `device`, or of every device for -1.
pub fn read(sys: &System, device: i32, traces: bool) -> FfiResult<FlatSnapshot> {
    let mut flat = FlatSnapshot::default();
    for d in sys.devices_of(device)? {
        if let Some(a) = sys.existing(d) {
            if traces {
                // Read together, so that they agree while other threads allocate.
                let (segments, history) = a.segments_and_history();
                flat.add_segments(d, &segments)?;
                flat.add_trace(d, &history);
            } else {
                flat.add_segments(d, &a.segments())?;
            }
        }
    }
    Ok(flat)
}

/// Copies `items` to `out` when `capacity` holds them all.
///
/// # Safety
/// `out` points to room for `capacity` values of `T` (it may be NULL when `items` is empty).
unsafe fn write_all<T: Copy>(items: &[T], out: *mut T) {
    if items.is_empty() {
        return;
    }
    // SAFETY: the caller checked that `out` has room for `items.len()` values and is not NULL;
    // a fresh Vec of ours never overlaps the caller's array.
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), out, items.len()) };
}

/// Writes the segments, blocks and (when `include_traces` is not 0) history entries of
/// `device` (-1: every device) into the caller's arrays, and their counts into
/// `counts[0..3]`. Answers 0 when they were written, 1 when an array was too small (nothing
/// written; `counts` says how many this reading needed: call again with more room), -1 with
/// the last error.
///
/// # Safety
/// `counts` points to room for three `size_t`; each array points to room for its capacity
/// (NULL allowed for a capacity of 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_memory_snapshot(
    device: c_int,
    include_traces: c_int,
    segments: *mut SegmentEntry,
    segment_capacity: usize,
    blocks: *mut BlockEntry,
    block_capacity: usize,
    trace: *mut TraceRecord,
    trace_capacity: usize,
    counts: *mut usize,
) -> c_int {
    let mut fits = true;
    let answer = status("bufferheap_memory_snapshot", || {
        if counts.is_null() {
            return Err(FfiError::new(
                "bufferheap_memory_snapshot: `counts` is NULL",
            ));
        }
        let flat = read(registry().system()?, device, include_traces != 0)?;
        let needed = flat.counts();
        // SAFETY: `counts` is not NULL (checked above) and has room for three size_t.
        unsafe { std::ptr::copy_nonoverlapping(needed.as_ptr(), counts, 3) };
        let arrays = [
            (segment_capacity, segments.is_null()),
            (block_capacity, blocks.is_null()),
            (trace_capacity, trace.is_null()),
        ];
        for (n, (capacity, null)) in needed.into_iter().zip(arrays) {
            if n > capacity {
                fits = false;
                return Ok(());
            }
            if n > 0 && null {
                return Err(FfiError::new(
                    "bufferheap_memory_snapshot: an array with a non-zero capacity is NULL",
                ));
            }
        }
        // SAFETY: each array is not NULL where it receives anything (checked above) and has
        // room for its capacity, which is at least what is written (checked above).
        unsafe {
            write_all(&flat.segments, segments);
            write_all(&flat.blocks, blocks);
            write_all(&flat.trace, trace);
        }
        Ok(())
    });
    if answer == 0 && !fits { 1 } else { answer }
}

/// Records the last `max_entries` allocator events of every device from now on, devices not
/// used yet included; 0 stops recording and drops what was kept. A history already kept
/// goes on (trimmed to the new limit) unless `clear` is not 0. PyTorch's
/// `_record_memory_history`.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_record_history(max_entries: usize, clear: c_int) -> c_int {
    status("bufferheap_record_history", || {
        let reg = registry();
        reg.system()?.record_history(reg, max_entries, clear != 0);
        Ok(())
    })
}

/// The most allocator events kept per device (0: none are recorded), written to `*out`.
///
/// # Safety
/// `out` must be NULL (the call then fails) or point to writable storage for one `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_history_limit(out: *mut usize) -> c_int {
    status("bufferheap_history_limit", || {
        if out.is_null() {
            return Err(FfiError::new("bufferheap_history_limit: `out` is NULL"));
        }
        let reg = registry();
        let limit = reg.system()?.history_limit(reg)?;
        // SAFETY: `out` is not NULL (checked above) and points to storage for one size_t.
        unsafe { out.write(limit) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(address: u64, size: usize, state: BlockState) -> bufferheap_core::BlockInfo {
        bufferheap_core::BlockInfo {
            address,
            size,
            requested_size: if state == BlockState::ActiveAllocated {
                size - 1
            } else {
                0
            },
            state,
        }
    }

    /// A large, page-mapped segment on stream 7 holding `blocks`, its sums taken from them.
    fn segment(
        address: u64,
        total_size: usize,
        blocks: Vec<bufferheap_core::BlockInfo>,
    ) -> SegmentInfo {
        let sum = |f: &dyn Fn(&bufferheap_core::BlockInfo) -> bool,
                   size: &dyn Fn(&bufferheap_core::BlockInfo) -> usize| {
            blocks.iter().filter(|b| f(b)).map(size).sum()
        };
        SegmentInfo {
            address,
            total_size,
            allocated_size: sum(&|b| b.state == BlockState::ActiveAllocated, &|b| b.size),
            active_size: sum(&|b| b.state != BlockState::Inactive, &|b| b.size),
            requested_size: sum(&|_| true, &|b| b.requested_size),
            stream: 7,
            segment_type: "large",
            is_expandable: true,
            blocks,
        }
    }

    #[test]
    fn blocks_tile_their_segment_with_gaps_filled() {
        let segment = segment(
            0x1000,
            0x1000,
            vec![
                block(0x1200, 0x200, BlockState::ActiveAllocated),
                block(0x1400, 0x100, BlockState::Inactive),
            ],
        );
        assert_eq!(
            (segment.allocated_size, segment.requested_size),
            (0x200, 0x1ff)
        );
        let mut flat = FlatSnapshot::default();
        flat.add_segments(3, &[segment]).unwrap();
        let s = flat.segments[0];
        assert_eq!(
            (s.device, s.is_large, s.is_expandable, s.stream),
            (3, 1, 1, 7)
        );
        assert_eq!((s.first_block, s.block_count), (0, 4));
        let tiles: Vec<(u64, u64, i32)> = flat
            .blocks
            .iter()
            .map(|b| (b.address, b.size, b.state))
            .collect();
        assert_eq!(
            tiles,
            vec![
                (0x1000, 0x200, BLOCK_INACTIVE),
                (0x1200, 0x200, BLOCK_ACTIVE_ALLOCATED),
                (0x1400, 0x100, BLOCK_INACTIVE),
                (0x1500, 0xb00, BLOCK_INACTIVE),
            ]
        );
        assert_eq!(
            flat.blocks.iter().map(|b| b.size).sum::<u64>(),
            s.total_size
        );
    }

    #[test]
    fn overlapping_blocks_are_an_error_not_a_wrong_picture() {
        let segment = segment(
            0,
            0x400,
            vec![
                block(0, 0x200, BlockState::Inactive),
                block(0x100, 0x200, BlockState::Inactive),
            ],
        );
        let err = FlatSnapshot::default()
            .add_segments(0, &[segment])
            .unwrap_err();
        assert!(err.message.contains("overlaps"), "{}", err.message);
    }

    #[test]
    fn actions_carry_pytorchs_numbers() {
        let codes: Vec<i32> = [
            TraceAction::Alloc,
            TraceAction::FreeRequested,
            TraceAction::FreeCompleted,
            TraceAction::SegmentAlloc,
            TraceAction::SegmentFree,
            TraceAction::SegmentMap,
            TraceAction::SegmentUnmap,
            TraceAction::Oom,
        ]
        .into_iter()
        .map(action_code)
        .collect();
        assert_eq!(codes, vec![0, 1, 2, 3, 4, 5, 6, 8]);
    }
}
