//! The pause histograms of every protected run, as one SVG file drawn with plotters (the
//! histogram panel of `colo report`).

use plotters::prelude::{IntoDrawingArea, RGBColor, SVGBackend, WHITE};

use super::{ColoBenchArgs, Kind, PAUSE_TARGET_MS, Run, mode_name};
use crate::bench::report::fmt_bytes;
use crate::colo::Mode;
use crate::report::{DrawError, HistogramPanel, LogBins, boxed, draw_histogram};

const PANEL_W: u32 = 480;
const PANEL_H: u32 = 300;
const HEADER_H: u32 = 40;

fn mode_color(m: Mode) -> RGBColor {
    match m {
        Mode::Periodic => RGBColor(0x1f, 0x77, 0xb4),
        Mode::Colo => RGBColor(0x2c, 0xa0, 0x2c),
    }
}

/// A panel's pauses in milliseconds, its title and its color.
struct RunPauses {
    title: String,
    color: RGBColor,
    pauses_ms: Vec<f64>,
}

/// The SVG of every protected run's pauses: one panel per run, a row per dirty rate and a
/// column per mode, all on the same log-spaced millisecond axis.
///
/// # Errors
/// Plotters' error, if drawing fails.
pub(super) fn pause_svg(args: &ColoBenchArgs, runs: &[Run]) -> Result<String, DrawError> {
    let panels: Vec<RunPauses> = runs
        .iter()
        .filter_map(|r| match r.kind {
            Kind::Unprotected => None,
            Kind::Protected(m) => Some(RunPauses {
                title: format!(
                    "{}{}, {} MiB/s dirty: {} pauses, max {:.2} ms",
                    mode_name(m),
                    if args.rounds > 1 {
                        format!(" #{}", r.round)
                    } else {
                        String::new()
                    },
                    r.rate_mib,
                    r.report.pauses_us.len(),
                    r.report.pause_max_ms
                ),
                color: mode_color(m),
                pauses_ms: r
                    .report
                    .pauses_us
                    .iter()
                    .map(|us| *us as f64 / 1e3)
                    .collect(),
            }),
        })
        .collect();
    let title = format!(
        "colo bench colo: checkpoint pause distribution ({:.1} s per run, checkpoint every {} \
         ms, {} RAM)",
        args.duration.as_secs_f64(),
        args.checkpoint_delay.as_secs_f64() * 1e3,
        fmt_bytes(args.ram)
    );
    histogram_svg(&title, &panels, args.modes.len().max(1))
}

/// Histograms (share of pauses per log-spaced bin, p50, p99 and target markers) in a grid
/// of `cols` columns under a title.
fn histogram_svg(title: &str, panels: &[RunPauses], cols: usize) -> Result<String, DrawError> {
    let bins = LogBins::covering(
        panels.iter().flat_map(|p| p.pauses_ms.iter().copied()),
        PAUSE_TARGET_MS * 2.0,
        10,
    );
    let rows = panels.len().div_ceil(cols).max(1);
    let size = (PANEL_W * cols as u32, HEADER_H + PANEL_H * rows as u32);
    crate::report::register_font();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(boxed)?;
        let body = root
            .titled(title, (crate::report::FONT, 18))
            .map_err(boxed)?;
        for (p, area) in panels.iter().zip(body.split_evenly((rows, cols))) {
            let panel = HistogramPanel {
                title: p.title.clone(),
                color: p.color,
                pauses_ms: &p.pauses_ms,
                target_ms: Some(PAUSE_TARGET_MS),
            };
            draw_histogram(&area, &panel, &bins)?;
        }
        root.present().map_err(boxed)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_has_one_panel_per_run_and_escapes_text() {
        let panels = [
            RunPauses {
                title: "periodic <a & b>".into(),
                color: mode_color(Mode::Periodic),
                pauses_ms: vec![0.8, 1.2, 4.0, 12.0],
            },
            RunPauses {
                title: "colo".into(),
                color: mode_color(Mode::Colo),
                pauses_ms: vec![],
            },
        ];
        let svg = histogram_svg("t", &panels, 2).expect("draw");
        let doc = roxmltree::Document::parse(&svg).expect("the SVG is XML");
        assert_eq!(doc.root_element().attribute("width"), Some("960"));
        let texts: Vec<&str> = doc
            .descendants()
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        assert!(texts.contains(&"periodic <a & b>"), "{texts:?}");
        assert!(texts.contains(&"colo"));
        assert!(texts.contains(&"no checkpoint pauses"));
        assert!(texts.contains(&"5 ms target"));
        // Four pauses in four distinct bins: four bars, of the panel's color.
        assert_eq!(svg.matches(r##"fill="#1F77B4""##).count(), 4, "{svg}");
        assert_eq!(svg.matches("<svg").count(), 1);
    }
}
