//! The exported C functions (declared in `include/bufferheap.h`).
//!
//! Invariants:
//! - every function runs its body inside [`guard`]/[`status`]: no panic crosses the ABI;
//! - functions returning `int` answer 0 on success and -1 on failure, with the reason in
//!   `bufferheap_last_error()`; functions returning a pointer answer NULL on failure, likewise;
//! - `void` functions, and `bufferheap_malloc` (whose NULL PyTorch does not check), also write
//!   every failure to stderr, since their callers may never look at the last error;
//! - a pointer is looked up in the allocator of the device it is given with first, then in
//!   every other device's allocator: device addresses are unique in the process (one virtual
//!   address space), so at most one allocator knows it;
//! - `unsafe` is limited to the six functions that dereference pointers from C
//!   (`bufferheap_configure`, `bufferheap_base_alloc`, `bufferheap_string_free`,
//!   `bufferheap_try_malloc`, `bufferheap_stats_values`, `bufferheap_largest_available`).

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ptr::null_mut;

use bufferheap_core::{Error, MAX_RATIO, StreamId};

use crate::error::{
    FfiError, FfiResult, eprint_lines, guard, last_error_ptr, report, set_last_error, status,
};
use crate::json;
use crate::registry::{DeviceAllocator, Registry, registry};

fn stream_id(stream: *mut c_void) -> StreamId {
    stream as usize as StreamId
}

fn address(ptr: *mut c_void) -> u64 {
    ptr as usize as u64
}

fn null_note(size: isize, device: c_int) -> String {
    format!(
        "bufferheap: returning NULL for {size} bytes on device {device}; if the caller is \
         PyTorch, the tensor it builds on it is invalid (PyTorch does not check the pointer)"
    )
}

/// Allocates `size` bytes on `device` for use on `stream`. NULL for size 0 (no allocation).
/// On failure the reason is the last error and is written to stderr; inside PyTorch the call
/// then raises PyTorch's error with that reason (see `raise`), elsewhere it returns NULL.
#[unsafe(no_mangle)]
pub extern "C-unwind" fn bufferheap_malloc(
    size: isize,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    let mut failure = None;
    let ptr = guard("bufferheap_malloc", null_mut(), || {
        let result = match usize::try_from(size) {
            Ok(size) => malloc(size, device, stream_id(stream)),
            Err(_) => Err(FfiError::new(format!(
                "bufferheap: negative size {size} requested on device {device}; nothing was \
                 allocated"
            ))),
        };
        match result {
            Ok(ptr) => ptr,
            Err(e) => {
                report(&e);
                if !crate::raise::raises() {
                    eprint_lines(&null_note(size, device));
                }
                failure = Some(e.message);
                null_mut()
            }
        }
    });
    if let Some(message) = failure {
        // Outside `guard`: a C++ exception must not meet `catch_unwind`.
        crate::raise::raise_in_pytorch(&message);
    }
    ptr
}

fn malloc(size: usize, device: c_int, stream: StreamId) -> FfiResult<*mut c_void> {
    if size == 0 {
        return Ok(null_mut());
    }
    let reg = registry();
    let sys = reg.system()?;
    let d = sys.check_device(device)?;
    let allocator = sys.get_or_create(reg, d)?;
    match allocator.alloc_on(size, stream) {
        Ok(Some(buffer)) => Ok(buffer.ptr as usize as *mut c_void),
        Ok(None) => Ok(null_mut()),
        Err(Error::OutOfMemory(oom)) => Err(FfiError::out_of_memory(format!("{oom} (device {d})"))),
        // Larger than the device: PyTorch's own allocators call this out of memory too.
        Err(e @ Error::InvalidSize { .. }) => Err(FfiError::out_of_memory(format!(
            "bufferheap out of memory: allocation of {size} bytes on device {d} failed: {e}"
        ))),
        Err(e) => Err(FfiError::new(format!(
            "bufferheap: allocation of {size} bytes on device {d} failed: {e}"
        ))),
    }
}

/// `bufferheap_try_malloc`'s answers.
const ALLOCATED: c_int = 0;
const OUT_OF_MEMORY: c_int = 1;
const FAILED: c_int = -1;

/// Allocates like `bufferheap_malloc`, for callers that raise their own errors (the C++ front
/// of `bufferheap.torch`): never throws, never writes to stderr. 0 with `*out` set (NULL for
/// size 0), 1 when the device is out of memory, -1 on any other failure, the reason being
/// the last error either way. A size above `isize::MAX` is out of memory.
///
/// # Safety
/// `out` must be NULL (the call then fails) or point to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_try_malloc(
    size: usize,
    device: c_int,
    stream: *mut c_void,
    out: *mut *mut c_void,
) -> c_int {
    guard("bufferheap_try_malloc", FAILED, || {
        if out.is_null() {
            set_last_error("bufferheap_try_malloc: `out` is NULL; nothing was allocated");
            return FAILED;
        }
        // Sizes past `isize::MAX` reach the engine too, which refuses them as larger than the
        // device and counts the out-of-memory error as PyTorch does.
        // The caller raises the reason itself: a setup error is not written to stderr too.
        let result = crate::registry::quietly(|| malloc(size, device, stream_id(stream)));
        let (ptr, answer) = match result {
            Ok(ptr) => (ptr, ALLOCATED),
            Err(e) => {
                set_last_error(&e.message);
                (
                    null_mut(),
                    if e.out_of_memory {
                        OUT_OF_MEMORY
                    } else {
                        FAILED
                    },
                )
            }
        };
        // SAFETY: `out` is not NULL (checked above) and the caller guarantees it points to
        // writable storage for one pointer.
        unsafe { out.write(ptr) };
        answer
    })
}

/// Frees a pointer from `bufferheap_malloc`. NULL: nothing. A pointer bufferheap does not know
/// (never allocated here, or freed already): a message on stderr, nothing else happens.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_free(
    ptr: *mut c_void,
    size: isize,
    device: c_int,
    stream: *mut c_void,
) {
    let _ = stream;
    guard("bufferheap_free", (), || {
        if ptr.is_null() {
            return;
        }
        if let Err(e) = free(address(ptr), size, device) {
            report(&e);
        }
    })
}

/// What one allocator said about a pointer to free.
enum Freed {
    Done,
    NotHere,
    Failed(FfiError),
}

fn free_in(allocator: &DeviceAllocator, d: usize, ptr: u64, size: isize) -> Freed {
    // PyTorch passes the size it asked for: a hint that lets large buffers skip the thread's
    // front cache (a wrong one is still freed correctly).
    match allocator.free_sized(ptr, usize::try_from(size).unwrap_or(0)) {
        Ok(()) => Freed::Done,
        Err(Error::UnknownPointer(_)) => Freed::NotHere,
        Err(Error::DoubleFree(_)) => Freed::Failed(FfiError::new(format!(
            "bufferheap: free of pointer {ptr:#x} ignored: it was freed twice (device {d} \
             allocated it and it is free already)"
        ))),
        Err(e) => Freed::Failed(FfiError::new(format!(
            "bufferheap: free of pointer {ptr:#x} on device {d} failed: {e}"
        ))),
    }
}

/// Frees in the allocator of `device` first (no search, no allocation on this path), then in
/// the others.
fn free(ptr: u64, size: isize, device: c_int) -> FfiResult<()> {
    let reg = registry();
    let sys = reg.system()?;
    let hint = usize::try_from(device).ok();
    if let Some(d) = hint
        && let Some(allocator) = sys.existing(d)
    {
        match free_in(allocator, d, ptr, size) {
            Freed::Done => return Ok(()),
            Freed::Failed(e) => return Err(e),
            Freed::NotHere => {}
        }
    }
    for (d, allocator) in sys.all_existing().filter(|(d, _)| Some(*d) != hint) {
        match free_in(allocator, d, ptr, size) {
            Freed::Done => {
                if reg.debug() != 0 && hint.is_some() {
                    eprint_lines(&format!(
                        "bufferheap: free of {ptr:#x} named device {device}, but the pointer \
                         belongs to device {d}; freed there"
                    ));
                }
                return Ok(());
            }
            Freed::Failed(e) => return Err(e),
            Freed::NotHere => {}
        }
    }
    Err(FfiError::new(format!(
        "bufferheap: free of pointer {ptr:#x} ({size} bytes, device {device}) ignored: it was \
         not allocated by bufferheap or was freed twice"
    )))
}

/// PyTorch's `set_init_fn`: called once when CUDA starts. Freezes the configuration and starts
/// the backend (allocators are still created per device on first use); failed allocations
/// raise PyTorch's error from then on (see `raise`).
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_init(device_count: c_int) {
    guard("bufferheap_init", (), || {
        crate::raise::started_by_pytorch();
        let reg = registry();
        let started = reg
            .freeze("bufferheap_init was called")
            .and_then(|_| reg.system());
        match started {
            Ok(sys) if usize::try_from(device_count).ok() != Some(sys.count()) => {
                eprint_lines(&format!(
                    "bufferheap_init: the caller counts {device_count} devices, bufferheap sees \
                     {} ({} backend)",
                    sys.count(),
                    sys.kind
                ));
            }
            Ok(_) => {}
            Err(e) => report(&e),
        }
    })
}

/// PyTorch's `set_reset_fn` (`torch.cuda.empty_cache()`): empties the cache of every device.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_reset() {
    guard("bufferheap_reset", (), || {
        if let Err(e) = empty_cache(-1) {
            report(&e);
        }
    })
}

/// PyTorch's `set_memory_fraction_fn`: the high watermark ratio of `device` becomes
/// `fraction` (the low one is lowered to it if above). 0 allows no memory, as in PyTorch.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_set_memory_fraction(fraction: f64, device: c_int) {
    guard("bufferheap_set_memory_fraction", (), || {
        if let Err(e) = set_memory_fraction(fraction, device) {
            report(&e);
        }
    })
}

fn set_memory_fraction(fraction: f64, device: c_int) -> FfiResult<()> {
    if !fraction.is_finite() || !(0.0..=MAX_RATIO).contains(&fraction) {
        return Err(FfiError::new(format!(
            "bufferheap_set_memory_fraction: invalid fraction {fraction} for device {device}: \
             must be between 0.0 and {MAX_RATIO}; the limit is unchanged"
        )));
    }
    let reg = registry();
    let sys = reg.system()?;
    let d = sys.check_device(device)?;
    let allocator = sys.get_or_create(reg, d)?;
    // A ratio of 0 disables the limit; a fraction of 0 allows nothing.
    let high = if fraction == 0.0 {
        f64::MIN_POSITIVE
    } else {
        fraction
    };
    // The low watermark follows the fraction down and back up to the one chosen, never
    // above it (0, disabled, stays disabled).
    let mut chosen = sys.chosen_low(d).lock();
    let low = *chosen.get_or_insert(allocator.watermark_ratios().0);
    allocator
        .set_watermark_ratios(low.min(high), high)
        .map_err(|e| FfiError::new(format!("bufferheap_set_memory_fraction({fraction}): {e}")))
}

/// PyTorch's `set_record_stream_fn`: the buffer is used on `stream` too; when freed, it waits
/// for that stream's work before reuse. NULL: nothing (empty tensors have no storage).
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_record_stream(ptr: *mut c_void, stream: *mut c_void) {
    guard("bufferheap_record_stream", (), || {
        if ptr.is_null() {
            return;
        }
        if let Err(e) = record_stream(address(ptr), stream_id(stream)) {
            report(&e);
        }
    })
}

fn record_stream(ptr: u64, stream: StreamId) -> FfiResult<()> {
    let sys = registry().system()?;
    for (d, allocator) in sys.all_existing() {
        match allocator.record_stream(ptr, stream) {
            Ok(()) => return Ok(()),
            Err(Error::UnknownPointer(_)) => continue,
            Err(Error::NotInUse(_)) => {
                return Err(FfiError::new(format!(
                    "bufferheap: record_stream of pointer {ptr:#x} ignored: device {d}'s buffer \
                     there is not in use (it was freed)"
                )));
            }
            Err(e) => {
                return Err(FfiError::new(format!(
                    "bufferheap: record_stream of pointer {ptr:#x} on device {d} failed: {e}"
                )));
            }
        }
    }
    Err(FfiError::new(format!(
        "bufferheap: record_stream of pointer {ptr:#x} ignored: it was not allocated by \
         bufferheap"
    )))
}

/// PyTorch's `set_base_alloc_fn`: the base and size of the heap holding `ptr`. NULL (and a
/// size of 0) for a pointer bufferheap does not know.
///
/// # Safety
/// `size` is NULL or points to a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_base_alloc(ptr: *mut c_void, size: *mut usize) -> *mut c_void {
    let (base, len) = guard(
        "bufferheap_base_alloc",
        (null_mut(), 0),
        || match base_alloc(address(ptr)) {
            Ok((base, len)) => (base as usize as *mut c_void, len),
            Err(e) => {
                report(&e);
                (null_mut(), 0)
            }
        },
    );
    if !size.is_null() {
        // SAFETY: the caller passes NULL (checked above) or a valid, writable `size_t`.
        unsafe { size.write(len) };
    }
    base
}

fn base_alloc(ptr: u64) -> FfiResult<(u64, usize)> {
    let sys = registry().system()?;
    sys.all_existing()
        .find_map(|(_, a)| a.base_allocation(ptr))
        .ok_or_else(|| {
            FfiError::new(format!(
                "bufferheap_base_alloc: pointer {ptr:#x} does not lie in memory bufferheap holds"
            ))
        })
}

/// Changes one setting before the first allocation: `policy` (`default`, `mps`),
/// `low_watermark_ratio`, `high_watermark_ratio`, `debug`. 0 or -1 with the last error.
///
/// # Safety
/// `key` and `value` are NULL or NUL-terminated strings.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_configure(key: *const c_char, value: *const c_char) -> c_int {
    if key.is_null() || value.is_null() {
        set_last_error("bufferheap_configure: key and value must not be NULL");
        return -1;
    }
    // SAFETY: both are non-NULL (checked above) and the caller passes NUL-terminated strings
    // that stay alive for the duration of the call; they are copied before it returns.
    let (key, value) = unsafe { (CStr::from_ptr(key), CStr::from_ptr(value)) };
    status("bufferheap_configure", || {
        let (Ok(key), Ok(value)) = (key.to_str(), value.to_str()) else {
            return Err(FfiError::new(
                "bufferheap_configure: key and value must be UTF-8 text",
            ));
        };
        registry().configure(key, value)
    })
}

/// Changes several settings at once, all or none: `settings` holds one `key=value` per line
/// (the keys of `bufferheap_configure`). 0, or -1 with the last error and nothing applied.
///
/// # Safety
/// `settings` is NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_configure_all(settings: *const c_char) -> c_int {
    if settings.is_null() {
        set_last_error("bufferheap_configure_all: settings must not be NULL");
        return -1;
    }
    // SAFETY: non-NULL (checked above); the caller passes a NUL-terminated string that stays
    // alive for the duration of the call; it is copied before it returns.
    let settings = unsafe { CStr::from_ptr(settings) };
    status("bufferheap_configure_all", || {
        let Ok(settings) = settings.to_str() else {
            return Err(FfiError::new(
                "bufferheap_configure_all: settings must be UTF-8 text",
            ));
        };
        let mut pairs = Vec::new();
        for (n, line) in settings.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some(pair) = line.split_once('=') else {
                return Err(FfiError::new(format!(
                    "bufferheap_configure_all: line {} ({line:?}) is not key=value; nothing \
                     was applied",
                    n + 1
                )));
            };
            pairs.push(pair);
        }
        registry().configure_all(&pairs)
    })
}

/// 1 once the configuration is frozen (`bufferheap_init` was called or an allocator exists).
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_initialized() -> c_int {
    guard("bufferheap_initialized", 0, || {
        c_int::from(registry().initialized())
    })
}

fn into_c_string(result: FfiResult<String>) -> *mut c_char {
    match result.and_then(|s| {
        CString::new(s).map_err(|_| FfiError::new("bufferheap: answer holds a NUL byte"))
    }) {
        Ok(c) => c.into_raw(),
        Err(e) => {
            set_last_error(&e.message);
            null_mut()
        }
    }
}

fn stats(reg: &Registry, device: c_int) -> FfiResult<String> {
    let sys = reg.system()?;
    json::stats_json(reg, sys, sys.check_device(device)?)
}

/// The statistics of `device` as a JSON object (free with `bufferheap_string_free`).
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_stats_json(device: c_int) -> *mut c_char {
    guard("bufferheap_stats_json", null_mut(), || {
        into_c_string(stats(registry(), device))
    })
}

/// Writes the statistics named by `keys` (the keys of `bufferheap_stats_json`'s numeric
/// answers) into `out`, 0 for a key bufferheap does not keep; answers how many it keeps, or
/// -1 with the last error. One consistent reading for all of them.
///
/// # Safety
/// `keys` must point to `n` NUL-terminated strings and `out` to room for `n` integers
/// (either may be NULL when `n` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_stats_values(
    device: c_int,
    keys: *const *const c_char,
    n: usize,
    out: *mut i64,
) -> c_int {
    guard("bufferheap_stats_values", -1, || {
        if n > 0 && (keys.is_null() || out.is_null()) {
            set_last_error("bufferheap_stats_values: `keys` or `out` is NULL");
            return -1;
        }
        let counters = registry().system().and_then(|sys| {
            let d = sys.check_device(device)?;
            Ok(sys.existing(d).map(|a| a.stats()).unwrap_or_default())
        });
        let counters = match counters {
            Ok(c) => c.to_map(),
            Err(e) => {
                set_last_error(&e.message);
                return -1;
            }
        };
        let mut known = 0;
        for i in 0..n {
            // SAFETY: `keys` holds `n` pointers to NUL-terminated strings (caller's contract;
            // not NULL, checked first) and `i < n`.
            let key = unsafe { CStr::from_ptr(*keys.add(i)) };
            let value = key.to_str().ok().and_then(|k| counters.get(k)).copied();
            known += c_int::from(value.is_some());
            // SAFETY: `out` has room for `n` integers (caller's contract) and `i < n`.
            unsafe {
                out.add(i)
                    .write(value.map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX)))
            };
        }
        known
    })
}

/// Segments of `device` (-1: every device) in PyTorch's snapshot shape, as JSON.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_snapshot_json(device: c_int) -> *mut c_char {
    guard("bufferheap_snapshot_json", null_mut(), || {
        let reg = registry();
        into_c_string(
            reg.system()
                .and_then(|sys| json::snapshot_json(reg, sys, device)),
        )
    })
}

/// Frees a string from `bufferheap_stats_json` / `bufferheap_snapshot_json`. NULL: nothing.
///
/// # Safety
/// `s` is NULL or a string from this library not freed before.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_string_free(s: *mut c_char) {
    if s.is_null() {
        return;
    }
    // SAFETY: `s` came from `CString::into_raw` in this library (the caller's contract) and is
    // freed exactly once, here.
    drop(unsafe { CString::from_raw(s) });
}

fn empty_cache(device: c_int) -> FfiResult<()> {
    let sys = registry().system()?;
    let mut result = Ok(());
    for d in sys.devices_of(device)? {
        if let Some(a) = sys.existing(d)
            && let Err(e) = a.empty_cache()
            && result.is_ok()
        {
            result = Err(FfiError::new(format!(
                "bufferheap: emptying the cache of device {d} failed: {e}"
            )));
        }
    }
    result
}

/// Releases every cached buffer of `device` (-1: every device) back to the device.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_empty_cache(device: c_int) -> c_int {
    status("bufferheap_empty_cache", || empty_cache(device))
}

/// Resets the peak counters of `device` (-1: every device) to their current values.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_reset_peak(device: c_int) -> c_int {
    status("bufferheap_reset_peak", || {
        for_each_existing(device, DeviceAllocator::reset_peak)
    })
}

/// Runs `f` on the allocator of `device` (-1: every device) where it exists; a device not
/// used yet has nothing to reset.
fn for_each_existing(device: c_int, f: impl Fn(&DeviceAllocator)) -> FfiResult<()> {
    let sys = registry().system()?;
    for d in sys.devices_of(device)? {
        if let Some(a) = sys.existing(d) {
            f(a);
        }
    }
    Ok(())
}

/// The largest buffer one request on `device` could get now without failing (PyTorch's
/// `cacheInfo`, which sizes cuDNN's benchmark workspaces), written to `*out`.
///
/// # Safety
/// `out` must be NULL (the call then fails) or point to writable storage for one `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bufferheap_largest_available(device: c_int, out: *mut usize) -> c_int {
    status("bufferheap_largest_available", || {
        if out.is_null() {
            return Err(FfiError::new("bufferheap_largest_available: `out` is NULL"));
        }
        let reg = registry();
        let sys = reg.system()?;
        let allocator = sys.get_or_create(reg, sys.check_device(device)?)?;
        // SAFETY: `out` is not NULL (checked above) and points to storage for one size_t.
        unsafe { out.write(allocator.largest_available()) };
        Ok(())
    })
}

/// Zeroes the cumulative counters of `device` (-1: every device): every `.allocated` and
/// `.freed`, and the event counts such as `num_ooms`; current values and peaks stay.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_reset_accumulated(device: c_int) -> c_int {
    status("bufferheap_reset_accumulated", || {
        for_each_existing(device, DeviceAllocator::reset_accumulated)
    })
}

/// Sets the low and high watermark ratios of `device` (0 disables a limit).
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_set_watermarks(device: c_int, low: f64, high: f64) -> c_int {
    status("bufferheap_set_watermarks", || {
        let reg = registry();
        let sys = reg.system()?;
        let d = sys.check_device(device)?;
        let allocator = sys.get_or_create(reg, d)?;
        let mut chosen = sys.chosen_low(d).lock();
        allocator.set_watermark_ratios(low, high).map_err(|e| {
            FfiError::new(format!(
                "bufferheap_set_watermarks({device}, {low}, {high}): {e}"
            ))
        })?;
        *chosen = Some(low);
        Ok(())
    })
}

/// The calling thread's last error; `""` if none. Valid until the thread's next failing call.
#[unsafe(no_mangle)]
pub extern "C" fn bufferheap_last_error() -> *const c_char {
    guard("bufferheap_last_error", c"".as_ptr(), last_error_ptr)
}
