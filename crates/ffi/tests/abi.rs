//! The C ABI end to end, on the host backend (no GPU needed), calling the exported functions
//! exactly as C does.
//!
//! The registry is global to the process and the tests run as threads of one process, so:
//! [`setup`] runs once before any test body (it selects 4 host devices and checks
//! `bufferheap_configure` while nothing is initialized yet), and a test that checks exact
//! figures owns its device: 0 is shared (no exact counts), 1 belongs to
//! `stats_snapshot_and_empty_cache`, 2 to `watermarks_memory_fraction_and_oom`, 3 to
//! `free_names_the_wrong_device`.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ptr::null_mut;
use std::sync::Once;

use bufferheap_core::ALIGN;
use bufferheap_ffi::*;
use serde_json::Value;

const DEVICES: usize = 4;
const SHARED: c_int = 0;
const STATS_DEVICE: c_int = 1;
const LIMITS_DEVICE: c_int = 2;
const CROSS_DEVICE: c_int = 3;

fn configure(key: &str, value: &str) -> c_int {
    let key = std::ffi::CString::new(key).unwrap();
    let value = std::ffi::CString::new(value).unwrap();
    // SAFETY: both are valid NUL-terminated strings that outlive the call.
    unsafe { bufferheap_configure(key.as_ptr(), value.as_ptr()) }
}

fn last_error() -> String {
    // SAFETY: the library returns a valid NUL-terminated string it owns, valid until this
    // thread's next failing call; it is copied at once.
    unsafe { CStr::from_ptr(bufferheap_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        select_backend(BackendChoice {
            kind: Some(BackendKind::Host),
            host_devices: DEVICES,
            host_memory: None,
        })
        .unwrap();
        assert_eq!(bufferheap_initialized(), 0);
        // configure before the first allocation: accepted, or refused with a reason
        assert_eq!(configure("policy", "default"), 0, "{}", last_error());
        assert_eq!(
            configure("high_watermark_ratio", "1.7"),
            0,
            "{}",
            last_error()
        );
        assert_eq!(
            configure("low_watermark_ratio", "1.0"),
            0,
            "{}",
            last_error()
        );
        assert_eq!(configure("debug", "0"), 0, "{}", last_error());
        assert_eq!(configure("history", "10000"), 0, "{}", last_error());
        assert_eq!(configure("policy", "bogus"), -1);
        assert!(last_error().contains("unknown policy"), "{}", last_error());
        assert_eq!(configure("no_such_key", "1"), -1);
        assert!(last_error().contains("unknown setting"), "{}", last_error());
        assert_eq!(configure("low_watermark_ratio", "1.8"), -1);
        assert!(last_error().contains("must not exceed"), "{}", last_error());
        assert_eq!(configure("high_watermark_ratio", "abc"), -1);
        assert!(last_error().contains("not a number"), "{}", last_error());
        // SAFETY: NULL key and value are allowed (answered with an error).
        let status = unsafe { bufferheap_configure(std::ptr::null(), std::ptr::null()) };
        assert_eq!(status, -1);
        assert!(last_error().contains("must not be NULL"));
        assert_eq!(bufferheap_initialized(), 0);
    });
}

/// Takes a JSON string from the library and gives it back.
fn take_json(ptr: *mut c_char) -> Option<Value> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: non-NULL strings from the library are valid NUL-terminated C strings.
    let text = unsafe { CStr::from_ptr(ptr) }.to_str().unwrap().to_owned();
    // SAFETY: `ptr` came from the library and is freed once, here.
    unsafe { bufferheap_string_free(ptr) };
    Some(serde_json::from_str(&text).expect("valid JSON"))
}

fn stats(device: c_int) -> Value {
    take_json(bufferheap_stats_json(device)).unwrap_or_else(|| panic!("{}", last_error()))
}

fn stat(device: c_int, key: &str) -> u64 {
    stats(device)[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing"))
}

fn malloc(size: isize, device: c_int) -> *mut c_void {
    bufferheap_malloc(size, device, null_mut())
}

fn free(ptr: *mut c_void, device: c_int) {
    bufferheap_free(ptr, 0, device, null_mut());
}

fn fill(ptr: *mut c_void, len: usize, byte: u8) {
    // SAFETY: `ptr` is a live host-backend buffer of at least `len` bytes.
    unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), byte, len) };
}

/// True if the buffer still holds `byte` (checked at both ends and every 509 bytes).
fn holds(ptr: *mut c_void, len: usize, byte: u8) -> bool {
    // SAFETY: `ptr` is a live host-backend buffer of at least `len` bytes, written before.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len) };
    let ends = bytes.iter().take(64).chain(bytes.iter().rev().take(64));
    ends.chain(bytes.iter().step_by(509)).all(|&b| b == byte)
}

fn rounded(size: usize) -> u64 {
    size.div_ceil(ALIGN) as u64 * ALIGN as u64
}

#[test]
fn signatures_match_the_contract() {
    // The header's declarations, as Rust function pointer types: a mismatch fails to compile.
    let _: extern "C-unwind" fn(isize, c_int, *mut c_void) -> *mut c_void = bufferheap_malloc;
    let _: extern "C" fn(*mut c_void, isize, c_int, *mut c_void) = bufferheap_free;
    let _: unsafe extern "C" fn(usize, c_int, *mut c_void, *mut *mut c_void) -> c_int =
        bufferheap_try_malloc;
    let _: extern "C" fn(c_int) = bufferheap_init;
    let _: extern "C" fn() = bufferheap_reset;
    let _: extern "C" fn(f64, c_int) = bufferheap_set_memory_fraction;
    let _: extern "C" fn(*mut c_void, *mut c_void) = bufferheap_record_stream;
    let _: unsafe extern "C" fn(*mut c_void, *mut usize) -> *mut c_void = bufferheap_base_alloc;
    let _: unsafe extern "C" fn(*const c_char, *const c_char) -> c_int = bufferheap_configure;
    let _: unsafe extern "C" fn(*const c_char) -> c_int = bufferheap_configure_all;
    let _: extern "C" fn() -> c_int = bufferheap_initialized;
    let _: extern "C" fn(c_int) -> *mut c_char = bufferheap_stats_json;
    let _: extern "C" fn(c_int) -> *mut c_char = bufferheap_snapshot_json;
    let _: unsafe extern "C" fn(*mut c_char) = bufferheap_string_free;
    let _: extern "C" fn(c_int) -> c_int = bufferheap_empty_cache;
    let _: extern "C" fn(c_int) -> c_int = bufferheap_reset_peak;
    let _: extern "C" fn(c_int) -> c_int = bufferheap_reset_accumulated;
    let _: unsafe extern "C" fn(c_int, *mut usize) -> c_int = bufferheap_largest_available;
    let _: unsafe extern "C" fn(c_int, *const *const c_char, usize, *mut i64) -> c_int =
        bufferheap_stats_values;
    let _: extern "C" fn(c_int, f64, f64) -> c_int = bufferheap_set_watermarks;
    let _: extern "C" fn() -> *const c_char = bufferheap_last_error;
}

#[test]
fn round_trip_writes_memory_and_finds_the_base() {
    setup();
    let size = (1 << 20) + 123;
    let p = malloc(size as isize, SHARED);
    assert!(!p.is_null(), "{}", last_error());
    fill(p, size, 0x5a);
    assert!(holds(p, size, 0x5a));
    let mut heap_size = 0usize;
    let inner = p.cast::<u8>().wrapping_add(1000).cast::<c_void>();
    // SAFETY: `heap_size` is a valid, writable size_t.
    let base = unsafe { bufferheap_base_alloc(inner, &mut heap_size) };
    assert!(!base.is_null(), "{}", last_error());
    assert!(base as usize <= p as usize && p as usize + size <= base as usize + heap_size);
    // SAFETY: a NULL size pointer is allowed.
    assert_eq!(unsafe { bufferheap_base_alloc(p, null_mut()) }, base);
    free(p, SHARED);
    assert_eq!(bufferheap_initialized(), 1);
}

#[test]
fn zero_negative_and_unknown_device() {
    setup();
    assert!(malloc(0, SHARED).is_null());
    assert!(malloc(-5, SHARED).is_null());
    assert!(
        last_error().contains("negative size -5"),
        "{}",
        last_error()
    );
    assert!(malloc(4096, 99).is_null());
    let e = last_error();
    assert!(
        e.contains("invalid device 99") && e.contains("4 host devices"),
        "{e}"
    );
    assert!(malloc(4096, -1).is_null());
    assert!(last_error().contains("invalid device -1"));
    assert!(bufferheap_stats_json(99).is_null());
    assert!(last_error().contains("invalid device 99"));
}

#[test]
fn bad_frees_are_reported_and_harm_nothing() {
    setup();
    let keep = malloc(8192, SHARED);
    let p = malloc(4096, SHARED);
    assert!(!keep.is_null() && !p.is_null(), "{}", last_error());
    fill(keep, 8192, 7);
    free(p, SHARED);
    free(p, SHARED);
    let e = last_error();
    assert!(e.contains(&format!("{:#x}", p as usize)), "{e}");
    assert!(e.contains("freed twice"), "{e}");
    let mut local = 0u64;
    let foreign = (&mut local as *mut u64).cast::<c_void>();
    free(foreign, SHARED);
    let e = last_error();
    assert!(e.contains("not allocated by bufferheap"), "{e}");
    // NULL: nothing happens, the last error stays as it was
    free(null_mut(), SHARED);
    assert_eq!(last_error(), e);
    assert!(holds(keep, 8192, 7));
    free(keep, SHARED);
}

#[test]
fn free_names_the_wrong_device() {
    setup();
    let p = malloc(1 << 16, CROSS_DEVICE);
    assert!(!p.is_null(), "{}", last_error());
    assert_eq!(stat(CROSS_DEVICE, "allocation.all.current"), 1);
    free(p, SHARED);
    assert_eq!(stat(CROSS_DEVICE, "allocation.all.current"), 0);
    assert_eq!(stat(CROSS_DEVICE, "allocated_bytes.all.current"), 0);
}

#[test]
fn record_stream_of_known_and_unknown_pointers() {
    setup();
    let mut local = 0u8;
    let foreign = (&mut local as *mut u8).cast::<c_void>();
    bufferheap_record_stream(foreign, 7usize as *mut c_void);
    assert!(last_error().contains("record_stream"), "{}", last_error());
    assert!(last_error().contains("not allocated by bufferheap"));
    let p = malloc(4096, SHARED);
    assert!(!p.is_null());
    // mark the last error, then check that a good call leaves it alone
    assert!(malloc(-1, SHARED).is_null());
    let mark = last_error();
    bufferheap_record_stream(p, 7usize as *mut c_void);
    bufferheap_record_stream(null_mut(), 7usize as *mut c_void);
    assert_eq!(last_error(), mark);
    free(p, SHARED);
}

#[test]
fn configure_after_init_is_refused() {
    setup();
    let p = malloc(512, SHARED);
    assert!(!p.is_null());
    assert_eq!(bufferheap_initialized(), 1);
    assert_eq!(configure("policy", "mps"), -1);
    let e = last_error();
    assert!(e.contains("must come before the first allocation"), "{e}");
    assert!(e.contains("policy=mps"), "{e}");
    assert_eq!(stats(SHARED)["policy"], "default");
    free(p, SHARED);
    bufferheap_init(DEVICES as c_int);
    bufferheap_reset();
}

#[test]
fn stats_snapshot_and_empty_cache() {
    setup();
    let d = STATS_DEVICE;
    let s = stats(d);
    assert_eq!(s["device"], 1);
    assert_eq!(s["policy"], "default");
    for key in [
        "allocated_bytes.all.current",
        "reserved_bytes.all.peak",
        "requested_bytes.large_pool.allocated",
        "num_ooms",
        "num_alloc_retries",
        "low_watermark_limit",
        "high_watermark_limit",
    ] {
        assert!(s.get(key).is_some(), "{key} missing from {s}");
    }
    let sizes = [1000usize, 3 << 20, 70_000];
    let ptrs: Vec<_> = sizes.iter().map(|&n| malloc(n as isize, d)).collect();
    assert!(ptrs.iter().all(|p| !p.is_null()), "{}", last_error());
    let s = stats(d);
    let want: u64 = sizes.iter().map(|&n| rounded(n)).sum();
    assert_eq!(s["allocated_bytes.all.current"], want);
    assert_eq!(
        s["requested_bytes.all.current"],
        sizes.iter().sum::<usize>() as u64
    );
    assert_eq!(s["allocation.all.current"], 3);
    assert!(s["high_watermark_limit"].as_u64().unwrap() > 0);

    let snap = take_json(bufferheap_snapshot_json(d)).unwrap();
    // The allocation history is kept (configured in setup): our three allocations are in it,
    // in PyTorch's trace shape.
    let traces = snap["device_traces"].as_array().unwrap();
    assert_eq!(traces.len(), 1);
    let allocs: Vec<&Value> = traces[0]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "alloc")
        .collect();
    for (&p, &n) in ptrs.iter().zip(&sizes) {
        let e = allocs
            .iter()
            .find(|e| e["addr"] == p as u64)
            .unwrap_or_else(|| panic!("alloc of {p:?} missing from the trace"));
        // The size requested, as PyTorch's traces record it.
        assert_eq!(e["size"], n as u64);
        assert!(e["time_us"].as_i64().unwrap() > 0);
        assert_eq!(e["frames"], serde_json::json!([]));
    }
    let segments = snap["segments"].as_array().unwrap();
    assert!(!segments.is_empty());
    for seg in segments {
        for key in [
            "device",
            "address",
            "total_size",
            "allocated_size",
            "active_size",
            "requested_size",
            "stream",
            "segment_type",
            "segment_pool_id",
            "is_expandable",
            "frames",
            "blocks",
        ] {
            assert!(seg.get(key).is_some(), "{key} missing from {seg}");
        }
        assert_eq!(seg["device"], 1);
        assert_eq!(seg["segment_pool_id"], serde_json::json!([0, 0]));
        let block_sum: u64 = seg["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["size"].as_u64().unwrap())
            .sum();
        assert_eq!(block_sum, seg["total_size"].as_u64().unwrap());
    }
    let blocks: Vec<&Value> = segments
        .iter()
        .flat_map(|s| s["blocks"].as_array().unwrap())
        .collect();
    for (&p, &n) in ptrs.iter().zip(&sizes) {
        let b = blocks
            .iter()
            .find(|b| b["address"] == p as u64)
            .unwrap_or_else(|| panic!("block {p:?} missing"));
        assert_eq!(b["state"], "active_allocated");
        assert_eq!(b["requested_size"], n as u64);
        assert_eq!(b["size"], rounded(n));
        assert_eq!(b["frames"], serde_json::json!([]));
    }
    let all = take_json(bufferheap_snapshot_json(-1)).unwrap();
    assert_eq!(all["device_traces"].as_array().unwrap().len(), DEVICES);
    assert!(bufferheap_snapshot_json(42).is_null());
    assert!(last_error().contains("invalid device 42"));

    // the same figures by name, as the C++ front reads them
    let names = [
        "allocation.all.current",
        "allocated_bytes.all.peak",
        "no_such_key",
    ]
    .map(|k| std::ffi::CString::new(k).unwrap());
    let keys: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
    let mut out = [-1i64; 3];
    // SAFETY: three valid NUL-terminated strings and room for three integers.
    let known = unsafe { bufferheap_stats_values(d, keys.as_ptr(), 3, out.as_mut_ptr()) };
    assert_eq!((known, out), (2, [3, want as i64, 0]));
    // SAFETY: with n = 0 nothing is read or written.
    let known = unsafe { bufferheap_stats_values(42, std::ptr::null(), 0, null_mut()) };
    assert_eq!(known, -1);
    assert!(last_error().contains("invalid device 42"));

    for &p in &ptrs {
        free(p, d);
    }
    // cumulative counts start again from zero; gauges and peaks stay
    assert!(stat(d, "allocation.all.allocated") >= 3);
    assert_eq!(bufferheap_reset_accumulated(d), 0);
    assert_eq!(stat(d, "allocation.all.allocated"), 0);
    assert_eq!(stat(d, "allocation.all.freed"), 0);
    assert_eq!(stat(d, "allocated_bytes.all.peak"), want);
    let s = stats(d);
    assert_eq!(s["allocated_bytes.all.current"], 0);
    assert_eq!(s["allocated_bytes.all.peak"], want);
    let reserved = s["reserved_bytes.all.current"].as_u64().unwrap();
    assert!(reserved > 0);
    assert_eq!(bufferheap_empty_cache(d), 0, "{}", last_error());
    let s = stats(d);
    assert!(s["reserved_bytes.all.current"].as_u64().unwrap() < reserved);
    assert_eq!(s["reserved_bytes.all.current"], 0);
    assert_eq!(bufferheap_reset_peak(d), 0);
    assert_eq!(stat(d, "allocated_bytes.all.peak"), 0);
    assert_eq!(bufferheap_empty_cache(-1), 0);
    assert_eq!(bufferheap_reset_peak(-1), 0);
    assert_eq!(bufferheap_empty_cache(7), -1);
    assert!(last_error().contains("invalid device 7"));
    assert_eq!(bufferheap_reset_peak(-2), -1);
}

#[test]
fn watermarks_memory_fraction_and_oom() {
    setup();
    let d = LIMITS_DEVICE;
    assert_eq!(bufferheap_set_watermarks(d, 1.5, 1.0), -1);
    let e = last_error();
    assert!(e.contains("bufferheap_set_watermarks(2, 1.5, 1)"), "{e}");
    assert!(e.contains("must not exceed"), "{e}");
    assert_eq!(bufferheap_set_watermarks(-1, 0.5, 1.0), -1);
    assert!(last_error().contains("invalid device -1"));
    assert_eq!(
        bufferheap_set_watermarks(d, 0.0, 0.0),
        0,
        "{}",
        last_error()
    );
    let s = stats(d);
    assert!(s["low_watermark_limit"].is_null() && s["high_watermark_limit"].is_null());

    // the memory fraction is the high ratio; the low ratio follows it down
    assert_eq!(bufferheap_set_watermarks(d, 1.0, 1.5), 0);
    let chosen_low = stat(d, "low_watermark_limit");
    bufferheap_set_memory_fraction(0.5, d);
    let s = stats(d);
    let high = s["high_watermark_limit"].as_u64().unwrap();
    assert_eq!(s["low_watermark_limit"].as_u64().unwrap(), high);
    let mark = last_error();
    bufferheap_set_memory_fraction(-0.5, d);
    assert!(
        last_error().contains("invalid fraction -0.5"),
        "{}",
        last_error()
    );
    bufferheap_set_memory_fraction(f64::NAN, d);
    assert!(last_error().contains("invalid fraction NaN"));
    assert_ne!(last_error(), mark);
    assert_eq!(stat(d, "high_watermark_limit"), high);

    // a tiny limit: out of memory, reported with figures, NULL returned
    bufferheap_set_memory_fraction(1e-6, d);
    let ooms = stat(d, "num_ooms");
    assert!(malloc(64 << 20, d).is_null());
    let e = last_error();
    assert!(
        e.contains("out of memory") && e.contains("Tried to allocate"),
        "{e}"
    );
    assert!(e.contains("device 2"), "{e}");
    assert_eq!(stat(d, "num_ooms"), ooms + 1);
    // a fraction of 0 allows nothing (as in PyTorch), not "no limit"
    assert_eq!(bufferheap_empty_cache(d), 0);
    bufferheap_set_memory_fraction(0.0, d);
    assert!(malloc(512, d).is_null());
    assert!(last_error().contains("out of memory"));
    // and back up: the low watermark returns to the one chosen, not the fractions' lowest
    bufferheap_set_memory_fraction(1.2, d);
    assert_eq!(stat(d, "low_watermark_limit"), chosen_low);
    bufferheap_set_memory_fraction(0.0, d);
    // the C++ front's entry: out of memory is told apart from other failures
    assert_eq!(try_malloc(512, d).1, 1);
    assert!(last_error().contains("out of memory"));
    assert_eq!(try_malloc(1 << 60, d).1, 1);
    assert!(
        last_error().contains("not below the device's limit"),
        "{}",
        last_error()
    );
    let ooms = stat(d, "num_ooms");
    assert_eq!(try_malloc(usize::MAX, d).1, 1);
    assert!(
        last_error().contains("not below the device's limit"),
        "{}",
        last_error()
    );
    assert_eq!(
        stat(d, "num_ooms"),
        ooms + 1,
        "a request past isize::MAX counts as out of memory"
    );
    assert_eq!(try_malloc(512, 99).1, -1);
    assert!(
        last_error().contains("invalid device 99"),
        "{}",
        last_error()
    );
    // SAFETY: a NULL `out` is refused before anything is written.
    let answer = unsafe { bufferheap_try_malloc(512, d, null_mut(), null_mut()) };
    assert_eq!(answer, -1);
    assert!(last_error().contains("`out` is NULL"));
    // nothing more can be had under a fraction of 0
    let mut largest = usize::MAX;
    // SAFETY: `largest` is a valid place for one size_t.
    assert_eq!(unsafe { bufferheap_largest_available(d, &mut largest) }, 0);
    assert_eq!(largest, 0);
    // SAFETY: a NULL `out` is refused before anything is written.
    let answer = unsafe { bufferheap_largest_available(d, null_mut()) };
    assert_eq!(answer, -1);
    // lifted again
    assert_eq!(bufferheap_set_watermarks(d, 0.0, 0.0), 0);
    // SAFETY: as above.
    assert_eq!(unsafe { bufferheap_largest_available(d, &mut largest) }, 0);
    assert!(largest >= 64 << 20, "{largest}");
    let p = malloc(64 << 20, d);
    assert!(!p.is_null(), "{}", last_error());
    free(p, d);
    let (p, answer) = try_malloc(64 << 20, d);
    assert_eq!(answer, 0, "{}", last_error());
    assert!(!p.is_null());
    assert_eq!(try_malloc(0, d), (null_mut(), 0));
    // freed by address alone: no size, no device
    bufferheap_free(p, 0, -1, null_mut());
    assert_eq!(stat(d, "allocated_bytes.all.current"), 0);
}

/// `bufferheap_try_malloc` on the default stream: the pointer and the answer.
fn try_malloc(size: usize, device: c_int) -> (*mut c_void, c_int) {
    let mut out = std::ptr::dangling_mut::<c_void>(); // overwritten by every answer
    // SAFETY: `out` is a valid place for one pointer.
    let answer = unsafe { bufferheap_try_malloc(size, device, null_mut(), &mut out) };
    (out, answer)
}

#[test]
fn many_threads_allocate_and_free_at_once() {
    setup();
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut live: Vec<(usize, usize)> = Vec::new();
                let mut x = 0x9e37_79b9_u32.wrapping_mul(u32::from(t) + 1);
                for i in 0..1500 {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    // mostly small buffers, now and then a large one
                    let size = if i % 50 == 0 {
                        (1 << 20) + x as usize % (8 << 20)
                    } else {
                        1 + x as usize % (256 << 10)
                    };
                    let p = malloc(size as isize, SHARED);
                    assert!(!p.is_null(), "{}", last_error());
                    fill(p, size, t);
                    live.push((p as usize, size));
                    if live.len() > 16 || x.is_multiple_of(3) {
                        let (q, n) = live.swap_remove(x as usize % live.len());
                        assert!(holds(q as *mut c_void, n, t), "buffer overwritten");
                        free(q as *mut c_void, SHARED);
                    }
                }
                for (q, n) in live {
                    assert!(holds(q as *mut c_void, n, t), "buffer overwritten");
                    free(q as *mut c_void, SHARED);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn string_free_and_last_error_edge_cases() {
    setup();
    // SAFETY: NULL is allowed.
    unsafe { bufferheap_string_free(null_mut()) };
    let fresh = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(fresh, "");
}

#[test]
fn header_declares_exactly_the_exports() {
    let header = include_str!("../include/bufferheap.h");
    let mut declared: Vec<&str> = header
        .lines()
        .filter(|l| !l.trim_start().starts_with('*') && !l.trim_start().starts_with("/*"))
        .filter_map(|l| {
            let name_end = l.find('(')?;
            let name_start = l[..name_end].rfind([' ', '*'])? + 1;
            l[name_start..name_end]
                .starts_with("bufferheap_")
                .then(|| &l[name_start..name_end])
        })
        .collect();
    declared.sort_unstable();
    let mut exported = vec![
        "bufferheap_malloc",
        "bufferheap_try_malloc",
        "bufferheap_free",
        "bufferheap_init",
        "bufferheap_reset",
        "bufferheap_set_memory_fraction",
        "bufferheap_record_stream",
        "bufferheap_base_alloc",
        "bufferheap_configure",
        "bufferheap_configure_all",
        "bufferheap_initialized",
        "bufferheap_stats_json",
        "bufferheap_snapshot_json",
        "bufferheap_string_free",
        "bufferheap_empty_cache",
        "bufferheap_reset_peak",
        "bufferheap_reset_accumulated",
        "bufferheap_largest_available",
        "bufferheap_stats_values",
        "bufferheap_set_watermarks",
        "bufferheap_memory_snapshot",
        "bufferheap_record_history",
        "bufferheap_history_limit",
        "bufferheap_last_error",
    ];
    exported.sort_unstable();
    assert_eq!(declared, exported);
}

/// The contract: the exact function pointer types PyTorch and the C++ front use.
const CONTRACT: &str = r#"#include <bufferheap.h>
void *(*p_malloc)(ssize_t, int, void *) = bufferheap_malloc;
void (*p_free)(void *, ssize_t, int, void *) = bufferheap_free;
int (*p_try_malloc)(size_t, int, void *, void **) = bufferheap_try_malloc;
void (*p_init)(int) = bufferheap_init;
void (*p_reset)(void) = bufferheap_reset;
void (*p_fraction)(double, int) = bufferheap_set_memory_fraction;
void (*p_record)(void *, void *) = bufferheap_record_stream;
void *(*p_base)(void *, size_t *) = bufferheap_base_alloc;
int (*p_configure)(const char *, const char *) = bufferheap_configure;
int (*p_configure_all)(const char *) = bufferheap_configure_all;
int (*p_initialized)(void) = bufferheap_initialized;
char *(*p_stats)(int) = bufferheap_stats_json;
char *(*p_snapshot)(int) = bufferheap_snapshot_json;
void (*p_string_free)(char *) = bufferheap_string_free;
int (*p_empty)(int) = bufferheap_empty_cache;
int (*p_peak)(int) = bufferheap_reset_peak;
int (*p_accumulated)(int) = bufferheap_reset_accumulated;
int (*p_largest)(int, size_t *) = bufferheap_largest_available;
int (*p_values)(int, const char *const *, size_t, int64_t *) = bufferheap_stats_values;
int (*p_marks)(int, double, double) = bufferheap_set_watermarks;
int (*p_memory)(int, int, bufferheap_segment *, size_t, bufferheap_block *, size_t,
                bufferheap_trace_entry *, size_t, size_t *) = bufferheap_memory_snapshot;
int (*p_history)(size_t, int) = bufferheap_record_history;
int (*p_limit)(size_t *) = bufferheap_history_limit;
const char *(*p_error)(void) = bufferheap_last_error;
#include <stddef.h>
#ifdef __cplusplus
#define LAYOUT(c) static_assert(c, #c);
#else
#define LAYOUT(c) _Static_assert(c, #c);
#endif
"#;

/// The size of a field, from a projection to it.
fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    std::mem::size_of::<F>()
}

/// (name, offset, size) of each named field of a struct.
macro_rules! fields {
    ($ty:ty; $($field:ident),*) => {
        vec![$((
            stringify!($field),
            std::mem::offset_of!($ty, $field),
            field_size(|x: &$ty| &x.$field),
        )),*]
    };
}

/// C assertions that the header's structs have the Rust structs' sizes, and their fields the
/// same offsets and sizes.
fn layout_checks() -> String {
    use std::mem::size_of;
    let mut c = String::new();
    let mut check = |ty: &str, size: usize, fields: Vec<(&str, usize, usize)>| {
        c += &format!("LAYOUT(sizeof({ty}) == {size})\n");
        for (field, offset, len) in fields {
            c += &format!("LAYOUT(offsetof({ty}, {field}) == {offset})\n");
            c += &format!("LAYOUT(sizeof((({ty} *)0)->{field}) == {len})\n");
        }
    };
    check(
        "bufferheap_block",
        size_of::<BlockEntry>(),
        fields!(BlockEntry; address, size, requested_size, state),
    );
    check(
        "bufferheap_segment",
        size_of::<SegmentEntry>(),
        fields!(SegmentEntry; device, is_large, is_expandable, address, total_size,
            allocated_size, active_size, requested_size, stream, first_block, block_count),
    );
    check(
        "bufferheap_trace_entry",
        size_of::<TraceRecord>(),
        fields!(TraceRecord; action, device, addr, size, stream, time_us),
    );
    c
}

/// Compiles C and C++ code against the header with the contract's exact function pointer
/// types and the structs' layouts, where a C compiler is installed.
#[test]
fn header_compiles_with_the_contract_types() {
    let Some(cc) = ["cc", "gcc", "clang"].into_iter().find(|c| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        eprintln!("no C compiler: header check skipped");
        return;
    };
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let dir = std::env::temp_dir().join(format!("bufferheap-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("check.c");
    std::fs::write(&src, format!("{CONTRACT}{}", layout_checks())).unwrap();
    for lang in ["c", "c++"] {
        let out = std::process::Command::new(cc)
            .args([
                "-fsyntax-only",
                "-Wall",
                "-Werror",
                "-x",
                lang,
                "-I",
                include,
            ])
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cc} -x {lang}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
