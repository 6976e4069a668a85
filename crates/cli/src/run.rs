//! `bufferheap replay`: reads each trace, replays each of its devices, and hands every result
//! (a [`Row`]) to the output as soon as it exists.
//!
//! Invariants:
//! - Traces are handled one after another; a trace that cannot be read or replayed is reported
//!   on stderr, naming the file, and the others still run. The exit status is the worst seen.
//! - stdout carries only results (JSON lines, or the table at the end); progress, warnings,
//!   the plot files written and errors go to stderr.
//! - The progress display exists only when stderr is a terminal and `--json` is not given.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow};
use bufferheap_core::Config;
use bufferheap_replay::{ReplayOptions, ReplayReport};
use bufferheap_trace::Snapshot;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::args::ReplayArgs;
use crate::output;
use crate::plot::{self, PlotFormat};
use crate::{Failure, Status};

/// The result of replaying one device of one trace.
#[derive(Debug)]
pub struct Row {
    /// The trace file as given on the command line.
    pub path: PathBuf,
    /// The trace's short name (file name without `.pkl.gz` and the like), with the device
    /// when the trace has several.
    pub name: String,
    /// `name` in a form fit for a file name.
    pub file_tag: String,
    pub report: ReplayReport,
    pub warnings: Vec<String>,
}

/// Runs `bufferheap replay` and returns the exit status.
pub fn replay(args: &ReplayArgs) -> Status {
    let mut status = Status::Ok;
    let plot_format = match args.plot.as_deref().map(PlotFormat::from_path).transpose() {
        Ok(f) => f,
        Err(e) => return report_failure(&Failure::Input(e)),
    };
    let options = ReplayOptions {
        policy: args.policy.into(),
        config: Config::default(),
        backend: args.backend.into(),
        device_memory: args.device_memory,
        // No series unless a plot is asked for; then one point per event (see below).
        series_points: 0,
    };
    let show_progress = !args.json && std::io::stderr().is_terminal();
    let mut rows = Vec::new();
    let mut plots_written = HashSet::new();
    let several_traces = args.traces.len() > 1;
    // Plots never replace an input (a plot named like a trace of a later row).
    let inputs: Vec<PathBuf> = args
        .traces
        .iter()
        .filter_map(|p| p.canonicalize().ok())
        .collect();
    let mut plot_status = Status::Ok;

    for path in &args.traces {
        let plot_status = &mut plot_status;
        let result = replay_trace(
            path,
            &options,
            plot_format.is_some(),
            show_progress,
            &mut |mut row, several_devices| {
                for w in &row.warnings {
                    eprintln!(
                        "warning: {}: {w}",
                        row_label(&row.path, row.report.device, several_devices)
                    );
                }
                if args.json {
                    output::print_json_line(&row)?;
                }
                if let (Some(base), Some(format)) = (&args.plot, plot_format) {
                    let target =
                        plot::file_for(base, &row.file_tag, several_traces || several_devices);
                    let target = unique(target, &mut plots_written);
                    let plotted = if target.canonicalize().is_ok_and(|t| inputs.contains(&t)) {
                        Err(Failure::Input(anyhow!(
                            "{}: not written: the plot would replace a trace being replayed \
                             (choose another --plot name)",
                            target.display()
                        )))
                    } else {
                        plot::write(&row, format, &target)
                    };
                    // A plot that cannot be written fails the run, not the other rows.
                    match plotted {
                        Ok(()) => eprintln!("wrote {}", target.display()),
                        Err(failure) => *plot_status = (*plot_status).max(report_failure(&failure)),
                    }
                }
                // The table needs only the figures; a series can be large.
                row.report.series = Vec::new();
                rows.push(row);
                Ok(())
            },
        );
        match result {
            Ok((worst, false)) => status = status.max(worst),
            // Nobody reads the results any more: stop quietly.
            Ok((worst, true)) => return status.max(worst).max(*plot_status),
            Err(Failure::BrokenPipe) => return status.max(*plot_status),
            Err(failure) => status = status.max(report_failure(&failure)),
        }
    }
    status = status.max(plot_status);
    if !args.json
        && !rows.is_empty()
        && let Err(failure) = output::print_table(&rows)
    {
        status = status.max(report_failure(&failure));
    }
    status
}

/// Prints a failure on stderr and returns the exit status it stands for.
pub fn report_failure(failure: &Failure) -> Status {
    match failure {
        Failure::Input(e) => {
            eprintln!("error: {}", describe(e));
            Status::BadInput
        }
        Failure::Internal(e) => {
            eprintln!(
                "internal error (a bug in bufferheap; please report it): {}",
                describe(e)
            );
            Status::Internal
        }
        Failure::BrokenPipe => Status::Ok,
    }
}

/// The error and its causes on one line. The project's error types already print their
/// source in their own message, so a cause is added only where its text is not there yet.
fn describe(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// Reads one trace and replays each of its devices, calling `emit` with each row and whether
/// the trace has several devices. With `with_series`, each report keeps one series point per
/// event (32 bytes each), so that a plot can show every peak. A device whose replay fails is
/// reported on stderr and the others are still replayed; the status says the worst failure
/// reported that way.
fn replay_trace(
    path: &Path,
    options: &ReplayOptions,
    with_series: bool,
    show_progress: bool,
    emit: &mut dyn FnMut(Row, bool) -> Result<(), Failure>,
) -> Result<(Status, bool), Failure> {
    let stem = trace_stem(path);
    let spinner = progress_bar(show_progress, None, &stem);
    spinner.set_message("reading");
    let snap = bufferheap_trace::read_snapshot(path);
    spinner.finish_and_clear();
    let snap: Snapshot = snap.map_err(|e| Failure::Input(anyhow!(e)))?;

    let devices = bufferheap_replay::devices(&snap);
    if devices.len() > bufferheap_replay::MAX_DEVICES {
        return Err(Failure::Input(anyhow!(
            "{}: the snapshot names {} devices, more than the {} a replay accepts: it is \
             damaged (machines have a few dozen GPUs at most)",
            path.display(),
            devices.len(),
            bufferheap_replay::MAX_DEVICES
        )));
    }
    if devices.is_empty() {
        return Err(Failure::Input(anyhow!(
            "{}: the snapshot has no allocator events and no segments: nothing to replay \
             (was recording on? torch.cuda.memory._record_memory_history() must run first)",
            path.display()
        )));
    }
    let several_devices = devices.len() > 1;
    let mut status = Status::Ok;
    let mut broken = false;
    for device in devices {
        let (name, file_tag) = if several_devices {
            (
                format!("{stem} (device {device})"),
                format!("{stem}-device{device}"),
            )
        } else {
            (stem.clone(), stem.clone())
        };
        let total = snap.events(device).len();
        let options = ReplayOptions {
            series_points: if with_series { total.max(1) } else { 0 },
            ..options.clone()
        };
        let bar = progress_bar(show_progress, Some(total as u64), &name);
        let result = bufferheap_replay::replay(&snap, device, &options, &mut |done, _| {
            bar.set_position(done as u64)
        });
        bar.finish_and_clear();
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                let failure = Failure::Input(anyhow!(e).context(path.display().to_string()));
                status = status.max(report_failure(&failure));
                continue;
            }
        };
        let warnings = report.warnings();
        match emit(
            Row {
                path: path.to_path_buf(),
                name,
                file_tag: file_tag.replace(|c: char| !is_file_name_char(c), "_"),
                report,
                warnings,
            },
            several_devices,
        ) {
            Ok(()) => {}
            Err(Failure::BrokenPipe) => {
                broken = true;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok((status, broken))
}

/// A progress bar on stderr (a spinner when `total` is `None`), or a hidden one.
fn progress_bar(show: bool, total: Option<u64>, name: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template(
                "{prefix:>16} [{wide_bar}] {human_pos}/{human_len} events",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        ),
        None => {
            let s = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{prefix:>16} {spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            s.enable_steady_tick(Duration::from_millis(100));
            s
        }
    };
    bar.set_prefix(name.to_owned());
    bar
}

/// The file name of a trace without its directory and its `.pkl.gz`-like suffixes.
pub fn trace_stem(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let mut stem = file.as_str();
    if let Some(s) = stem.strip_suffix(".gz") {
        stem = s;
    }
    for ext in [".pkl", ".pickle", ".pck"] {
        if let Some(s) = stem.strip_suffix(ext) {
            stem = s;
            break;
        }
    }
    if stem.is_empty() {
        file
    } else {
        stem.to_owned()
    }
}

fn row_label(path: &Path, device: usize, several_devices: bool) -> String {
    if several_devices {
        format!("{} (device {device})", path.display())
    } else {
        path.display().to_string()
    }
}

fn is_file_name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')
}

/// `path`, or `path` with `-2`, `-3`, ... before its extension if it was already used.
fn unique(path: PathBuf, used: &mut HashSet<PathBuf>) -> PathBuf {
    let mut candidate = path.clone();
    let mut n = 2;
    while used.contains(&candidate) {
        candidate = plot::with_suffix(&path, &n.to_string());
        n += 1;
    }
    used.insert(candidate.clone());
    candidate
}

/// Writes to stdout; a closed pipe (`bufferheap ... | head`) ends output quietly.
pub fn write_stdout(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failure::BrokenPipe),
        Err(e) => Err(Failure::Input(anyhow!(e).context("cannot write to stdout"))),
    }
}

/// Adds the file name to an I/O error while writing `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    std::fs::write(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
        .map_err(Failure::Input)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stems_drop_directories_and_pickle_suffixes() {
        assert_eq!(
            trace_stem(Path::new("traces/gpt2_train.pkl.gz")),
            "gpt2_train"
        );
        assert_eq!(trace_stem(Path::new("a/b.pickle")), "b");
        assert_eq!(trace_stem(Path::new("snap.gz")), "snap");
        assert_eq!(trace_stem(Path::new("snap")), "snap");
        assert_eq!(trace_stem(Path::new(".pkl")), ".pkl");
    }

    #[test]
    fn causes_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow!(io).context("cannot write p.svg");
        assert_eq!(describe(&e), "cannot write p.svg: gone");
        let inner = anyhow!("inner").context("outer: inner");
        assert_eq!(describe(&inner), "outer: inner");
    }

    #[test]
    fn repeated_plot_names_get_a_number() {
        let mut used = HashSet::new();
        let a = unique(PathBuf::from("p-x.svg"), &mut used);
        let b = unique(PathBuf::from("p-x.svg"), &mut used);
        let c = unique(PathBuf::from("p-x.svg"), &mut used);
        assert_eq!(a, PathBuf::from("p-x.svg"));
        assert_eq!(b, PathBuf::from("p-x-2.svg"));
        assert_eq!(c, PathBuf::from("p-x-3.svg"));
    }
}
