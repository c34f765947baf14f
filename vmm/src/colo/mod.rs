//! COLO itself: a primary and a secondary VM in coarse-grained lock-step.
//!
//! - [`link`]: the control connection with its heartbeat.
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
pub mod failover;
pub mod link;
pub mod metrics;
pub mod primary;
pub mod push;
pub mod qmp;
pub mod secondary;

#[cfg(test)]
mod lifetime_tests;

use std::time::Duration;

/// Errors of the COLO controller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ColoError {
    /// Setting up a side failed.
    #[error("setup: {0}")]
    Setup(String),
    /// The VM failed.
    #[error("VM")]
    Vm(#[from] colo_machine::Error),
    /// A transport operation failed.
    #[error("{what}")]
    Transport {
        /// What was being done.
        what: &'static str,
        /// The transport's error.
        #[source]
        source: colo_transport::Error,
    },
    /// The RAM cache refused a step.
    #[error("RAM cache")]
    Cache(#[from] colo_ramcache::Error),
    /// The peer is gone (connection closed, heartbeat timeout, or declared lost).
    #[error("peer lost: {0}")]
    PeerLost(String),
    /// The peer said something out of order.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The peer sent another message than the protocol step waits for.
    #[error("protocol: expected {expected}, got {got}")]
    Unexpected {
        /// The message the step waits for.
        expected: link::MessageId,
        /// The message that came.
        got: link::MessageId,
    },
}

impl ColoError {
    /// Wraps a transport error with what was being done.
    pub fn transport(what: &'static str) -> impl FnOnce(colo_transport::Error) -> Self {
        move |source| Self::Transport { what, source }
    }
}

/// The result type of the controller.
pub type Result<T> = std::result::Result<T, ColoError>;

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
}

/// How long one protocol step may take before the peer counts as lost.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The disk replication address: the control address's port plus one.
pub fn blk_addr(control: &str) -> Result<std::net::SocketAddr> {
    let a: std::net::SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(control)
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| ColoError::Setup(format!("cannot resolve {control}")))?;
    let port = a
        .port()
        .checked_add(1)
        .ok_or_else(|| ColoError::Setup(format!("{control}: no port after it for the disk")))?;
    Ok(std::net::SocketAddr::new(a.ip(), port))
}
