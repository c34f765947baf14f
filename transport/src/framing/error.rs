//! What can go wrong reading or checking a frame, in any colo protocol.

use std::io;

/// A frame could not be read, or is not one this side will act on.
///
/// The error types of `colo_transport` and `colo_blk` wrap it (their `Frame` variant), so
/// a caller matches these cases the same way whichever protocol it speaks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer closed the connection where a frame was expected.
    #[error("the peer closed the connection")]
    PeerClosed,
    /// The connection ended in the middle of a frame.
    #[error("truncated frame: the connection ended after {got} of {want} bytes")]
    Truncated {
        /// Bytes of the frame that arrived.
        got: usize,
        /// Bytes the frame needed.
        want: usize,
    },
    /// The stream's read timeout fired before a frame started (the peer is quiet, the
    /// stream is still in step).
    #[error("no frame arrived before the read timeout")]
    Timeout,
    /// Reading from the peer failed.
    #[error("cannot receive from the peer")]
    Recv(#[source] io::Error),
    /// A frame did not start with the protocol's magic number.
    #[error(
        "bad magic {found:#010x}, expected {expected:#010x}: not a {protocol} peer, or the stream is out of step"
    )]
    BadMagic {
        /// The protocol that was expected.
        protocol: &'static str,
        /// What arrived.
        found: u32,
        /// What was expected.
        expected: u32,
    },
    /// The peer speaks another version of the protocol.
    #[error(
        "{protocol} protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}"
    )]
    VersionMismatch {
        /// The protocol.
        protocol: &'static str,
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// A frame carried a type this version of the protocol does not know.
    #[error("unknown frame type {kind} in the {protocol} protocol")]
    UnknownKind {
        /// The protocol.
        protocol: &'static str,
        /// The type code that arrived.
        kind: u16,
    },
    /// A length field is over its limit (checked before anything is allocated or read).
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// The result type of framing.
pub type Result<T> = std::result::Result<T, Error>;
