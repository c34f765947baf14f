//! The one error type of this crate.

use std::io;
use std::time::Duration;

/// Everything that can go wrong in the proxy.
///
/// Bad network input is never an error here: a malformed frame is counted in the metrics and
/// forwarded or dropped by policy. Errors are about configuration, the devices and sockets
/// the proxy talks through, and its control interface.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration cannot work (a zero limit, a bad passthrough rule, a bad port).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Opening or setting up a tap device failed.
    #[error("cannot open tap device {name}")]
    Tap {
        /// The interface name asked for.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Binding a listening socket failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address or path.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Connecting to a peer failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address or path.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Reading a frame from a port failed.
    #[error("cannot read from the {port} port")]
    Read {
        /// Which port.
        port: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing a frame to a port failed.
    #[error("cannot write to the {port} port")]
    Write {
        /// Which port.
        port: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A length-prefixed stream announced a frame longer than the limit: the stream is out
    /// of step or the peer is not a frame socket, so the connection is closed.
    #[error("frame of {len} bytes announced on a stream exceeds the limit of {max}")]
    FrameTooLong {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// A one-byte frame from a VM names no [`RoleWord`](crate::framing::RoleWord) (a newer
    /// VMM, or a stream out of step).
    #[error("unknown role word {0:#04x}")]
    UnknownRoleWord(u8),
    /// A role word must be a one-byte frame.
    #[error("a role word is one byte, not {0}")]
    RoleWordLength(usize),
    /// The proxy runs in cluster mode: the VMs' role words and commit markers decide, so a
    /// controller cannot commit checkpoints or change the mode.
    #[error("the proxy runs in cluster mode: the VMs' role words decide, not a controller")]
    ClusterMode,
    /// A port closed (end of file on a socket that is not re-accepted, a tap that went away).
    #[error("the {0} port closed")]
    PortClosed(&'static str),
    /// Starting a worker thread failed.
    #[error("cannot start a worker thread")]
    Thread(#[source] io::Error),
    /// The proxy thread is gone (it stopped on an error or was shut down).
    #[error("the proxy is not running")]
    Stopped,
    /// The proxy did not answer a control request in time.
    #[error("timed out after {0:?} waiting for the proxy to {1}")]
    Timeout(Duration, &'static str),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
