//! The two messages of the verbs push path, sent with SEND-with-immediate on the queue pair:
//!
//! - **commit** (sender → receiver): closes epoch E. Posted only after the completion of the
//!   epoch's last RDMA WRITE, so every byte of E is in the receiver's region before the
//!   receiver can see it. The immediate carries E's low 32 bits; the payload carries the full
//!   epoch, the payload byte count and the epoch's page bitmap.
//! - **release** (receiver → sender): epoch E has been applied; writes of E+1 may land.
//! - **close** (sender → receiver): the session ends in order.
//! - **address** (sender → receiver, first): the sender's endpoint name, where endpoints
//!   are not connected (libfabric's reliable datagram endpoints).
//!
//! Layout (little-endian): magic `u32`, version `u16`, kind `u16`, epoch `u64`, bytes `u64`,
//! bitmap words `u32`, reserved `u32` (zero), then the bitmap words. The decoder treats the
//! bytes as hostile: they come from the network.

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, TryFromBytes, Unaligned};

use crate::error::{Error, Result};
use crate::framing::{self, Header};
use crate::push::EndpointName;

/// "CPSH" (colo push).
pub const MAGIC: u32 = u32::from_le_bytes(*b"CPSH");
/// The version of this message layout.
pub const VERSION: u16 = 1;
/// Bytes before the bitmap.
pub const HEADER_LEN: usize = 32;

/// The message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(u16)]
enum Kind {
    Commit = 1,
    Release = 2,
    Address = 3,
    Close = 4,
}

impl framing::Protocol for Kind {
    const NAME: &'static str = "colo verbs push";
    const MAGIC: u32 = MAGIC;
    const VERSION: u16 = VERSION;
    type Fields = Fields;
}

/// The header's fields after the kind.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
struct Fields {
    epoch: U64,
    bytes: U64,
    words: U32,
    reserved: U32,
}

const _: () = assert!(Header::<Kind>::LEN == HEADER_LEN);

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Epoch `epoch` is complete: `bytes` payload bytes, pages in `bitmap`.
    Commit {
        /// The epoch.
        epoch: u64,
        /// Payload bytes written in the epoch.
        bytes: u64,
        /// One bit per page written.
        bitmap: Vec<u64>,
    },
    /// The receiver has applied `epoch`.
    Release {
        /// The epoch.
        epoch: u64,
    },
    /// The sender ends the session in order; `epoch` is its open (uncommitted) epoch.
    /// Reliable datagram endpoints have no connection whose end the receiver would see.
    Close {
        /// The sender's open epoch.
        epoch: u64,
    },
    /// The sender's endpoint name, its first message where endpoints are not connected
    /// (libfabric's reliable datagram endpoints): the receiver answers to that address.
    Address {
        /// The name, as the sender's provider gave it.
        name: EndpointName,
    },
}

/// The size of an address message: the header and the longest name.
pub const ADDRESS_MAX_LEN: usize = HEADER_LEN + EndpointName::MAX;

/// The size of a commit message carrying `words` bitmap words.
pub fn commit_len(words: usize) -> usize {
    HEADER_LEN + words * 8
}

fn header(out: &mut Vec<u8>, kind: Kind, epoch: u64, bytes: u64, words: u32) {
    let fields = Fields {
        epoch: epoch.into(),
        bytes: bytes.into(),
        words: words.into(),
        reserved: 0.into(),
    };
    out.clear();
    out.extend_from_slice(Header::<Kind>::new(kind, fields).as_bytes());
}

/// Encodes a commit into `out` (cleared first).
pub fn encode_commit(out: &mut Vec<u8>, epoch: u64, bytes: u64, bitmap: &[u64]) {
    header(out, Kind::Commit, epoch, bytes, bitmap.len() as u32);
    for w in bitmap {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Encodes a release into `out` (cleared first).
pub fn encode_release(out: &mut Vec<u8>, epoch: u64) {
    header(out, Kind::Release, epoch, 0, 0);
}

/// Encodes a close into `out` (cleared first); its immediate is the epoch's low bits.
pub fn encode_close(out: &mut Vec<u8>, epoch: u64) {
    header(out, Kind::Close, epoch, 0, 0);
}

/// Encodes an address message into `out` (cleared first); its immediate is 0.
pub fn encode_address(out: &mut Vec<u8>, name: &EndpointName) {
    let b = name.as_bytes();
    header(out, Kind::Address, 0, b.len() as u64, 0);
    out.extend_from_slice(b);
}

/// Decodes a message that arrived with immediate data `imm`, accepting at most
/// `max_words` bitmap words.
///
/// # Errors
/// [`framing::Error::Truncated`], [`framing::Error::BadMagic`],
/// [`framing::Error::VersionMismatch`], [`framing::Error::UnknownKind`],
/// [`framing::Error::TooLarge`] (bitmap over `max_words`) (all as [`Error::Frame`]), or
/// [`Error::Protocol`] (a length that disagrees with the header, a non-zero reserved field,
/// an immediate that disagrees with the epoch, a release with a bitmap).
pub fn decode(data: &[u8], imm: u32, max_words: usize) -> Result<Message> {
    let (kind, f) = Header::<Kind>::parse(data)?;
    let (epoch, bytes, words) = (f.epoch.get(), f.bytes.get(), f.words.get() as usize);
    if f.reserved.get() != 0 {
        return Err(Error::Protocol(
            "push message: reserved field is not zero".into(),
        ));
    }
    if imm != epoch as u32 {
        return Err(Error::Protocol(format!(
            "push message: immediate {imm:#x} does not match epoch {epoch}"
        )));
    }
    if kind == Kind::Address {
        // The name's length is in `bytes`; no epoch, no bitmap.
        let name = &data[HEADER_LEN..];
        if epoch != 0 || words != 0 || bytes != name.len() as u64 {
            return Err(Error::Protocol(format!(
                "push address message: epoch {epoch}, {words} bitmap words, a {bytes}-byte \
                 name in {} bytes",
                name.len()
            )));
        }
        return Ok(Message::Address {
            name: EndpointName::new(name)?,
        });
    }
    if words > max_words {
        return Err(framing::Error::TooLarge {
            what: "commit bitmap (words)",
            len: words as u64,
            max: max_words as u64,
        }
        .into());
    }
    let bitmap = <[U64]>::ref_from_bytes(&data[HEADER_LEN..])
        .ok()
        .filter(|b| b.len() == words)
        .ok_or_else(|| {
            Error::Protocol(format!(
                "push message of {} bytes, but its header says {} bitmap words ({} bytes)",
                data.len(),
                words,
                commit_len(words)
            ))
        })?;
    match kind {
        Kind::Commit => Ok(Message::Commit {
            epoch,
            bytes,
            bitmap: bitmap.iter().map(|w| w.get()).collect(),
        }),
        Kind::Release if words == 0 && bytes == 0 => Ok(Message::Release { epoch }),
        Kind::Release => Err(Error::Protocol(
            "push message: a release carries no bitmap or byte count".into(),
        )),
        Kind::Close if words == 0 && bytes == 0 => Ok(Message::Close { epoch }),
        Kind::Close => Err(Error::Protocol(
            "push message: a close carries no bitmap or byte count".into(),
        )),
        Kind::Address => unreachable!("decoded above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framing::Error as FrameError;
    use proptest::prelude::*;

    #[test]
    fn commit_and_release_round_trip() {
        let mut b = Vec::new();
        encode_commit(&mut b, 7, 8192, &[3, u64::MAX]);
        assert_eq!(b.len(), commit_len(2));
        assert_eq!(
            decode(&b, 7, 2).unwrap(),
            Message::Commit {
                epoch: 7,
                bytes: 8192,
                bitmap: vec![3, u64::MAX]
            }
        );
        encode_release(&mut b, 1 << 40);
        assert_eq!(
            decode(&b, 0, 0).unwrap(),
            Message::Release { epoch: 1 << 40 }
        );
        encode_close(&mut b, 9);
        assert_eq!(decode(&b, 9, 0).unwrap(), Message::Close { epoch: 9 });
        b[16] = 1;
        assert!(matches!(decode(&b, 9, 0), Err(Error::Protocol(_))));
    }

    #[test]
    fn address_messages_round_trip_and_are_checked() {
        let name = EndpointName::new(b"fi_shm://77").unwrap();
        let mut b = Vec::new();
        encode_address(&mut b, &name);
        assert_eq!(b.len(), HEADER_LEN + 11);
        assert_eq!(decode(&b, 0, 0).unwrap(), Message::Address { name });
        // The immediate must be the (zero) epoch; the length must match the name.
        assert!(matches!(decode(&b, 1, 0), Err(Error::Protocol(_))));
        assert!(matches!(
            decode(&b[..b.len() - 1], 0, 0),
            Err(Error::Protocol(_))
        ));
        // A name over the most carried is refused.
        let mut long = b[..HEADER_LEN].to_vec();
        long[16..24].copy_from_slice(&65u64.to_le_bytes());
        long.extend_from_slice(&[b'x'; 65]);
        assert!(matches!(decode(&long, 0, 0), Err(Error::Protocol(_))));
        assert!(b.len() <= ADDRESS_MAX_LEN);
    }

    #[test]
    fn golden_commit() {
        let golden = [
            b'C', b'P', b'S', b'H', 1, 0, 1, 0, // magic, version, kind commit
            7, 0, 0, 0, 0, 0, 0, 0, // epoch 7
            0, 0x20, 0, 0, 0, 0, 0, 0, // 8192 bytes
            1, 0, 0, 0, 0, 0, 0, 0, // one bitmap word, reserved
            5, 0, 0, 0, 0, 0, 0, 0x80, // the word
        ];
        let mut b = Vec::new();
        encode_commit(&mut b, 7, 8192, &[(1 << 63) | 5]);
        assert_eq!(b, golden);
        assert_eq!(
            decode(&golden, 7, 1).unwrap(),
            Message::Commit {
                epoch: 7,
                bytes: 8192,
                bitmap: vec![(1 << 63) | 5]
            }
        );
        encode_release(&mut b, 7);
        assert_eq!(b[..8], [b'C', b'P', b'S', b'H', 1, 0, 2, 0]);
        assert_eq!(
            b[8..],
            [
                7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn every_header_field_is_checked() {
        let mut good = Vec::new();
        encode_commit(&mut good, 5, 0, &[1]);
        let bad = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] ^= v;
            decode(&b, 5, 1).unwrap_err()
        };
        assert!(matches!(
            bad(0, 1),
            Error::Frame(FrameError::BadMagic { .. })
        ));
        assert!(matches!(
            bad(4, 1),
            Error::Frame(FrameError::VersionMismatch { .. })
        ));
        assert!(matches!(
            bad(6, 4),
            Error::Frame(FrameError::UnknownKind { kind: 5, .. })
        ));
        assert!(
            matches!(bad(8, 1), Error::Protocol(_)),
            "epoch vs immediate"
        );
        assert!(matches!(
            bad(24, 2),
            Error::Frame(FrameError::TooLarge { .. })
        ));
        assert!(matches!(bad(28, 1), Error::Protocol(_)));
        assert!(matches!(
            decode(&good[..good.len() - 1], 5, 1),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            decode(&good[..10], 5, 1),
            Err(Error::Frame(FrameError::Truncated { got: 10, .. }))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), imm: u32) {
            let _ = decode(&data, imm, 8);
        }
    }
}
