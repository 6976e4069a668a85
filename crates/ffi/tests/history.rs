//! The allocation history and the flat memory snapshot through the C ABI, on the host
//! backend: what a C++ front needs for PyTorch's `_record_memory_history()` and `_snapshot()`.
//!
//! Its own test binary (its own process): recording is switched for every device at once, so
//! it would disturb the exact history checks of `abi.rs`. The steps run in one test, in order.

use std::ffi::{CStr, c_int, c_void};
use std::ptr::null_mut;

use bufferheap_ffi::*;

const MIB: usize = 1 << 20;

fn last_error() -> String {
    // SAFETY: the library returns a valid NUL-terminated string it owns; copied at once.
    unsafe { CStr::from_ptr(bufferheap_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// One reading, grown until it fits, as a C++ caller does.
fn snapshot(device: c_int) -> (Vec<SegmentEntry>, Vec<BlockEntry>, Vec<TraceRecord>) {
    let mut counts = [0usize; 3];
    let (mut segments, mut blocks, mut trace) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..8 {
        // SAFETY: each pointer has room for the capacity passed with it; `counts` for three.
        let answer = unsafe {
            bufferheap_memory_snapshot(
                device,
                1,
                segments.as_mut_ptr(),
                segments.capacity(),
                blocks.as_mut_ptr(),
                blocks.capacity(),
                trace.as_mut_ptr(),
                trace.capacity(),
                counts.as_mut_ptr(),
            )
        };
        match answer {
            0 => {
                // SAFETY: the library wrote counts[i] initialized values into each array.
                unsafe {
                    segments.set_len(counts[0]);
                    blocks.set_len(counts[1]);
                    trace.set_len(counts[2]);
                }
                return (segments, blocks, trace);
            }
            1 => {
                segments.reserve(counts[0]);
                blocks.reserve(counts[1]);
                trace.reserve(counts[2]);
            }
            _ => panic!("bufferheap_memory_snapshot: {}", last_error()),
        }
    }
    panic!("the snapshot never fit")
}

fn history_limit() -> usize {
    let mut limit = usize::MAX;
    // SAFETY: `limit` is writable storage for one size_t.
    assert_eq!(unsafe { bufferheap_history_limit(&mut limit) }, 0);
    limit
}

/// The buffer actions (alloc, free requested, free completed) at `addr`; a segment's map
/// may share the address of its first buffer.
fn actions_at(trace: &[TraceRecord], addr: u64) -> Vec<i32> {
    trace
        .iter()
        .filter(|e| e.addr == addr && e.action <= 2)
        .map(|e| e.action)
        .collect()
}

#[test]
fn history_and_flat_snapshot_through_the_c_abi() {
    select_backend(BackendChoice {
        kind: Some(BackendKind::Host),
        host_devices: 2,
        host_memory: Some(8 << 30),
    })
    .unwrap();

    // Nothing allocated yet: an empty reading fits empty arrays.
    let (segments, blocks, trace) = snapshot(-1);
    assert!(segments.is_empty() && blocks.is_empty() && trace.is_empty());

    // Recording from now on, on the device that has no allocator yet too.
    assert_eq!(bufferheap_record_history(100, 0), 0, "{}", last_error());
    assert_eq!(history_limit(), 100);
    let big = bufferheap_malloc(3 * MIB as isize, 0, null_mut());
    let small = bufferheap_malloc(4000, 0, null_mut());
    let gone = bufferheap_malloc(5 * MIB as isize, 0, null_mut());
    assert!(!big.is_null() && !small.is_null() && !gone.is_null());
    bufferheap_free(gone, 0, 0, null_mut());

    let (segments, blocks, trace) = snapshot(0);
    assert!(!segments.is_empty());
    for s in &segments {
        assert_eq!(s.device, 0);
        let mine = &blocks[s.first_block as usize..(s.first_block + s.block_count) as usize];
        // The blocks tile the segment: PyTorch rebuilds their addresses from the sizes.
        let mut at = s.address;
        for b in mine {
            assert_eq!(
                b.address, at,
                "blocks of the segment at {:#x} tile it",
                s.address
            );
            at += b.size;
        }
        assert_eq!(at, s.address + s.total_size);
        let allocated: u64 = mine
            .iter()
            .filter(|b| b.state == BLOCK_ACTIVE_ALLOCATED)
            .map(|b| b.size)
            .sum();
        assert_eq!(allocated, s.allocated_size);
    }
    let block_at = |ptr: *mut c_void| {
        blocks
            .iter()
            .find(|b| b.address == ptr as u64)
            .copied()
            .unwrap_or_else(|| panic!("no block at {ptr:?}"))
    };
    let b = block_at(big);
    assert_eq!(
        (b.state, b.requested_size),
        (BLOCK_ACTIVE_ALLOCATED, 3 * MIB as u64)
    );
    assert_eq!(block_at(small).requested_size, 4000);
    assert_ne!(block_at(gone).state, BLOCK_ACTIVE_ALLOCATED);
    let (large, small_seg) = (
        segments.iter().any(|s| s.is_large == 1),
        segments.iter().any(|s| s.is_large == 0),
    );
    assert!(
        large && small_seg,
        "a 4000-byte buffer sits in a small segment"
    );

    // PyTorch's numbering: alloc 0, free_requested 1, free_completed 2.
    assert_eq!(actions_at(&trace, big as u64), vec![0]);
    assert_eq!(actions_at(&trace, gone as u64), vec![0, 1, 2]);
    assert!(trace.iter().all(|e| e.device == 0 && e.time_us > 0));
    let sizes: Vec<u64> = trace
        .iter()
        .filter(|e| e.action == 0)
        .map(|e| e.size)
        .collect();
    assert!(sizes.contains(&(3 * MIB as u64)), "{sizes:?}");

    // A smaller limit keeps the newest entries; 0 stops and drops them.
    assert_eq!(bufferheap_record_history(2, 0), 0);
    let (_, _, trace) = snapshot(0);
    assert_eq!(trace.len(), 2);
    assert_eq!(actions_at(&trace, gone as u64), vec![1, 2]);
    assert_eq!(bufferheap_record_history(0, 0), 0);
    assert_eq!(history_limit(), 0);
    bufferheap_free(small, 0, 0, null_mut());
    assert!(snapshot(0).2.is_empty());

    // Turned on again with clear: starts empty; a device first used now records too.
    assert_eq!(bufferheap_record_history(50, 1), 0);
    let other = bufferheap_malloc(MIB as isize, 1, null_mut());
    assert!(!other.is_null());
    let (_, _, trace) = snapshot(-1);
    let devices: Vec<(i32, i32)> = trace.iter().map(|e| (e.device, e.action)).collect();
    assert_eq!(
        devices,
        vec![(1, 5), (1, 0)],
        "only device 1's new range: its first page map, then the allocation"
    );
    let (segments, _, _) = snapshot(-1);
    assert!(segments.iter().any(|s| s.device == 1));
    assert!(segments.iter().any(|s| s.device == 0));

    // Bad arguments fail with a reason, never write.
    let mut counts = [0usize; 3];
    // SAFETY: NULL `counts` is refused before anything is written.
    let answer = unsafe {
        bufferheap_memory_snapshot(
            0,
            1,
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
        )
    };
    assert_eq!(answer, -1);
    assert!(
        last_error().contains("`counts` is NULL"),
        "{}",
        last_error()
    );
    // SAFETY: NULL arrays with a capacity that would hold the reading are refused.
    let answer = unsafe {
        bufferheap_memory_snapshot(
            0,
            1,
            null_mut(),
            1000,
            null_mut(),
            1000,
            null_mut(),
            1000,
            counts.as_mut_ptr(),
        )
    };
    assert_eq!(answer, -1);
    assert!(last_error().contains("NULL"), "{}", last_error());
    // SAFETY: `counts` has room for three; the arrays are too small, so nothing is written.
    let answer = unsafe {
        bufferheap_memory_snapshot(
            7,
            1,
            null_mut(),
            0,
            null_mut(),
            0,
            null_mut(),
            0,
            counts.as_mut_ptr(),
        )
    };
    assert_eq!(answer, -1);
    assert!(
        last_error().contains("invalid device 7"),
        "{}",
        last_error()
    );
    // SAFETY: NULL is refused.
    assert_eq!(unsafe { bufferheap_history_limit(null_mut()) }, -1);

    bufferheap_free(big, 0, 0, null_mut());
    bufferheap_free(other, 0, 1, null_mut());
}
