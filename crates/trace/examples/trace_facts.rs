//! Prints the facts of each snapshot given on the command line, one JSON line each, as
//! `tools/trace_facts.py` does, plus the time taken to read and decode the file.
//!
//! `cargo run --release -p bufferheap-trace --example trace_facts -- traces/*.pkl.gz`

use std::path::Path;
use std::time::Instant;

fn main() {
    let mut failed = false;
    for arg in std::env::args().skip(1) {
        let path = Path::new(&arg);
        let started = Instant::now();
        match bufferheap_trace::read_snapshot(path) {
            Ok(snap) => {
                let decoded = started.elapsed();
                let f = bufferheap_trace::facts(&snap, 0);
                let name = path
                    .file_name()
                    .map_or(arg.clone(), |n| n.to_string_lossy().into());
                println!(
                    "{{\"trace\": {name:?}, \"events\": {}, \"allocs\": {}, \"initial_live\": {}, \
                     \"initial_live_bytes\": {}, \"peak_live_bytes\": {}, \
                     \"native_reserved_start\": {}, \"native_reserved_end\": {}, \
                     \"native_ratio\": {:.4}, \"decode_s\": {:.3}}}",
                    f.events,
                    f.allocs,
                    f.initial_live,
                    f.initial_live_bytes,
                    f.peak_live_bytes,
                    f.native_reserved_start,
                    f.native_reserved_end,
                    f.native_ratio(),
                    decoded.as_secs_f64()
                );
            }
            Err(e) => {
                eprintln!("error: {e}");
                failed = true;
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
