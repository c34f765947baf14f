//! Frames of the TCP push path.
//!
//! ```text
//!  sender (one thread per stream)                 receiver (one thread per stream)
//!   │── Hello(key, region len, page size, i, n) ─▶│ check key and layout
//!   │◀── HelloAck ─────────────────────────────────│
//!   │── Batch(epoch, k runs, total) + k × Run ─────▶│ check every run, then readv the
//!   │     + the runs' bytes, back to back          │ bytes straight into the region
//!   │── Fence(id) ─────────────────────────────────▶│ everything before it has landed
//!   │◀── FenceAck(id) ─────────────────────────────│
//!   │── EpochEnd(epoch, words) [+ bitmap, stream 0]▶│ when all n streams reached it,
//!   │◀── EpochAck(epoch) ──────────────────────────│ the epoch is committed
//!   │── Goodbye ───────────────────────────────────▶│
//! ```

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, TryFromBytes, Unaligned};

use crate::error::{Error, Result};
use crate::framing::{self, Header};

/// "CPSH" as a little-endian u32.
pub const PUSH_MAGIC: u32 = u32::from_le_bytes(*b"CPSH");
/// Version of the push framing.
pub const PUSH_VERSION: u16 = 1;
/// Size of [`PushHeader`].
pub const PUSH_HEADER_LEN: usize = 32;
/// Size of one [`RunDesc`].
pub const RUN_DESC_LEN: usize = 16;
/// Most runs a receiver accepts in one batch (one iovec each, within IOV_MAX).
pub const MAX_BATCH_RUNS: u32 = 1023;
/// Most payload bytes a receiver accepts in one batch.
pub const MAX_BATCH_BYTES: u64 = 64 << 20;
/// Most parallel streams of one sender.
pub const MAX_STREAMS: u32 = 16;

/// Push frame types. Values not listed are rejected at parse time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(u16)]
#[non_exhaustive]
pub enum PushKind {
    /// Stream opening: key, region length, page size, stream index and count.
    Hello = 1,
    /// Receiver accepts the stream.
    HelloAck = 2,
    /// Runs of data.
    Batch = 3,
    /// Fence request.
    Fence = 4,
    /// Fence reached.
    FenceAck = 5,
    /// End of an epoch on this stream (stream 0 carries the bitmap).
    EpochEnd = 6,
    /// Epoch end reached.
    EpochAck = 7,
    /// Orderly close.
    Goodbye = 8,
}

impl framing::Protocol for PushKind {
    const NAME: &'static str = "colo push";
    const MAGIC: u32 = PUSH_MAGIC;
    const VERSION: u16 = PUSH_VERSION;
    type Fields = PushFields;
}

/// The push header's fields after the kind. Their use by type: `Hello` (a = stream index,
/// b = stream count, x = key, y = region length, c = page size); `Batch` (a = runs,
/// x = epoch, y = payload bytes); `Fence`/`FenceAck` (x = fence id); `EpochEnd`
/// (a = bitmap words, x = epoch); `EpochAck` (x = epoch).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct PushFields {
    a: U32,
    b: U16,
    c: U16,
    x: U64,
    y: U64,
}

/// The 32-byte header of every push frame. Build and read it as a [`PushFrame`].
pub type PushHeader = Header<PushKind>;

const _: () = assert!(PushHeader::LEN == PUSH_HEADER_LEN);

/// A parsed, validated push header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushFrame {
    /// See [`PushKind::Hello`].
    Hello {
        /// The region key the sender presents.
        key: u64,
        /// The region length the sender expects.
        region_len: u64,
        /// Page size the sender expects, in KiB.
        page_kib: u16,
        /// This stream's index.
        stream: u32,
        /// How many streams the sender opens.
        streams: u16,
    },
    /// See [`PushKind::HelloAck`].
    HelloAck,
    /// See [`PushKind::Batch`].
    Batch {
        /// The epoch the data belongs to.
        epoch: u64,
        /// Number of run descriptors that follow.
        runs: u32,
        /// Payload bytes after the descriptors.
        bytes: u64,
    },
    /// See [`PushKind::Fence`].
    Fence(u64),
    /// See [`PushKind::FenceAck`].
    FenceAck(u64),
    /// See [`PushKind::EpochEnd`].
    EpochEnd {
        /// The epoch that ends.
        epoch: u64,
        /// Bitmap words that follow (stream 0 only).
        words: u32,
    },
    /// See [`PushKind::EpochAck`].
    EpochAck(u64),
    /// See [`PushKind::Goodbye`].
    Goodbye,
}

impl PushFrame {
    /// Encodes the header.
    pub fn to_bytes(self) -> [u8; PUSH_HEADER_LEN] {
        let (kind, a, b, c, x, y) = match self {
            Self::Hello {
                key,
                region_len,
                page_kib,
                stream,
                streams,
            } => (PushKind::Hello, stream, streams, page_kib, key, region_len),
            Self::HelloAck => (PushKind::HelloAck, 0, 0, 0, 0, 0),
            Self::Batch { epoch, runs, bytes } => (PushKind::Batch, runs, 0, 0, epoch, bytes),
            Self::Fence(id) => (PushKind::Fence, 0, 0, 0, id, 0),
            Self::FenceAck(id) => (PushKind::FenceAck, 0, 0, 0, id, 0),
            Self::EpochEnd { epoch, words } => (PushKind::EpochEnd, words, 0, 0, epoch, 0),
            Self::EpochAck(epoch) => (PushKind::EpochAck, 0, 0, 0, epoch, 0),
            Self::Goodbye => (PushKind::Goodbye, 0, 0, 0, 0, 0),
        };
        let h = PushHeader::new(
            kind,
            PushFields {
                a: a.into(),
                b: b.into(),
                c: c.into(),
                x: x.into(),
                y: y.into(),
            },
        );
        zerocopy::transmute!(h)
    }

    /// Parses and validates a header: magic, version, known type, and per-type limits
    /// (runs and bytes of a batch).
    ///
    /// # Errors
    /// [`framing::Error::BadMagic`], [`framing::Error::VersionMismatch`],
    /// [`framing::Error::UnknownKind`], [`framing::Error::TooLarge`] (all as
    /// [`Error::Frame`]) or [`Error::Protocol`].
    pub fn parse(bytes: &[u8; PUSH_HEADER_LEN]) -> Result<Self> {
        let (kind, h) = PushHeader::parse(bytes)?;
        let (a, b, c, x, y) = (h.a.get(), h.b.get(), h.c.get(), h.x.get(), h.y.get());
        let frame = match kind {
            PushKind::Hello => Self::Hello {
                key: x,
                region_len: y,
                page_kib: c,
                stream: a,
                streams: b,
            },
            PushKind::HelloAck => Self::HelloAck,
            PushKind::Batch => {
                if a == 0 || a > MAX_BATCH_RUNS {
                    return Err(framing::Error::TooLarge {
                        what: "runs in a batch",
                        len: a.into(),
                        max: MAX_BATCH_RUNS.into(),
                    }
                    .into());
                }
                if y > MAX_BATCH_BYTES {
                    return Err(framing::Error::TooLarge {
                        what: "batch payload",
                        len: y,
                        max: MAX_BATCH_BYTES,
                    }
                    .into());
                }
                Self::Batch {
                    epoch: x,
                    runs: a,
                    bytes: y,
                }
            }
            PushKind::Fence => Self::Fence(x),
            PushKind::FenceAck => Self::FenceAck(x),
            PushKind::EpochEnd => Self::EpochEnd { epoch: x, words: a },
            PushKind::EpochAck => Self::EpochAck(x),
            PushKind::Goodbye => Self::Goodbye,
        };
        let unused_ok = match frame {
            Self::Hello { .. } => true,
            Self::Batch { .. } => b == 0 && c == 0,
            Self::EpochEnd { .. } => b == 0 && c == 0 && y == 0,
            _ => a == 0 && b == 0 && c == 0 && y == 0,
        };
        if !unused_ok {
            return Err(Error::Protocol(format!(
                "unused fields of a {:?} frame are not zero",
                frame
            )));
        }
        Ok(frame)
    }
}

/// One run descriptor in a batch: where `len` bytes go in the receiver's region.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct RunDesc {
    offset: U64,
    len: U64,
}

const _: () = assert!(size_of::<RunDesc>() == RUN_DESC_LEN);

impl RunDesc {
    /// A descriptor.
    pub fn new(offset: u64, len: u64) -> Self {
        Self {
            offset: offset.into(),
            len: len.into(),
        }
    }

    /// Destination offset.
    pub fn offset(&self) -> u64 {
        self.offset.get()
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len.get()
    }

    /// Whether the run is empty (never valid on the wire).
    pub fn is_empty(&self) -> bool {
        self.len.get() == 0
    }

    /// Views a buffer of encoded descriptors.
    ///
    /// # Errors
    /// [`Error::Protocol`] if the buffer is not a whole number of descriptors.
    pub fn slice_from(bytes: &[u8]) -> Result<&[RunDesc]> {
        <[RunDesc]>::ref_from_bytes(bytes)
            .map_err(|_| Error::Protocol("ragged run descriptor table".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::Error as FrameError;

    #[test]
    fn golden_batch_header() {
        let golden: [u8; PUSH_HEADER_LEN] = [
            b'C', b'P', b'S', b'H', 1, 0, 3, 0, // magic, version, kind batch
            2, 0, 0, 0, 0, 0, 0, 0, // runs 2, b, c
            5, 0, 0, 0, 0, 0, 0, 0, // epoch 5
            0, 0x20, 0, 0, 0, 0, 0, 0, // 8192 bytes
        ];
        let f = PushFrame::Batch {
            epoch: 5,
            runs: 2,
            bytes: 8192,
        };
        assert_eq!(f.to_bytes(), golden);
        assert_eq!(PushFrame::parse(&golden).unwrap(), f);
    }

    #[test]
    fn exactly_the_listed_kinds_parse_and_keep_their_codes() {
        let goodbye = PushFrame::Goodbye.to_bytes();
        for code in 0..=u16::MAX {
            let mut b = goodbye;
            b[6..8].copy_from_slice(&code.to_le_bytes());
            let (kind, fields) = match PushHeader::parse(&b) {
                Ok(k) => k,
                Err(e) => {
                    assert!(!(1..=8).contains(&code), "{code}: {e}");
                    continue;
                }
            };
            assert!((1..=8).contains(&code), "{code} parsed as {kind:?}");
            assert_eq!(PushHeader::new(kind, fields).as_bytes(), b, "{kind:?}");
        }
    }

    #[test]
    fn every_frame_round_trips() {
        for f in [
            PushFrame::Hello {
                key: 9,
                region_len: 1 << 30,
                page_kib: 4,
                stream: 1,
                streams: 2,
            },
            PushFrame::HelloAck,
            PushFrame::Batch {
                epoch: 1,
                runs: 1,
                bytes: 4096,
            },
            PushFrame::Fence(3),
            PushFrame::FenceAck(3),
            PushFrame::EpochEnd {
                epoch: 4,
                words: 10,
            },
            PushFrame::EpochAck(4),
            PushFrame::Goodbye,
        ] {
            assert_eq!(PushFrame::parse(&f.to_bytes()).unwrap(), f);
        }
    }

    #[test]
    fn limits_and_garbage_are_refused() {
        let big = PushFrame::Batch {
            epoch: 1,
            runs: MAX_BATCH_RUNS + 1,
            bytes: 1,
        }
        .to_bytes();
        assert!(matches!(
            PushFrame::parse(&big),
            Err(Error::Frame(FrameError::TooLarge { .. }))
        ));
        let empty = PushFrame::Batch {
            epoch: 1,
            runs: 0,
            bytes: 0,
        }
        .to_bytes();
        assert!(matches!(
            PushFrame::parse(&empty),
            Err(Error::Frame(FrameError::TooLarge { .. }))
        ));
        let huge = PushFrame::Batch {
            epoch: 1,
            runs: 1,
            bytes: MAX_BATCH_BYTES + 1,
        }
        .to_bytes();
        assert!(matches!(
            PushFrame::parse(&huge),
            Err(Error::Frame(FrameError::TooLarge { .. }))
        ));
        let mut junk = PushFrame::Goodbye.to_bytes();
        junk[8] = 1;
        assert!(matches!(PushFrame::parse(&junk), Err(Error::Protocol(_))));
        let mut k = PushFrame::Goodbye.to_bytes();
        k[6] = 77;
        assert!(matches!(
            PushFrame::parse(&k),
            Err(Error::Frame(FrameError::UnknownKind { kind: 77, .. }))
        ));
        let mut v = PushFrame::Goodbye.to_bytes();
        v[4] = 9;
        assert!(matches!(
            PushFrame::parse(&v),
            Err(Error::Frame(FrameError::VersionMismatch { .. }))
        ));
        assert!(RunDesc::slice_from(&[0; 17]).is_err());
    }
}
