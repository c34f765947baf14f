//! The fixed 24-byte header that starts every control frame: the [`framing`] prefix, then
//! one 64-bit argument (an epoch, a sequence number or a size), the payload length and a
//! reserved word.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, TryFromBytes, Unaligned};

use crate::error::{Error, Result};
use crate::framing::{self, Header};

/// "COLO" read as a little-endian u32.
pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"COLO");

/// The control protocol version this build speaks. Peers must speak the same one.
/// Version 2: the Hello carries the VM's vCPU count. Version 3: heartbeats are answered.
/// Version 4: a Region may carry the receiver's endpoint name (libfabric RDM endpoints).
pub const PROTOCOL_VERSION: u16 = 4;

/// Size of [`FrameHeader`] on the wire.
pub const HEADER_LEN: usize = 24;

/// Message type codes. Values not listed are rejected at parse time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromBytes, IntoBytes, KnownLayout, Immutable)]
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
    /// The answer to a heartbeat, echoing its sequence number (for the round trip).
    HeartbeatAck = 35,
    /// Secondary to primary: the registered receive region of the page-push path.
    Region = 48,
}

impl framing::Protocol for Kind {
    const NAME: &'static str = "colo";
    const MAGIC: u32 = CONTROL_MAGIC;
    const VERSION: u16 = PROTOCOL_VERSION;
    type Fields = ControlFields;
}

/// The control header's fields after the kind.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ControlFields {
    arg: U64,
    payload_len: U32,
    reserved: U32,
}

impl ControlFields {
    /// The fields of a frame with argument `arg` and `payload_len` bytes of payload.
    pub fn new(arg: u64, payload_len: u32) -> Self {
        Self {
            arg: arg.into(),
            payload_len: payload_len.into(),
            reserved: 0.into(),
        }
    }
}

/// The control frame header: magic, version, type, one 64-bit argument (an epoch, a
/// sequence number or a size) and the length of the payload that follows.
pub type FrameHeader = Header<Kind>;

const _: () = assert!(FrameHeader::LEN == HEADER_LEN);

impl FrameHeader {
    /// Parses and validates a header: magic, version, known type, zero reserved field.
    ///
    /// # Errors
    /// [`framing::Error::BadMagic`], [`framing::Error::VersionMismatch`],
    /// [`framing::Error::UnknownKind`] (as [`Error::Frame`]), or [`Error::Protocol`] for a
    /// non-zero reserved field.
    pub fn read_from(bytes: &[u8; HEADER_LEN]) -> Result<(Kind, u64, u32)> {
        let (kind, f) = Self::parse(bytes)?;
        if f.reserved.get() != 0 {
            return Err(Error::Protocol(format!(
                "reserved header field is {:#x}, not 0",
                f.reserved.get()
            )));
        }
        Ok((kind, f.arg.get(), f.payload_len.get()))
    }

    /// The header's wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        zerocopy::transmute!(*self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::Error as FrameError;

    /// A golden checkpoint-request header for epoch 7, byte for byte.
    const GOLDEN: [u8; HEADER_LEN] = [
        b'C', b'O', b'L', b'O', // magic
        4, 0, // version
        17, 0, // kind: checkpoint-request
        7, 0, 0, 0, 0, 0, 0, 0, // arg: epoch 7
        0, 0, 0, 0, // payload length
        0, 0, 0, 0, // reserved
    ];

    #[test]
    fn golden_construct() {
        assert_eq!(
            FrameHeader::new(Kind::CheckpointRequest, ControlFields::new(7, 0)).to_bytes(),
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
            Err(Error::Frame(FrameError::BadMagic {
                protocol: "colo",
                ..
            }))
        ));
        let mut b = GOLDEN;
        b[4] = 5;
        assert!(matches!(
            FrameHeader::read_from(&b),
            Err(Error::Frame(FrameError::VersionMismatch {
                ours: 4,
                theirs: 5,
                ..
            }))
        ));
        let mut b = GOLDEN;
        b[6] = 99;
        assert!(matches!(
            FrameHeader::read_from(&b),
            Err(Error::Frame(FrameError::UnknownKind { kind: 99, .. }))
        ));
        let mut b = GOLDEN;
        b[23] = 1;
        assert!(matches!(
            FrameHeader::read_from(&b),
            Err(Error::Protocol(_))
        ));
    }

    #[test]
    fn exactly_the_listed_kinds_parse_and_keep_their_codes() {
        let listed = [1u16, 2, 16, 17, 18, 19, 20, 21, 22, 32, 33, 34, 35, 48];
        for code in 0..=u16::MAX {
            let mut b = GOLDEN;
            b[6..8].copy_from_slice(&code.to_le_bytes());
            match FrameHeader::read_from(&b) {
                Ok((kind, 7, 0)) => {
                    assert!(listed.contains(&code), "{code} parsed as {kind:?}");
                    let again = FrameHeader::new(kind, ControlFields::new(7, 0)).to_bytes();
                    assert_eq!(again, b, "{kind:?}");
                }
                Ok(other) => panic!("{code}: {other:?}"),
                Err(e) => assert!(!listed.contains(&code), "{code}: {e}"),
            }
        }
    }
}
