//! What `bufferheap replay` prints on stdout: a table for people, JSON Lines for programs.
//!
//! Invariants:
//! - A JSON line is one object holding `trace` (the path as given), `trace_name`, every field
//!   `ReplayReport` serializes (its own names and units: bytes, seconds), and `warnings`.
//!   Lines are compact, so one result is one line and several are JSON Lines.
//! - The table has one row per result, sizes in `format_size`'s units, ratios to 4 decimals;
//!   numbers are right-aligned so that columns compare at a glance.

use bufferheap_core::format_size;
use bufferheap_replay::ReplayReport;

use crate::Failure;
use crate::run::{Row, write_stdout};

/// One JSON line.
#[derive(serde::Serialize)]
struct JsonRow<'a> {
    trace: String,
    trace_name: &'a str,
    #[serde(flatten)]
    report: &'a ReplayReport,
    warnings: &'a [String],
}

/// The JSON object of a row, on one line.
pub fn json_line(row: &Row) -> Result<String, Failure> {
    let json = JsonRow {
        trace: row.path.display().to_string(),
        trace_name: &row.name,
        report: &row.report,
        warnings: &row.warnings,
    };
    serde_json::to_string(&json)
        .map_err(|e| Failure::Internal(anyhow::anyhow!(e).context("cannot serialize the report")))
}

/// Prints the row as one JSON line on stdout.
pub fn print_json_line(row: &Row) -> Result<(), Failure> {
    let mut line = json_line(row)?;
    line.push('\n');
    write_stdout(&line)
}

/// Prints the table of all rows on stdout.
pub fn print_table(rows: &[Row]) -> Result<(), Failure> {
    write_stdout(&table(rows))
}

/// Column alignment.
#[derive(Clone, Copy, PartialEq)]
enum Align {
    Left,
    Right,
}

/// Columns: two header lines, alignment, and the cell of a row.
type Column = (&'static str, &'static str, Align, fn(&Row) -> String);

const COLUMNS: [Column; 13] = [
    ("trace", "", Align::Left, |r| r.name.clone()),
    ("policy", "", Align::Left, |r| r.report.policy.to_string()),
    ("backend", "", Align::Left, |r| r.report.backend.to_string()),
    ("events", "", Align::Right, |r| r.report.events.to_string()),
    ("allocs", "", Align::Right, |r| r.report.allocs.to_string()),
    ("peak", "live", Align::Right, |r| {
        size(r.report.peak_live_bytes)
    }),
    ("PyTorch", "reserved", Align::Right, |r| {
        size(r.report.pytorch_reserved_bytes.max(0) as u64)
    }),
    ("ours", "reserved", Align::Right, |r| {
        size(r.report.peak_reserved_bytes)
    }),
    ("PyTorch", "/live", Align::Right, |r| {
        format!("{:.4}", r.report.pytorch_over_live)
    }),
    ("ours", "/live", Align::Right, |r| {
        format!("{:.4}", r.report.reserved_over_live)
    }),
    ("heap", "allocs", Align::Right, |r| {
        r.report.device_allocs.to_string()
    }),
    ("map+unmap", "/1k allocs", Align::Right, |r| {
        format!("{:.1}", r.report.map_unmap_per_1000_allocs)
    }),
    ("replay", "s", Align::Right, |r| {
        format!("{:.2}", r.report.replay_seconds)
    }),
];

fn size(bytes: u64) -> String {
    format_size(usize::try_from(bytes).unwrap_or(usize::MAX))
}

/// The table as text, with a trailing newline.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| COLUMNS.iter().map(|c| (c.3)(r)).collect())
        .collect();
    let widths: Vec<usize> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|row| row[i].chars().count())
                .chain([c.0.len(), c.1.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |texts: &mut dyn Iterator<Item = &str>| -> String {
        let mut out = String::new();
        for (i, text) in texts.enumerate() {
            let (w, align) = (widths[i], COLUMNS[i].2);
            if i > 0 {
                out.push_str("  ");
            }
            let pad = w.saturating_sub(text.chars().count());
            if align == Align::Right {
                out.push_str(&" ".repeat(pad));
            }
            out.push_str(text);
            if align == Align::Left {
                out.push_str(&" ".repeat(pad));
            }
        }
        let mut out = out.trim_end().to_owned();
        out.push('\n');
        out
    };
    let mut out = String::new();
    out.push_str(&line(&mut COLUMNS.iter().map(|c| c.0)));
    out.push_str(&line(&mut COLUMNS.iter().map(|c| c.1)));
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in &cells {
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bufferheap_core::Policy;
    use bufferheap_replay::BackendKind;
    use std::path::PathBuf;

    fn row(name: &str, peak_live: u64, reserved: u64) -> Row {
        Row {
            path: PathBuf::from(format!("traces/{name}.pkl.gz")),
            name: name.to_owned(),
            file_tag: name.to_owned(),
            report: ReplayReport {
                device: 0,
                policy: Policy::Mps,
                backend: BackendKind::Sim,
                events: 1234,
                allocs: 600,
                initial_live_blocks: 1,
                initial_live_bytes: 512,
                peak_live_bytes: peak_live,
                peak_reserved_bytes: reserved,
                reserved_over_live: reserved as f64 / peak_live as f64,
                final_reserved_bytes: reserved,
                pytorch_reserved_bytes: 2 * peak_live as i64,
                pytorch_over_live: 2.0,
                device_allocs: 7,
                device_frees: 3,
                map_calls: 0,
                unmap_calls: 0,
                map_unmap_per_1000_allocs: 0.0,
                physical_allocs: 0,
                alloc_retries: 0,
                orphan_frees: 2,
                replaced_allocs: 0,
                unknown_actions: 0,
                replay_seconds: 0.125,
                series: Vec::new(),
            },
            warnings: vec!["2 frees of addresses never allocated were skipped".into()],
        }
    }

    #[test]
    fn json_line_has_the_report_fields_and_more() {
        let line = json_line(&row("resnet", 3 << 30, 4 << 30)).expect("serializes");
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
        assert_eq!(v["trace"], "traces/resnet.pkl.gz");
        assert_eq!(v["trace_name"], "resnet");
        assert_eq!(v["policy"], "mps");
        assert_eq!(v["backend"], "sim");
        assert_eq!(v["device"], 0);
        assert_eq!(v["peak_live_bytes"], 3u64 << 30);
        assert_eq!(v["reserved_over_live"], 4.0 / 3.0);
        assert_eq!(
            v["warnings"][0],
            "2 frees of addresses never allocated were skipped"
        );
        assert!(v.get("series").is_none());
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&[
            row("a", 3 << 30, 4 << 30),
            row("longer_name", 5 << 20, 6 << 20),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        assert!(lines[0].starts_with("trace"));
        assert!(lines[3].starts_with("a            mps"), "{t}");
        assert!(
            lines[3].contains("3.00 GiB") && lines[3].contains("1.3333"),
            "{t}"
        );
        assert!(
            lines[4].contains("5.00 MiB") && lines[4].contains("2.0000"),
            "{t}"
        );
        // Right-aligned columns end at the same place on every line.
        let end = |l: &str, s: &str| l.find(s).map(|i| i + s.len());
        assert_eq!(end(lines[3], "1234"), end(lines[4], "1234"));
    }
}
