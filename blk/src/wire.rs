//! The wire protocol of forwarded writes: one TCP stream from the primary to the
//! secondary, acknowledgements flowing back on the same stream.
//!
//! Every frame starts with a fixed 32-byte little-endian header ([`FrameHeader`], a
//! [`framing::Header`]): magic `"CBLK"`, version, type, payload length, one 32-bit and two
//! 64-bit fields. Unknown
//! types, other versions, non-zero unused fields, unaligned or oversized payloads are
//! refused at parse time, before anything is allocated; offsets are checked against the
//! disk ([`Frame::check_disk`]) before any byte reaches it. Sequence numbers count every
//! frame the primary sends after the handshake, from 1, with no gaps.
//!
//! ```text
//!  primary                                                      secondary
//!     │── Hello(disk length, mode: resync | in-sync) ──────────────▶│ same length?
//!     │◀── HelloAck(disk length) ───────────────── (or Reject) ─────│
//!     │   resync mode only: the full copy, while guest writes go on  │
//!     │── SyncData(seq, offset) + bytes ───────────────────────────▶│ straight to disk
//!     │── SyncDone(seq, base epoch) ───────────────────────────────▶│ disks equal
//!     │   ┌─ every epoch ───────────────────────────────────────┐    │
//!     │── Write(seq, offset) + bytes ──────────────────────────────▶│ copy originals to
//!     │── Flush(seq) ──────────────────────────────────────────────▶│ hidden, then write
//!     │◀── Ack(seq, buffer bytes) ── cumulative, coalesced ─────────│
//!     │── Checkpoint(seq, epoch) ──────────────────────────────────▶│ epoch's writes done;
//!     │◀── Ack(seq) ───────────────────────────────────────────────│ wait for commit
//!     │   └──────────────────────────────────────────────────────┘    │
//!     │── Goodbye ─────────────────────────────────────────────────▶│
//! ```

use colo_transport::framing::{self, Header};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, TryFromBytes, Unaligned};

use crate::error::{Error, Result};
use crate::sector::{SECTOR_SIZE, check_span};

/// "CBLK" read as a little-endian u32.
pub const BLK_MAGIC: u32 = u32::from_le_bytes(*b"CBLK");
/// The version of this protocol. Peers must speak the same one.
pub const BLK_VERSION: u16 = 1;
/// Size of [`FrameHeader`] on the wire.
pub const HEADER_LEN: usize = 32;
/// Most data bytes in one Write or SyncData frame (larger guest writes are split).
pub const MAX_WRITE_BYTES: u64 = 1 << 20;
/// Most bytes of a Reject reason.
pub const MAX_REASON_BYTES: u32 = 256;

/// Frame type codes. Values not listed are rejected at parse time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(u16)]
#[non_exhaustive]
pub enum FrameKind {
    /// Primary to secondary: disk length and start mode.
    Hello = 1,
    /// Secondary to primary: accepted.
    HelloAck = 2,
    /// Either way: refused, with a reason.
    Reject = 3,
    /// A forwarded guest write.
    Write = 16,
    /// A forwarded guest flush.
    Flush = 17,
    /// End of an epoch's writes.
    Checkpoint = 18,
    /// A chunk of the full copy (resync).
    SyncData = 19,
    /// End of the full copy.
    SyncDone = 20,
    /// Secondary to primary: every frame up to a sequence number is applied.
    Ack = 32,
    /// Orderly close.
    Goodbye = 34,
}

impl framing::Protocol for FrameKind {
    const NAME: &'static str = "colo-blk";
    const MAGIC: u32 = BLK_MAGIC;
    const VERSION: u16 = BLK_VERSION;
    type Fields = BlkFields;
}

/// How a secondary starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SyncMode {
    /// The secondary's disk is unknown: a full copy follows (SyncData ... SyncDone).
    Resync,
    /// Both disks are already equal (same image, nothing written since): replication
    /// starts at once, with epoch 0 committed.
    InSync,
}

impl SyncMode {
    fn code(self) -> u32 {
        match self {
            Self::Resync => 1,
            Self::InSync => 2,
        }
    }
}

/// The header's fields after the kind. They are private; build frames with
/// [`Frame::to_bytes`] and read them with [`Frame::parse`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct BlkFields {
    len: U32,
    aux: U32,
    seq: U64,
    arg: U64,
}

/// The wire layout of every frame's header.
pub type FrameHeader = Header<FrameKind>;

const _: () = assert!(FrameHeader::LEN == HEADER_LEN);

/// A parsed, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Frame {
    /// See [`FrameKind::Hello`].
    Hello {
        /// The primary's disk length in bytes.
        disk_len: u64,
        /// How the secondary starts.
        mode: SyncMode,
    },
    /// See [`FrameKind::HelloAck`].
    HelloAck {
        /// The secondary's disk length in bytes.
        disk_len: u64,
    },
    /// See [`FrameKind::Reject`]; `len` bytes of reason follow.
    Reject {
        /// Bytes of reason text that follow.
        len: u32,
    },
    /// See [`FrameKind::Write`]; `len` bytes of data follow.
    Write {
        /// Sequence number.
        seq: u64,
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes of data.
        len: u32,
    },
    /// See [`FrameKind::Flush`].
    Flush {
        /// Sequence number.
        seq: u64,
    },
    /// See [`FrameKind::Checkpoint`].
    Checkpoint {
        /// Sequence number.
        seq: u64,
        /// The epoch whose writes end here.
        epoch: u64,
    },
    /// See [`FrameKind::SyncData`]; `len` bytes of data follow.
    SyncData {
        /// Sequence number.
        seq: u64,
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes of data.
        len: u32,
    },
    /// See [`FrameKind::SyncDone`].
    SyncDone {
        /// Sequence number.
        seq: u64,
        /// The epoch number the copied state counts as committed.
        epoch: u64,
    },
    /// See [`FrameKind::Ack`].
    Ack {
        /// Every frame up to and including this sequence number is applied.
        seq: u64,
        /// The secondary's disk buffer footprint in bytes.
        buffered: u64,
    },
    /// See [`FrameKind::Goodbye`].
    Goodbye,
}

fn data_len(len: u32) -> Result<u32> {
    if u64::from(len) > MAX_WRITE_BYTES {
        return Err(framing::Error::TooLarge {
            what: "write payload",
            len: len.into(),
            max: MAX_WRITE_BYTES,
        }
        .into());
    }
    if len == 0 || u64::from(len) % SECTOR_SIZE != 0 {
        return Err(Error::Protocol(format!(
            "write payload of {len} bytes is not a non-zero multiple of 512"
        )));
    }
    Ok(len)
}

impl Frame {
    /// The bytes of payload that follow this header.
    pub fn payload_len(&self) -> u32 {
        match *self {
            Self::Reject { len } | Self::Write { len, .. } | Self::SyncData { len, .. } => len,
            _ => 0,
        }
    }

    /// The frame's sequence number, for the frames that carry one.
    pub fn seq(&self) -> Option<u64> {
        match *self {
            Self::Write { seq, .. }
            | Self::Flush { seq }
            | Self::Checkpoint { seq, .. }
            | Self::SyncData { seq, .. }
            | Self::SyncDone { seq, .. }
            | Self::Ack { seq, .. } => Some(seq),
            _ => None,
        }
    }

    /// Checks the data span of a Write or SyncData frame against a disk of `disk_len`
    /// bytes (other frames pass).
    ///
    /// # Errors
    /// [`Error::OutOfRange`] or [`Error::Misaligned`].
    pub fn check_disk(&self, disk_len: u64) -> Result<()> {
        match *self {
            Self::Write { offset, len, .. } | Self::SyncData { offset, len, .. } => {
                check_span(offset, len.into(), disk_len)
            }
            _ => Ok(()),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let (kind, len, aux, seq, arg) = match self {
            Self::Hello { disk_len, mode } => (FrameKind::Hello, 0, mode.code(), 0, disk_len),
            Self::HelloAck { disk_len } => (FrameKind::HelloAck, 0, 0, 0, disk_len),
            Self::Reject { len } => (FrameKind::Reject, len, 0, 0, 0),
            Self::Write { seq, offset, len } => (FrameKind::Write, len, 0, seq, offset),
            Self::Flush { seq } => (FrameKind::Flush, 0, 0, seq, 0),
            Self::Checkpoint { seq, epoch } => (FrameKind::Checkpoint, 0, 0, seq, epoch),
            Self::SyncData { seq, offset, len } => (FrameKind::SyncData, len, 0, seq, offset),
            Self::SyncDone { seq, epoch } => (FrameKind::SyncDone, 0, 0, seq, epoch),
            Self::Ack { seq, buffered } => (FrameKind::Ack, 0, 0, seq, buffered),
            Self::Goodbye => (FrameKind::Goodbye, 0, 0, 0, 0),
        };
        let fields = BlkFields {
            len: len.into(),
            aux: aux.into(),
            seq: seq.into(),
            arg: arg.into(),
        };
        zerocopy::transmute!(FrameHeader::new(kind, fields))
    }

    /// Parses and validates a header: magic, version, known type, zero unused fields,
    /// and the payload rules of its type (data: 512-byte multiple, at most
    /// [`MAX_WRITE_BYTES`]; reasons: at most [`MAX_REASON_BYTES`]; others: none).
    ///
    /// # Errors
    /// [`framing::Error::BadMagic`], [`framing::Error::VersionMismatch`],
    /// [`framing::Error::UnknownKind`], [`framing::Error::TooLarge`] (all as
    /// [`Error::Frame`]) or [`Error::Protocol`].
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Self> {
        let (kind, h) = FrameHeader::parse(bytes)?;
        let (len, aux, seq, arg) = (h.len.get(), h.aux.get(), h.seq.get(), h.arg.get());
        // Which of len, aux, seq, arg the type uses; the others must be zero.
        let (uses_len, uses_aux, uses_seq, uses_arg) = match kind {
            FrameKind::Hello => (false, true, false, true),
            FrameKind::HelloAck => (false, false, false, true),
            FrameKind::Reject => (true, false, false, false),
            FrameKind::Write | FrameKind::SyncData => (true, false, true, true),
            FrameKind::Flush => (false, false, true, false),
            FrameKind::Checkpoint | FrameKind::SyncDone | FrameKind::Ack => {
                (false, false, true, true)
            }
            FrameKind::Goodbye => (false, false, false, false),
        };
        if (!uses_len && len != 0)
            || (!uses_aux && aux != 0)
            || (!uses_seq && seq != 0)
            || (!uses_arg && arg != 0)
        {
            return Err(Error::Protocol(format!(
                "unused fields of a {kind:?} frame are not zero"
            )));
        }
        if uses_seq && seq == 0 {
            return Err(Error::Protocol(format!("{kind:?} frame with sequence 0")));
        }
        Ok(match kind {
            FrameKind::Hello => Self::Hello {
                disk_len: arg,
                mode: match aux {
                    1 => SyncMode::Resync,
                    2 => SyncMode::InSync,
                    m => return Err(Error::Protocol(format!("unknown start mode {m}"))),
                },
            },
            FrameKind::HelloAck => Self::HelloAck { disk_len: arg },
            FrameKind::Reject => {
                if len > MAX_REASON_BYTES {
                    return Err(framing::Error::TooLarge {
                        what: "reject reason",
                        len: len.into(),
                        max: MAX_REASON_BYTES.into(),
                    }
                    .into());
                }
                Self::Reject { len }
            }
            FrameKind::Write => Self::Write {
                seq,
                offset: arg,
                len: data_len(len)?,
            },
            FrameKind::SyncData => Self::SyncData {
                seq,
                offset: arg,
                len: data_len(len)?,
            },
            FrameKind::Flush => Self::Flush { seq },
            FrameKind::Checkpoint => Self::Checkpoint { seq, epoch: arg },
            FrameKind::SyncDone => Self::SyncDone { seq, epoch: arg },
            FrameKind::Ack => Self::Ack { seq, buffered: arg },
            FrameKind::Goodbye => Self::Goodbye,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_transport::framing::Error as FrameError;

    /// A golden Write header: sequence 7, 4096 bytes at offset 1 MiB.
    const GOLDEN_WRITE: [u8; HEADER_LEN] = [
        b'C', b'B', b'L', b'K', // magic
        1, 0, // version
        16, 0, // kind: write
        0, 0x10, 0, 0, // len 4096
        0, 0, 0, 0, // aux
        7, 0, 0, 0, 0, 0, 0, 0, // seq 7
        0, 0, 0x10, 0, 0, 0, 0, 0, // offset 1 MiB
    ];

    #[test]
    fn golden_construct_and_deconstruct() {
        let f = Frame::Write {
            seq: 7,
            offset: 1 << 20,
            len: 4096,
        };
        assert_eq!(f.to_bytes(), GOLDEN_WRITE);
        assert_eq!(Frame::parse(&GOLDEN_WRITE).unwrap(), f);
    }

    #[test]
    fn golden_hello() {
        let golden: [u8; HEADER_LEN] = [
            b'C', b'B', b'L', b'K', 1, 0, 1, 0, // magic, version, hello
            0, 0, 0, 0, 1, 0, 0, 0, // len 0, aux 1 (resync)
            0, 0, 0, 0, 0, 0, 0, 0, // seq 0
            0, 0, 0, 0x40, 0, 0, 0, 0, // disk 1 GiB
        ];
        let f = Frame::Hello {
            disk_len: 1 << 30,
            mode: SyncMode::Resync,
        };
        assert_eq!(f.to_bytes(), golden);
        assert_eq!(Frame::parse(&golden).unwrap(), f);
    }

    #[test]
    fn exactly_the_listed_kinds_parse_and_keep_their_codes() {
        let listed = [1u16, 2, 3, 16, 17, 18, 19, 20, 32, 34];
        let goodbye = Frame::Goodbye.to_bytes();
        for code in 0..=u16::MAX {
            let mut b = goodbye;
            b[6..8].copy_from_slice(&code.to_le_bytes());
            match FrameHeader::parse(&b) {
                Ok((kind, fields)) => {
                    assert!(listed.contains(&code), "{code} parsed as {kind:?}");
                    assert_eq!(FrameHeader::new(kind, fields).as_bytes(), b, "{kind:?}");
                }
                Err(e) => assert!(!listed.contains(&code), "{code}: {e}"),
            }
        }
    }

    #[test]
    fn every_frame_round_trips() {
        for f in [
            Frame::Hello {
                disk_len: 4096,
                mode: SyncMode::InSync,
            },
            Frame::HelloAck { disk_len: 4096 },
            Frame::Reject { len: 10 },
            Frame::Write {
                seq: 1,
                offset: 512,
                len: 512,
            },
            Frame::Flush { seq: 2 },
            Frame::Checkpoint { seq: 3, epoch: 9 },
            Frame::SyncData {
                seq: 4,
                offset: 0,
                len: MAX_WRITE_BYTES as u32,
            },
            Frame::SyncDone { seq: 5, epoch: 0 },
            Frame::Ack {
                seq: 5,
                buffered: 1 << 40,
            },
            Frame::Goodbye,
        ] {
            assert_eq!(Frame::parse(&f.to_bytes()).unwrap(), f);
        }
    }

    #[test]
    fn garbage_is_refused_with_typed_errors() {
        let mut b = GOLDEN_WRITE;
        b[0] = b'X';
        assert!(matches!(
            Frame::parse(&b),
            Err(Error::Frame(FrameError::BadMagic {
                protocol: "colo-blk",
                ..
            }))
        ));
        let mut b = GOLDEN_WRITE;
        b[4] = 2;
        assert!(matches!(
            Frame::parse(&b),
            Err(Error::Frame(FrameError::VersionMismatch {
                ours: 1,
                theirs: 2,
                ..
            }))
        ));
        let mut b = GOLDEN_WRITE;
        b[6] = 99;
        assert!(matches!(
            Frame::parse(&b),
            Err(Error::Frame(FrameError::UnknownKind { kind: 99, .. }))
        ));
        // Unused aux field.
        let mut b = GOLDEN_WRITE;
        b[12] = 1;
        assert!(matches!(Frame::parse(&b), Err(Error::Protocol(_))));
        // Length not a multiple of 512.
        let mut b = GOLDEN_WRITE;
        b[8] = 1;
        assert!(matches!(Frame::parse(&b), Err(Error::Protocol(_))));
        // Over the limit: checked before anything is read or allocated.
        let big = Frame::Write {
            seq: 1,
            offset: 0,
            len: (MAX_WRITE_BYTES + 512) as u32,
        };
        assert!(matches!(
            Frame::parse(&big.to_bytes()),
            Err(Error::Frame(FrameError::TooLarge { .. }))
        ));
        // Sequence zero.
        let z = Frame::Flush { seq: 0 };
        assert!(matches!(
            Frame::parse(&z.to_bytes()),
            Err(Error::Protocol(_))
        ));
        // Reason too long.
        let r = Frame::Reject { len: 10_000 };
        assert!(matches!(
            Frame::parse(&r.to_bytes()),
            Err(Error::Frame(FrameError::TooLarge { .. }))
        ));
        // Unknown mode.
        let mut h = Frame::Hello {
            disk_len: 512,
            mode: SyncMode::InSync,
        }
        .to_bytes();
        h[12] = 9;
        assert!(matches!(Frame::parse(&h), Err(Error::Protocol(_))));
    }

    #[test]
    fn spans_are_checked_against_the_disk() {
        let w = Frame::Write {
            seq: 1,
            offset: 4096,
            len: 512,
        };
        assert!(w.check_disk(4608).is_ok());
        assert!(matches!(w.check_disk(4096), Err(Error::OutOfRange { .. })));
        let w = Frame::Write {
            seq: 1,
            offset: u64::MAX - 511,
            len: 1024,
        };
        assert!(w.check_disk(u64::MAX).is_err());
        let w = Frame::SyncData {
            seq: 1,
            offset: 100,
            len: 512,
        };
        assert!(matches!(
            w.check_disk(1 << 20),
            Err(Error::Misaligned { .. })
        ));
    }
}
