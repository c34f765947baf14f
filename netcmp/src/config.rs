//! The proxy's limits and policies, with QEMU colo-compare's defaults.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::passthrough::PassthroughRule;

/// What happens to a frame that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MalformedPolicy {
    /// Count it and forward it unchanged: client frames to both VMs, primary frames to the
    /// client (without compare). The secondary's are never forwarded, nor are empty and
    /// one-byte client frames (on a VM's socket they would be a commit marker or a pacing
    /// word).
    #[default]
    Forward,
    /// Count it and drop it.
    Drop,
}

/// Limits and policies of the compare engine.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long a primary packet waits for its secondary counterpart. After that it is
    /// released and a checkpoint is requested. Secondary output with no primary counterpart
    /// for this long also requests a checkpoint. Default 3000 ms.
    pub compare_timeout: Duration,
    /// How often queues are scanned for packets past `compare_timeout`. Default 3000 ms.
    pub expired_scan_cycle: Duration,
    /// Most packets queued per connection and side. On overflow a checkpoint is forced
    /// (nothing is dropped). Default 1024.
    pub max_queue_size: usize,
    /// Most tracked connections. Default 65536.
    pub max_connections: usize,
    /// An open TCP connection with nothing queued is forgotten after this long without a
    /// packet. Default 2 hours.
    pub tcp_idle_timeout: Duration,
    /// A closed TCP connection, or a UDP/ICMP/other flow, with nothing queued is forgotten
    /// after this long without a packet. Default 60 s.
    pub flow_idle_timeout: Duration,
    /// What to do with frames that do not parse.
    pub malformed: MalformedPolicy,
    /// Flows that are never compared: the primary's output is released at once.
    pub passthrough: Vec<PassthroughRule>,
    /// An empty frame on the primary's port is the primary's commit marker: the checkpoint
    /// that covers everything the primary sent before it has committed. The proxy acts on
    /// it in order with the primary's frames, so the primary may resume right after writing
    /// it, with no round trip to a controller. Only for a primary that never forwards an
    /// empty frame of its guest (colo's does not). Default off: an empty frame is
    /// malformed.
    pub commit_marker: bool,
    /// Pace the secondary VM: when its oldest TCP output not yet compared is older than
    /// this, the secondary has run that far ahead of the primary, and each checkpoint will
    /// throw that work away (the secondary restarts from the primary's state). The proxy
    /// then sends the secondary's port a [`PACE_HOLD`](crate::framing::PACE_HOLD) frame,
    /// and a [`PACE_GO`](crate::framing::PACE_GO) frame once that output is younger than
    /// half this (or compared, or a checkpoint committed). Only for a secondary that
    /// understands them on a socket port (colo's does); a tap cannot carry them. Default
    /// off.
    pub secondary_lead: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            compare_timeout: Duration::from_millis(3000),
            expired_scan_cycle: Duration::from_millis(3000),
            max_queue_size: 1024,
            max_connections: 65536,
            tcp_idle_timeout: Duration::from_secs(2 * 3600),
            flow_idle_timeout: Duration::from_secs(60),
            malformed: MalformedPolicy::Forward,
            passthrough: Vec::new(),
            commit_marker: false,
            secondary_lead: None,
        }
    }
}

impl Config {
    /// Checks that every limit can work.
    ///
    /// # Errors
    /// [`Error::Config`] for a zero timeout, scan cycle, queue size or connection limit.
    pub fn validate(&self) -> Result<()> {
        if self.compare_timeout.is_zero() {
            return Err(Error::Config("compare_timeout must be positive".into()));
        }
        if self.expired_scan_cycle.is_zero() {
            return Err(Error::Config("expired_scan_cycle must be positive".into()));
        }
        if self.max_queue_size == 0 {
            return Err(Error::Config("max_queue_size must be at least 1".into()));
        }
        if self.secondary_lead.is_some_and(|d| d.is_zero()) {
            return Err(Error::Config("secondary_lead must be positive".into()));
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be at least 1".into()));
        }
        Ok(())
    }
}
