//! The latency loop of BASELINES.md through the C ABI (the entry points PyTorch calls), on
//! whichever backend `BUFFERHEAP_BACKEND` selects: ns per alloc+free pair.
//!
//! `BUFFERHEAP_BACKEND=host cargo run --release -p bufferheap-ffi --example abi_loop`

use std::ffi::c_void;
use std::time::Instant;

use bufferheap_ffi::{bufferheap_free, bufferheap_malloc};

fn main() {
    let all = [
        (512f64, 4096f64, 64usize),
        (512.0, (1 << 20) as f64, 256),
        ((1 << 20) as f64, (64 << 20) as f64, 32),
    ];
    let pick: usize = std::env::var("ABI_LOOP_ONLY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX);
    for (k, (lo, hi, live)) in all.into_iter().enumerate() {
        if pick != usize::MAX && pick != k {
            continue;
        }
        let n = 200_000;
        let mut x: u64 = 42;
        let sizes: Vec<isize> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f64 / (1u64 << 53) as f64;
                (lo.ln() + u * (hi.ln() - lo.ln())).exp() as isize
            })
            .collect();
        let mut ring: Vec<*mut c_void> = vec![std::ptr::null_mut(); live];
        let mut best = f64::MAX;
        for _pass in 0..3 {
            let t0 = Instant::now();
            for (i, &s) in sizes.iter().enumerate() {
                let slot = &mut ring[i % live];
                if !slot.is_null() {
                    bufferheap_free(*slot, 0, 0, std::ptr::null_mut());
                }
                *slot = bufferheap_malloc(s, 0, std::ptr::null_mut());
            }
            best = best.min(t0.elapsed().as_nanos() as f64 / n as f64);
        }
        for slot in &mut ring {
            bufferheap_free(*slot, 0, 0, std::ptr::null_mut());
            *slot = std::ptr::null_mut();
        }
        println!("{lo:>9} .. {hi:>9} B, {live:>3} live: {best:7.1} ns per pair");
    }
}
