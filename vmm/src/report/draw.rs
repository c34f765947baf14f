//! The four panels of a report, drawn with plotters on any backend (SVG or PNG).

use plotters::coord::Shift;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor;

use super::bins::LogBins;
use crate::colo::metrics::{EpochRecord, Summary, Trigger};

/// The panel titles, in drawing order (left to right, top to bottom).
pub const PANEL_TITLES: [&str; 4] = [
    "Pause per checkpoint",
    "Pause distribution",
    "Pages per checkpoint",
    "Checkpoints by cause",
];

/// The font every text is drawn in (registered from the embedded DejaVu Sans).
pub const FONT: &str = "sans-serif";

/// A plotters drawing error, whatever its backend.
pub type DrawError = Box<dyn std::error::Error + Send + Sync>;

const PAUSE_COLOR: RGBColor = RGBColor(0x2c, 0xa0, 0x2c);
const BACKGROUND_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const TARGET_COLOR: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// Checkpoint causes in bar order, with their colors.
const CAUSES: [(Trigger, &str, RGBColor); 5] = [
    (
        Trigger::InitialSync,
        "initial sync",
        RGBColor(0x7f, 0x7f, 0x7f),
    ),
    (Trigger::Timer, "timer", RGBColor(0x1f, 0x77, 0xb4)),
    (Trigger::Mismatch, "mismatch", RGBColor(0xff, 0x7f, 0x0e)),
    (Trigger::Threshold, "threshold", RGBColor(0xd6, 0x27, 0x28)),
    (Trigger::Resync, "resync", RGBColor(0x94, 0x67, 0xbd)),
];

/// Whether a record is a regular checkpoint (not a full synchronization, whose pause and
/// pages would dwarf the others).
fn regular(r: &EpochRecord) -> bool {
    !matches!(r.trigger, Trigger::InitialSync | Trigger::Resync)
}

/// The x axis of the per-checkpoint panels: seconds when every record has its time,
/// the checkpoint number otherwise (files written before records carried `at_ms`).
fn x_axis(records: &[&EpochRecord]) -> (&'static str, Vec<f64>) {
    if !records.is_empty() && records.iter().all(|r| r.at_ms.is_some()) {
        let xs = records
            .iter()
            .map(|r| r.at_ms.unwrap_or(0) as f64 / 1e3)
            .collect();
        ("time since the primary started (s)", xs)
    } else {
        let xs = records.iter().map(|r| r.epoch as f64).collect();
        ("checkpoint number", xs)
    }
}

/// A range from `lo` to a little above `hi`, never empty.
fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let span = (hi - lo).max(1e-9);
    lo..hi + span * 0.05 + if hi > lo { 0.0 } else { 1.0 }
}

/// Draws the whole report on `root`: a title line, then the four panels in a 2x2 grid.
///
/// # Errors
/// The backend's drawing error.
pub fn draw_report<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    records: &[EpochRecord],
    title: &str,
) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    super::font::register();
    root.fill(&WHITE).map_err(boxed)?;
    let body = root.titled(title, (FONT, 20)).map_err(boxed)?;
    let panels = body.split_evenly((2, 2));
    let regular: Vec<&EpochRecord> = records.iter().filter(|r| regular(r)).collect();
    let pauses_ms: Vec<f64> = regular.iter().map(|r| r.pause_us as f64 / 1e3).collect();
    pause_series(&panels[0], &regular, &pauses_ms)?;
    let hist = HistogramPanel {
        title: PANEL_TITLES[1].into(),
        color: PAUSE_COLOR,
        pauses_ms: &pauses_ms,
        target_ms: None,
    };
    let bins = LogBins::covering(pauses_ms.iter().copied(), 1.0, 10);
    draw_histogram(&panels[1], &hist, &bins)?;
    pages_series(&panels[2], &regular)?;
    causes(&panels[3], records)?;
    root.present().map_err(boxed)?;
    Ok(())
}

/// Boxes a backend's drawing error.
pub fn boxed<E: std::error::Error + Send + Sync + 'static>(
    e: DrawingAreaErrorKind<E>,
) -> DrawError {
    Box::new(e)
}

/// A note in the middle of an empty panel.
fn note<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, text: &str) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let (w, h) = area.dim_in_pixel();
    let style = TextStyle::from((FONT, 14)).pos(text_anchor::Pos::new(
        text_anchor::HPos::Center,
        text_anchor::VPos::Center,
    ));
    area.draw_text(text, &style, (w as i32 / 2, h as i32 / 2))
        .map_err(boxed)
}

/// Panel 1: every regular checkpoint's pause, in milliseconds, over time.
fn pause_series<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    regular: &[&EpochRecord],
    pauses_ms: &[f64],
) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let (x_desc, xs) = x_axis(regular);
    let (x_lo, x_hi) = min_max(&xs);
    let (_, y_hi) = min_max(pauses_ms);
    let mut chart = ChartBuilder::on(area)
        .caption(PANEL_TITLES[0], (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(padded(x_lo, x_hi), padded(0.0, y_hi))
        .map_err(boxed)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("pause (ms)")
        .label_style((FONT, 12))
        .draw()
        .map_err(boxed)?;
    if regular.is_empty() {
        return note(area, "no checkpoint pauses");
    }
    let points = xs.iter().copied().zip(pauses_ms.iter().copied());
    chart
        .draw_series(LineSeries::new(points.clone(), PAUSE_COLOR.stroke_width(1)))
        .map_err(boxed)?;
    if regular.len() <= 400 {
        chart
            .draw_series(points.map(|p| Circle::new(p, 2, PAUSE_COLOR.filled())))
            .map_err(boxed)?;
    }
    Ok(())
}

/// The smallest and largest of `v` (0 and 0 for none).
fn min_max(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// One pause histogram.
#[derive(Debug)]
pub struct HistogramPanel<'a> {
    /// Its caption.
    pub title: String,
    /// The bars' color.
    pub color: RGBColor,
    /// The pauses, in milliseconds.
    pub pauses_ms: &'a [f64],
    /// A target pause to mark, in milliseconds.
    pub target_ms: Option<f64>,
}

/// A histogram of pauses: the share of them per log-spaced bin of `bins`, with p50 and p99
/// markers (and the target's, if it has one).
///
/// # Errors
/// The backend's drawing error.
pub fn draw_histogram<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    p: &HistogramPanel<'_>,
    bins: &LogBins,
) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    super::font::register();
    let counts = bins.counts(p.pauses_ms.iter().copied());
    let n = p.pauses_ms.len().max(1) as f64;
    let max_pct = counts.iter().copied().max().unwrap_or(0) as f64 * 100.0 / n;
    let top = [2.0, 4.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        .into_iter()
        .find(|t| *t >= max_pct)
        .unwrap_or(100.0);
    let (lo, hi) = (bins.edge(0), bins.edge(bins.len()));
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..top)
        .map_err(boxed)?;
    chart
        .configure_mesh()
        .x_desc("pause (ms, log scale)")
        .y_desc("% of pauses")
        .label_style((FONT, 12))
        .x_labels(12)
        .x_label_formatter(&|v| format!("{v}"))
        .y_label_formatter(&|v| format!("{v}%"))
        .draw()
        .map_err(boxed)?;
    if p.pauses_ms.is_empty() {
        return note(area, "no checkpoint pauses");
    }
    chart
        .draw_series(
            counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(b, &c)| {
                    Rectangle::new(
                        [
                            (bins.edge(b), 0.0),
                            (bins.edge(b + 1), c as f64 * 100.0 / n),
                        ],
                        p.color.mix(0.75).filled(),
                    )
                }),
        )
        .map_err(boxed)?;
    let mut sorted = p.pauses_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() as f64 - 1.0) * q).round() as usize];
    let mut marks = vec![
        (format!("p50: {:.2} ms", at(0.5)), at(0.5), BLACK),
        (
            format!("p99: {:.2} ms", at(0.99)),
            at(0.99),
            RGBColor(0x88, 0x88, 0x88),
        ),
    ];
    if let Some(t) = p.target_ms {
        marks.push((format!("{t} ms target"), t, TARGET_COLOR));
    }
    for (label, x, color) in marks {
        let x = x.clamp(lo, hi);
        chart
            .draw_series(LineSeries::new([(x, 0.0), (x, top)], color.stroke_width(2)))
            .map_err(boxed)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    legend_box(&mut chart)
}

/// A line of the pages panel: its label, its color, and its figure of a record.
/// The box of series labels, in the upper right corner.
fn legend_box<'a, DB, CT>(chart: &mut ChartContext<'a, DB, CT>) -> Result<(), DrawError>
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: CoordTranslate,
{
    chart
        .configure_series_labels()
        .label_font((FONT, 12))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(boxed)
}

type PageSeries = (&'static str, RGBColor, fn(&EpochRecord) -> u64);

/// Panel 3: pages pushed per regular checkpoint, during the pause and in the background.
fn pages_series<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    regular: &[&EpochRecord],
) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let (x_desc, xs) = x_axis(regular);
    let (x_lo, x_hi) = min_max(&xs);
    let y_hi = regular
        .iter()
        .map(|r| r.pause_pages.max(r.background_pages))
        .max()
        .unwrap_or(0) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(PANEL_TITLES[2], (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(padded(x_lo, x_hi), padded(0.0, y_hi))
        .map_err(boxed)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("pages (4 KiB)")
        .label_style((FONT, 12))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(boxed)?;
    if regular.is_empty() {
        return note(area, "no checkpoints after the initial sync");
    }
    let series: [PageSeries; 2] = [
        ("during the pause", PAUSE_COLOR, |r| r.pause_pages),
        ("in the background", BACKGROUND_COLOR, |r| {
            r.background_pages
        }),
    ];
    for (label, color, pages) in series {
        let points = xs.iter().zip(regular).map(|(x, r)| (*x, pages(r) as f64));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(1)))
            .map_err(boxed)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    legend_box(&mut chart)
}

/// Panel 4: how many checkpoints each cause took (every record, the syncs included).
fn causes<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    records: &[EpochRecord],
) -> Result<(), DrawError>
where
    DB::ErrorType: 'static,
{
    let counts: Vec<u64> = CAUSES
        .iter()
        .map(|(t, _, _)| records.iter().filter(|r| r.trigger == *t).count() as u64)
        .collect();
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(PANEL_TITLES[3], (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(56)
        // A segmented 0..n has n + 1 segments: one per cause.
        .build_cartesian_2d(
            (0..CAUSES.len() - 1).into_segmented(),
            0..top + top / 10 + 1,
        )
        .map_err(boxed)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_desc("checkpoints")
        .x_desc("cause")
        .label_style((FONT, 12))
        .x_labels(CAUSES.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => CAUSES.get(*i).map_or("", |c| c.1).to_string(),
            _ => String::new(),
        })
        .draw()
        .map_err(boxed)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let mut bar = Rectangle::new(
                [(SegmentValue::Exact(i), 0), (SegmentValue::Exact(i + 1), c)],
                CAUSES[i].2.filled(),
            );
            bar.set_margin(0, 0, 12, 12);
            bar
        }))
        .map_err(boxed)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            Text::new(
                c.to_string(),
                (SegmentValue::CenterOf(i), c),
                TextStyle::from((FONT, 12)).pos(text_anchor::Pos::new(
                    text_anchor::HPos::Center,
                    text_anchor::VPos::Bottom,
                )),
            )
        }))
        .map_err(boxed)?;
    Ok(())
}

/// The report's title: the source, and the summary figures of its checkpoints.
pub fn title(name: &str, records: &[EpochRecord]) -> String {
    let mut s = Summary::default();
    for r in records {
        s.add(r);
    }
    format!(
        "{name}: {} checkpoints; pause p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s.epochs,
        s.pause(0.5).as_secs_f64() * 1e3,
        s.pause(0.99).as_secs_f64() * 1e3,
        s.pause(1.0).as_secs_f64() * 1e3,
    )
}
