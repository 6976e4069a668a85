//! Where the default policy places buffers on page-mapped heaps.
//!
//! Private buffers above 16 KiB share one address range per stream, so small buffers fill
//! the holes that large ones leave (pages already mapped) instead of mapping a second range;
//! they still count as `small_pool` in the statistics. Tiny ones keep a pool of their own.
//! A burst of growth maps ahead only while the pool climbs past the most it ever placed, and
//! a pool's first growth is no burst. Among equal holes, the lowest address is taken first.

use bufferheap_core::{Allocator, Config, Policy, PoolKind};
use bufferheap_sim::SimBackend;

const MIB: usize = 1 << 20;
/// Statistics groups: all, small_pool, large_pool.
const SMALL_GROUP: usize = 1;
const LARGE_GROUP: usize = 2;

fn sim(config: Config) -> Allocator<SimBackend> {
    Allocator::new(SimBackend::new(1 << 34), config).unwrap()
}

fn pool_reserved(a: &Allocator<SimBackend>, kind: PoolKind) -> usize {
    a.report()
        .pools
        .iter()
        .filter(|p| p.kind == kind)
        .map(|p| p.reserved)
        .sum()
}

#[test]
fn small_buffers_fill_the_holes_large_ones_leave() {
    let a = sim(Config {
        map_chunk: 2 * MIB,
        front_cache_bytes: 0,
        ..Config::default()
    });
    let first = a.alloc(8 * MIB).unwrap().unwrap();
    let hole = a.alloc(8 * MIB).unwrap().unwrap();
    let _third = a.alloc(8 * MIB).unwrap().unwrap();
    a.free(hole.ptr).unwrap();
    let reserved = a.usage().reserved;
    assert_eq!(reserved, 24 * MIB);

    let small: Vec<_> = (0..16)
        .map(|_| a.alloc(256 << 10).unwrap().unwrap())
        .collect();
    assert_eq!(
        a.usage().reserved,
        reserved,
        "small buffers mapped memory of their own while 8 MiB lay idle"
    );
    for b in &small {
        assert!(
            (hole.ptr..hole.ptr + 8 * MIB as u64).contains(&b.ptr),
            "a small buffer at {:#x} outside the hole at {:#x} (first buffer at {:#x})",
            b.ptr,
            hole.ptr,
            first.ptr
        );
    }
    assert_eq!(pool_reserved(&a, PoolKind::PrivateSmall), 0);
    let stats = a.stats();
    assert_eq!(stats.allocated_bytes[SMALL_GROUP].current, 4 * MIB as u64);
    assert_eq!(stats.allocated_bytes[LARGE_GROUP].current, 16 * MIB as u64);
    assert_eq!(stats.allocation[SMALL_GROUP].current, 16);

    // Freed, they count out of the small group again.
    for b in small {
        a.free(b.ptr).unwrap();
    }
    let stats = a.stats();
    assert_eq!(stats.allocated_bytes[SMALL_GROUP].current, 0);
    assert_eq!(stats.cached_bytes[SMALL_GROUP].current, 4 * MIB as u64);
    a.empty_cache().unwrap();
    assert_eq!(a.stats().cached_bytes[SMALL_GROUP].current, 0);
}

#[test]
fn tiny_buffers_keep_a_pool_of_their_own() {
    let a = sim(Config {
        front_cache_bytes: 0,
        ..Config::default()
    });
    let tiny = a.alloc(16 << 10).unwrap().unwrap();
    assert!(pool_reserved(&a, PoolKind::PrivateSmall) > 0);
    assert_eq!(pool_reserved(&a, PoolKind::PrivateLarge), 0);
    let small = a.alloc((16 << 10) + 512).unwrap().unwrap();
    assert!(pool_reserved(&a, PoolKind::PrivateLarge) > 0);
    assert_eq!(a.stats().allocation[SMALL_GROUP].current, 2);
    a.free(tiny.ptr).unwrap();
    a.free(small.ptr).unwrap();
}

#[test]
fn the_seed_policy_keeps_small_buffers_in_their_own_pool() {
    let a = sim(Config {
        policy: Policy::Mps,
        front_cache_bytes: 0,
        ..Config::default()
    });
    let b = a.alloc(256 << 10).unwrap().unwrap();
    assert!(pool_reserved(&a, PoolKind::PrivateSmall) > 0);
    assert_eq!(pool_reserved(&a, PoolKind::PrivateLarge), 0);
    a.free(b.ptr).unwrap();
}

/// Reserved bytes after a burst of `n` 2 MiB buffers, allocated one after another.
fn burst(a: &Allocator<SimBackend>, n: usize) -> usize {
    let buffers: Vec<_> = (0..n).map(|_| a.alloc(2 * MIB).unwrap().unwrap()).collect();
    let reserved = a.usage().reserved;
    for b in buffers {
        a.free(b.ptr).unwrap();
    }
    reserved
}

#[test]
fn growth_maps_ahead_only_past_the_placed_peak() {
    // Climbing from nothing, a burst maps ahead in doubling chunks.
    let fresh = sim(Config::default());
    assert!(
        burst(&fresh, 4) > 8 * MIB,
        "a burst past the placed peak should map ahead"
    );

    // Below an earlier peak (64 MiB placed, then given back), the same burst maps exactly
    // what its buffers need.
    let a = sim(Config::default());
    let big = a.alloc(64 * MIB).unwrap().unwrap();
    a.free(big.ptr).unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.usage().reserved, 0);
    assert_eq!(burst(&a, 4), 8 * MIB, "mapped ahead below the placed peak");
}

#[test]
fn a_pools_first_growth_maps_only_what_its_buffer_needs() {
    // The large pool grows first; a few allocations later the tiny pool grows for the first
    // time. That is no burst of the tiny pool's: one page holds its 8 KiB.
    let a = sim(Config {
        front_cache_bytes: 0,
        ..Config::default()
    });
    let large = a.alloc(4 * MIB).unwrap().unwrap();
    let tiny = a.alloc(8 << 10).unwrap().unwrap();
    assert_eq!(
        pool_reserved(&a, PoolKind::PrivateSmall),
        2 * MIB,
        "the tiny pool's first growth mapped ahead"
    );
    a.free(tiny.ptr).unwrap();
    a.free(large.ptr).unwrap();
}

#[test]
fn among_many_equal_holes_placement_takes_the_lowest_address() {
    // Thousands of equal holes crowd one bin of the free-space index past the size where it
    // turns into a tree: placement must still be best fit, lowest address first.
    let a = sim(Config {
        front_cache_bytes: 0,
        ..Config::default()
    });
    let buffers: Vec<_> = (0..3000).map(|_| a.alloc(4096).unwrap().unwrap()).collect();
    let mut holes: Vec<u64> = buffers.iter().step_by(2).map(|b| b.ptr).collect();
    for &ptr in &holes {
        a.free(ptr).unwrap();
    }
    a.empty_cache().unwrap();
    holes.sort();
    let reserved = a.usage().reserved;
    for (i, &hole) in holes.iter().enumerate().take(1200) {
        let b = a.alloc(4096).unwrap().unwrap();
        assert_eq!(b.ptr, hole, "allocation {i} not in the lowest free hole");
    }
    assert_eq!(
        a.usage().reserved,
        reserved,
        "holes filled without new pages"
    );
}
