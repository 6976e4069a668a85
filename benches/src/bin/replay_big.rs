//! The ~900k-event replay target: at most 3 s and 500 MB (release build).
//!
//!     replay_big write OUT.pkl.gz [--events N]
//!         builds the big trace from traces/*.pkl.gz and writes it as a gzipped pickle, to be
//!         replayed by the real command line: `/usr/bin/time -v bufferheap replay OUT.pkl.gz`;
//!     replay_big run IN.pkl.gz [--policy default|mps] [--backend sim|host] [--repeat R]
//!         reads, decodes and replays it in this process, as the command line does, and prints
//!         the seconds of each phase and the peak resident set (VmHWM). With --repeat, the
//!         whole read+decode+replay runs R times and the median is printed too.
//!
//! Run `run` in its own process (not after `write`), so that the peak resident set is the
//! replay's alone.

use std::time::Instant;

use bufferheap_benches::big::{BIG_EVENTS, shipped_gz};
use bufferheap_benches::{peak_rss_bytes, rss_bytes};
use bufferheap_core::Policy;
use bufferheap_replay::{BackendKind, ReplayOptions, replay};

const TARGET_SECONDS: f64 = 3.0;
const TARGET_BYTES: u64 = 500_000_000;

fn usage() -> ! {
    eprintln!(
        "usage: replay_big write OUT.pkl.gz [--events N]\n       \
         replay_big run IN.pkl.gz [--policy default|mps] [--backend sim|host] [--repeat R]"
    );
    std::process::exit(2)
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    match args.iter().position(|a| a == name) {
        None => default,
        Some(i) => match args.get(i + 1).map(|v| v.parse()) {
            Some(Ok(v)) => v,
            _ => {
                eprintln!("{name} needs a valid value");
                usage()
            }
        },
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(cmd), Some(path)) = (args.first(), args.get(1)) else {
        usage()
    };
    match cmd.as_str() {
        "write" => {
            let events: usize = flag(&args, "--events", BIG_EVENTS);
            let t = Instant::now();
            let gz = shipped_gz(events);
            std::fs::write(path, &gz).unwrap_or_else(|e| {
                eprintln!("cannot write {path}: {e}");
                std::process::exit(1)
            });
            println!(
                "{path}: {events} events, {} bytes gzipped, built in {:.2} s",
                gz.len(),
                t.elapsed().as_secs_f64()
            );
        }
        "run" => run(path, &args),
        _ => usage(),
    }
}

fn run(path: &str, args: &[String]) {
    let policy: Policy = flag(args, "--policy", Policy::Default);
    let backend: BackendKind = flag(args, "--backend", BackendKind::Sim);
    let repeat: usize = flag(args, "--repeat", 1).max(1);
    let opts = ReplayOptions {
        policy,
        backend,
        ..ReplayOptions::default()
    };
    let start_rss = rss_bytes().unwrap_or(0);
    let mut totals = Vec::with_capacity(repeat);
    for round in 0..repeat {
        let t0 = Instant::now();
        let bytes = std::fs::read(path).unwrap_or_else(|e| {
            eprintln!("cannot read {path}: {e}");
            std::process::exit(1)
        });
        let t1 = Instant::now();
        let snap = bufferheap_trace::parse_snapshot(&bytes).unwrap_or_else(|e| {
            eprintln!("{path}: {e}");
            std::process::exit(1)
        });
        drop(bytes);
        let t2 = Instant::now();
        let report = replay(&snap, 0, &opts, &mut |_, _| {}).unwrap_or_else(|e| {
            eprintln!("{path}: {e}");
            std::process::exit(1)
        });
        let t3 = Instant::now();
        drop(snap);
        let total = t3.duration_since(t0).as_secs_f64();
        totals.push(total);
        println!(
            "round {round}: read {:.3} s, decode {:.3} s, replay {:.3} s, total {total:.3} s \
             ({} events, {} allocs, peak reserved/live {:.4})",
            t1.duration_since(t0).as_secs_f64(),
            t2.duration_since(t1).as_secs_f64(),
            t3.duration_since(t2).as_secs_f64(),
            report.events,
            report.allocs,
            report.reserved_over_live,
        );
    }
    totals.sort_by(f64::total_cmp);
    let median = totals[totals.len() / 2];
    let peak = peak_rss_bytes().unwrap_or(0);
    println!(
        "{policy} policy, {backend} backend: median total {median:.3} s of {repeat}; \
         peak RSS {:.1} MB (at start {:.1} MB)",
        mb(peak),
        mb(start_rss)
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "target {TARGET_SECONDS} s: {}; target {} MB: {}",
        verdict(median <= TARGET_SECONDS),
        mb(TARGET_BYTES),
        verdict(peak <= TARGET_BYTES)
    );
}
