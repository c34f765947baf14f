//! The one error type of this crate.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in block replication.
///
/// A decoding error means the peer sent something this side will not act on: the
/// connection it came from is closed, and nothing from the bad frame reached a disk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Opening or creating a disk or buffer file failed.
    #[error("cannot open {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A disk's size is zero or not a whole number of sectors.
    #[error("disk size {0} is not a non-zero multiple of 512 bytes")]
    DiskSize(u64),
    /// An access is not aligned to 512-byte sectors, or is empty.
    #[error("access at offset {offset} of {len} bytes is not a non-empty, 512-byte aligned span")]
    Misaligned {
        /// Byte offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
    },
    /// An access reaches past the end of the disk.
    #[error(
        "access at offset {offset} of {len} bytes reaches past the end of the {disk_len}-byte disk"
    )]
    OutOfRange {
        /// Byte offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// The disk's size.
        disk_len: u64,
    },
    /// Reading a disk failed.
    #[error("cannot read {len} bytes at offset {offset} of the disk")]
    DiskRead {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing a disk failed.
    #[error("cannot write {len} bytes at offset {offset} of the disk")]
    DiskWrite {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Making a disk durable (fdatasync) failed.
    #[error("cannot flush the disk")]
    DiskFlush(#[source] io::Error),
    /// Reading, writing or resetting the disk buffer's spill file failed.
    #[error("disk buffer spill file: cannot {op}")]
    Spill {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Starting a worker thread failed.
    #[error("cannot start a worker thread")]
    Thread(#[source] io::Error),
    /// Setting a socket option or duplicating a socket failed.
    #[error("cannot set socket option {option}")]
    SocketOption {
        /// The option's name.
        option: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing to the peer failed.
    #[error("cannot send to the peer")]
    Send(#[source] io::Error),
    /// A frame could not be read, or failed the checks every protocol makes (magic,
    /// version, known type, length limits).
    #[error(transparent)]
    Frame(#[from] colo_transport::framing::Error),
    /// A frame was well formed but broke a rule of the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The two sides disagree on something the handshake checks.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// The peer refused our handshake or a frame, and said why.
    #[error("the peer refused: {0}")]
    Rejected(String),
    /// Waiting took longer than allowed.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    /// Replication to the secondary stopped; the primary runs unprotected.
    #[error("replication to the secondary is lost: {0}")]
    ReplicationLost(String),
    /// The operation needs a state the disk is not in.
    #[error("{op} is not possible while {state}")]
    WrongState {
        /// The operation.
        op: &'static str,
        /// The state, in words.
        state: &'static str,
    },
    /// A checkpoint was committed for an epoch whose writes have not all arrived.
    #[error("epoch {epoch} cannot commit: its end marker has not arrived (last marker: {last:?})")]
    EpochNotReady {
        /// The epoch asked for.
        epoch: u64,
        /// The last epoch marker received, if any.
        last: Option<u64>,
    },
    /// Epoch numbers must grow.
    #[error("epoch {epoch} does not follow epoch {after}")]
    EpochOrder {
        /// The epoch given.
        epoch: u64,
        /// The epoch it must exceed.
        after: u64,
    },
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
