//! End-to-end tests of the `bufferheap` binary: output shapes, the figures of a shipped trace,
//! plots, and the exit status and message for every kind of bad input.
//!
//! Invariants checked on every run: stderr never shows a panic, and a run that succeeds with
//! piped stderr prints nothing there but warnings and plot file names (no progress bar).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// Peak live bytes of `traces/resnet50_train.pkl.gz`, a fact of the trace
/// (`tools/trace_facts.py` computes the same).
const RESNET_PEAK_LIVE: u64 = 3_195_121_448;

/// Command-line arguments from strings and paths alike.
macro_rules! a {
    ($($arg:expr),* $(,)?) => {
        vec![$(OsString::from(&$arg)),*]
    };
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn resnet() -> PathBuf {
    repo_file("traces/resnet50_train.pkl.gz")
}

/// Runs the binary; asserts that nothing panicked.
fn bufferheap<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_bufferheap"))
        .args(args)
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "panic in stderr: {stderr}");
    assert!(
        !stderr.contains("internal error"),
        "internal error: {stderr}"
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a replay with `--json` and returns the one object it prints.
fn json_of(trace: &Path, extra: &[&str]) -> Value {
    let mut args = a!["replay", trace, "--json"];
    args.extend(extra.iter().map(OsString::from));
    let out = bufferheap(args);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stderr(&out), "", "no progress bar, no warnings");
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "one object: {text}");
    serde_json::from_str(&text).expect("stdout is one JSON object")
}

/// Asserts exit status 2 and a message on stderr that contains every one of `needles`.
fn assert_bad_input(out: &Output, needles: &[&str]) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    assert_eq!(stdout(out), "", "nothing on stdout");
}

#[test]
fn json_has_every_key_and_the_traces_peak_live_for_both_policies() {
    for policy in ["default", "mps"] {
        let v = json_of(&resnet(), &["--policy", policy]);
        for key in [
            "trace",
            "trace_name",
            "device",
            "policy",
            "backend",
            "events",
            "allocs",
            "initial_live_blocks",
            "initial_live_bytes",
            "peak_live_bytes",
            "peak_reserved_bytes",
            "reserved_over_live",
            "final_reserved_bytes",
            "pytorch_reserved_bytes",
            "pytorch_over_live",
            "device_allocs",
            "device_frees",
            "map_calls",
            "unmap_calls",
            "map_unmap_per_1000_allocs",
            "physical_allocs",
            "alloc_retries",
            "orphan_frees",
            "replaced_allocs",
            "unknown_actions",
            "replay_seconds",
            "warnings",
        ] {
            assert!(v.get(key).is_some(), "{policy}: missing key {key}: {v}");
        }
        assert_eq!(v["peak_live_bytes"], RESNET_PEAK_LIVE, "{policy}");
        assert_eq!(v["policy"], policy);
        assert_eq!(v["backend"], "sim");
        assert_eq!(v["device"], 0);
        assert_eq!(v["trace_name"], "resnet50_train");
        assert!(
            v["trace"]
                .as_str()
                .is_some_and(|t| t.ends_with("resnet50_train.pkl.gz"))
        );
        assert!(v["warnings"].is_array());
        assert!(v["events"].as_u64().is_some_and(|n| n > 0));
        let reserved = v["peak_reserved_bytes"].as_u64().expect("a number");
        assert!(
            reserved >= RESNET_PEAK_LIVE,
            "{policy}: reserved {reserved}"
        );
        let ratio = v["reserved_over_live"].as_f64().expect("a number");
        assert!((ratio - reserved as f64 / RESNET_PEAK_LIVE as f64).abs() < 1e-9);
    }
}

#[test]
fn host_and_sim_backends_reserve_the_same_for_both_policies() {
    for policy in ["default", "mps"] {
        let sim = json_of(&resnet(), &["--policy", policy, "--backend", "sim"]);
        let host = json_of(&resnet(), &["--policy", policy, "--backend", "host"]);
        assert_eq!(host["backend"], "host");
        assert_eq!(
            sim["peak_reserved_bytes"], host["peak_reserved_bytes"],
            "{policy}"
        );
        assert_eq!(sim["peak_live_bytes"], host["peak_live_bytes"], "{policy}");
    }
}

#[test]
fn two_traces_give_two_json_lines_and_two_table_rows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("second_run.pkl.gz");
    std::fs::copy(resnet(), &copy).expect("copy the trace");

    let out = bufferheap(a!["replay", resnet(), copy, "--json",]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a JSON object"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["trace_name"], "resnet50_train");
    assert_eq!(lines[1]["trace_name"], "second_run");
    assert_eq!(lines[0]["peak_live_bytes"], lines[1]["peak_live_bytes"]);

    let out = bufferheap(a!["replay", resnet(), copy]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "",
        "no progress bar when stderr is not a terminal"
    );
    let table = stdout(&out);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "two header lines, a rule, two rows: {table}"
    );
    for header in [
        "trace", "policy", "backend", "events", "allocs", "PyTorch", "ours",
    ] {
        assert!(lines[0].contains(header), "{header}: {table}");
    }
    assert!(
        lines[1].contains("live") && lines[1].contains("reserved"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("resnet50_train  default  sim"),
        "{table}"
    );
    assert!(lines[4].starts_with("second_run"), "{table}");
    // 3195121448 bytes, as format_size prints it.
    assert!(lines[3].contains("2.98 GiB"), "{table}");
}

#[test]
fn plots_are_written_as_svg_and_png() {
    let dir = tempfile::tempdir().expect("temp dir");
    let svg = dir.path().join("plot.svg");
    let out = bufferheap(a!["replay", resnet(), "--plot", svg,]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("plot.svg"),
        "names the file: {}",
        stderr(&out)
    );
    let text = std::fs::read_to_string(&svg).expect("the SVG exists");
    assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(200)]);
    for legend in [
        "PyTorch reserved",
        "bufferheap reserved",
        "live (peak 2.98 GiB)",
    ] {
        assert!(text.contains(legend), "legend {legend:?} missing");
    }
    assert!(text.contains("resnet50_train: policy default"), "title");

    // Two traces: one PNG each, named after the traces.
    let copy = dir.path().join("other.pkl.gz");
    std::fs::copy(resnet(), &copy).expect("copy the trace");
    let png = dir.path().join("plot.png");
    let out = bufferheap(a![
        "replay",
        resnet(),
        copy,
        "--policy",
        "mps",
        "--plot",
        png,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!png.exists(), "several rows never write the base name");
    for name in ["plot-resnet50_train.png", "plot-other.png"] {
        let path = dir.path().join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{name} is a PNG");
        assert!(
            bytes.len() > 10_000,
            "{name} has a picture: {} bytes",
            bytes.len()
        );
        assert!(stderr(&out).contains(name), "{}", stderr(&out));
    }
}

#[test]
fn unreadable_traces_exit_2_and_name_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");

    let missing = dir.path().join("no_such_trace.pkl.gz");
    let out = bufferheap(a!["replay", missing]);
    assert_bad_input(&out, &["no_such_trace.pkl.gz", "cannot read"]);

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello, not a pickle\n").expect("write");
    let out = bufferheap(a!["replay", text]);
    assert_bad_input(&out, &["notes.txt", "not a pickle"]);

    let bytes = std::fs::read(resnet()).expect("the shipped trace");
    let truncated = dir.path().join("truncated.pkl.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).expect("write");
    let out = bufferheap(a!["replay", truncated, "--json"]);
    assert_bad_input(&out, &["truncated.pkl.gz", "gzip"]);

    // pickle.dumps([1, 2], protocol=2): a valid pickle, not a snapshot.
    let list = dir.path().join("list.pkl");
    std::fs::write(&list, b"\x80\x02]q\x00(K\x01K\x02e.").expect("write");
    let out = bufferheap(a!["replay", list]);
    assert_bad_input(&out, &["list.pkl", "top level", "expected a dict"]);

    // A truncated pickle, not gzipped: the decoder's own error, with its byte offset.
    let cut = dir.path().join("cut.pkl");
    std::fs::write(&cut, b"\x80\x02}q\x00(X\x08\x00\x00\x00segm").expect("write");
    let out = bufferheap(a!["replay", cut]);
    assert_bad_input(&out, &["cut.pkl", "byte offset"]);
}

#[test]
fn bad_arguments_exit_2_and_say_what_is_wrong() {
    let out = bufferheap(a!["replay", resnet(), "--policy", "fastest",]);
    assert_bad_input(&out, &["'fastest'", "--policy", "default", "mps"]);

    let out = bufferheap(a!["replay", resnet(), "--backend", "gpu",]);
    assert_bad_input(&out, &["'gpu'", "--backend"]);

    let out = bufferheap(a!["replay", resnet(), "--device-memory", "80XB",]);
    assert_bad_input(&out, &["--device-memory", "80XB", "unknown unit"]);

    for huge in ["18446744073709551615", "65TiB"] {
        let out = bufferheap(a!["replay", resnet(), "--device-memory", huge,]);
        assert_bad_input(&out, &["--device-memory", huge, "at most 64 TiB"]);
    }
    let out = bufferheap(a!["replay", resnet(), "--device-memory", "0",]);
    assert_bad_input(&out, &["--device-memory", "greater than zero"]);

    let out = bufferheap(a!["replay", resnet(), "--plot", "p.jpg",]);
    assert_bad_input(&out, &["p.jpg", ".svg or .png"]);

    let out = bufferheap(a!["replay"]);
    assert_bad_input(&out, &["TRACE"]);
}

#[test]
fn an_engine_error_names_the_file_and_the_event() {
    // ResNet-50 needs about 3 GiB at its peak: 1 GiB is out of memory at some event.
    let out = bufferheap(a!["replay", resnet(), "--device-memory", "1GiB",]);
    assert_bad_input(
        &out,
        &["resnet50_train.pkl.gz", "device 0, event ", "out of memory"],
    );
}

#[test]
fn a_bad_trace_among_good_ones_still_reports_the_good_ones() {
    let dir = tempfile::tempdir().expect("temp dir");
    let list = dir.path().join("list.pkl");
    std::fs::write(&list, b"\x80\x02]q\x00(K\x01K\x02e.").expect("write");
    let out = bufferheap(a!["replay", list, resnet(), "--json",]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("list.pkl"), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(v["peak_live_bytes"], RESNET_PEAK_LIVE);
}

#[test]
fn version_and_help() {
    let out = bufferheap(a!["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        stdout(&out).trim(),
        format!("bufferheap {}", env!("CARGO_PKG_VERSION"))
    );

    let out = bufferheap(a!["replay", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    // Wrapping depends on the terminal's width: compare with whitespace collapsed.
    let help = stdout(&out)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for words in [
        "peak live",
        "PyTorch reserved",
        "ours/live",
        "map+unmap",
        "--device-memory",
        "--plot",
        "--json",
    ] {
        assert!(help.contains(words), "{words:?} missing from: {help}");
    }
}

/// A tiny pickle writer (protocol 2) for hand-made snapshots.
mod pickle {
    pub enum V<'a> {
        Int(u64),
        Str(&'a str),
        List(Vec<V<'a>>),
        Dict(Vec<(&'a str, V<'a>)>),
    }

    pub fn dumps(v: &V) -> Vec<u8> {
        let mut out = b"\x80\x02".to_vec();
        write(v, &mut out);
        out.push(b'.');
        out
    }

    fn write(v: &V, out: &mut Vec<u8>) {
        match v {
            V::Int(n) => match i32::try_from(*n) {
                Ok(small) => {
                    out.push(b'J');
                    out.extend(small.to_le_bytes());
                }
                Err(_) => {
                    // LONG1: little-endian two's complement; 9 bytes hold any u64.
                    out.extend([0x8a, 9]);
                    out.extend(n.to_le_bytes());
                    out.push(0);
                }
            },
            V::Str(s) => {
                out.push(b'X');
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s.as_bytes());
            }
            V::List(items) => {
                out.extend(b"](");
                items.iter().for_each(|i| write(i, out));
                out.push(b'e');
            }
            V::Dict(pairs) => {
                out.extend(b"}(");
                for (k, val) in pairs {
                    write(&V::Str(k), out);
                    write(val, out);
                }
                out.push(b'u');
            }
        }
    }

    pub fn event<'a>(action: &'a str, addr: u64, size: u64) -> V<'a> {
        V::Dict(vec![
            ("action", V::Str(action)),
            ("addr", V::Int(addr)),
            ("size", V::Int(size)),
            ("stream", V::Int(0)),
        ])
    }

    pub fn snapshot(device_traces: Vec<Vec<V>>) -> Vec<u8> {
        dumps(&V::Dict(vec![
            ("segments", V::List(Vec::new())),
            (
                "device_traces",
                V::List(device_traces.into_iter().map(V::List).collect()),
            ),
        ]))
    }
}

#[test]
fn every_device_of_a_trace_is_a_row_and_skipped_events_are_warnings() {
    use pickle::event;
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("two_gpus.pickle");
    let mib = 1 << 20;
    let big = 5 << 30; // above 2^31: written as LONG1
    std::fs::write(
        &trace,
        pickle::snapshot(vec![
            vec![
                event("alloc", 0x7f00_0000_0000, 3 * mib),
                event("free_requested", 0x7f00_0000_0000, 3 * mib),
                event("free_completed", 0x7f00_0000_0000, 3 * mib),
            ],
            vec![
                event("alloc", 0x7f10_0000_0000, big),
                event("alloc", 0x7f20_0000_0000, mib),
                event("free_completed", 0x7f20_0000_0000, mib),
                // Freed twice: the second free names no live block.
                event("free_completed", 0x7f20_0000_0000, mib),
                event("some_future_action", 0, 0),
                event("free_completed", 0x7f10_0000_0000, big),
            ],
        ]),
    )
    .expect("write");

    let out = bufferheap(a!["replay", trace, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(rows.len(), 2, "{}", stdout(&out));
    assert_eq!(rows[0]["device"], 0);
    assert_eq!(rows[1]["device"], 1);
    assert_eq!(rows[0]["peak_live_bytes"], 3 * mib);
    assert_eq!(rows[1]["peak_live_bytes"], big + mib);
    assert_eq!(rows[1]["trace_name"], "two_gpus (device 1)");
    assert_eq!(rows[0]["warnings"], Value::Array(Vec::new()));
    let warnings = rows[1]["warnings"].as_array().expect("a list");
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 2, "{err}");
    for line in err.lines() {
        assert!(line.starts_with("warning: "), "{err}");
        assert!(line.contains("two_gpus.pickle (device 1): "), "{err}");
    }

    // One plot per device.
    let svg = dir.path().join("p.svg");
    let out = bufferheap(a!["replay", trace, "--plot", svg]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    for name in ["p-two_gpus-device0.svg", "p-two_gpus-device1.svg"] {
        let text = std::fs::read_to_string(dir.path().join(name)).expect(name);
        assert!(text.contains("PyTorch reserved"), "{name}");
    }
    assert!(
        stdout(&out).contains("two_gpus (device 1)"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_snapshot_with_nothing_to_replay_is_bad_input() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("empty.pickle");
    std::fs::write(&trace, pickle::snapshot(Vec::new())).expect("write");
    let out = bufferheap(a!["replay", trace]);
    assert_bad_input(&out, &["empty.pickle", "nothing to replay"]);
}

#[test]
fn a_plot_never_replaces_a_trace_being_replayed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("snap.svg");
    std::fs::copy(resnet(), &trace).expect("copy");
    let before = std::fs::read(&trace).expect("read");
    let out = bufferheap(a!["replay", trace, "--plot", trace]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("would replace a trace"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(&trace).expect("read"),
        before,
        "the trace is intact"
    );
    assert!(stdout(&out).contains("snap"), "the row is still reported");
}

#[test]
fn a_plot_that_cannot_be_written_does_not_stop_the_other_devices() {
    use pickle::event;
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("two.pickle");
    let one = |addr| {
        vec![
            event("alloc", addr, 1 << 20),
            event("free_completed", addr, 1 << 20),
        ]
    };
    std::fs::write(
        &trace,
        pickle::snapshot(vec![one(0x7f00_0000_0000), one(0x7f10_0000_0000)]),
    )
    .expect("write");
    // A directory where device 0's plot would go.
    std::fs::create_dir(dir.path().join("p-two-device0.svg")).expect("mkdir");
    let plot = dir.path().join("p.svg");
    let out = bufferheap(a!["replay", trace, "--json", "--plot", plot]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).lines().count(),
        2,
        "both devices: {}",
        stdout(&out)
    );
    assert!(dir.path().join("p-two-device1.svg").is_file());
}

/// A two-device trace in `dir` whose device 0 asks for 2 GiB (more than a 1 GiB device has)
/// and whose device 1 fits.
fn trace_failing_on_device_0(dir: &Path) -> PathBuf {
    use pickle::event;
    let trace = dir.join("two.pickle");
    std::fs::write(
        &trace,
        pickle::snapshot(vec![
            vec![event("alloc", 0x7f00_0000_0000, 2 << 30)],
            vec![event("alloc", 0x7f10_0000_0000, 1 << 20)],
        ]),
    )
    .expect("write");
    trace
}

#[test]
fn a_device_that_fails_to_replay_does_not_stop_the_other_devices() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = trace_failing_on_device_0(dir.path());
    let out = bufferheap(a!["replay", trace, "--json", "--device-memory", "1GiB"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("device 0"), "{}", stderr(&out));
    let rows: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "device 1 still has its row: {}",
        stdout(&out)
    );
    assert_eq!(rows[0]["device"], 1);
}

#[test]
fn a_closed_stdout_does_not_erase_a_failure_already_reported() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = trace_failing_on_device_0(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_bufferheap"))
        .args(["replay", "--json", "--device-memory", "1GiB"])
        .arg(&trace)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The reader goes away before anything is written.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: "), "{err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
}

#[test]
fn a_snapshot_naming_too_many_devices_is_bad_input() {
    use pickle::event;
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("many.pickle");
    let traces = (0..1025u64)
        .map(|d| vec![event("alloc", 0x7f00_0000_0000 + (d << 32), 512)])
        .collect();
    std::fs::write(&trace, pickle::snapshot(traces)).expect("write");
    let out = bufferheap(a!["replay", trace]);
    assert_bad_input(&out, &["many.pickle", "1025 devices", "damaged"]);
}
