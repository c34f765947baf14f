//! The pause histograms of every protected run, as one hand-written SVG file.

use std::fmt::Write as _;

use super::{ColoBenchArgs, Kind, PAUSE_TARGET_MS, Run, mode_name};
use crate::bench::report::fmt_bytes;
use crate::colo::Mode;

/// Log-spaced histogram bins in milliseconds: `per_decade` bins per power of ten, from
/// `lo` over `decades` decades.
#[derive(Debug, Clone, Copy, PartialEq)]
struct LogBins {
    /// Lowest edge, a power of ten (as an exponent).
    lo_exp: i32,
    decades: u32,
    per_decade: u32,
}

impl LogBins {
    /// Bins that cover every value of `values_ms` and `also_ms`, from 10 us up.
    fn covering(values_ms: impl IntoIterator<Item = f64>, also_ms: f64, per_decade: u32) -> Self {
        let (mut lo, mut hi) = (also_ms, also_ms);
        for v in values_ms.into_iter().filter(|v| *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let lo_exp = (lo.max(0.01).log10().floor() as i32).min(2);
        let hi_exp = (hi.log10().ceil() as i32).max(lo_exp + 1);
        Self {
            lo_exp,
            decades: (hi_exp - lo_exp) as u32,
            per_decade: per_decade.max(1),
        }
    }

    fn len(&self) -> usize {
        (self.decades * self.per_decade) as usize
    }

    /// The lower edge of bin `i` (`i == len()` gives the top edge).
    fn edge(&self, i: usize) -> f64 {
        10f64.powf(f64::from(self.lo_exp) + i as f64 / f64::from(self.per_decade))
    }

    /// Where `v` lies on the axis, 0 at the lowest edge and 1 at the top one (clamped).
    fn position(&self, v: f64) -> f64 {
        if v <= 0.0 {
            return 0.0;
        }
        ((v.log10() - f64::from(self.lo_exp)) / f64::from(self.decades)).clamp(0.0, 1.0)
    }

    /// The bin of `v`; values outside the range land in the first or the last bin.
    fn index(&self, v: f64) -> usize {
        let x = self.position(v) * self.len() as f64;
        // A value on an edge belongs to the bin above it, despite rounding in log10.
        ((x + 1e-9).floor() as usize).min(self.len() - 1)
    }

    fn counts(&self, values_ms: impl IntoIterator<Item = f64>) -> Vec<u64> {
        let mut c = vec![0; self.len()];
        for v in values_ms {
            c[self.index(v)] += 1;
        }
        c
    }
}

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick label for 10^e ms.
fn decade_label(e: i32) -> String {
    if e >= 0 {
        format!("{}", 10u64.pow(e as u32))
    } else {
        format!("{:.*}", (-e) as usize, 10f64.powi(e))
    }
}

/// A round upper bound of a y axis in percent, whose quarters are round too.
fn nice_top(max_pct: f64) -> f64 {
    [2.0, 4.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0]
        .into_iter()
        .find(|t| *t >= max_pct)
        .unwrap_or(100.0)
}

/// One panel of the histogram file.
struct Panel<'a> {
    title: String,
    color: &'static str,
    pauses_us: &'a [u64],
    p50_ms: f64,
    p99_ms: f64,
}

const PANEL_W: f64 = 440.0;
const PANEL_H: f64 = 250.0;
/// Plot area inside a panel: left, right, top and bottom margins.
const PLOT: (f64, f64, f64, f64) = (52.0, 14.0, 34.0, 44.0);
const HEADER_H: f64 = 64.0;

fn mode_color(m: Mode) -> &'static str {
    match m {
        Mode::Periodic => "#1f77b4",
        Mode::Colo => "#2ca02c",
    }
}

/// The SVG of every protected run's pauses: one panel per run, a row per dirty rate and a
/// column per mode, all on the same log-spaced millisecond axis.
pub(super) fn pause_svg(args: &ColoBenchArgs, runs: &[Run]) -> String {
    let cols = args.modes.len().max(1);
    let panels: Vec<Panel<'_>> = runs
        .iter()
        .filter_map(|r| match r.kind {
            Kind::Unprotected => None,
            Kind::Protected(m) => Some(Panel {
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
                pauses_us: &r.report.pauses_us,
                p50_ms: r.report.pause_p50_ms,
                p99_ms: r.report.pause_p99_ms,
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
    let legend: Vec<(String, &'static str)> = args
        .modes
        .iter()
        .map(|&m| (mode_name(m), mode_color(m)))
        .collect();
    histogram_svg(&title, &legend, &panels, cols)
}

/// A pause in microseconds, in milliseconds.
fn ms(us: &u64) -> f64 {
    *us as f64 / 1e3
}

/// Hand-written SVG: bar histograms (share of pauses per log-spaced bin) in a grid of
/// `cols` columns, with p50, p99 and target markers and a legend.
fn histogram_svg(
    title: &str,
    legend: &[(String, &'static str)],
    panels: &[Panel<'_>],
    cols: usize,
) -> String {
    let bins = LogBins::covering(
        panels.iter().flat_map(|p| p.pauses_us.iter().map(ms)),
        PAUSE_TARGET_MS * 2.0,
        10,
    );
    let rows = panels.len().div_ceil(cols).max(1);
    let (w, h) = (
        PANEL_W * cols as f64,
        HEADER_H + PANEL_H * rows as f64 + 8.0,
    );
    let mut s = String::new();
    write_header(&mut s, title, legend, (w, h));
    for (i, p) in panels.iter().enumerate() {
        let origin = (
            (i % cols) as f64 * PANEL_W,
            HEADER_H + (i / cols) as f64 * PANEL_H,
        );
        write_panel(&mut s, p, &bins, origin);
    }
    s.push_str("</svg>\n");
    s
}

/// The SVG element of `size`, the title and the legend: one swatch per mode, then the
/// markers.
fn write_header(s: &mut String, title: &str, legend: &[(String, &'static str)], size: (f64, f64)) {
    let (w, h) = size;
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        esc(title)
    );
    // Legend: one swatch per mode, then the markers.
    let mut x = 10.0;
    let y = 44.0;
    for (name, color) in legend {
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}" fill-opacity="0.75"/><text x="{}" y="{y}">{} (share of pauses per bin)</text>"#,
            y - 10.0,
            x + 16.0,
            esc(name)
        );
        x += 16.0 + 7.0 * (name.len() as f64 + 28.0);
    }
    for (label, style) in [
        ("p50", r#"stroke="black""#),
        ("p99", r#"stroke="black" stroke-dasharray="4,3""#),
        (
            "5 ms target",
            r##"stroke="#d62728" stroke-dasharray="2,2""##,
        ),
    ] {
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="{}" x2="{}" y2="{}" {style} stroke-width="1.5"/><text x="{}" y="{y}">{label}</text>"#,
            y - 4.0,
            x + 22.0,
            y - 4.0,
            x + 26.0
        );
        x += 26.0 + 7.0 * (label.len() as f64 + 2.0);
    }
}

/// One panel whose top left corner is at `origin`: the share of its pauses per bin of
/// `bins`, the p50, p99 and target markers, the axes.
fn write_panel(s: &mut String, p: &Panel<'_>, bins: &LogBins, origin: (f64, f64)) {
    let (ox, oy) = origin;
    let (ml, mr, mt, mb) = PLOT;
    let (pw, ph) = (PANEL_W - ml - mr, PANEL_H - mt - mb);
    let (x0, y0) = (ox + ml, oy + mt + ph);
    let xat = |v: f64| x0 + bins.position(v) * pw;
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" font-weight="bold">{}</text>"#,
        ox + 8.0,
        oy + 16.0,
        esc(&p.title)
    );
    let counts = bins.counts(p.pauses_us.iter().map(ms));
    let n = p.pauses_us.len().max(1) as f64;
    let max_pct = counts.iter().copied().max().unwrap_or(0) as f64 * 100.0 / n;
    let top = nice_top(max_pct);
    let yat = |pct: f64| y0 - pct / top * ph;
    // Grid and y ticks.
    for k in 0..=4 {
        let pct = top * f64::from(k) / 4.0;
        let yy = yat(pct);
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{yy}" x2="{}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{pct}%</text>"##,
            x0 + pw,
            x0 - 4.0,
            yy + 4.0
        );
    }
    // Bars.
    for (b, &c) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
        let (xa, xb) = (xat(bins.edge(b)), xat(bins.edge(b + 1)));
        let yy = yat(c as f64 * 100.0 / n);
        let _ = writeln!(
            s,
            r#"<rect x="{xa:.1}" y="{yy:.1}" width="{:.1}" height="{:.1}" fill="{}" fill-opacity="0.75"><title>{:.3}-{:.3} ms: {c}</title></rect>"#,
            (xb - xa - 0.5).max(0.5),
            y0 - yy,
            p.color,
            bins.edge(b),
            bins.edge(b + 1)
        );
    }
    if p.pauses_us.is_empty() {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">no checkpoint pauses</text>"#,
            x0 + pw / 2.0,
            y0 - ph / 2.0
        );
    } else {
        for (v, dash) in [(p.p50_ms, ""), (p.p99_ms, r#" stroke-dasharray="4,3""#)] {
            let xx = xat(v);
            let _ = writeln!(
                s,
                r#"<line x1="{xx:.1}" y1="{}" x2="{xx:.1}" y2="{y0}" stroke="black" stroke-width="1.5"{dash}/>"#,
                y0 - ph
            );
        }
    }
    let xt = xat(PAUSE_TARGET_MS);
    let _ = writeln!(
        s,
        r##"<line x1="{xt:.1}" y1="{}" x2="{xt:.1}" y2="{y0}" stroke="#d62728" stroke-width="1.5" stroke-dasharray="2,2"/>"##,
        y0 - ph
    );
    // Axes, x ticks (decades labelled, 2x and 5x marked) and labels.
    let _ = writeln!(
        s,
        r#"<path d="M{x0},{} V{y0} H{}" fill="none" stroke="black"/>"#,
        y0 - ph,
        x0 + pw
    );
    for d in 0..=bins.decades as i32 {
        let e = bins.lo_exp + d;
        let xx = xat(10f64.powi(e));
        let _ = writeln!(
            s,
            r#"<line x1="{xx:.1}" y1="{y0}" x2="{xx:.1}" y2="{}" stroke="black"/><text x="{xx:.1}" y="{}" text-anchor="middle">{}</text>"#,
            y0 + 5.0,
            y0 + 17.0,
            decade_label(e)
        );
        if d < bins.decades as i32 {
            for m in [2.0, 5.0] {
                let xm = xat(m * 10f64.powi(e));
                let _ = writeln!(
                    s,
                    r#"<line x1="{xm:.1}" y1="{y0}" x2="{xm:.1}" y2="{}" stroke="black"/>"#,
                    y0 + 3.0
                );
            }
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">checkpoint pause (ms, log scale)</text>"#,
        x0 + pw / 2.0,
        y0 + 32.0
    );
    let (lx, ly) = (ox + 11.0, oy + mt + ph / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{lx}" y="{ly}" text-anchor="middle" transform="rotate(-90 {lx} {ly})">% of pauses</text>"#
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_bins_cover_the_values_and_the_target() {
        let b = LogBins::covering([0.3, 42.0], 10.0, 10);
        assert_eq!((b.lo_exp, b.decades), (-1, 3));
        assert_eq!(b.len(), 30);
        assert!((b.edge(0) - 0.1).abs() < 1e-12);
        assert!((b.edge(30) - 100.0).abs() < 1e-9);
        // Values on a decade edge go to the bin that starts there.
        assert_eq!(b.index(1.0), 10);
        assert_eq!(b.index(10.0), 20);
        assert_eq!(b.index(0.1), 0);
        // Outside the range: clamped into the first and last bin.
        assert_eq!(b.index(0.0), 0);
        assert_eq!(b.index(1e6), 29);
        let c = b.counts([0.1, 0.5, 1.0, 1.0, 99.0, 500.0]);
        assert_eq!(c.iter().sum::<u64>(), 6);
        assert_eq!(c[10], 2);
        assert_eq!(c[29], 2);
    }

    #[test]
    fn log_bins_of_nothing_still_span_a_decade() {
        let b = LogBins::covering([], 10.0, 4);
        assert_eq!((b.lo_exp, b.decades, b.len()), (1, 1, 4));
        assert_eq!(decade_label(-2), "0.01");
        assert_eq!(decade_label(2), "100");
    }

    #[test]
    fn svg_has_one_panel_per_run_and_escapes_text() {
        let pauses = [800, 1200, 4000, 12_000];
        let panels = [
            Panel {
                title: "periodic <a & b>".into(),
                color: "#1f77b4",
                pauses_us: &pauses,
                p50_ms: 1.2,
                p99_ms: 12.0,
            },
            Panel {
                title: "colo".into(),
                color: "#2ca02c",
                pauses_us: &[],
                p50_ms: 0.0,
                p99_ms: 0.0,
            },
        ];
        let svg = histogram_svg("t", &[("periodic".into(), "#1f77b4")], &panels, 2);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("periodic &lt;a &amp; b&gt;"));
        assert!(svg.contains("no checkpoint pauses"));
        // Four pauses in four distinct bins: four bars.
        assert_eq!(svg.matches("<rect x=").count(), 4 + 1);
        assert_eq!(svg.matches("<svg").count(), 1);
    }
}
