//! The fixed 24-byte header that starts every control frame.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Error, Result};

/// "COLO" read as a little-endian u32.
pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"COLO");

/// The control protocol version this build speaks. Peers must speak the same one.
pub const PROTOCOL_VERSION: u16 = 1;

/// Size of [`FrameHeader`] on the wire.
pub const HEADER_LEN: usize = 24;

/// Message type codes. Values not listed are rejected at parse time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
#[non_exhaustive]
pub enum Kind {
    /// Handshake: who we are and what memory we protect.
    Hello = 1,
    /// Handshake refused, with a reason.
    Reject = 2,
    /// Secondary to primary: ready for COLO checkpoints.
    CheckpointReady = 16,
    /// Primary to secondary: pause the SVM, a checkpoint starts.
    CheckpointRequest = 17,
    /// Secondary to primary: SVM paused.
    CheckpointReply = 18,
    /// Primary to secondary: device state follows.
    VmstateSend = 19,
    /// The size of the device state, followed directly by the state bytes.
    VmstateSize = 20,
    /// Secondary to primary: state buffered whole.
    VmstateReceived = 21,
    /// Secondary to primary: state and RAM applied, SVM resumed.
    VmstateLoaded = 22,
    /// Liveness, both ways.
    Heartbeat = 32,
    /// Either side: this side takes over / leaves COLO.
    Failover = 33,
    /// Orderly close.
    Goodbye = 34,
    /// Secondary to primary: the registered receive region of the page-push path.
    Region = 48,
}

impl Kind {
    /// Parses a type code, rejecting unknown ones.
    ///
    /// # Errors
    /// [`Error::UnknownMessage`] for a code this version does not define.
    pub fn from_u16(v: u16) -> Result<Self> {
        Ok(match v {
            1 => Self::Hello,
            2 => Self::Reject,
            16 => Self::CheckpointReady,
            17 => Self::CheckpointRequest,
            18 => Self::CheckpointReply,
            19 => Self::VmstateSend,
            20 => Self::VmstateSize,
            21 => Self::VmstateReceived,
            22 => Self::VmstateLoaded,
            32 => Self::Heartbeat,
            33 => Self::Failover,
            34 => Self::Goodbye,
            48 => Self::Region,
            other => return Err(Error::UnknownMessage(other)),
        })
    }
}

/// The control frame header: magic, version, type, one 64-bit argument (an epoch, a
/// sequence number or a size) and the length of the payload that follows.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct FrameHeader {
    magic: U32,
    version: U16,
    kind: U16,
    arg: U64,
    payload_len: U32,
    reserved: U32,
}

const _: () = assert!(size_of::<FrameHeader>() == HEADER_LEN);

impl FrameHeader {
    /// A header of the current version.
    pub fn new(kind: Kind, arg: u64, payload_len: u32) -> Self {
        Self {
            magic: CONTROL_MAGIC.into(),
            version: PROTOCOL_VERSION.into(),
            kind: (kind as u16).into(),
            arg: arg.into(),
            payload_len: payload_len.into(),
            reserved: 0.into(),
        }
    }

    /// Parses and validates a header: magic, version, known type, zero reserved field.
    ///
    /// # Errors
    /// [`Error::BadMagic`], [`Error::VersionMismatch`], [`Error::UnknownMessage`] or
    /// [`Error::Protocol`] for a non-zero reserved field.
    pub fn read_from(bytes: &[u8; HEADER_LEN]) -> Result<(Kind, u64, u32)> {
        let h = Self::read_from_bytes(bytes).expect("array has exactly the header's size");
        if h.magic.get() != CONTROL_MAGIC {
            return Err(Error::BadMagic {
                found: h.magic.get(),
                expected: CONTROL_MAGIC,
            });
        }
        if h.version.get() != PROTOCOL_VERSION {
            return Err(Error::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: h.version.get(),
            });
        }
        let kind = Kind::from_u16(h.kind.get())?;
        if h.reserved.get() != 0 {
            return Err(Error::Protocol(format!(
                "reserved header field is {:#x}, not 0",
                h.reserved.get()
            )));
        }
        Ok((kind, h.arg.get(), h.payload_len.get()))
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(self.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A golden checkpoint-request header for epoch 7, byte for byte.
    const GOLDEN: [u8; HEADER_LEN] = [
        b'C', b'O', b'L', b'O', // magic
        1, 0, // version
        17, 0, // kind: checkpoint-request
        7, 0, 0, 0, 0, 0, 0, 0, // arg: epoch 7
        0, 0, 0, 0, // payload length
        0, 0, 0, 0, // reserved
    ];

    #[test]
    fn golden_construct() {
        assert_eq!(
            FrameHeader::new(Kind::CheckpointRequest, 7, 0).to_bytes(),
            GOLDEN
        );
    }

    #[test]
    fn golden_deconstruct() {
        assert_eq!(
            FrameHeader::read_from(&GOLDEN).unwrap(),
            (Kind::CheckpointRequest, 7, 0)
        );
    }

    #[test]
    fn rejects_bad_magic_version_kind_reserved() {
        let mut b = GOLDEN;
        b[0] = b'X';
        assert!(matches!(
            FrameHeader::read_from(&b),
            Err(Error::BadMagic { .. })
        ));
        let mut b = GOLDEN;
        b[4] = 2;
        assert!(matches!(
            FrameHeader::read_from(&b),
            Err(Error::VersionMismatch { ours: 1, theirs: 2 })
        ));
        let mut b = GOLDEN;
        b[6] = 99;
        assert!(matches!(
            FrameHeader::read_from(&b),
            Err(Error::UnknownMessage(99))
        ));
        let mut b = GOLDEN;
        b[23] = 1;
        assert!(matches!(
            FrameHeader::read_from(&b),
            Err(Error::Protocol(_))
        ));
    }
}
