//! Replays the shipped traces with both policies and prints the key figures.
fn main() {
    for path in std::env::args().skip(1) {
        let snap = bufferheap_trace::read_snapshot(path.as_ref()).unwrap();
        for policy in [
            bufferheap_core::Policy::Default,
            bufferheap_core::Policy::Mps,
        ] {
            let mut opts = bufferheap_replay::ReplayOptions {
                policy,
                ..Default::default()
            };
            if let Ok(v) = std::env::var("BH_IDLE") {
                opts.config.idle_page_fraction = v.parse().unwrap();
            }
            if let Ok(v) = std::env::var("BH_STALE") {
                opts.config.stale_page_age = v.parse().unwrap();
            }
            if let Ok(v) = std::env::var("BH_AGE") {
                opts.config.min_idle_age = v.parse().unwrap();
            }
            if let Ok(v) = std::env::var("BH_CHUNK") {
                opts.config.map_chunk = v.parse::<usize>().unwrap() << 20;
            }
            let r = bufferheap_replay::replay(&snap, 0, &opts, &mut |_, _| {}).unwrap();
            println!(
                "{path} {policy}: live {} reserved {} ratio {:.4} pytorch {:.4} maps {} unmaps {} per1000 {:.2} heaps {} {:.2}s",
                r.peak_live_bytes,
                r.peak_reserved_bytes,
                r.reserved_over_live,
                r.pytorch_over_live,
                r.map_calls,
                r.unmap_calls,
                r.map_unmap_per_1000_allocs,
                r.device_allocs,
                r.replay_seconds
            );
        }
    }
}
