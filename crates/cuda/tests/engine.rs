//! The engine over the CUDA backend on a real device: both policies, data written to every
//! buffer survives every later allocation (no overlap), page-mapped heaps give memory back
//! (the backend holds no page the engine unmapped, and the driver's figures agree with the
//! engine's), and scalar buffers hold their value. Skips, saying so, where no CUDA device is present.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bufferheap_core::{Allocator, Config, Policy};
use bufferheap_cuda::CudaBackend;
use cudarc::driver::sys;

fn device() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            println!("skipping: no CUDA device ({e})");
            None
        }
    }
}

fn fill(backend: &CudaBackend, ptr: u64, len: usize, seed: u8) {
    backend.bind_to_thread().expect("context");
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    // SAFETY: `ptr` is a live device buffer of at least `len` bytes handed out by the engine,
    // the context is current, and `data` is a host buffer of exactly `len` bytes.
    let r = unsafe { sys::cuMemcpyHtoD_v2(ptr, data.as_ptr() as *const c_void, len) };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
}

fn check(backend: &CudaBackend, ptr: u64, len: usize, seed: u8) {
    backend.bind_to_thread().expect("context");
    let mut out = vec![0u8; len];
    // SAFETY: as in `fill`, reading `len` bytes of a live device buffer into a host buffer of
    // exactly that size.
    let r = unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, ptr, len) };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    let bad = (0..len).find(|&i| out[i] != (i as u8).wrapping_mul(31).wrapping_add(seed));
    assert_eq!(bad, None, "buffer at {ptr:#x} was overwritten");
}

#[test]
fn buffers_keep_their_data_under_both_policies() {
    for policy in [Policy::Default, Policy::Mps] {
        let Some(backend) = device() else { return };
        let a = Allocator::new(
            backend,
            Config {
                policy,
                ..Config::default()
            },
        )
        .expect("allocator");
        let sizes = [
            1000usize,
            300_000,
            3 << 20,
            40 << 20,
            200 << 20,
            777,
            5 << 20,
        ];
        let mut live = Vec::new();
        for round in 0..4u8 {
            for (i, &size) in sizes.iter().enumerate() {
                let b = a.alloc(size + round as usize * 4096).unwrap().unwrap();
                let seed = round.wrapping_mul(16).wrapping_add(i as u8);
                fill(a.backend(), b.ptr, b.requested, seed);
                live.push((b, seed));
            }
            // Free every other buffer; the survivors must keep their contents.
            let mut keep = Vec::new();
            for (k, (b, seed)) in live.drain(..).enumerate() {
                if k % 2 == 0 {
                    a.free(b.ptr).unwrap();
                } else {
                    keep.push((b, seed));
                }
            }
            for (b, seed) in &keep {
                check(a.backend(), b.ptr, b.requested, *seed);
            }
            live = keep;
            // Whatever the engine unmapped went back to the device: nothing is held behind
            // its back, so the backend's physical memory never exceeds what it reserves.
            let s = a.backend().stats();
            assert_eq!(s.held_bytes, 0, "{policy} round {round}: {s:?}");
            assert_eq!(s.physical_bytes, s.mapped_bytes);
            assert!(
                s.physical_bytes <= a.total_allocated(),
                "{policy} round {round}: {} bytes mapped, the engine reserves {}",
                s.physical_bytes,
                a.total_allocated()
            );
        }
        let reserved = a.total_allocated();
        assert!(reserved >= a.current_allocated());
        for (b, _) in live.drain(..) {
            a.free(b.ptr).unwrap();
        }
        a.empty_cache().unwrap();
        assert_eq!(a.total_allocated(), 0, "{policy}: everything given back");
        let s = a.backend().stats();
        assert_eq!((s.physical_bytes, s.handles), (0, 0), "{policy}: {s:?}");
        println!(
            "{policy}: reserved {reserved} bytes at the end of the rounds; stats {:?}",
            a.backend().stats()
        );
    }
}

#[test]
fn scalar_buffers_hold_their_value_on_the_device() {
    let Some(backend) = device() else { return };
    let a = Allocator::new(backend, Config::default()).expect("allocator");
    assert!(a.shared_storage_supported());
    let value = 0x0123_4567_89ab_cdefu64.to_le_bytes();
    let s = a.alloc_scalar(&value).unwrap().unwrap();
    assert!(a.is_shared(s.ptr));
    a.backend().bind_to_thread().expect("context");
    let mut out = [0u8; 8];
    // SAFETY: `s.ptr` is the device address of a live 8-byte shared buffer; the context is
    // current; `out` is 8 bytes.
    let r = unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr() as *mut c_void, s.ptr, 8) };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    assert_eq!(out, value);
    a.free(s.ptr).unwrap();
}

/// A host function queued on a stream: holds the stream until the flag opens (or 20 s pass).
unsafe extern "C" fn gate(user: *mut c_void) {
    // SAFETY: `user` points to a leaked (never freed) `AtomicBool`.
    let open = unsafe { &*(user as *const AtomicBool) };
    let start = Instant::now();
    while !open.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn new_stream(backend: &CudaBackend) -> sys::CUstream {
    backend.bind_to_thread().expect("context");
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: `stream` is a valid out-pointer; the context is current.
    let r = unsafe {
        sys::cuStreamCreate(
            &mut stream,
            sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32,
        )
    };
    assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
    stream
}

#[test]
fn a_buffer_in_use_on_another_stream_is_not_handed_out() {
    for policy in [Policy::Default, Policy::Mps] {
        let Some(backend) = device() else { return };
        let a = Allocator::new(
            backend,
            Config {
                policy,
                ..Config::default()
            },
        )
        .expect("allocator");
        let (s1, s2) = (new_stream(a.backend()), new_stream(a.backend()));
        let (id1, id2) = (s1 as usize as u64, s2 as usize as u64);
        let size = 4 << 20;
        let x = a.alloc_on(size, id1).unwrap().unwrap();
        // Work on stream 2 still uses `x` (held back by the gate, then writing into it).
        let open: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
        a.backend().bind_to_thread().expect("context");
        // SAFETY: `gate` only reads the leaked flag; the stream is live.
        let r = unsafe {
            sys::cuLaunchHostFunc(s2, Some(gate), open as *const AtomicBool as *mut c_void)
        };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        // SAFETY: `x.ptr` is a live device buffer of `size` bytes; the memset is queued on s2.
        let r = unsafe { sys::cuMemsetD8Async(x.ptr, 0xab, size, s2) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        a.record_stream(x.ptr, id2).unwrap();
        a.free(x.ptr).unwrap();
        let y = a.alloc_on(size, id1).unwrap().unwrap();
        assert_ne!(
            y.ptr, x.ptr,
            "{policy}: handed out while stream 2 still writes it"
        );
        assert_eq!(
            a.usage().active,
            2 * y.size,
            "{policy}: the freed buffer stays active"
        );
        open.store(true, Ordering::Release);
        a.backend().bind_to_thread().expect("context");
        // SAFETY: the stream is live; waiting for its work.
        let r = unsafe { sys::cuStreamSynchronize(s2) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        a.free_inactive_buffers();
        let z = a.alloc_on(size, id1).unwrap().unwrap();
        assert_eq!(z.ptr, x.ptr, "{policy}: reusable once stream 2 is done");
        for p in [y.ptr, z.ptr] {
            a.free(p).unwrap();
        }
        a.empty_cache().unwrap();
        a.backend().bind_to_thread().expect("context");
        for s in [s1, s2] {
            // SAFETY: each stream was created above, is idle, and is destroyed once.
            let r = unsafe { sys::cuStreamDestroy_v2(s) };
            assert_eq!(r, sys::CUresult::CUDA_SUCCESS);
        }
    }
}
