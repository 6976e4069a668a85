//! Runs files (or every file in folders) through the fuzz target's body without AFL, printing
//! each outcome and its time: for reproducing a crash or timing a corpus.

use std::path::PathBuf;
use std::time::Instant;

fn main() {
    let mut files: Vec<PathBuf> = Vec::new();
    for arg in std::env::args_os().skip(1) {
        let p = PathBuf::from(arg);
        match std::fs::read_dir(&p) {
            Ok(rd) => files.extend(
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_none_or(|x| x != "md")),
            ),
            Err(_) => files.push(p),
        }
    }
    files.sort();
    let start = Instant::now();
    let mut counts = std::collections::BTreeMap::new();
    for f in &files {
        let Ok(bytes) = std::fs::read(f) else {
            continue;
        };
        let t = Instant::now();
        let outcome = bufferheap_fuzz::exercise(&bytes);
        *counts.entry(format!("{outcome:?}")).or_insert(0u32) += 1;
        if std::env::var_os("VERBOSE").is_some() {
            println!(
                "{:?} {:.3} ms {}",
                outcome,
                t.elapsed().as_secs_f64() * 1e3,
                f.display()
            );
        }
    }
    println!(
        "{} inputs in {:.2} s: {counts:?}",
        files.len(),
        start.elapsed().as_secs_f64()
    );
}
