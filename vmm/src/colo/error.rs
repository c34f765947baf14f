//! The one error type of the controller (and of `colo pair`), and [`Chain`], which shows an
//! error with its sources on one line.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::event::ExitReason;
use super::link::{LostReason, MessageId};

/// Errors of the COLO controller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ColoError {
    /// A command-line option is out of range, or one that is needed is missing.
    #[error("{0}")]
    Usage(&'static str),
    /// Neither `--pair-key` nor `--insecure`.
    #[error(
        "no pair key: make one with `colo keygen --out pair.key`, copy it to both hosts \
         (mode 0600) and give both sides --pair-key pair.key; or run both with --insecure \
         (then anyone who reaches their ports can write into the guest)"
    )]
    NoPairKey,
    /// The pair key file cannot be used.
    #[error(transparent)]
    Key(#[from] colo_auth::KeyError),
    /// A connection of the pair did not authenticate.
    #[error("{what}: authentication failed")]
    Auth {
        /// Which connection.
        what: &'static str,
        /// Why.
        #[source]
        source: colo_auth::AuthError,
    },
    /// No peer authenticated on a listener.
    #[error(transparent)]
    AuthAccept(#[from] colo_auth::AcceptError),
    /// `--transport rdma` where this build or this host cannot do RDMA.
    #[error("--transport rdma: {0}")]
    NoRdma(String),
    /// `--transport ofi` where this build has no libfabric.
    #[cfg(not(feature = "ofi"))]
    #[error("--transport ofi: {0}")]
    NoOfi(String),
    /// `--rdma-device` names a device that is not there.
    #[cfg(feature = "rdma")]
    #[error("--rdma-device {device}: no such device; present: {}", present.join(", "))]
    NoSuchRdmaDevice {
        /// The device asked for.
        device: String,
        /// The devices there are.
        present: Vec<String>,
    },
    /// An address does not resolve.
    #[error("cannot resolve {addr}")]
    Resolve {
        /// The address (host or host:port).
        addr: String,
    },
    /// The control address's port is the last one: disk replication needs the next.
    #[error("{addr}: no port after it for the disk")]
    NoDiskPort {
        /// The control address.
        addr: String,
    },
    /// Listening on a TCP address failed.
    #[error("cannot listen for {what} on {addr}")]
    Listen {
        /// Who would connect.
        what: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Connecting to a TCP address failed.
    #[error("cannot connect {what} to {addr}")]
    Connect {
        /// The connection's purpose.
        what: &'static str,
        /// The address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An operation on a file, a directory or a Unix socket failed.
    #[error("cannot {what} {}", path.display())]
    File {
        /// What was done ("open the metrics file").
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another system call failed.
    #[error("cannot {what}")]
    Io {
        /// What was done ("accept the disk replication").
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the {thread} thread")]
    Spawn {
        /// The thread's purpose.
        thread: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
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
    /// A step of the disk replication failed.
    #[error("disk replication: {what}")]
    Disk {
        /// The step ("checkpoint barrier").
        what: &'static str,
        /// The replication's error.
        #[source]
        source: colo_blk::Error,
    },
    /// The peer is gone (connection closed, heartbeat timeout, or declared lost).
    #[error("peer lost")]
    PeerLost(#[source] LostReason),
    /// The primary has no secondary now (it left COLO).
    #[error("no secondary")]
    NoPeer,
    /// Ctrl-C, SIGTERM, QMP `quit` or `--duration` ended a wait before it was done.
    #[error("stopped before the peer came")]
    Stopped,
    /// A protocol step waited too long for the peer's message.
    #[error("protocol: no {} within {} ms", waited_for(expected), after.as_millis())]
    Timeout {
        /// The message waited for (`None`: any).
        expected: Option<MessageId>,
        /// How long.
        after: Duration,
    },
    /// The peer sent another message than the protocol step waits for.
    #[error("protocol: expected {expected}, got {got}")]
    Unexpected {
        /// The message the step waits for.
        expected: MessageId,
        /// The message that came.
        got: MessageId,
    },
    /// The peer sent a message no step waits for now.
    #[error("protocol: unexpected {got}")]
    Stray {
        /// The message that came.
        got: MessageId,
    },
    /// The push epoch that closes a checkpoint did not land in time.
    #[error("protocol: push epoch {push_epoch} did not land within {} ms", after.as_millis())]
    NotLanded {
        /// The push epoch.
        push_epoch: u64,
        /// How long the secondary waited.
        after: Duration,
    },
    /// The secondary lost the primary before it held any checkpoint.
    #[error("{reason} before the first checkpoint: nothing to take over")]
    NothingToTakeOver {
        /// Why the primary counts as lost.
        reason: ExitReason,
    },
    /// `colo status`: the QMP socket could not be used.
    #[error("QMP {}", path.display())]
    QmpIo {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `colo status`: the QMP socket answered something that is not JSON.
    #[error("QMP {}: bad reply {line:?}", path.display())]
    QmpJson {
        /// The socket.
        path: PathBuf,
        /// The line that came.
        line: String,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// `colo status`: the QMP socket answered, but not what was asked for.
    #[error("QMP {}: expected {expected}, got {got}", path.display())]
    QmpAnswer {
        /// The socket.
        path: PathBuf,
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: serde_json::Value,
    },
    /// `--qmp`: something other than a socket is at the path; it is left as it is.
    #[error(
        "--qmp {}: {kind} is there; only a stale socket is replaced (remove it or choose \
         another path)",
        path.display()
    )]
    QmpPathTaken {
        /// The path.
        path: PathBuf,
        /// What is there.
        kind: super::qmp::PathKind,
    },
    /// `--qmp`: a socket at the path accepts connections: another process serves it.
    #[error(
        "--qmp {}: a live socket is there (another process serves it); refusing to take it \
         over",
        path.display()
    )]
    QmpSocketInUse {
        /// The path.
        path: PathBuf,
    },
    /// `colo pair`: the proxy failed.
    #[error("proxy")]
    Proxy(#[source] colo_netcmp::Error),
    /// `colo pair`: a child process could not be started.
    #[error("cannot start the {name}")]
    Child {
        /// "primary" or "secondary".
        name: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `colo pair`: no two adjacent loopback ports are free.
    #[error("no two adjacent free loopback ports")]
    NoFreePorts,
    /// `colo pair`: the primary did not connect its event socket.
    #[error("the primary did not connect its event socket:\n{log}")]
    NoEvents {
        /// The children's last log lines.
        log: String,
    },
    /// `colo pair`: the primary never committed its initial sync.
    #[error("no initial sync:\n{log}")]
    NoInitialSync {
        /// The children's last log lines.
        log: String,
    },
    /// `colo pair`: the client got no reply at all.
    #[error("the client got no reply at all:\n{log}")]
    NoReplies {
        /// The children's last log lines.
        log: String,
    },
    /// `colo pair`: the client saw lost or contradicted data.
    #[error(
        "the client saw {lost} lost acknowledged writes and {contradicted} contradicted replies"
    )]
    DataLost {
        /// Acknowledged writes lost.
        lost: u64,
        /// Replies that contradicted earlier ones.
        contradicted: u64,
    },
}

fn waited_for(expected: &Option<MessageId>) -> String {
    expected.map_or_else(|| "message".to_string(), |m| m.to_string())
}

impl ColoError {
    /// Wraps a transport error with what was being done.
    pub fn transport(what: &'static str) -> impl FnOnce(colo_transport::Error) -> Self {
        move |source| Self::Transport { what, source }
    }

    /// Wraps an OS error with what was being done.
    pub fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }

    /// Wraps an OS error with what was being done to `path`.
    pub fn file(what: &'static str, path: &std::path::Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| Self::File { what, path, source }
    }

    /// Wraps a disk replication error with the step that failed.
    pub fn disk(what: &'static str) -> impl FnOnce(colo_blk::Error) -> Self {
        move |source| Self::Disk { what, source }
    }

    /// Wraps a thread's spawn error with the thread's purpose.
    pub fn spawn(thread: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Spawn { thread, source }
    }
}

/// The result type of the controller.
pub type Result<T> = std::result::Result<T, ColoError>;

/// An error and its sources on one line (`a: b: c`), for logs and for reasons that keep
/// an error's text.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_shows_every_source_once() {
        let e = ColoError::Disk {
            what: "checkpoint barrier",
            source: colo_blk::Error::DiskSize(3),
        };
        assert_eq!(
            Chain(&e).to_string(),
            "disk replication: checkpoint barrier: disk size 3 is not a non-zero multiple of 512 bytes"
        );
        let e = ColoError::Timeout {
            expected: None,
            after: Duration::from_millis(50),
        };
        assert_eq!(e.to_string(), "protocol: no message within 50 ms");
    }
}
