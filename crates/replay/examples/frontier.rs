//! The fragmentation / map-call frontier of the default policy on the shipped traces: one row
//! per setting of the reserved-bytes budget (`idle_page_fraction`) and of the burst chunk
//! (`map_chunk`), plus "never unmap" and the seed's `mps` policy for reference. The churn
//! feedback (`unmap_rate_limit`) is off in these rows; at the default budget neither trace
//! unmaps, so it changes nothing there.
//!
//! `cargo run --release -p bufferheap-replay --example frontier`

use bufferheap_core::{Config, Policy};
use bufferheap_replay::{ReplayOptions, replay};

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../traces");
    let traces = ["gpt2_train.pkl.gz", "resnet50_train.pkl.gz"];
    let snaps: Vec<_> = traces
        .iter()
        .map(|t| bufferheap_trace::read_snapshot(&root.join(t)).expect("shipped trace"))
        .collect();
    let defaults = Config::default();
    let mut settings: Vec<(String, Policy, Config)> = Vec::new();
    for fraction in [0.002, 0.005, 0.007, 0.01] {
        for chunk_mib in [2usize, 32] {
            let config = Config {
                idle_page_fraction: fraction,
                map_chunk: chunk_mib << 20,
                // The budget alone: with the churn feedback on, a tight budget that keeps
                // unmapping loosens itself, and the row would no longer show that budget.
                unmap_rate_limit: 0.0,
                ..Config::default()
            };
            let mark = if fraction == defaults.idle_page_fraction
                && chunk_mib << 20 == defaults.map_chunk
            {
                " (default)"
            } else {
                ""
            };
            settings.push((
                format!(
                    "budget {:.1}%, chunk {chunk_mib} MiB{mark}",
                    fraction * 100.0
                ),
                Policy::Default,
                config,
            ));
        }
    }
    settings.push((
        "never unmap".into(),
        Policy::Default,
        Config {
            idle_page_fraction: 1e9,
            map_chunk: 2 << 20,
            ..Config::default()
        },
    ));
    settings.push((
        "mps (the seed's design)".into(),
        Policy::Mps,
        Config::default(),
    ));

    println!(
        "| setting | GPT-2 reserved/live | GPT-2 map+unmap per 1000 allocs | ResNet-50 reserved/live | ResNet-50 map+unmap per 1000 allocs |"
    );
    println!("|---|---|---|---|---|");
    for (name, policy, config) in settings {
        let mut cells = Vec::new();
        for snap in &snaps {
            let options = ReplayOptions {
                policy,
                config: config.clone(),
                ..ReplayOptions::default()
            };
            let r = replay(snap, 0, &options, &mut |_, _| {}).expect("replay");
            cells.push(format!("{:.4}", r.reserved_over_live));
            cells.push(format!("{:.2}", r.map_unmap_per_1000_allocs));
        }
        println!("| {name} | {} |", cells.join(" | "));
    }
}
