//! Tests of `CudaBackend` on a real device. Each test first opens device 0; where that fails
//! (no driver, no device) it prints "skipping: no CUDA device (<error>)" and returns, so the
//! suite passes on machines without a GPU and says why. `no_driver_is_an_error_not_a_panic`
//! is the opposite: it runs only where no driver is present.
//!
//! The GPU tests take one lock each, so that memory figures and the out-of-memory test are not
//! disturbed by other tests running at the same time. The page-mapping tests live in
//! `gpu/page_mapping.rs`, a module of this suite (one test binary).

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bufferheap_core::{Backend, BackendOp, Region, Storage};
use bufferheap_cuda::{
    CudaBackend, CudaOptions, DEFAULT_PHYSICAL_BLOCK, PartialUnmap, PhysicalGranularity,
    device_count, driver_present,
};
use cudarc::driver::sys::{self, CUresult};

static GPU: Mutex<()> = Mutex::new(());

/// The lock and a backend of device 0 (built with `options`), or `None` after printing why.
fn gpu_with(options: CudaOptions) -> Option<(MutexGuard<'static, ()>, CudaBackend)> {
    let lock = GPU.lock().unwrap_or_else(|e| e.into_inner());
    match CudaBackend::with_options(0, options) {
        Ok(b) => Some((lock, b)),
        Err(e) => {
            println!("skipping: no CUDA device ({e})");
            None
        }
    }
}

fn gpu() -> Option<(MutexGuard<'static, ()>, CudaBackend)> {
    gpu_with(CudaOptions::default())
}

fn per_page() -> CudaOptions {
    CudaOptions {
        physical: PhysicalGranularity::PerPage,
        ..CudaOptions::default()
    }
}

fn per_map(mode: PartialUnmap) -> CudaOptions {
    CudaOptions {
        physical: PhysicalGranularity::PerMap(mode),
        ..CudaOptions::default()
    }
}

/// Free device memory as the driver reports it (`cuMemGetInfo`).
fn free_memory(b: &CudaBackend) -> usize {
    b.memory_info().free
}

/// Unmap calls one unmap of `mappings` adjacent mappings should take: one, unless the driver
/// refused ranges over several mappings (then the backend unmaps them one by one).
fn unmap_calls(b: &CudaBackend, mappings: u64) -> u64 {
    if b.stats().unmap_runs_refused {
        println!("note: the driver refused one cuMemUnmap over several mappings");
        mappings
    } else {
        1
    }
}

fn check(what: &str, status: CUresult) {
    assert_eq!(status, CUresult::CUDA_SUCCESS, "{what}");
}

/// A byte pattern that differs per page and per byte.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_pages(b: &CudaBackend, r: &Region, first: usize, count: usize, seed: u8) {
    let g = b.caps().granularity;
    for p in first..first + count {
        b.write(r, p * g, &pattern(seed.wrapping_add(p as u8), g))
            .unwrap();
    }
}

fn assert_pages(b: &CudaBackend, r: &Region, first: usize, count: usize, seed: u8) {
    let g = b.caps().granularity;
    let mut out = vec![0u8; g];
    for p in first..first + count {
        b.read(r, p * g, &mut out).unwrap();
        assert!(
            out == pattern(seed.wrapping_add(p as u8), g),
            "page {p} lost its contents"
        );
    }
}

// Mapping and unmapping pages, physical allocation modes, batching of driver calls.
#[path = "gpu/page_mapping.rs"]
mod page_mapping;

#[test]
fn no_driver_is_an_error_not_a_panic() {
    if driver_present() {
        println!("skipping: a CUDA driver is present, so the no-driver path cannot be tested here");
        return;
    }
    let err = CudaBackend::new(0).expect_err("no driver, yet a backend");
    assert_eq!(err.op, BackendOp::Init);
    assert!(err.message.contains("libcuda"), "{err}");
    assert!(!err.out_of_memory);
    assert_eq!(device_count(), Ok(0));
    assert!(CudaBackend::new(3).is_err());
}

#[test]
fn bad_ordinal_is_an_error() {
    let Some((_lock, b)) = gpu() else { return };
    let n = device_count().unwrap();
    assert!(n >= 1);
    let err = CudaBackend::new(n + 7).expect_err("ordinal past the last device");
    assert_eq!(err.op, BackendOp::Init);
    println!("device 0: {} ({n} device(s))", b.name());
}

#[test]
fn caps_and_memory_info() {
    let Some((_lock, b)) = gpu() else { return };
    let caps = b.caps();
    assert!(caps.shared_storage && !caps.unified_memory);
    assert!(caps.page_mapping, "every supported data-centre GPU has VMM");
    assert!(caps.granularity.is_power_of_two() && caps.granularity >= 64 << 10);
    println!("{}: granularity {} bytes", b.name(), caps.granularity);
    let info = b.memory_info();
    assert!(info.total > 0 && info.free <= info.total);
    assert_eq!(info.recommended_max, info.total);
    assert_eq!(caps.max_buffer_size, info.total);
    assert_eq!(info.driver_allocated(), info.total - info.free);
}

#[test]
fn plain_region() {
    let Some((_lock, b)) = gpu() else { return };
    let g = b.caps().granularity;
    let r = b.reserve(2 * g, Storage::Private, true).unwrap();
    assert_eq!(r.base % g as u64, 0);
    assert_eq!(r.host_base, None);
    let data = pattern(7, 2 * g);
    b.write(&r, 0, &data).unwrap();
    let mut out = vec![0u8; 2 * g];
    b.read(&r, 0, &mut out).unwrap();
    assert!(out == data);
    assert!(b.write(&r, 2 * g - 1, &[0, 0]).is_err(), "out of bounds");
    assert!(
        b.map(&r, 0, g).is_err(),
        "a plain region has no pages to map"
    );
    assert_eq!(b.stats().regions, [0, 1, 0]);
    b.release(&r).unwrap();
    assert_eq!(b.stats().regions, [0, 0, 0]);
}

#[test]
fn shared_region_is_one_memory_for_host_and_device() {
    let Some((_lock, b)) = gpu() else { return };
    let g = b.caps().granularity;
    let size = 4 * g;
    let r = b.reserve(size, Storage::Shared, false).unwrap();
    let host = r.host_base.expect("shared regions have a host address");
    assert_eq!(r.base % g as u64, 0);
    println!("shared region: device {:#x}, host {host:#x}", r.base);

    // Written through the host address (by `write`), read through the device address.
    let data = pattern(11, 4096);
    b.write(&r, g + 100, &data).unwrap();
    let mut out = vec![0u8; data.len()];
    b.read(&r, g + 100, &mut out).unwrap();
    assert!(
        out == data,
        "cuMemcpyDtoH of the device pointer sees the host write"
    );

    // Written through the device address, read through the host pointer.
    b.bind_to_thread().unwrap();
    // SAFETY: `[base + 3g, base + 3g + 4096)` lies inside the live shared region.
    let status = unsafe { sys::cuMemsetD8_v2(r.base + 3 * g as u64, 0xAB, 4096) };
    check("cuMemsetD8", status);
    // SAFETY: the legacy default stream is valid with the context current.
    check("cuStreamSynchronize", unsafe {
        sys::cuStreamSynchronize(std::ptr::null_mut())
    });
    // SAFETY: the host mapping of the region is live and 4 * g bytes long; the device is done
    // writing (synchronised above); nothing else writes it meanwhile.
    let seen = unsafe { std::slice::from_raw_parts((host as usize + 3 * g) as *const u8, 4096) };
    assert!(seen.iter().all(|&x| x == 0xAB));

    assert!(b.write(&r, size - 1, &[0, 0]).is_err(), "out of bounds");
    assert!(
        b.map(&r, 0, g).is_err(),
        "shared regions are not page-mapped"
    );
    b.release(&r).unwrap();
}

/// A stream callback that blocks the stream until the flag is set (or 20 s pass).
unsafe extern "C" fn gate(user: *mut c_void) {
    // SAFETY: `user` points to a leaked (so never freed) `AtomicBool`.
    let open = unsafe { &*(user as *const AtomicBool) };
    let start = Instant::now();
    while !open.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn events_on_a_stream() {
    let Some((_lock, b)) = gpu() else { return };
    b.bind_to_thread().unwrap();
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: `stream` is a valid out-pointer; the backend's context is current.
    check("cuStreamCreate", unsafe {
        sys::cuStreamCreate(
            &mut stream,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
        )
    });
    // Leaked, so the callback may read it whenever it runs, even if the test fails first.
    let open: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    // SAFETY: `gate` only reads the flag, which is never freed.
    check("cuLaunchHostFunc", unsafe {
        sys::cuLaunchHostFunc(stream, Some(gate), open as *const AtomicBool as *mut c_void)
    });
    let stream_id = stream as usize as u64;
    let recorded = b.record_event(stream_id);
    let pending = recorded
        .as_ref()
        .map(|ev| b.event_complete(ev))
        .map_err(Clone::clone);
    open.store(true, Ordering::Release);
    let ev = recorded.unwrap();
    assert_eq!(pending, Ok(Ok(false)), "the stream is held by the gate");
    b.wait_event(&ev).unwrap();
    assert_eq!(b.event_complete(&ev), Ok(true));

    // Events are pooled: a dropped event is reused by the next record.
    drop(ev);
    let idle = b.stats().idle_events;
    assert!(idle >= 1);
    let ev0 = b.record_event(0).unwrap();
    assert_eq!(b.stats().idle_events, idle - 1);
    b.wait_event(&ev0).unwrap();
    assert_eq!(b.event_complete(&ev0), Ok(true));

    // Events may be queried and dropped on another thread.
    let b = Arc::new(b);
    let ev = b.record_event(stream_id).unwrap();
    let b2 = Arc::clone(&b);
    std::thread::spawn(move || {
        b2.wait_event(&ev).unwrap();
        assert_eq!(b2.event_complete(&ev), Ok(true));
    })
    .join()
    .unwrap();

    b.bind_to_thread().unwrap();
    // SAFETY: `stream` was created above and is destroyed once, after its work is done.
    check("cuStreamSynchronize", unsafe {
        sys::cuStreamSynchronize(stream)
    });
    // SAFETY: as above.
    check("cuStreamDestroy", unsafe {
        sys::cuStreamDestroy_v2(stream)
    });
}

#[test]
fn callers_context_is_restored() {
    let Some((_lock, b)) = gpu() else { return };
    // SAFETY: setting no context is always allowed.
    check("cuCtxSetCurrent", unsafe {
        sys::cuCtxSetCurrent(std::ptr::null_mut())
    });
    let _ = b.memory_info();
    let r = b
        .reserve(b.caps().granularity, Storage::Private, false)
        .unwrap();
    b.map(&r, 0, r.size).unwrap();
    let mut current: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: `current` is a valid out-pointer.
    check("cuCtxGetCurrent", unsafe {
        sys::cuCtxGetCurrent(&mut current)
    });
    assert!(current.is_null(), "the backend left its context current");
    b.release(&r).unwrap();
    b.bind_to_thread().unwrap();
    // SAFETY: as above.
    check("cuCtxGetCurrent", unsafe {
        sys::cuCtxGetCurrent(&mut current)
    });
    assert_eq!(current, b.raw_context());
}

#[test]
fn out_of_memory_is_marked() {
    let Some((_lock, b)) = gpu_with(per_map(PartialUnmap::Defer)) else {
        return;
    };
    let g = b.caps().granularity;
    let too_much = (b.memory_info().total + g).next_multiple_of(g);
    let err = b.reserve(too_much, Storage::Private, true).unwrap_err();
    assert!(err.out_of_memory, "{err}");
    assert_eq!(err.op, BackendOp::Reserve);
    // Address space for it is fine; the pages are not.
    let r = b.reserve(too_much, Storage::Private, false).unwrap();
    let err = b.map(&r, 0, too_much).unwrap_err();
    assert!(err.out_of_memory, "{err}");
    assert_eq!(err.op, BackendOp::Map);
    assert!(err.message.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{err}");
    assert_eq!(b.stats().physical_bytes, 0);
    b.release(&r).unwrap();
}

/// With one handle per page, a map larger than the device runs out part way: every page made
/// so far is unmapped and released again (about a second on an 80 GB device).
#[test]
fn out_of_memory_per_page_gives_everything_back() {
    let Some((_lock, b)) = gpu_with(per_page()) else {
        return;
    };
    let g = b.caps().granularity;
    let free_start = free_memory(&b);
    let too_much = (b.memory_info().total + g).next_multiple_of(g);
    let r = b.reserve(too_much, Storage::Private, false).unwrap();
    let t = Instant::now();
    let err = b.map(&r, 0, too_much).unwrap_err();
    println!(
        "failed map of {} pages: {:.2} s, {} pages made and given back",
        too_much / g,
        t.elapsed().as_secs_f64(),
        b.stats().mem_release
    );
    assert!(err.out_of_memory, "{err}");
    assert!(err.message.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{err}");
    let s = b.stats();
    assert_eq!((s.physical_bytes, s.handles, s.mapped_bytes), (0, 0, 0));
    assert_eq!(s.mem_create, s.mem_release);
    assert!(free_memory(&b) + g >= free_start, "all memory came back");
    // The region is still usable.
    b.map(&r, 0, 2 * g).unwrap();
    write_pages(&b, &r, 0, 2, 80);
    assert_pages(&b, &r, 0, 2, 80);
    b.release(&r).unwrap();
}

#[test]
fn one_backend_many_threads() {
    let Some((_lock, b)) = gpu() else { return };
    let b = Arc::new(b);
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let g = b.caps().granularity;
                for _ in 0..5 {
                    let r = b.reserve(4 * g, Storage::Private, false).unwrap();
                    b.map(&r, 0, 2 * g).unwrap();
                    b.map(&r, 2 * g, 2 * g).unwrap();
                    write_pages(&b, &r, 0, 4, t);
                    assert_pages(&b, &r, 0, 4, t);
                    b.unmap(&r, g, 2 * g).unwrap();
                    assert_pages(&b, &r, 0, 1, t);
                    b.release(&r).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = b.stats();
    assert_eq!(s.regions, [0, 0, 0]);
    assert_eq!(s.mem_create, s.mem_release);
}

#[test]
fn every_device() {
    let Some((_lock, b0)) = gpu() else { return };
    let n = device_count().unwrap();
    if n < 2 {
        println!("skipping the multi-device part: {n} device(s)");
    }
    let mut backends = vec![b0];
    for i in 1..n {
        backends.push(CudaBackend::new(i).unwrap());
    }
    // Interleave calls on one thread: each call must bind its own device's context.
    let regions: Vec<Region> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let g = b.caps().granularity;
            let r = b.reserve(2 * g, Storage::Private, false).unwrap();
            b.map(&r, 0, 2 * g).unwrap();
            write_pages(b, &r, 0, 2, 40 + i as u8);
            r
        })
        .collect();
    for (i, (b, r)) in backends.iter().zip(&regions).enumerate() {
        assert_eq!(b.ordinal(), i);
        assert_pages(b, r, 0, 2, 40 + i as u8);
        let ev = b.record_event(0).unwrap();
        b.wait_event(&ev).unwrap();
    }
    for (b, r) in backends.iter().zip(&regions) {
        b.release(r).unwrap();
    }
}

/// Prints what one map and one unmap cost through the backend (driver calls included), for
/// the record; asserts nothing about speed.
#[test]
fn map_unmap_cost() {
    let modes = [
        PhysicalGranularity::default(),
        PhysicalGranularity::PerPage,
        PhysicalGranularity::PerMap(PartialUnmap::Defer),
    ];
    for physical in modes {
        let options = CudaOptions {
            physical,
            ..CudaOptions::default()
        };
        let Some((_lock, b)) = gpu_with(options) else {
            return;
        };
        let g = b.caps().granularity;
        for pages in [1usize, 4, 16] {
            let len = pages * g;
            let r = b.reserve(len, Storage::Private, false).unwrap();
            let (mut map_us, mut unmap_us) = (Vec::new(), Vec::new());
            for _ in 0..50 {
                let t = Instant::now();
                b.map(&r, 0, len).unwrap();
                map_us.push(t.elapsed().as_secs_f64() * 1e6);
                let t = Instant::now();
                b.unmap(&r, 0, len).unwrap();
                unmap_us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            b.release(&r).unwrap();
            map_us.sort_by(f64::total_cmp);
            unmap_us.sort_by(f64::total_cmp);
            println!(
                "{physical:?}, {} MiB: map {:.1} us, unmap {:.1} us (medians of 50)",
                len >> 20,
                map_us[25],
                unmap_us[25]
            );
        }
    }
}

/// Random map/unmap sequences on the device, with each physical granularity (partial unmaps
/// of pieces included, which the engine never makes): the driver accepts every call the page
/// table makes, every mapped page keeps its bytes (except with `Recreate`), and one handle
/// per page never holds memory.
#[test]
fn random_map_unmap_sequences() {
    const N: usize = 32;
    const PROBE: usize = 4096;
    let modes = [
        PhysicalGranularity::default(),
        PhysicalGranularity::PerPage,
        PhysicalGranularity::PerMap(PartialUnmap::Defer),
        PhysicalGranularity::PerMap(PartialUnmap::Recreate),
    ];
    for physical in modes {
        let options = CudaOptions {
            physical,
            ..CudaOptions::default()
        };
        let Some((_lock, b)) = gpu_with(options) else {
            return;
        };
        let keeps_contents = physical != PhysicalGranularity::PerMap(PartialUnmap::Recreate);
        let g = b.caps().granularity;
        let r = b.reserve(N * g, Storage::Private, false).unwrap();
        let mut live = [None::<u8>; N];
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut probe = vec![0u8; PROBE];
        for step in 0..300u32 {
            let a = (next() % N as u64) as usize;
            let n = 1 + (next() % (N - a).min(8) as u64) as usize;
            if live[a..a + n].iter().all(Option::is_none) {
                b.map(&r, a * g, n * g).unwrap();
                for (p, slot) in live.iter_mut().enumerate().skip(a).take(n) {
                    let v = (step as u8).wrapping_add(p as u8);
                    b.write(&r, p * g, &[v; PROBE]).unwrap();
                    *slot = Some(v);
                }
            } else if live[a..a + n].iter().all(Option::is_some) {
                b.unmap(&r, a * g, n * g).unwrap();
                live[a..a + n].fill(None);
            }
            for (p, v) in live.iter().enumerate() {
                match v {
                    Some(v) => {
                        b.read(&r, p * g, &mut probe).unwrap();
                        if keeps_contents {
                            assert!(probe.iter().all(|x| x == v), "step {step} page {p}");
                        }
                    }
                    None => assert!(b.read(&r, p * g, &mut probe).is_err()),
                }
            }
            let s = b.stats();
            let n_live = live.iter().filter(|v| v.is_some()).count();
            assert_eq!(s.mapped_bytes, n_live * g);
            if physical == PhysicalGranularity::PerPage {
                assert_eq!((s.physical_bytes, s.held_bytes), (n_live * g, 0));
            }
        }
        let s = b.stats();
        println!(
            "{physical:?}: {} creates, {} access calls, {} unmaps, {} bytes held at the end",
            s.mem_create, s.mem_set_access, s.mem_unmap, s.held_bytes
        );
        b.release(&r).unwrap();
        assert_eq!(b.stats().mem_create, b.stats().mem_release);
    }
}
