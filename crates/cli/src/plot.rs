//! `--plot`: live bytes, our reserved bytes and PyTorch's reserved bytes over the trace, as an
//! SVG or a PNG file.
//!
//! Text is laid out (and, for PNG, drawn) with DejaVu Sans, embedded in the binary, so a plot
//! looks the same on every machine and needs no system fonts. SVG text is left to the viewer's
//! `sans-serif` font; its widths are measured with DejaVu Sans.
//!
//! Invariants: the format comes from the file's extension (`.svg` or `.png`, any case) and
//! anything else is refused before a trace is read; a plot is rendered in memory first, so a
//! file is written whole or not at all; a drawing failure is a bug (internal error), a failure
//! to write the file is the user's (bad input).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::anyhow;
use bufferheap_replay::SeriesPoint;
use plotters::backend::RGBPixel;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::Failure;
use crate::run::{Row, write_file};

/// DejaVu Sans (see `assets/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 675;
const GIB: f64 = (1u64 << 30) as f64;

const LIVE_COLOR: RGBColor = RGBColor(40, 40, 40);
const OURS_COLOR: RGBColor = RGBColor(31, 119, 180);
const PYTORCH_COLOR: RGBColor = RGBColor(230, 110, 20);

/// The file formats `--plot` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    Svg,
    Png,
}

impl PlotFormat {
    /// The format named by the file's extension.
    pub fn from_path(path: &Path) -> Result<PlotFormat, anyhow::Error> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        match ext.as_deref() {
            Some("svg") => Ok(PlotFormat::Svg),
            Some("png") => Ok(PlotFormat::Png),
            Some(other) => Err(anyhow!(
                "--plot {}: unsupported plot format \".{other}\" (use a file name ending in .svg or .png)",
                path.display()
            )),
            None => Err(anyhow!(
                "--plot {}: the file name has no extension (use a file name ending in .svg or .png)",
                path.display()
            )),
        }
    }
}

/// The file for one row: `base` itself for a single row, else `base` with `-tag` inserted
/// before the extension (`plot.svg` -> `plot-gpt2_train.svg`).
pub fn file_for(base: &Path, tag: &str, several: bool) -> PathBuf {
    if several {
        with_suffix(base, tag)
    } else {
        base.to_path_buf()
    }
}

/// `path` with `-suffix` inserted before its extension.
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{suffix}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{suffix}"),
    };
    path.with_file_name(name)
}

/// Renders the plot of `row` and writes it to `path`.
pub fn write(row: &Row, format: PlotFormat, path: &Path) -> Result<(), Failure> {
    let bytes = render(row, format).map_err(|e| {
        Failure::Internal(anyhow!("cannot draw the plot for {}: {e}", path.display()))
    })?;
    write_file(path, &bytes)
}

/// The plot of `row` as the bytes of a file of `format`.
pub fn render(row: &Row, format: PlotFormat) -> Result<Vec<u8>, String> {
    register_font()?;
    match format {
        PlotFormat::Svg => {
            let mut svg = String::new();
            {
                let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
                draw(&root, row, Lines::Joined)?;
                root.present().map_err(|e| e.to_string())?;
            }
            Ok(svg.into_bytes())
        }
        PlotFormat::Png => {
            let mut rgb = vec![255u8; WIDTH as usize * HEIGHT as usize * 3];
            {
                let backend =
                    BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut rgb, (WIDTH, HEIGHT))
                        .map_err(|e| e.to_string())?;
                let root = backend.into_drawing_area();
                draw(&root, row, Lines::Segments)?;
                root.present().map_err(|e| e.to_string())?;
            }
            encode_png(&rgb, WIDTH, HEIGHT)
        }
    }
}

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err("the embedded font does not load".into())
    }
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(out)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// Decimals that tell the y axis's ticks apart (about 10 ticks up to `y_max` GiB): 0 for
/// tens of GiB, 1 for a few GiB, more for small traces.
fn y_decimals(y_max: f64) -> usize {
    (1.0 - y_max.log10()).ceil().clamp(0.0, 6.0) as usize
}

/// Event counts on the x axis: 950, 20k, 1.2M.
fn event_label(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// One line of the chart: legend label, color, stroke width, points.
type Line = (String, RGBColor, u32, Vec<(f64, f64)>);

/// How thick lines are handed to the backend.
#[derive(Clone, Copy, PartialEq)]
enum Lines {
    /// One polyline per series: compact, for SVG, where the viewer draws the joins.
    Joined,
    /// One element per segment: for bitmaps, whose thick-polyline rasterizer degenerates
    /// where a line turns back on itself within a pixel column (the line vanishes or spikes).
    Segments,
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    row: &Row,
    mode: Lines,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let report = &row.report;
    let series = &report.series;
    root.fill(&WHITE).map_err(err)?;

    let pytorch = |p: &SeriesPoint| p.pytorch_reserved_bytes.max(0) as u64;
    let top = series
        .iter()
        .map(|p| p.live_bytes.max(p.reserved_bytes).max(pytorch(p)))
        .max()
        .unwrap_or(0)
        .max(report.peak_reserved_bytes)
        .max(report.peak_live_bytes)
        .max(report.pytorch_reserved_bytes.max(0) as u64);
    // Headroom above the highest line keeps the legend clear of the data.
    let y_max = if top == 0 { 1.0 } else { gib(top) * 1.32 };
    let x_max = series.last().map_or(0, |p| p.event).max(1) as f64;
    let decimals = y_decimals(y_max);

    let caption = format!(
        "{}: policy {}, {} backend",
        row.name, report.policy, report.backend
    );
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 28))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(205, 205, 205))
        // Whole events only: a short trace gets fewer ticks, never fractional ones.
        .x_labels((x_max as usize + 1).min(10))
        .x_desc("event")
        .y_desc("GiB")
        .x_label_formatter(&|x| event_label(*x))
        .y_label_formatter(&|y| format!("{y:.decimals$}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(err)?;

    let ratio = |peak: f64| {
        if report.peak_live_bytes == 0 {
            String::new()
        } else {
            format!(", {:.4}x live", peak / report.peak_live_bytes as f64)
        }
    };
    let pytorch_peak = report.pytorch_reserved_bytes.max(0) as u64;
    let lines: [Line; 3] = [
        (
            format!(
                "PyTorch reserved (peak {}{})",
                size(pytorch_peak),
                ratio(pytorch_peak as f64)
            ),
            PYTORCH_COLOR,
            2,
            envelope(series, |p| gib(pytorch(p))),
        ),
        (
            format!(
                "bufferheap reserved, policy {} (peak {}{})",
                report.policy,
                size(report.peak_reserved_bytes),
                ratio(report.peak_reserved_bytes as f64)
            ),
            OURS_COLOR,
            2,
            envelope(series, |p| gib(p.reserved_bytes)),
        ),
        (
            format!("live (peak {})", size(report.peak_live_bytes)),
            LIVE_COLOR,
            1,
            envelope(series, |p| gib(p.live_bytes)),
        ),
    ];
    for (label, color, width, points) in lines {
        let style = color.stroke_width(width);
        let path = steps(&points);
        let drawn = if mode == Lines::Joined {
            chart.draw_series(LineSeries::new(path, style))
        } else {
            chart.draw_series(
                path.windows(2)
                    .map(|w| PathElement::new(vec![w[0], w[1]], style)),
            )
        };
        drawn
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 17))
        .background_style(WHITE.mix(0.9))
        .border_style(RGBColor(160, 160, 160))
        .margin(12)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// The points of one line, at most about `2 * BUCKETS` of them: the series is cut into
/// buckets of consecutive events and each bucket keeps its lowest and its highest point, in
/// the order they happened, so no peak (or trough) is lost however long the trace.
fn envelope(series: &[SeriesPoint], value: impl Fn(&SeriesPoint) -> f64) -> Vec<(f64, f64)> {
    const BUCKETS: usize = 1500;
    let chunk = series.len().div_ceil(BUCKETS).max(1);
    let mut out = Vec::with_capacity(2 * BUCKETS + 2);
    for bucket in series.chunks(chunk) {
        let mut lo = (0, f64::INFINITY);
        let mut hi = (0, f64::NEG_INFINITY);
        for (i, p) in bucket.iter().enumerate() {
            let v = value(p);
            if v < lo.1 {
                lo = (i, v);
            }
            if v > hi.1 {
                hi = (i, v);
            }
        }
        let (first, second) = if lo.0 <= hi.0 { (lo, hi) } else { (hi, lo) };
        out.push((bucket[first.0].event as f64, first.1));
        if second.0 != first.0 {
            out.push((bucket[second.0].event as f64, second.1));
        }
    }
    if let Some(last) = series.last()
        && out.last().map(|p| p.0) != Some(last.event as f64)
    {
        out.push((last.event as f64, value(last)));
    }
    out
}

/// The line as steps: each value holds until the next point, as memory does between events.
/// Only horizontal and vertical segments, which also keeps thick bitmap lines free of the
/// spikes that sharp, nearly reversing turns otherwise draw.
fn steps(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(2 * points.len());
    for (i, &(x, y)) in points.iter().enumerate() {
        if let Some(&(_, prev_y)) = i.checked_sub(1).and_then(|j| points.get(j))
            && prev_y != y
        {
            out.push((x, prev_y));
        }
        out.push((x, y));
    }
    out
}

fn size(bytes: u64) -> String {
    bufferheap_core::format_size(usize::try_from(bytes).unwrap_or(usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_come_from_the_extension() {
        assert_eq!(
            PlotFormat::from_path(Path::new("a/p.svg")).ok(),
            Some(PlotFormat::Svg)
        );
        assert_eq!(
            PlotFormat::from_path(Path::new("P.PNG")).ok(),
            Some(PlotFormat::Png)
        );
        let e = PlotFormat::from_path(Path::new("p.jpg")).expect_err("jpg");
        assert!(
            e.to_string().contains("unsupported plot format \".jpg\""),
            "{e}"
        );
        assert!(PlotFormat::from_path(Path::new("plot")).is_err());
    }

    #[test]
    fn several_rows_get_one_file_each() {
        assert_eq!(
            file_for(Path::new("out/plot.svg"), "gpt2_train", true),
            PathBuf::from("out/plot-gpt2_train.svg")
        );
        assert_eq!(
            file_for(Path::new("plot.png"), "gpt2_train", false),
            PathBuf::from("plot.png")
        );
    }

    #[test]
    fn envelopes_keep_every_peak() {
        let series: Vec<SeriesPoint> = (0..100_000u64)
            .map(|i| SeriesPoint {
                event: i as usize,
                live_bytes: if i == 77_777 { 1000 } else { i % 7 },
                reserved_bytes: 0,
                pytorch_reserved_bytes: 0,
            })
            .collect();
        let line = envelope(&series, |p| p.live_bytes as f64);
        assert!(line.len() <= 3002, "{}", line.len());
        assert!(line.contains(&(77_777.0, 1000.0)));
        assert!(line.windows(2).all(|w| w[0].0 < w[1].0), "in event order");
        assert_eq!(line.first(), Some(&(0.0, 0.0)));
        assert_eq!(line.last().map(|p| p.0), Some(99_999.0));
        assert!(envelope(&[], |p| p.live_bytes as f64).is_empty());
    }

    #[test]
    fn steps_hold_each_value_until_the_next_point() {
        assert_eq!(
            steps(&[(0.0, 1.0), (2.0, 1.0), (3.0, 5.0)]),
            vec![(0.0, 1.0), (2.0, 1.0), (3.0, 1.0), (3.0, 5.0)]
        );
        assert!(steps(&[]).is_empty());
    }

    #[test]
    fn y_labels_have_enough_decimals() {
        assert_eq!(y_decimals(50.0), 0);
        assert_eq!(y_decimals(5.0), 1);
        assert_eq!(y_decimals(0.5), 2);
        assert_eq!(y_decimals(0.004), 4);
        assert_eq!(y_decimals(1e-12), 6);
    }

    #[test]
    fn event_labels_are_short() {
        assert_eq!(event_label(950.0), "950");
        assert_eq!(event_label(20_000.0), "20k");
        assert_eq!(event_label(1_240_000.0), "1.2M");
    }
}
