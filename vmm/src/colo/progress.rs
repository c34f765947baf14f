//! Progress of long copies (the initial sync, a re-protection's RAM and disk copy): a bar
//! with bytes, rate and ETA on a terminal (indicatif), plain lines every few seconds
//! otherwise (a log file, a cluster agent's output).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(2);

/// One copy's progress.
pub struct Progress {
    what: &'static str,
    total: u64,
    started: Instant,
    bar: Option<ProgressBar>,
    last_line: Instant,
}

impl Progress {
    /// Starts showing the progress of copying `total` bytes, named `what` ("initial sync").
    pub fn new(what: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{msg}: [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what);
            b
        });
        let now = Instant::now();
        Self {
            what,
            total,
            started: now,
            bar,
            last_line: now,
        }
    }

    /// `done` of the total bytes are copied.
    pub fn set(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        } else if self.last_line.elapsed() >= LINE_EVERY {
            self.last_line = Instant::now();
            eprintln!("{}", self.line(done));
        }
    }

    /// The copy is complete: the bar goes, one last line stays.
    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        eprintln!("{}", self.line(self.total));
    }

    /// "initial sync: 42% (27 of 64 MiB, 812 MiB/s, ETA 0 s)".
    fn line(&self, done: u64) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        format!(
            "{}: {:>3}% ({} of {} MiB, {:.0} MiB/s, ETA {:.0} s)",
            self.what,
            done.saturating_mul(100)
                .checked_div(self.total)
                .unwrap_or(100),
            done >> 20,
            self.total >> 20,
            rate / f64::from(1 << 20),
            eta
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_line_says_percent_sizes_and_rate() {
        let p = Progress::new("initial sync", 64 << 20);
        let l = p.line(16 << 20);
        assert!(l.starts_with("initial sync:  25% (16 of 64 MiB, "), "{l}");
        assert!(l.contains(" MiB/s, ETA "), "{l}");
        let empty = Progress::new("disk resync", 0);
        assert!(empty.line(0).contains("100%"), "{}", empty.line(0));
    }
}
