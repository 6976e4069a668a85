//! Physical pieces: a backend may back each piece of a map call (its range cut at multiples
//! of `BackendCaps::physical_block`) with one physical allocation, so the engine unmaps only
//! whole pieces and counts the allocations its maps cost. The sim refuses an unmap that splits
//! a piece, so any engine path that tried would fail these programs.

mod common;

use bufferheap_core::{Allocator, Config};
use bufferheap_sim::SimBackend;
use common::Rng;

const MIB: usize = 1 << 20;

#[test]
fn a_map_call_counts_one_physical_allocation_per_piece() {
    let a = Allocator::new(
        SimBackend::new(1 << 34).with_physical_block(4 * MIB),
        Config::default(),
    )
    .unwrap();
    // The first growth maps one run of 2 MiB pages from the heap's start (20 MiB, and what
    // the burst maps ahead): one allocation per 4 MiB it touches.
    let b = a.alloc(20 * MIB).unwrap().unwrap();
    let stats = a.stats();
    let pieces = a.usage().reserved.div_ceil(4 * MIB) as u64;
    assert!(pieces >= 5);
    assert_eq!(
        (stats.num_map_calls, stats.num_physical_allocs),
        (1, pieces)
    );
    assert_eq!(a.backend().counters().allocations, pieces);
    a.free(b.ptr).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(
        a.usage().reserved,
        0,
        "empty_cache gives every whole piece back"
    );
}

#[test]
fn random_programs_unmap_whole_pieces_only() {
    for (seed, block) in [(1, 16 * MIB), (2, 4 * MIB), (3, usize::MAX)] {
        let a = Allocator::new(
            SimBackend::new(1 << 36).with_physical_block(block),
            Config {
                idle_page_fraction: 0.002,
                ..Config::default()
            },
        )
        .unwrap();
        let mut rng = Rng(seed);
        let mut live: Vec<u64> = Vec::new();
        for step in 0..20_000 {
            if live.len() > 40 || (!live.is_empty() && rng.below(2) == 0) {
                let i = rng.below(live.len() as u64) as usize;
                a.free(live.swap_remove(i)).unwrap();
            } else {
                let size = 1 + rng.below(48 * MIB as u64) as usize;
                let b = a.alloc(size).unwrap_or_else(|e| panic!("step {step}: {e}"));
                live.push(b.expect("memory").ptr);
            }
            if step % 5000 == 4999 {
                a.empty_cache().unwrap();
            }
        }
        let stats = a.stats();
        assert!(
            stats.num_unmap_calls > 0,
            "block {block}: the program never unmapped"
        );
        assert_eq!(
            stats.num_physical_allocs,
            a.backend().counters().allocations,
            "block {block}: the engine's count of physical allocations"
        );
        for ptr in live {
            a.free(ptr).unwrap();
        }
        a.empty_cache().unwrap();
        assert_eq!(a.usage().reserved, 0, "block {block}");
    }
}
