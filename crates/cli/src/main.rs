//! `bufferheap`, the command line of the bufferheap allocator.
//!
//! `bufferheap replay TRACE...` replays PyTorch memory snapshots through the engine and prints
//! what PyTorch reserved next to what bufferheap would reserve (a table, or JSON Lines with
//! `--json`), optionally with a plot of both over the trace (`--plot FILE.svg|FILE.png`).
//!
//! Exit status: 0 on success; 2 for bad input (a bad argument, a trace that cannot be read or
//! does not have a snapshot's shape, a replay the engine refuses, such as out of memory at an
//! event, a file that cannot be written); 1 only for a bug in bufferheap itself. The program
//! never panics on user input; should a bug panic anyway, the panic is reported as an
//! internal error and the status is 1.

mod args;
mod output;
mod plot;
mod run;
mod size;

use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

/// Why a step failed, which decides the exit status.
#[derive(Debug)]
pub enum Failure {
    /// The user's input is at fault: a trace, an argument, a path.
    Input(anyhow::Error),
    /// bufferheap is at fault.
    Internal(anyhow::Error),
    /// stdout was closed by its reader; not an error.
    BrokenPipe,
}

/// The exit status, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Ok,
    BadInput,
    Internal,
}

impl From<Status> for ExitCode {
    fn from(s: Status) -> ExitCode {
        ExitCode::from(match s {
            Status::Ok => 0,
            Status::Internal => 1,
            Status::BadInput => 2,
        })
    }
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("internal error (a bug in bufferheap; please report it): {info}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and --version print to stdout and exit 0; usage errors print and exit 2.
        Err(e) => e.exit(),
    };
    match std::panic::catch_unwind(|| match &cli.command {
        Command::Replay(args) => run::replay(args),
    }) {
        Ok(status) => status.into(),
        Err(_) => Status::Internal.into(),
    }
}
