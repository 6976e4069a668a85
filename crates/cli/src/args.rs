//! The command line: subcommands, options and their help texts (clap, derive).
//!
//! Invariants: every value a user types is parsed here or by a parser named here, so a bad
//! value is a clap usage error (exit status 2) that names the option and the value; nothing
//! downstream re-parses user text.

use std::path::PathBuf;

use bufferheap_core::Policy;
use bufferheap_replay::BackendKind;
use clap::{Parser, Subcommand, ValueEnum};

/// bufferheap: a caching allocator for accelerator memory.
#[derive(Debug, Parser)]
#[command(name = "bufferheap", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay PyTorch memory snapshots and compare what PyTorch reserved with what bufferheap
    /// would reserve.
    #[command(long_about = REPLAY_LONG_ABOUT)]
    Replay(ReplayArgs),
}

const REPLAY_LONG_ABOUT: &str = "\
Replay PyTorch memory snapshots and compare what PyTorch reserved with what bufferheap would \
reserve.

Each TRACE is a snapshot written by torch.cuda.memory._dump_snapshot() (a pickle, gzipped or \
not). Every device of every trace is replayed through the bufferheap engine, one allocation \
and free at a time, and gives one row: 'events' and 'allocs' count the trace's recorded \
events and allocations; 'peak live' is the most bytes of blocks alive at once, counted from \
the trace itself (blocks alive before recording started included) and so the physical \
lower bound for any allocator; 'PyTorch reserved' is the most memory PyTorch's own caching \
allocator held from the driver during the trace, and 'ours reserved' the most bufferheap \
held (mapped bytes on page-mapped heaps) replaying the same events; 'PyTorch/live' and \
'ours/live' divide those peaks by peak live, so 1.0000 is perfect and 1.05 means 5% of \
memory lost to fragmentation and caching; 'heap allocs' counts the backend calls that \
obtained memory (heap reservations and page maps); 'map+unmap/1k' counts page map and unmap \
calls per 1000 allocations, the cost that page mapping adds on a real GPU; 'replay s' is \
the wall time of the replay. Sizes are in powers of 1024 (KiB, MiB, GiB).";

/// Options of `bufferheap replay`.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// PyTorch memory snapshots (.pickle or .pkl, optionally gzipped)
    #[arg(value_name = "TRACE", required = true)]
    pub traces: Vec<PathBuf>,

    /// Heap and reuse policy: ours ("default") or the one PyTorch's MPS allocator ships ("mps")
    #[arg(long, value_enum, default_value_t = PolicyArg::Default)]
    pub policy: PolicyArg,

    /// Where heaps live: a simulated address space ("sim") or real, untouched host mappings
    /// ("host")
    #[arg(long, value_enum, default_value_t = BackendArg::Sim)]
    pub backend: BackendArg,

    /// Memory of the replayed device, e.g. 80GiB, 80G, 81920MiB or a number of bytes
    /// (K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024, KB/MB/GB/TB powers of 1000), at most
    /// 64 TiB
    #[arg(long, value_name = "SIZE", default_value = "80GiB", value_parser = parse_device_memory)]
    pub device_memory: usize,

    /// Print one JSON object per trace and device (JSON Lines) instead of a table
    #[arg(long)]
    pub json: bool,

    /// Draw live, our reserved and PyTorch's reserved bytes over the trace into FILE
    /// (.svg or .png); with several rows, one file each, named FILE-<trace>.<ext>
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

/// The largest replayed device: the simulated device keeps a table entry per 2 MiB page of
/// its address space in memory (today's largest GPUs have under 200 GiB).
pub const MAX_DEVICE_MEMORY: usize = 64 << 40;

fn parse_device_memory(text: &str) -> Result<usize, String> {
    let size = crate::size::parse_size(text)?;
    if size > MAX_DEVICE_MEMORY {
        return Err(format!(
            "{text:?} is more than a replayed device may have (at most 64 TiB: the simulated \
             device keeps a table of its pages in memory)"
        ));
    }
    Ok(size)
}

/// `--policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Page-mapped heaps, best fit with coalescing (bufferheap's own)
    Default,
    /// The system PyTorch's MPS allocator ships
    Mps,
}

impl From<PolicyArg> for Policy {
    fn from(p: PolicyArg) -> Policy {
        match p {
            PolicyArg::Default => Policy::Default,
            PolicyArg::Mps => Policy::Mps,
        }
    }
}

/// `--backend` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    /// Simulated address space: any trace at full scale on any machine
    Sim,
    /// Host memory mappings, reserved but never written
    Host,
}

impl From<BackendArg> for BackendKind {
    fn from(b: BackendArg) -> BackendKind {
        match b {
            BackendArg::Sim => BackendKind::Sim,
            BackendArg::Host => BackendKind::Host,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_a_full_replay_line() {
        let cli = Cli::try_parse_from([
            "bufferheap",
            "replay",
            "a.pkl.gz",
            "b.pickle",
            "--policy",
            "mps",
            "--backend",
            "host",
            "--device-memory",
            "40G",
            "--json",
            "--plot",
            "p.svg",
        ])
        .expect("valid command line");
        let Command::Replay(args) = cli.command;
        assert_eq!(args.traces.len(), 2);
        assert_eq!(args.policy, PolicyArg::Mps);
        assert_eq!(args.backend, BackendArg::Host);
        assert_eq!(args.device_memory, 40 << 30);
        assert!(args.json);
        assert_eq!(args.plot, Some(PathBuf::from("p.svg")));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for line in [
            &["bufferheap", "replay", "a", "--policy", "fast"][..],
            &["bufferheap", "replay", "a", "--backend", "gpu"][..],
            &["bufferheap", "replay", "a", "--device-memory", "lots"][..],
            &["bufferheap", "replay"][..],
        ] {
            let err = Cli::try_parse_from(line).expect_err("must fail");
            assert!(err.use_stderr(), "{line:?}");
        }
    }
}
