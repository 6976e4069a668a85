//! The fuzz target's body, shared by the AFL++ binary and the plain runner: decode the input as
//! a snapshot and, if it decodes, replay up to four of its devices on the simulated device under
//! both policies. Any outcome but a panic, a hang or a runaway allocation is a pass.

use bufferheap_core::Policy;
use bufferheap_replay::{ReplayOptions, devices, replay};

/// What one input did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The reader refused it with an error.
    Rejected,
    /// It decoded and every replay ran to the end.
    Replayed,
    /// It decoded and a replay stopped with an error.
    ReplayError,
}

/// Runs one input through the reader and the replay.
pub fn exercise(data: &[u8]) -> Outcome {
    let snap = match bufferheap_trace::parse_snapshot(data) {
        Ok(s) => s,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return Outcome::Rejected;
        }
    };
    let mut outcome = Outcome::Replayed;
    for device in devices(&snap).into_iter().take(4) {
        for policy in [Policy::Default, Policy::Mps] {
            let options = ReplayOptions {
                policy,
                series_points: 64,
                ..ReplayOptions::default()
            };
            match replay(&snap, device, &options, &mut |_, _| {}) {
                Ok(report) => assert!(report.peak_reserved_bytes >= report.final_reserved_bytes),
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    outcome = Outcome::ReplayError;
                }
            }
        }
    }
    outcome
}
