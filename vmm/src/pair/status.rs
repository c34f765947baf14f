//! The live status line of `colo pair`: once a second on stderr, rewritten in place on a
//! terminal.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use colo_netcmp::proxy::Proxy;

use super::client::ClientStats;
use super::shared::{Shared, lock};

/// When the line was last shown, and the client's replies then (for the request rate).
pub(super) struct StatusLine {
    tty: bool,
    last: Instant,
    last_replies: u64,
}

impl StatusLine {
    /// A status line whose first showing is a second from now.
    pub(super) fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            last_replies: 0,
        }
    }

    /// Shows the line if a second has passed: epochs, checkpoints per second, pauses, the
    /// last epoch's pages, mismatches and the client's figures, `el` into the load.
    pub(super) fn tick(
        &mut self,
        el: Duration,
        shared: &Shared,
        proxy: &Proxy,
        stats: &ClientStats,
        failed_over: bool,
    ) {
        if self.last.elapsed() < Duration::from_secs(1) {
            return;
        }
        let replies = stats.replies.load(Ordering::Relaxed);
        let rate = (replies - self.last_replies) as f64 / self.last.elapsed().as_secs_f64();
        self.last_replies = replies;
        self.last = Instant::now();
        let s = lock(&shared.summary).clone();
        let last = lock(&shared.last).clone();
        let m = proxy.metrics();
        let line = format!(
            "{:>5.1}s | epochs {} | {:.1} ckpt/s | pause p50 {:.2} ms p99 {:.2} ms | {} pages {:.2} MiB last epoch | mismatches {} | client {:.0} req/s, {} lost, {} contradicted{}",
            el.as_secs_f64(),
            s.epochs,
            s.epochs as f64 / el.as_secs_f64().max(0.1),
            s.pause(0.5).as_secs_f64() * 1e3,
            s.pause(0.99).as_secs_f64() * 1e3,
            last.as_ref()
                .map_or(0, |r| r.pause_pages + r.background_pages),
            last.as_ref()
                .map_or(0.0, |r| r.bytes as f64 / f64::from(1 << 20)),
            m.checkpoint_requests,
            rate,
            stats.lost_acked.load(Ordering::Relaxed),
            stats.contradictions.load(Ordering::Relaxed),
            if failed_over { " | FAILED OVER" } else { "" },
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }
}
