//! The engine over the CUDA backend on a real device: both policies, data written to every
//! buffer survives every later allocation (no overlap), page-mapped heaps give memory back
//! (the backend holds no page the engine unmapped, and the driver's figures agree with the
//! engine's), and scalar buffers hold their value. Skips, saying so, where no CUDA device is present.

use std::ffi::c_void;

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
