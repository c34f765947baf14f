//! The one error type of this crate.

use std::io;

/// Everything that can go wrong in the control protocol or the page-push path.
///
/// A decoding error means the peer sent something this side will not act on; the
/// connection it came from is closed. No variant is ever produced after a byte has been
/// written outside a registered region: bounds are checked before any data is placed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Binding a listening socket failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address that was asked for.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Connecting to the peer failed.
    #[error("cannot connect to {addr}")]
    Connect {
        /// The peer's address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed.
    #[error("cannot accept a connection")]
    Accept(#[source] io::Error),
    /// The peer did not authenticate (or refused this side's proof).
    #[error("authentication failed")]
    Auth(#[from] colo_auth::AuthError),
    /// No peer authenticated on a listener.
    #[error("waiting for the peer")]
    AuthAccept(#[from] colo_auth::AcceptError),
    /// Writing to the peer failed.
    #[error("cannot send to the peer")]
    Send(#[source] io::Error),
    /// Setting a socket option failed.
    #[error("cannot set socket option {option}")]
    SocketOption {
        /// The option's name.
        option: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Starting a worker thread failed.
    #[error("cannot start a worker thread")]
    Thread(#[source] io::Error),
    /// A frame could not be read, or failed the checks every protocol makes (magic,
    /// version, known type, length limits).
    #[error(transparent)]
    Frame(#[from] crate::framing::Error),
    /// A frame was well formed but broke a rule of the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The two sides disagree on something the handshake checks.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// The peer refused our handshake and said why.
    #[error("the peer refused the handshake: {0}")]
    Rejected(String),
    /// A write named a region key the receiver did not register.
    #[error("remote key {found:#x} does not match the registered region's key")]
    BadKey {
        /// The key presented.
        found: u64,
    },
    /// An access outside a region, a bitmap that does not fit its region, or a region
    /// that cannot be mapped: checked before any byte is placed.
    #[error(transparent)]
    Memory(#[from] colo_memory::Error),
    /// Waiting for the peer took longer than allowed.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
    /// The transport was already shut down by an earlier error or by the peer.
    #[error("the transport is closed")]
    Closed,
    /// A work request could not be posted (send queue full, too many SGEs, a message
    /// larger than the send buffer, or the queue pair is gone).
    #[error("cannot post a work request: {0}")]
    Post(String),
    /// A work request on a queue pair completed with an error status.
    #[error("{what} failed: {status}")]
    Completion {
        /// What the request was.
        what: &'static str,
        /// The completion status.
        status: crate::verbs::WcStatus,
    },
    /// The libfabric backend failed.
    #[cfg(feature = "ofi")]
    #[error(transparent)]
    Ofi(#[from] crate::ofi::OfiError),
    /// The verbs RDMA backend failed.
    #[cfg(feature = "rdma")]
    #[error(transparent)]
    Rdma(#[from] crate::rdma::RdmaError),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
