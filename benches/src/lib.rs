//! Benchmarks of bufferheap: the pieces shared by the `cargo bench` targets and the
//! measuring binaries.
//!
//! - [`ring`]: the alloc+free loop of `BASELINES.md` (a ring of live slots; each step frees
//!   the slot's old buffer and allocates a new one; log-uniform sizes from a fixed seed).
//! - [`pickle`]: a writer of PyTorch memory snapshots as pickles (what Python's pickler
//!   emits for them), so big traces can be made without Python.
//! - [`big`]: the ~900k-event timing trace, built from the shipped traces.
//! - [`peak_rss_bytes`]: the process's peak resident set, from `/proc/self/status`.

pub mod big;
pub mod pickle;
pub mod ring;

use std::path::PathBuf;

/// The repository's `traces/` folder.
pub fn traces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../traces")
}

/// The shipped traces (`traces/*.pkl.gz`), sorted by file name.
pub fn shipped_traces() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(traces_dir())
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with(".pkl.gz"))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A short name for a trace file: its name without `.pkl.gz`.
pub fn trace_name(path: &std::path::Path) -> String {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    name.trim_end_matches(".gz")
        .trim_end_matches(".pkl")
        .to_string()
}

/// Peak resident set size of this process in bytes (`VmHWM`), if the system reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

/// Current resident set size of this process in bytes (`VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

fn status_field(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
