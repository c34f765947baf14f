//! `colo report`: plots of a checkpoint metrics file (`colo primary --metrics FILE`, `colo
//! pair --metrics FILE`: one [`EpochRecord`](crate::colo::metrics::EpochRecord) per line)
//! as one SVG or PNG image of four panels: the pause of every checkpoint over time, the
//! pause distribution on log-spaced bins, the pages pushed per checkpoint, and the
//! checkpoints by cause. `colo bench colo` draws its pause histograms with the same code.

mod bins;
mod draw;
mod font;
mod load;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use plotters::prelude::{BitMapBackend, IntoDrawingArea, SVGBackend};

pub use bins::LogBins;
pub use draw::{DrawError, FONT, HistogramPanel, boxed, draw_histogram, draw_report};
pub use font::register as register_font;
pub use load::Records;

/// `colo report`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example: colo pair --duration 10s --metrics m.jsonl; colo report m.jsonl \
                  --out m.svg"
)]
pub struct ReportArgs {
    /// The metrics file: one checkpoint record (JSON) per line, as `colo primary --metrics`
    /// and `colo pair --metrics` write it.
    metrics: PathBuf,
    /// The image to write; its extension picks the format: .svg or .png.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// The image's size in pixels, WIDTHxHEIGHT.
    #[arg(long, default_value = "1200x900", value_parser = parse_size)]
    size: (u32, u32),
}

/// Everything `colo report` can fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The output's extension names no format colo draws.
    #[error("--out {}: unknown image format; the file name must end in .svg or .png", .0.display())]
    Format(PathBuf),
    /// The metrics file cannot be read.
    #[error("cannot read the metrics file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The metrics file holds no checkpoint record.
    #[error(
        "{} holds no checkpoint records ({}); expected the JSON lines of `colo primary \
         --metrics` or `colo pair --metrics`",
        path.display(),
        if *skipped == 0 {
            "it is empty".to_string()
        } else {
            format!("none of its {skipped} lines is one")
        }
    )]
    Empty {
        /// The file.
        path: PathBuf,
        /// Its lines that were not records.
        skipped: usize,
    },
    /// The image cannot be drawn or written.
    #[error("cannot draw {}", path.display())]
    Draw {
        /// The image file.
        path: PathBuf,
        /// Plotters' error.
        #[source]
        source: DrawError,
    },
}

impl Error {
    /// The process exit code: 2 for a bad command line, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Format(_) => 2,
            _ => 1,
        }
    }
}

/// The result of `colo report`'s operations.
pub type Result<T> = std::result::Result<T, Error>;

/// An image format, chosen by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Format {
    /// Scalable vector graphics.
    Svg,
    /// A PNG bitmap.
    Png,
}

impl Format {
    /// The format of `path`, by its extension (either case).
    ///
    /// # Errors
    /// [`Error::Format`] for any other extension, or none.
    pub fn of(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(Error::Format(path.to_owned())),
        }
    }
}

fn parse_size(s: &str) -> std::result::Result<(u32, u32), String> {
    let bad =
        || format!("{s:?} is not WIDTHxHEIGHT in pixels, each from 200 to 10000 (e.g. 1200x900)");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h) = (w.trim().parse::<u32>(), h.trim().parse::<u32>());
    match (w, h) {
        (Ok(w), Ok(h)) if (200..=10_000).contains(&w) && (200..=10_000).contains(&h) => Ok((w, h)),
        _ => Err(bad()),
    }
}

/// Draws `records` as a report titled `title` into `out` (SVG or PNG by its extension),
/// `size` pixels.
///
/// # Errors
/// [`Error::Format`] for an unknown extension, [`Error::Draw`] if drawing or writing fails.
pub fn render(
    records: &[crate::colo::metrics::EpochRecord],
    title: &str,
    out: &Path,
    size: (u32, u32),
) -> Result<()> {
    let format = Format::of(out)?;
    let draw_err = |source| Error::Draw {
        path: out.to_owned(),
        source,
    };
    match format {
        Format::Svg => draw_report(
            &SVGBackend::new(out, size).into_drawing_area(),
            records,
            title,
        ),
        Format::Png => draw_report(
            &BitMapBackend::new(out, size).into_drawing_area(),
            records,
            title,
        ),
    }
    .map_err(draw_err)
}

/// Reads the metrics file at `metrics` and draws its report into `out`; returns how many
/// records it drew and the note about skipped lines, if any.
///
/// # Errors
/// As [`Records::load`] and [`render`].
pub fn report_file(
    metrics: &Path,
    out: &Path,
    size: (u32, u32),
) -> Result<(usize, Option<String>)> {
    // The format first: a bad --out is refused before any reading.
    Format::of(out)?;
    let r = Records::load(metrics)?;
    let name = metrics.file_name().map_or_else(
        || metrics.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    render(&r.records, &draw::title(&name, &r.records), out, size)?;
    Ok((r.records.len(), r.skipped_note()))
}

/// Runs `colo report`: writes the image and says what it drew.
///
/// # Errors
/// As [`report_file`].
pub fn run(args: &ReportArgs) -> Result<()> {
    let (n, skipped) = report_file(&args.metrics, &args.out, args.size)?;
    println!("wrote {} ({n} checkpoints)", args.out.display());
    if let Some(note) = skipped {
        eprintln!("{}: {note}", args.metrics.display());
    }
    Ok(())
}
