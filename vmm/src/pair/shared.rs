//! What the supervisor's threads share: the checkpoint figures from the primary's events,
//! the secondary's takeover or fencing from its events, the children's logs (to show),
//! and whether the secondary is lost.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::colo::event::TakeoverTiming;
use crate::colo::metrics::{EpochRecord, Summary};

/// Locks `m`, also when a thread panicked while it held it (the data is figures and log
/// lines, still fit to show).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A moment on both clocks: the monotonic one for this process's own intervals, the wall
/// clock (microseconds since the Unix epoch) to set beside the times the sides report.
#[derive(Debug, Clone, Copy)]
pub(super) struct Moment {
    pub(super) at: Instant,
    pub(super) unix_us: u64,
}

impl Moment {
    pub(super) fn now() -> Self {
        Self {
            at: Instant::now(),
            unix_us: crate::colo::link::unix_us(std::time::SystemTime::now()),
        }
    }

    /// Milliseconds from this moment to `later` (negative if it came before).
    pub(super) fn ms_to(&self, later: Instant) -> f64 {
        match later.checked_duration_since(self.at) {
            Some(d) => d.as_secs_f64() * 1e3,
            None => -(self.at - later).as_secs_f64() * 1e3,
        }
    }

    /// Milliseconds from this moment to a wall-clock time `unix_us` (negative if before).
    pub(super) fn ms_to_unix(&self, unix_us: u64) -> f64 {
        (unix_us as f64 - self.unix_us as f64) / 1e3
    }
}

/// The supervisor's state, written by the event and log reader threads.
#[derive(Default)]
pub(super) struct Shared {
    /// Every checkpoint's record, summed up.
    pub(super) summary: Mutex<Summary>,
    /// The last checkpoint's record, for the status line.
    pub(super) last: Mutex<Option<EpochRecord>>,
    /// The record of the longest pause (after the initial sync), to explain it.
    pub(super) longest: Mutex<Option<EpochRecord>>,
    /// When the secondary first reported that it took over (its `failover` event).
    pub(super) failover_at: Mutex<Option<Instant>>,
    /// The secondary's own times of that takeover (lost the primary, decided).
    pub(super) takeover: Mutex<Option<TakeoverTiming>>,
    /// When the proxy had switched the client to the secondary (the client's
    /// [`ClientStats::switched`](super::client::ClientStats::switched), shared).
    pub(super) proxy_switched_at: Arc<OnceLock<Instant>>,
    /// When the supervisor saw the primary process end (its pidfd, or its poll).
    pub(super) primary_exit_seen: Mutex<Option<Moment>>,
    /// Whether the secondary reported that it stayed passive (its `fenced` event).
    pub(super) fenced: AtomicBool,
    /// The longest pause of a checkpoint that failed (the secondary vanished mid-way), in
    /// microseconds.
    pub(super) aborted_pause_us: AtomicU64,
    /// New secondaries that joined (re-protection).
    pub(super) reprotected: AtomicU64,
    /// Whether the primary has lost its secondary (its `failover` event) and no new one
    /// has joined since (`protected`). Held while the proxy's mode is changed on its account,
    /// so that the supervisor's "secondary gone: primary only" and the event thread's
    /// "protected again: compare" cannot interleave. (They once did: the supervisor read
    /// "lost", the event thread switched to compare, then the supervisor switched to
    /// primary-only for good; the proxy released the PVM's output unchecked while COLO ran,
    /// and the next failover lost the acknowledged writes of the last epoch.)
    pub(super) secondary_lost: Mutex<bool>,
    /// Commits the primary reported.
    pub(super) commits: AtomicU64,
    /// The children's last log lines, each prefixed with the child's name.
    pub(super) log: Mutex<Vec<String>>,
    /// The `--metrics` file, if any.
    pub(super) metrics: Mutex<Option<std::fs::File>>,
}

impl Shared {
    /// The children's last log lines, one a line.
    pub(super) fn log_text(&self) -> String {
        lock(&self.log).join("\n")
    }
}
