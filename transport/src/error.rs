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
    /// Mapping memory for a region failed.
    #[error("cannot map {len} bytes for a region")]
    Map {
        /// The size asked for.
        len: usize,
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
    /// A write or read fell outside a registered region.
    #[error(
        "access at offset {offset} of {len} bytes falls outside the region of {region_len} bytes"
    )]
    OutOfBounds {
        /// Offset into the region.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// The region's size.
        region_len: u64,
    },
    /// A write named a region key the receiver did not register.
    #[error("remote key {found:#x} does not match the registered region's key")]
    BadKey {
        /// The key presented.
        found: u64,
    },
    /// An epoch commit carried a bitmap of the wrong size or with bits past the last page.
    #[error("epoch bitmap has {found} words, expected {expected} for {pages} pages")]
    BitmapSize {
        /// Words received.
        found: usize,
        /// Words expected.
        expected: usize,
        /// Pages in the region.
        pages: u64,
    },
    /// An epoch bitmap marked pages past the end of the region.
    #[error("epoch bitmap marks pages past the last page ({pages} pages)")]
    BitmapExcess {
        /// Pages in the region.
        pages: u64,
    },
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
    /// The verbs RDMA backend failed.
    #[cfg(feature = "rdma")]
    #[error(transparent)]
    Rdma(#[from] crate::rdma::RdmaError),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
