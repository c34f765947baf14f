//! Per-epoch metrics: recorded by the primary, printed as JSON lines for `colo pair`, and
//! summarized on exit.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a checkpoint was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    /// The first, full synchronization.
    InitialSync,
    /// The checkpoint delay passed.
    Timer,
    /// The proxy saw different output.
    Mismatch,
    /// Too many dirty pages (or a full disk buffer).
    Threshold,
    /// The first checkpoint of a secondary that joined a running primary.
    Resync,
}

/// One checkpoint, as the primary saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Checkpoint number (1 is the initial sync).
    pub epoch: u64,
    /// When the pause began, in milliseconds since the primary started (absent in records
    /// written before colo recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    /// Why it was taken.
    pub trigger: Trigger,
    /// How long the PVM was paused, in microseconds.
    pub pause_us: u64,
    /// Of the pause: microseconds until every vCPU had stopped (a vCPU busy in a device
    /// exit, e.g. a disk flush, finishes it first).
    #[serde(default)]
    pub park_us: u64,
    /// Each vCPU's stop time, in microseconds from the request to stop, in vCPU order (0
    /// for a vCPU that was stopped already, e.g. running disk requests off the machine);
    /// the slowest is the pause's part in `park_us`.
    #[serde(default)]
    pub vcpu_stop_us: Vec<u64>,
    /// Of the pause: microseconds to read and clear the dirty log.
    #[serde(default)]
    pub collect_us: u64,
    /// Of the pause, from its start: microseconds until the last pages were posted and
    /// the push commit sent (park, dirty log, posting; not the acknowledgement, which
    /// overlaps the answer).
    #[serde(default)]
    pub push_us: u64,
    /// Of the pause: microseconds to save the device state and queue the disk's
    /// end-of-epoch marker.
    #[serde(default)]
    pub barrier_us: u64,
    /// Of the pause: microseconds from sending the state until the secondary held the
    /// whole checkpoint (its answer comes once the pages have landed, the disk marker has
    /// arrived and the state is in), with the push and disk acknowledgements taken.
    #[serde(default)]
    pub answer_us: u64,
    /// Of the pause: microseconds to hand the epoch's commit to the proxy (with
    /// `--commit-marker`, writing the marker into the PVM's network output). The PVM
    /// resumes after it.
    #[serde(default)]
    pub release_us: u64,
    /// Pages pushed during the pause.
    pub pause_pages: u64,
    /// Of those, hot pages kept writable (pushed at every checkpoint, see `--hot-budget`).
    #[serde(default)]
    pub hot_pages: u64,
    /// Pages pushed in the background during the epoch.
    pub background_pages: u64,
    /// Payload bytes of the whole epoch.
    pub bytes: u64,
    /// Bytes of device state.
    pub state_bytes: u64,
    /// The page faults KVM had taken for the PVM's vCPUs when the checkpoint committed,
    /// since the VM started (`pf_taken`; mostly the write-protect faults of dirty
    /// logging); absent where the kernel keeps no binary statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_faults: Option<u64>,
    /// The PVM's vCPUs' exits from the guest by then (`exits`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_exits: Option<u64>,
}

/// Opens `path` for appending checkpoint records (`--metrics`), creating it if needed.
///
/// # Errors
/// [`ColoError::File`](super::ColoError::File) naming the file.
pub fn open_stream(path: &std::path::Path) -> Result<std::fs::File, super::ColoError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(super::ColoError::file("open the metrics file", path))
}

/// Running totals and the pause distribution.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Every pause, in microseconds (kept to compute percentiles).
    pub pauses_us: Vec<u64>,
    /// Every pause's slowest vCPU stop, in microseconds.
    pub stops_us: Vec<u64>,
    /// vCPUs of the VM (from the latest checkpoint).
    pub vcpus: usize,
    /// Checkpoints taken.
    pub epochs: u64,
    /// Pages pushed.
    pub pages: u64,
    /// Bytes pushed.
    pub bytes: u64,
    /// Checkpoints by trigger: timer, mismatch, threshold.
    pub by_trigger: [u64; 3],
}

impl Summary {
    /// Adds one epoch (the initial sync is counted but kept out of the pause figures).
    pub fn add(&mut self, r: &EpochRecord) {
        self.epochs += 1;
        self.pages += r.pause_pages + r.background_pages;
        self.bytes += r.bytes;
        match r.trigger {
            Trigger::InitialSync | Trigger::Resync => return,
            Trigger::Timer => self.by_trigger[0] += 1,
            Trigger::Mismatch => self.by_trigger[1] += 1,
            Trigger::Threshold => self.by_trigger[2] += 1,
        }
        self.pauses_us.push(r.pause_us);
        self.stops_us
            .push(r.vcpu_stop_us.iter().copied().max().unwrap_or(0));
        if !r.vcpu_stop_us.is_empty() {
            self.vcpus = r.vcpu_stop_us.len();
        }
    }

    /// The p-th percentile pause (0..=1).
    pub fn pause(&self, p: f64) -> Duration {
        percentile(&self.pauses_us, p)
    }

    /// The p-th percentile of the slowest vCPU's stop time (0..=1).
    pub fn stop(&self, p: f64) -> Duration {
        percentile(&self.stops_us, p)
    }

    /// A one-paragraph summary.
    pub fn text(&self, secs: f64) -> String {
        format!(
            "{} checkpoints in {secs:.1} s ({:.1}/s; timer {}, mismatch {}, threshold {}); \
             pause p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (slowest of {} vCPU(s) stopped in \
             {} us p99); {} pages ({:.1} MiB) pushed",
            self.epochs,
            self.epochs as f64 / secs.max(1e-9),
            self.by_trigger[0],
            self.by_trigger[1],
            self.by_trigger[2],
            self.pause(0.5).as_secs_f64() * 1e3,
            self.pause(0.99).as_secs_f64() * 1e3,
            self.pause(1.0).as_secs_f64() * 1e3,
            self.vcpus.max(1),
            self.stop(0.99).as_micros(),
            self.pages,
            self.bytes as f64 / f64::from(1 << 20)
        )
    }
}

/// The p-th percentile (0..=1) of microsecond values.
fn percentile(us: &[u64], p: f64) -> Duration {
    let mut v = us.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    Duration::from_micros(v.get(i).copied().unwrap_or(0))
}
