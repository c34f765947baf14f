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
    /// A length field is over its limit.
    #[error("{what} of {len} exceeds the limit of {max}")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The limit.
        max: u64,
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
    /// Reading from the peer failed.
    #[error("cannot receive from the peer")]
    Recv(#[source] io::Error),
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
    /// A frame did not start with the block replication magic.
    #[error(
        "bad magic {found:#010x}, expected {expected:#010x}: not a colo-blk peer, or the stream is out of step"
    )]
    BadMagic {
        /// What arrived.
        found: u32,
        /// What was expected.
        expected: u32,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: this side speaks {ours}, the peer speaks {theirs}")]
    VersionMismatch {
        /// Our version.
        ours: u16,
        /// The peer's version.
        theirs: u16,
    },
    /// A frame carried a type this version does not know.
    #[error("unknown frame type {0}")]
    UnknownFrame(u16),
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
