//! The two messages of the verbs push path, sent with SEND-with-immediate on the queue pair:
//!
//! - **commit** (sender → receiver): closes epoch E. Posted only after the completion of the
//!   epoch's last RDMA WRITE, so every byte of E is in the receiver's region before the
//!   receiver can see it. The immediate carries E's low 32 bits; the payload carries the full
//!   epoch, the payload byte count and the epoch's page bitmap.
//! - **release** (receiver → sender): epoch E has been applied; writes of E+1 may land.
//!
//! Layout (little-endian): magic `u32`, version `u16`, kind `u16`, epoch `u64`, bytes `u64`,
//! bitmap words `u32`, reserved `u32` (zero), then the bitmap words. The decoder treats the
//! bytes as hostile: they come from the network.

use crate::error::{Error, Result};

/// "CPSH" (colo push).
pub const MAGIC: u32 = u32::from_le_bytes(*b"CPSH");
/// The version of this message layout.
pub const VERSION: u16 = 1;
/// Bytes before the bitmap.
pub const HEADER_LEN: usize = 32;

const KIND_COMMIT: u16 = 1;
const KIND_RELEASE: u16 = 2;

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
}

/// The size of a commit message carrying `words` bitmap words.
pub fn commit_len(words: usize) -> usize {
    HEADER_LEN + words * 8
}

fn header(out: &mut Vec<u8>, kind: u16, epoch: u64, bytes: u64, words: u32) {
    out.clear();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&bytes.to_le_bytes());
    out.extend_from_slice(&words.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

/// Encodes a commit into `out` (cleared first).
pub fn encode_commit(out: &mut Vec<u8>, epoch: u64, bytes: u64, bitmap: &[u64]) {
    header(out, KIND_COMMIT, epoch, bytes, bitmap.len() as u32);
    for w in bitmap {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Encodes a release into `out` (cleared first).
pub fn encode_release(out: &mut Vec<u8>, epoch: u64) {
    header(out, KIND_RELEASE, epoch, 0, 0);
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes a message that arrived with immediate data `imm`, accepting at most
/// `max_words` bitmap words.
///
/// # Errors
/// [`Error::Truncated`], [`Error::BadMagic`], [`Error::VersionMismatch`],
/// [`Error::UnknownMessage`], [`Error::TooLarge`] (bitmap over `max_words`), or
/// [`Error::Protocol`] (a length that disagrees with the header, a non-zero reserved field,
/// an immediate that disagrees with the epoch, a release with a bitmap).
pub fn decode(data: &[u8], imm: u32, max_words: usize) -> Result<Message> {
    if data.len() < HEADER_LEN {
        return Err(Error::Truncated {
            got: data.len(),
            want: HEADER_LEN,
        });
    }
    let magic = u32_at(data, 0);
    if magic != MAGIC {
        return Err(Error::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    let version = u16_at(data, 4);
    if version != VERSION {
        return Err(Error::VersionMismatch {
            ours: VERSION,
            theirs: version,
        });
    }
    let kind = u16_at(data, 6);
    let epoch = u64_at(data, 8);
    let bytes = u64_at(data, 16);
    let words = u32_at(data, 24) as usize;
    if u32_at(data, 28) != 0 {
        return Err(Error::Protocol(
            "push message: reserved field is not zero".into(),
        ));
    }
    if imm != epoch as u32 {
        return Err(Error::Protocol(format!(
            "push message: immediate {imm:#x} does not match epoch {epoch}"
        )));
    }
    if words > max_words {
        return Err(Error::TooLarge {
            what: "commit bitmap (words)",
            len: words as u64,
            max: max_words as u64,
        });
    }
    if data.len() != commit_len(words) {
        return Err(Error::Protocol(format!(
            "push message of {} bytes, but its header says {} bitmap words ({} bytes)",
            data.len(),
            words,
            commit_len(words)
        )));
    }
    match kind {
        KIND_COMMIT => Ok(Message::Commit {
            epoch,
            bytes,
            bitmap: data[HEADER_LEN..]
                .chunks_exact(8)
                .map(|c| u64_at(c, 0))
                .collect(),
        }),
        KIND_RELEASE if words == 0 && bytes == 0 => Ok(Message::Release { epoch }),
        KIND_RELEASE => Err(Error::Protocol(
            "push message: a release carries no bitmap or byte count".into(),
        )),
        other => Err(Error::UnknownMessage(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(matches!(bad(0, 1), Error::BadMagic { .. }));
        assert!(matches!(bad(4, 1), Error::VersionMismatch { .. }));
        assert!(matches!(bad(6, 4), Error::UnknownMessage(5)));
        assert!(
            matches!(bad(8, 1), Error::Protocol(_)),
            "epoch vs immediate"
        );
        assert!(matches!(bad(24, 2), Error::TooLarge { .. }));
        assert!(matches!(bad(28, 1), Error::Protocol(_)));
        assert!(matches!(
            decode(&good[..good.len() - 1], 5, 1),
            Err(Error::Protocol(_))
        ));
        assert!(matches!(
            decode(&good[..10], 5, 1),
            Err(Error::Truncated { got: 10, .. })
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200), imm: u32) {
            let _ = decode(&data, imm, 8);
        }
    }
}
