//! An opt-in encrypted record layer for a byte stream, keyed from the handshake's session
//! secret ([`Peer::session`]).
//!
//! # What it protects, and what not
//!
//! After the handshake, everything written through a sealed stream is confidential and
//! authenticated: someone who reads the traffic learns nothing of its bytes, and someone
//! who alters, drops, reorders, replays, inserts or truncates any record (header or body)
//! is detected at that record: the reader returns an error, hands out no byte of that
//! record, and stops for good. A record sealed in one direction does not open in the other
//! one, nor on another channel, nor in another session.
//!
//! It does not hide how much is sent and when (record lengths and timing stay visible:
//! an observer can tell a quiet guest from a busy one, and count checkpoints), nor can it
//! keep someone on the path from cutting the connection. An ending is authenticated,
//! though: a reader returns end-of-stream (`Ok(0)`) only after the writer's
//! [`SealWriter::close`]; a connection that simply ends is reported as
//! [`SealError::Truncated`]. Under `--insecure` the session secret comes from a well-known
//! key, so anyone can compute these keys: sealing then protects nothing.
//!
//! # Keys
//!
//! ```text
//! prk        = HKDF-Extract(salt = "colo-seal v1", ikm = Peer::session)
//! secret_0   = HKDF-Expand(prk, "colo-seal v1 traffic" | from role | to role | channel | index, 32)
//! key_i, iv_i = HKDF-Expand(secret_i, "colo-seal v1 key", 32), HKDF-Expand(secret_i, "colo-seal v1 iv", 12)
//! secret_i+1 = HKDF-Expand(secret_i, "colo-seal v1 next", 32)      every 2^20 records
//! nonce      = iv_i XOR (32 zero bits | 64-bit record number)
//! ```
//!
//! Each direction (primary to secondary, secondary to primary) and each channel (control,
//! push stream `i`, disk) has its own secret, so no key ever seals in two places, and each
//! key's nonce is a record counter, so no nonce repeats under a key. Both ends move to the
//! next key after every [`REKEY_RECORDS`] records on their own (no message), which keeps
//! the data under one AES-GCM key to at most 2^20 x 64 KiB = 64 GiB (2^32 blocks: a
//! distinguishing advantage near 2^64 / 2^129 = 2^-65). The record number is 64 bits; a
//! direction refuses to seal record 2^64 - 1 ([`SealError::Exhausted`]; at a billion
//! records a second that takes 584 years). A reader stops at its first bad record, so an
//! attacker gets one forgery attempt per connection.
//!
//! # Records
//!
//! ```text
//! | length: u32 LE | ciphertext: length bytes | tag: 16 bytes |
//! ```
//!
//! The length is the AEAD's associated data, so it cannot be altered either. A data record
//! holds 1 to [`MAX_RECORD`] bytes; the length 0 is the writer's end-of-stream record. A
//! length above [`MAX_RECORD`] is refused as soon as the header arrives, before waiting for
//! (or buffering) its body. A reader decrypts a whole record in its own buffer and hands
//! out its bytes only once the tag checked (a record that fails leaves that buffer in an
//! unspecified state, and nothing of it is handed out), so no unauthenticated byte ever
//! reaches the caller.
//!
//! # Threads and cloned sockets
//!
//! A direction's state (its key and record counter) lives in exactly one value:
//! [`Sealer`] for the side that writes, [`Opener`] for the side that reads. Neither is
//! `Clone`, so there is never a second copy of a counter to fall out of step. For a reader
//! thread and writer threads on clones of one socket:
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! # let (stream, peer): (std::net::TcpStream, colo_auth::Peer) = todo!();
//! use colo_auth::seal::{OpenReader, SealWriter, SessionKeys};
//! let (sealer, opener) = SessionKeys::from_peer(&peer).split();
//! let writer = SealWriter::new(stream.try_clone()?, sealer); // to the writer thread(s)
//! let reader = OpenReader::new(stream, opener); // to the reader thread
//! # Ok(()) }
//! ```
//!
//! The record counter is the order of records on the wire, so every writer must write
//! through the one [`SealWriter`]: writer threads share it behind a `Mutex` (as they must
//! already share a plain socket to keep their frames whole); each writes its message and
//! flushes under the lock, so its records go out whole and in counter order. A
//! single-threaded user takes [`Sealed`], which does both directions on one stream and can
//! later be [split](Sealed::into_split).
//!
//! [`Sealer::seal`] and [`Opener::open`] are the same codec without I/O, for a caller
//! that moves the bytes itself.
//!
//! # Cost
//!
//! The AEAD is ring's AES-256-GCM (maintained, the provider rustls uses; assembly that
//! runs AES and GHASH in one pass). `cargo bench -p colo-auth --bench seal` measures it:
//! here (AMD EPYC, AES-NI, PCLMULQDQ and VAES, December 2026) one core seals about
//! 4.5 GiB/s and opens 7-8.6 GiB/s against a memcpy of 11 GiB/s; RustCrypto's aes-gcm did
//! 1.9-2.4 (two passes), too slow for the push. A reader that copies into its destination
//! anyway (guest memory) saves a copy by taking the plaintext from
//! [`BufRead::fill_buf`](std::io::BufRead::fill_buf) instead of `read`.

use std::io;
use std::ops::Range;

use hkdf::Hkdf;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, Tag, UnboundKey};
use sha2::Sha256;

use crate::handshake::{Channel, MAC_LEN, Peer, Role};

mod bridge;
mod stream;
#[cfg(test)]
mod tests;

pub use bridge::bridge;
pub use stream::{OpenReader, SealWriter, Sealed};

/// Bytes of a record's header (its length, u32 little-endian).
pub const HEADER_LEN: usize = 4;
/// Bytes of a record's tag.
pub const TAG_LEN: usize = 16;
/// Most plaintext bytes in one record; larger writes are split.
pub const MAX_RECORD: usize = 64 * 1024;
/// Most bytes one record takes on the wire.
pub const MAX_WIRE_RECORD: usize = HEADER_LEN + MAX_RECORD + TAG_LEN;
/// Records sealed under one key before both ends move to the next one.
pub const REKEY_RECORDS: u64 = 1 << 20;

const NONCE_LEN: usize = 12;
const SECRET_LEN: usize = 32;

const SALT: &[u8] = b"colo-seal v1";
const TRAFFIC: &[u8] = b"colo-seal v1 traffic";
const KEY: &[u8] = b"colo-seal v1 key";
const IV: &[u8] = b"colo-seal v1 iv";
const NEXT: &[u8] = b"colo-seal v1 next";

/// Why a record could not be sealed or opened. Reading stops for good at the first one.
///
/// It reaches an I/O caller as the inner error of an [`io::Error`] (kind
/// [`io::ErrorKind::InvalidData`], except [`SealError::Truncated`]:
/// [`io::ErrorKind::UnexpectedEof`], and [`SealError::Closed`]:
/// [`io::ErrorKind::BrokenPipe`]); [`SealError::from_io`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The record's tag is wrong: it was altered (header or body), or it is not the record
    /// expected next (reordered, replayed, one before it dropped, cut short and followed by
    /// other bytes), or it was sealed for another direction, channel or session.
    #[error(
        "sealed record {record} failed authentication (altered, reordered, replayed, dropped, cut, or from another key)"
    )]
    BadTag {
        /// Its number in this direction.
        record: u64,
    },
    /// A header announces more than [`MAX_RECORD`] bytes (or a caller asked to seal more).
    #[error(
        "sealed record {record} would hold {length} bytes; a record holds at most {MAX_RECORD}"
    )]
    Oversized {
        /// Its number in this direction.
        record: u64,
        /// The length announced or asked for.
        length: u64,
    },
    /// This direction has sealed its last record; the connection must be made again.
    #[error("this direction's record counter is used up; the connection must be made again")]
    Exhausted,
    /// The stream ended without the writer's end record: the peer died, or someone cut the
    /// connection (inside a record, or between two).
    #[error(
        "the sealed stream ended without its end record ({} record {record})",
        if *.mid_record { "inside" } else { "before" }
    )]
    Truncated {
        /// The record that was expected next.
        record: u64,
        /// Whether part of that record had arrived.
        mid_record: bool,
    },
    /// This side already closed its writing direction.
    #[error("the sealed stream was closed for writing")]
    Closed,
}

/// Results of this module.
pub type Result<T> = std::result::Result<T, SealError>;

impl SealError {
    /// The [`SealError`] inside an I/O error from a sealed stream, if that is what it is.
    pub fn from_io(e: &io::Error) -> Option<&Self> {
        e.get_ref().and_then(|inner| inner.downcast_ref())
    }

    fn kind(self) -> io::ErrorKind {
        match self {
            Self::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            Self::Closed => io::ErrorKind::BrokenPipe,
            Self::BadTag { .. } | Self::Oversized { .. } | Self::Exhausted => {
                io::ErrorKind::InvalidData
            }
        }
    }
}

impl From<SealError> for io::Error {
    fn from(e: SealError) -> Self {
        Self::new(e.kind(), e)
    }
}

fn hkdf_expand(prk: &Hkdf<Sha256>, info: &[&[u8]], out: &mut [u8]) {
    prk.expand_multi_info(info, out)
        .expect("HKDF-SHA256 gives up to 8160 bytes; these are 12 and 32");
}

fn hkdf_from(secret: &[u8; SECRET_LEN]) -> Hkdf<Sha256> {
    Hkdf::<Sha256>::from_prk(secret).expect("a 32-byte secret is a valid SHA-256 PRK")
}

/// One direction's key schedule and record counter.
struct Direction {
    secret: [u8; SECRET_LEN],
    cipher: LessSafeKey,
    iv: [u8; NONCE_LEN],
    /// The next record's number.
    seq: u64,
    /// The first record number under the next key.
    epoch_end: u64,
}

impl Direction {
    fn new(secret: [u8; SECRET_LEN]) -> Self {
        let (cipher, iv) = Self::keys(&secret);
        Self {
            secret,
            cipher,
            iv,
            seq: 0,
            epoch_end: REKEY_RECORDS,
        }
    }

    fn keys(secret: &[u8; SECRET_LEN]) -> (LessSafeKey, [u8; NONCE_LEN]) {
        let h = hkdf_from(secret);
        let mut key = [0u8; 32];
        let mut iv = [0u8; NONCE_LEN];
        hkdf_expand(&h, &[KEY], &mut key);
        hkdf_expand(&h, &[IV], &mut iv);
        let cipher = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &key).expect("AES-256-GCM takes a 32-byte key"),
        );
        key.fill(0);
        (cipher, iv)
    }

    /// The next record's number and nonce, moving to the next key at an epoch's end. The
    /// number is used up only by [`Direction::advance`].
    fn next(&mut self) -> Result<(u64, Nonce)> {
        if self.seq == u64::MAX {
            return Err(SealError::Exhausted);
        }
        if self.seq == self.epoch_end {
            let mut next = [0u8; SECRET_LEN];
            hkdf_expand(&hkdf_from(&self.secret), &[NEXT], &mut next);
            self.secret = next;
            (self.cipher, self.iv) = Self::keys(&self.secret);
            self.epoch_end = self.epoch_end.saturating_add(REKEY_RECORDS);
        }
        let seq = self.seq;
        let mut nonce = self.iv;
        for (n, s) in nonce[NONCE_LEN - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Ok((seq, Nonce::assume_unique_for_key(nonce)))
    }

    fn advance(&mut self) {
        self.seq += 1;
    }

    /// Test hook: continue at record `seq` (both ends must do the same).
    #[cfg(test)]
    fn skip_to(&mut self, seq: u64) {
        self.seq = seq;
        self.epoch_end = seq.div_ceil(REKEY_RECORDS).saturating_mul(REKEY_RECORDS);
        if self.epoch_end == seq {
            self.epoch_end = seq.saturating_add(REKEY_RECORDS);
        }
    }
}

/// The two directions' secrets of one connection, from its handshake.
pub struct SessionKeys {
    send: [u8; SECRET_LEN],
    recv: [u8; SECRET_LEN],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// The keys of a connection that authenticated `peer`.
    pub fn from_peer(peer: &Peer) -> Self {
        Self::new(&peer.session, peer.role.peer(), peer.channel)
    }

    /// The keys for side `me` of a connection on `channel` whose session secret is
    /// `session` (both sides pass the same secret and channel and their own role).
    pub fn new(session: &[u8; MAC_LEN], me: Role, channel: Channel) -> Self {
        let (prk, _) = Hkdf::<Sha256>::extract(Some(SALT), session);
        let prk = Hkdf::<Sha256>::from_prk(&prk).expect("an extracted PRK has the hash's size");
        let (kind, index) = channel.code();
        let secret = |from: Role, to: Role| {
            let mut s = [0u8; SECRET_LEN];
            hkdf_expand(
                &prk,
                &[
                    TRAFFIC,
                    &[from.code(), to.code(), kind],
                    &index.to_le_bytes(),
                ],
                &mut s,
            );
            s
        };
        Self {
            send: secret(me, me.peer()),
            recv: secret(me.peer(), me),
        }
    }

    /// This side's sealer (its writing direction) and opener (its reading direction).
    pub fn split(self) -> (Sealer, Opener) {
        (
            Sealer {
                dir: Direction::new(self.send),
            },
            Opener {
                dir: Direction::new(self.recv),
            },
        )
    }
}

/// Seals the records of one direction. The only holder of that direction's counter.
pub struct Sealer {
    dir: Direction,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("next_record", &self.dir.seq)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// Appends to `out` one record holding the concatenation of `parts` (nothing when they
    /// are all empty: an empty record is the end record, see [`Sealer::seal_end`]).
    ///
    /// # Errors
    /// [`SealError::Oversized`] if `parts` hold more than [`MAX_RECORD`] bytes (nothing is
    /// appended and no record number is used), [`SealError::Exhausted`].
    pub fn seal(&mut self, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<()> {
        let length: usize = parts.iter().map(|p| p.len()).sum();
        if length == 0 {
            return Ok(());
        }
        if length > MAX_RECORD {
            return Err(SealError::Oversized {
                record: self.dir.seq,
                length: length as u64,
            });
        }
        let start = out.len();
        out.reserve(HEADER_LEN + length + TAG_LEN);
        out.extend_from_slice(&[0; HEADER_LEN]);
        for p in parts {
            out.extend_from_slice(p);
        }
        self.seal_tail(out, start)
            .inspect_err(|_| out.truncate(start))
    }

    /// Appends the end-of-stream record to `out`: after it, the reader returns `Ok(0)`.
    ///
    /// # Errors
    /// [`SealError::Exhausted`].
    pub fn seal_end(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let start = out.len();
        out.extend_from_slice(&[0; HEADER_LEN]);
        self.seal_tail(out, start)
            .inspect_err(|_| out.truncate(start))
    }

    /// Seals in place the record that starts at `out[start]`: a header's room, then at most
    /// [`MAX_RECORD`] plaintext bytes up to the end of `out`; appends the tag.
    fn seal_tail(&mut self, out: &mut Vec<u8>, start: usize) -> Result<()> {
        let length = out.len() - start - HEADER_LEN;
        out.resize(out.len() + TAG_LEN, 0);
        self.seal_into(None, length, &mut out[start..]).map(drop)
    }

    /// Seals one record of `length` (at most [`MAX_RECORD`]) bytes into `record`, which has
    /// room for it whole: from `src` (`length` bytes, encrypted straight into `record`), or,
    /// without one, from the plaintext already at `record[HEADER_LEN..]`. Returns the
    /// record's size.
    fn seal_into(&mut self, src: Option<&[u8]>, length: usize, record: &mut [u8]) -> Result<usize> {
        debug_assert!(length <= MAX_RECORD);
        let end = HEADER_LEN + length + TAG_LEN;
        let (record_no, nonce) = self.dir.next()?;
        let header = (length as u32).to_le_bytes();
        record[..HEADER_LEN].copy_from_slice(&header);
        let (body, tag_room) = record[HEADER_LEN..end].split_at_mut(length);
        let oversized = SealError::Oversized {
            record: record_no,
            length: length as u64,
        };
        if let Some(src) = src {
            if src.len() != body.len() {
                return Err(oversized);
            }
            body.copy_from_slice(src);
        }
        let tag = self
            .dir
            .cipher
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| oversized)?;
        tag_room.copy_from_slice(tag.as_ref());
        self.dir.advance();
        Ok(end)
    }

    /// Test hook: continue at record `seq`.
    #[cfg(test)]
    pub(crate) fn skip_to(&mut self, seq: u64) {
        self.dir.skip_to(seq);
    }
}

/// What [`Opener::open`] found at the front of its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Opened {
    /// Not a whole record yet: `need` bytes in all are needed (never more than
    /// [`MAX_WIRE_RECORD`]).
    Incomplete {
        /// Bytes the record takes, or [`HEADER_LEN`] while its header is not complete.
        need: usize,
    },
    /// A data record, now authenticated and decrypted in place.
    Data {
        /// Where its plaintext lies in the bytes given.
        plain: Range<usize>,
        /// Bytes it took (the next record starts there).
        consumed: usize,
    },
    /// The writer's end record: the stream ended cleanly.
    End {
        /// Bytes it took.
        consumed: usize,
    },
}

/// Opens the records of one direction, in order. The only holder of that direction's
/// counter.
pub struct Opener {
    dir: Direction,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("next_record", &self.dir.seq)
            .finish_non_exhaustive()
    }
}

impl Opener {
    /// Opens the record at the front of `bytes` in place, if it is all there. The record
    /// number advances only when a record opened; after an error the stream cannot go on.
    ///
    /// # Errors
    /// [`SealError::Oversized`] as soon as a header announces too much,
    /// [`SealError::BadTag`] (nothing of the record is decrypted),
    /// [`SealError::Exhausted`].
    pub fn open(&mut self, bytes: &mut [u8]) -> Result<Opened> {
        let Some(header) = bytes.first_chunk::<HEADER_LEN>().copied() else {
            return Ok(Opened::Incomplete { need: HEADER_LEN });
        };
        let length = u32::from_le_bytes(header) as usize;
        if length > MAX_RECORD {
            return Err(SealError::Oversized {
                record: self.dir.seq,
                length: length as u64,
            });
        }
        let end = HEADER_LEN + length + TAG_LEN;
        if bytes.len() < end {
            return Ok(Opened::Incomplete { need: end });
        }
        let (body, tag) = bytes[HEADER_LEN..end].split_at_mut(length);
        let tag = Tag::try_from(&*tag).map_err(|_| SealError::BadTag {
            record: self.dir.seq,
        })?;
        let (record, nonce) = self.dir.next()?;
        self.dir
            .cipher
            .open_in_place_separate_tag(nonce, Aad::from(header), tag, body, 0..)
            .map_err(|_| SealError::BadTag { record })?;
        self.dir.advance();
        Ok(if length == 0 {
            Opened::End { consumed: end }
        } else {
            Opened::Data {
                plain: HEADER_LEN..HEADER_LEN + length,
                consumed: end,
            }
        })
    }

    /// The number of the record expected next.
    pub fn next_record(&self) -> u64 {
        self.dir.seq
    }

    /// Test hook: continue at record `seq`.
    #[cfg(test)]
    pub(crate) fn skip_to(&mut self, seq: u64) {
        self.dir.skip_to(seq);
    }
}
