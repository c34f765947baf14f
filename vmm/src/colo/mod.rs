//! COLO itself: a primary and a secondary VM in coarse-grained lock-step.
//!
//! - [`link`]: the control connection with its heartbeat, and why a peer counts as lost
//!   ([`link::LostReason`]).
//! - [`event`]: what a side reports to a supervisor (`colo pair`) and what it is asked,
//!   as typed JSON lines.
//! - [`primary`]: the checkpoint loop of the primary (background push of dirty pages
//!   while the PVM runs, then a short pause for the last pages and the device state).
//! - [`secondary`]: the secondary, which stages each epoch in the RAM cache and applies it
//!   only once the whole epoch has arrived, and takes over when the primary is lost.
//!
//! The epoch protocol is the one drawn in `colo_transport::control`, with one addition:
//! `CheckpointRequest` carries the push epoch that will close the checkpoint, so the
//! secondary knows which push epoch to hold back until it has applied the checkpoint
//! (every earlier push epoch is released at once, see `colo_ramcache`).

pub mod cli;
pub mod error;
pub mod event;
pub mod failover;
pub mod link;
pub mod metrics;
pub mod metrics_http;
pub mod primary;
pub mod progress;
pub mod prometheus;
pub mod push;
pub mod qmp;
pub mod role;
pub mod secondary;

#[cfg(test)]
mod lifetime_tests;
#[cfg(test)]
mod split_ram_tests;

use std::time::Duration;

pub use error::{Chain, ColoError, Result};

/// What the secondary VM does between checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// COLO: the SVM runs, its output is compared with the primary's.
    Colo,
    /// Periodic (Remus-style): the SVM stays paused; output waits for the checkpoint.
    Periodic,
}

/// Timing of checkpoints and heartbeats.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Time between checkpoints (`x-checkpoint-delay`).
    pub checkpoint_delay: Duration,
    /// Time between background pushes of dirty pages within an epoch.
    pub push_interval: Duration,
    /// Heartbeat settings.
    pub heartbeat: link::Heartbeat,
    /// COLO or periodic.
    pub mode: Mode,
    /// A checkpoint is forced when this many pages are dirty (0: never).
    pub dirty_threshold: u64,
    /// Most pages the primary keeps writable because the guest rewrites them all the time
    /// (`--hot-budget`; 0: none): they go into every checkpoint instead of taking a
    /// write-protect fault after every collection.
    pub hot_budget_pages: u64,
    /// The last background round before each checkpoint flushes the hot pages
    /// (`--hot-flush`, see `colo_dirty_track::Collection::Flush`).
    pub hot_flush: bool,
    /// Say the VM's role to a proxy in cluster mode at each transition (`--role-words`,
    /// see [`role`]).
    pub role_words: bool,
}

/// How long one protocol step may take before the peer counts as lost.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The disk replication address: the control address's port plus one.
pub fn blk_addr(control: &str) -> Result<std::net::SocketAddr> {
    let a: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(control)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ColoError::Resolve {
            addr: control.to_string(),
        })?;
    let port = a
        .port()
        .checked_add(1)
        .ok_or_else(|| ColoError::NoDiskPort {
            addr: control.to_string(),
        })?;
    Ok(std::net::SocketAddr::new(a.ip(), port))
}
