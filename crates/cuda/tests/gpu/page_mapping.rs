//! Page-mapped regions on the device: mapping, unmapping in part, the physical allocation
//! modes behind a map call, and how the backend batches its driver calls.

use super::*;

#[test]
fn page_mapped_region_round_trip() {
    let Some((_lock, b)) = gpu_with(per_page()) else {
        return;
    };
    assert_eq!(b.options().physical, PhysicalGranularity::PerPage);
    assert_eq!(b.caps().physical_block, b.caps().granularity);
    assert!(!b.options().sync_before_unmap);
    let g = b.caps().granularity;
    let r = b.reserve(16 * g, Storage::Private, false).unwrap();
    assert_eq!(r.base % g as u64, 0);
    assert_eq!(r.host_base, None);
    let before = b.stats();
    let free_before = free_memory(&b);

    b.map(&r, 0, 8 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_create - before.mem_create, 8, "one handle per page");
    assert_eq!(s.mem_map - before.mem_map, 8);
    assert_eq!(
        s.mem_set_access - before.mem_set_access,
        1,
        "one cuMemSetAccess over the eight new mappings"
    );
    assert_eq!((s.mapped_bytes, s.physical_bytes), (8 * g, 8 * g));
    assert_eq!(s.handles, 8);
    let free_after = free_memory(&b);
    assert!(
        free_before.saturating_sub(free_after) >= 8 * g - g,
        "mapping 8 pages took {} bytes of device memory",
        free_before.saturating_sub(free_after)
    );
    write_pages(&b, &r, 0, 8, 1);
    assert_pages(&b, &r, 0, 8, 1);

    // Errors: unmapped pages, overlap, bad ranges.
    assert!(b.write(&r, 8 * g, &[1]).is_err(), "page 8 is not mapped");
    assert!(b.map(&r, 7 * g, 2 * g).is_err(), "overlap");
    assert!(b.map(&r, 8 * g + 1, g).is_err(), "misaligned");
    assert!(b.unmap(&r, 8 * g, g).is_err(), "not mapped");

    // Partial unmap of the middle of one map call: its pages go back at once, the rest keep
    // their contents.
    let mid = b.stats();
    b.unmap(&r, 2 * g, 2 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_unmap - mid.mem_unmap, unmap_calls(&b, 2));
    assert_eq!(s.mem_release - mid.mem_release, 2);
    assert_eq!(s.sync, mid.sync, "no context synchronisation by default");
    assert_eq!(
        (s.mapped_bytes, s.physical_bytes, s.held_bytes),
        (6 * g, 6 * g, 0)
    );
    assert!(
        b.write(&r, 2 * g, &[1]).is_err(),
        "page 2 is the engine's no more"
    );
    assert_pages(&b, &r, 0, 2, 1);
    assert_pages(&b, &r, 4, 4, 1);

    // Mapping the hole again makes two new pages, usable at once.
    b.map(&r, 2 * g, 2 * g).unwrap();
    assert_eq!(b.stats().mem_create, s.mem_create + 2);
    write_pages(&b, &r, 2, 2, 9);
    assert_pages(&b, &r, 2, 2, 9);
    assert_pages(&b, &r, 4, 4, 1);

    // Unmapping the whole run (made by two map calls) releases every handle.
    let mid = b.stats();
    b.unmap(&r, 0, 8 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_unmap - mid.mem_unmap, unmap_calls(&b, 8));
    assert_eq!(s.mem_release - mid.mem_release, 8);
    assert_eq!((s.mapped_bytes, s.physical_bytes), (0, 0));

    // A range spanning several map calls, covering the outer ones in part.
    b.map(&r, 0, 2 * g).unwrap();
    b.map(&r, 2 * g, 2 * g).unwrap();
    b.map(&r, 4 * g, 2 * g).unwrap();
    write_pages(&b, &r, 0, 6, 3);
    let mid = b.stats();
    b.unmap(&r, g, 4 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_unmap - mid.mem_unmap, unmap_calls(&b, 4));
    assert_eq!(s.mem_release - mid.mem_release, 4);
    assert_eq!((s.mapped_bytes, s.held_bytes), (2 * g, 0));
    assert_pages(&b, &r, 0, 1, 3);
    assert_pages(&b, &r, 5, 1, 3);

    // Release with pages still mapped.
    b.release(&r).unwrap();
    let s = b.stats();
    assert_eq!(s.regions, [0, 0, 0]);
    assert_eq!((s.physical_bytes, s.handles), (0, 0));
    assert_eq!(
        s.mem_create - before.mem_create,
        s.mem_release - before.mem_release
    );
    assert!(b.release(&r).is_err(), "released twice");
    assert!(b.map(&r, 0, g).is_err(), "stale region");
}

/// The measured problem: the engine maps up to 16 pages with one call and later unmaps part
/// of them. By default that memory must come back to the device at once (the driver's free
/// memory grows), and the pages that stay must keep their bytes.
#[test]
fn partial_unmap_of_a_large_mapping_returns_memory_at_once() {
    let Some((_lock, b)) = gpu_with(per_page()) else {
        return;
    };
    let g = b.caps().granularity;
    let r = b.reserve(16 * g, Storage::Private, false).unwrap();
    let free_start = free_memory(&b);
    b.map(&r, 0, 16 * g).unwrap();
    write_pages(&b, &r, 0, 16, 21);

    let free_mapped = free_memory(&b);
    b.unmap(&r, 4 * g, 8 * g).unwrap();
    let free_after = free_memory(&b);
    let s = b.stats();
    assert_eq!((s.physical_bytes, s.held_bytes, s.handles), (8 * g, 0, 8));
    let freed = free_after.saturating_sub(free_mapped);
    println!(
        "unmapping 8 of 16 pages: cuMemGetInfo free memory grew by {freed} bytes ({} pages)",
        freed / g
    );
    assert!(
        freed >= 7 * g,
        "unmapping 8 of 16 pages gave the device back only {freed} bytes"
    );
    assert_pages(&b, &r, 0, 4, 21);
    assert_pages(&b, &r, 12, 4, 21);

    // The two ends, one at a time: all of it comes back.
    b.unmap(&r, 0, 4 * g).unwrap();
    assert_pages(&b, &r, 12, 4, 21);
    b.unmap(&r, 12 * g, 4 * g).unwrap();
    let s = b.stats();
    assert_eq!((s.physical_bytes, s.handles), (0, 0));
    let free_end = free_memory(&b);
    assert!(
        free_end + g >= free_start,
        "free memory {free_end} after unmapping everything, {free_start} before mapping"
    );
    b.release(&r).unwrap();
}

/// The default: one allocation per 16 MiB piece of a map call (its range cut at multiples of
/// the block from the region's base), announced in the caps so that the engine unmaps whole
/// pieces only; a piece unmapped goes back to the device at once, its neighbours keep their
/// bytes.
#[test]
fn per_block_backs_each_piece_of_a_map_call_with_one_allocation() {
    let Some((_lock, b)) = gpu() else { return };
    let g = b.caps().granularity;
    let block = b.caps().physical_block;
    assert_eq!(b.options().physical, PhysicalGranularity::default());
    assert_eq!(block, DEFAULT_PHYSICAL_BLOCK.div_ceil(g) * g);
    let bp = block / g;
    if bp < 2 {
        println!("skipping: the VMM granularity {g} leaves one page per block");
        return;
    }
    let half = bp / 2;
    let r = b.reserve(4 * block, Storage::Private, false).unwrap();
    let before = b.stats();
    // From the middle of block 0 to the middle of block 2: three pieces, one access call.
    b.map(&r, half * g, 2 * block).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_create - before.mem_create, 3);
    assert_eq!(s.mem_set_access - before.mem_set_access, 1);
    assert_eq!((s.handles, s.mapped_bytes), (3, 2 * block));
    write_pages(&b, &r, half, 2 * bp, 90);
    let free_before = free_memory(&b);
    b.unmap(&r, block, block).unwrap();
    let s = b.stats();
    assert_eq!((s.handles, s.held_bytes), (2, 0));
    assert!(
        free_memory(&b) + g >= free_before + block,
        "the unmapped piece did not go back to the device"
    );
    assert_pages(&b, &r, half, bp - half, 90);
    assert_pages(&b, &r, 2 * bp, half, 90);
    b.unmap(&r, half * g, (bp - half) * g).unwrap();
    b.unmap(&r, 2 * block, half * g).unwrap();
    assert_eq!(b.stats().physical_bytes, 0);
    b.release(&r).unwrap();
}

/// One allocation per map call with `Defer`: a partial unmap holds the whole allocation (the
/// behaviour `PerPage` replaces), keeps the contents, and gives everything back with the last
/// page.
#[test]
fn per_map_defer_holds_a_partly_unmapped_allocation() {
    let Some((_lock, b)) = gpu_with(per_map(PartialUnmap::Defer)) else {
        return;
    };
    let g = b.caps().granularity;
    let r = b.reserve(8 * g, Storage::Private, false).unwrap();
    let before = b.stats();
    b.map(&r, 0, 8 * g).unwrap();
    let s = b.stats();
    assert_eq!(
        s.mem_create - before.mem_create,
        1,
        "one handle per map call"
    );
    assert_eq!(s.mem_set_access - before.mem_set_access, 1);
    write_pages(&b, &r, 0, 8, 1);

    let free_mapped = free_memory(&b);
    b.unmap(&r, 2 * g, 2 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_unmap, before.mem_unmap, "nothing can be unmapped yet");
    assert_eq!((s.mapped_bytes, s.held_bytes), (6 * g, 2 * g));
    assert!(
        free_memory(&b) < free_mapped + g,
        "held memory is not given back"
    );
    assert_pages(&b, &r, 0, 2, 1);
    assert_pages(&b, &r, 4, 4, 1);

    // Mapping held pages again needs no driver call.
    b.map(&r, 2 * g, 2 * g).unwrap();
    assert_eq!(b.stats().mem_create, s.mem_create);
    write_pages(&b, &r, 2, 2, 9);
    assert_pages(&b, &r, 4, 4, 1);

    // A range spanning several map calls, covering the outer ones in part.
    b.unmap(&r, 0, 8 * g).unwrap();
    b.map(&r, 0, 2 * g).unwrap();
    b.map(&r, 2 * g, 2 * g).unwrap();
    b.map(&r, 4 * g, 2 * g).unwrap();
    write_pages(&b, &r, 0, 6, 3);
    let mid = b.stats();
    b.unmap(&r, g, 4 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_unmap - mid.mem_unmap, 1, "the middle mapping only");
    assert_eq!((s.mapped_bytes, s.held_bytes), (2 * g, 2 * g));
    assert_pages(&b, &r, 0, 1, 3);
    assert_pages(&b, &r, 5, 1, 3);

    b.release(&r).unwrap();
    let s = b.stats();
    assert_eq!((s.physical_bytes, s.handles), (0, 0));
    assert_eq!(s.mem_create, s.mem_release);
}

#[test]
fn recreate_mode_replaces_the_rest_of_a_partly_unmapped_mapping() {
    let Some((_lock, b)) = gpu_with(per_map(PartialUnmap::Recreate)) else {
        return;
    };
    let g = b.caps().granularity;
    let r = b.reserve(8 * g, Storage::Private, false).unwrap();
    b.map(&r, 0, 8 * g).unwrap();
    let before = b.stats();
    b.unmap(&r, 2 * g, 2 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_create - before.mem_create, 2, "pages 0..2 and 4..8");
    assert_eq!(s.mem_unmap - before.mem_unmap, 1);
    assert_eq!(s.mem_release - before.mem_release, 1);
    assert_eq!(s.mem_set_access - before.mem_set_access, 2);
    assert_eq!((s.physical_bytes, s.held_bytes), (6 * g, 0));
    // The replacement pages are usable (their old contents are gone by contract).
    write_pages(&b, &r, 0, 2, 5);
    write_pages(&b, &r, 4, 4, 6);
    assert_pages(&b, &r, 0, 2, 5);
    assert_pages(&b, &r, 4, 4, 6);
    b.release(&r).unwrap();
}

/// One `cuMemSetAccess` per map call and one `cuMemUnmap` per run of adjacent pages, also when
/// the run was mapped by several calls; the memory really comes back and the addresses can be
/// mapped again.
#[test]
fn access_and_unmap_calls_are_batched() {
    let Some((_lock, b)) = gpu_with(per_page()) else {
        return;
    };
    let g = b.caps().granularity;
    let r = b.reserve(32 * g, Storage::Private, false).unwrap();
    let free_start = free_memory(&b);
    let before = b.stats();
    b.map(&r, 0, 16 * g).unwrap();
    b.map(&r, 16 * g, 4 * g).unwrap();
    b.map(&r, 20 * g, 12 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_create - before.mem_create, 32);
    assert_eq!(s.mem_set_access - before.mem_set_access, 3);
    write_pages(&b, &r, 0, 32, 60);
    assert_pages(&b, &r, 0, 32, 60);

    // One unmap call over pages from all three map calls.
    let mid = b.stats();
    b.unmap(&r, 8 * g, 20 * g).unwrap();
    let s = b.stats();
    assert_eq!(s.mem_unmap - mid.mem_unmap, unmap_calls(&b, 20));
    assert_eq!(s.mem_release - mid.mem_release, 20);
    assert_eq!((s.physical_bytes, s.held_bytes), (12 * g, 0));
    assert_pages(&b, &r, 0, 8, 60);
    assert_pages(&b, &r, 28, 4, 60);
    assert!(b.write(&r, 8 * g, &[0]).is_err());

    // The addresses take new pages again.
    b.map(&r, 8 * g, 20 * g).unwrap();
    write_pages(&b, &r, 8, 20, 70);
    assert_pages(&b, &r, 8, 20, 70);
    assert_pages(&b, &r, 0, 8, 60);

    b.unmap(&r, 0, 32 * g).unwrap();
    assert_eq!(b.stats().physical_bytes, 0);
    assert!(free_memory(&b) + g >= free_start, "everything came back");
    b.release(&r).unwrap();
}

#[test]
fn sync_before_unmap_synchronises_once_per_unmap() {
    // One allocation per page, so that each unmap below reaches the driver.
    let options = CudaOptions {
        sync_before_unmap: true,
        ..per_page()
    };
    let Some((_lock, b)) = gpu_with(options) else {
        return;
    };
    let g = b.caps().granularity;
    let r = b.reserve(8 * g, Storage::Private, false).unwrap();
    b.map(&r, 0, 8 * g).unwrap();
    assert_eq!(b.stats().sync, 0, "mapping does not synchronise");
    b.unmap(&r, 0, 4 * g).unwrap();
    assert_eq!(b.stats().sync, 1);
    b.unmap(&r, 4 * g, 2 * g).unwrap();
    assert_eq!(b.stats().sync, 2);
    b.release(&r).unwrap();
    assert_eq!(b.stats().sync, 3, "release unmaps what is left");
}
