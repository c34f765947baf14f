//! Length-prefixed frames on a byte stream, as QEMU's socket netdev and colo-compare's
//! chardevs carry them with vnet_hdr off: a 4-byte big-endian length, then the frame.
//!
//! ```text
//!  +----------------+---------------------------+
//!  | len: u32 (BE)  | frame: len bytes          |  ... next frame
//!  +----------------+---------------------------+
//! ```
//!
//! [`Decoder`] is push-based (feed it whatever `read` returned, take out whole frames), so it
//! has no I/O of its own and the fuzz target drives it directly. A length above the limit
//! means the stream is out of step: [`Decoder::next_frame`] fails and the connection is
//! closed. A zero length gives an empty frame, which the engine counts as malformed.
//!
//! Frames shorter than any Ethernet header carry words between a VMM and the proxy on a
//! VM's socket, in order with the VM's frames:
//!
//! ```text
//!  proxy -> VM   len 1: PACE_HOLD (0x01), PACE_GO (0x00)        pacing of a secondary
//!  VM -> proxy   len 0: commit marker                           the epoch before it commits
//!  VM -> proxy   len 1: RoleWord: Follower 'F' (0x46),          who this VM is now
//!                       Protected 'P' (0x50), Alone 'A' (0x41)  (`colo proxy --cluster`)
//! ```

use crate::error::{Error, Result};

/// Sent by the proxy on the secondary's port ([`Config::secondary_lead`](crate::Config)):
/// hold the VM, it is too far ahead of the primary. One byte, so never an Ethernet frame.
pub const PACE_HOLD: [u8; 1] = [1];
/// Sent by the proxy on the secondary's port: the VM may run again.
pub const PACE_GO: [u8; 1] = [0];

/// What a VMM says of its VM on its socket (`colo primary|secondary --role-words`): one
/// byte, so never an Ethernet frame, in order with the VM's frames. A proxy in cluster mode
/// (`colo proxy --cluster`) decides from these which VM port serves the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RoleWord {
    /// "I am a secondary": nothing this VM sends is for the clients.
    Follower,
    /// "I serve, protected": my output is held until my next commit marker.
    Protected,
    /// "I serve alone" (unprotected, or a secondary that took over): release my output at
    /// once.
    Alone,
}

impl RoleWord {
    /// `Follower` on the wire.
    pub const FOLLOWER: u8 = b'F';
    /// `Protected` on the wire.
    pub const PROTECTED: u8 = b'P';
    /// `Alone` on the wire.
    pub const ALONE: u8 = b'A';

    /// The word's byte.
    pub const fn byte(self) -> u8 {
        match self {
            Self::Follower => Self::FOLLOWER,
            Self::Protected => Self::PROTECTED,
            Self::Alone => Self::ALONE,
        }
    }

    /// The word as a one-byte frame (what goes after the 4-byte length prefix).
    pub const fn encode(self) -> [u8; 1] {
        [self.byte()]
    }

    /// The word in a one-byte frame.
    ///
    /// # Errors
    /// [`Error::RoleWordLength`] when `frame` is not one byte long;
    /// [`Error::UnknownRoleWord`] for a byte that names no word.
    pub fn parse(frame: &[u8]) -> Result<Self> {
        match *frame {
            [b] => Self::from_byte(b),
            _ => Err(Error::RoleWordLength(frame.len())),
        }
    }

    /// The word of byte `b`.
    ///
    /// # Errors
    /// [`Error::UnknownRoleWord`] for a byte that names no word.
    pub fn from_byte(b: u8) -> Result<Self> {
        match b {
            Self::FOLLOWER => Ok(Self::Follower),
            Self::PROTECTED => Ok(Self::Protected),
            Self::ALONE => Ok(Self::Alone),
            other => Err(Error::UnknownRoleWord(other)),
        }
    }
}

impl std::fmt::Display for RoleWord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Follower => "follower",
            Self::Protected => "protected",
            Self::Alone => "alone",
        })
    }
}

/// What a frame a VM sent on its socket is, as a proxy in cluster mode reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FromVm {
    /// An empty frame: the commit marker.
    Marker,
    /// A one-byte frame: a role word.
    Role(RoleWord),
    /// Anything longer: a frame of the guest.
    Frame(Vec<u8>),
}

impl FromVm {
    /// Classifies a frame read from a VM's socket.
    ///
    /// # Errors
    /// [`Error::UnknownRoleWord`] for a one-byte frame that names no word.
    pub fn classify(frame: Vec<u8>) -> Result<Self> {
        match frame.len() {
            0 => Ok(Self::Marker),
            1 => RoleWord::parse(&frame).map(Self::Role),
            _ => Ok(Self::Frame(frame)),
        }
    }
}

/// The largest frame accepted by default: QEMU's NET_BUFSIZE (4096 + 65536 bytes).
pub const MAX_FRAME: u32 = 4096 + 65536;

/// Appends `frame` with its length prefix to `out`.
///
/// # Errors
/// [`Error::FrameTooLong`] when the frame does not fit in a `u32` length.
pub fn encode(frame: &[u8], out: &mut Vec<u8>) -> Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| Error::FrameTooLong {
        len: u32::MAX,
        max: u32::MAX,
    })?;
    out.reserve(4 + frame.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    Ok(())
}

/// Splits a byte stream into frames.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    head: usize,
    max: u32,
}

impl Decoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: u32) -> Self {
        Self {
            buf: Vec::new(),
            head: 0,
            max,
        }
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.head > 0 && self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        } else if self.head >= 64 * 1024 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.head
    }

    /// The next whole frame, if one has arrived.
    ///
    /// # Errors
    /// [`Error::FrameTooLong`] when the next length prefix exceeds the limit. The decoder
    /// stays in that state: the stream cannot be resynchronised.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>> {
        let rest = self.buf.get(self.head..).unwrap_or_default();
        let Some(prefix) = rest.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len > self.max {
            return Err(Error::FrameTooLong { len, max: self.max });
        }
        let Some(frame) = rest.get(4..4 + len as usize) else {
            return Ok(None);
        };
        let frame = frame.to_vec();
        self.head += 4 + len as usize;
        Ok(Some(frame))
    }

    /// Forgets everything buffered (a new connection).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_encoding_and_split_reads() {
        let mut wire = Vec::new();
        encode(b"\x01\x02\x03", &mut wire).unwrap();
        encode(b"", &mut wire).unwrap();
        encode(&[0xAB; 300], &mut wire).unwrap();
        assert_eq!(&wire[..7], &[0, 0, 0, 3, 1, 2, 3]);
        assert_eq!(&wire[7..11], &[0, 0, 0, 0]);
        assert_eq!(&wire[11..15], &[0, 0, 1, 0x2C]);
        for chunk in [1, 2, 3, 5, 64, 1000] {
            let mut d = Decoder::new(MAX_FRAME);
            let mut frames = Vec::new();
            for c in wire.chunks(chunk) {
                d.feed(c);
                while let Some(f) = d.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            assert_eq!(
                frames,
                vec![vec![1, 2, 3], vec![], vec![0xAB; 300]],
                "chunk {chunk}"
            );
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn role_words_golden_bytes() {
        let golden = [
            (RoleWord::Follower, 0x46),
            (RoleWord::Protected, 0x50),
            (RoleWord::Alone, 0x41),
        ];
        for (w, b) in golden {
            assert_eq!(w.encode(), [b], "{w}");
            assert_eq!(RoleWord::parse(&[b]).unwrap(), w);
            // Framed as a VMM writes it: length 1, then the byte.
            let mut wire = Vec::new();
            encode(&w.encode(), &mut wire).unwrap();
            assert_eq!(wire, [0, 0, 0, 1, b]);
            let mut d = Decoder::new(MAX_FRAME);
            d.feed(&wire);
            let f = d.next_frame().unwrap().unwrap();
            assert_eq!(RoleWord::parse(&f).unwrap(), w);
        }
        // Never confused with the proxy's pacing words, which travel the other way.
        for (w, _) in golden {
            assert_ne!(w.encode(), PACE_HOLD);
            assert_ne!(w.encode(), PACE_GO);
        }
    }

    #[test]
    fn role_words_refuse_unknown_bytes_and_lengths() {
        for b in (0..=u8::MAX).filter(|b| ![0x41, 0x46, 0x50].contains(b)) {
            assert!(
                matches!(RoleWord::parse(&[b]), Err(Error::UnknownRoleWord(x)) if x == b),
                "{b:#x}"
            );
        }
        assert!(matches!(
            RoleWord::parse(&[]),
            Err(Error::RoleWordLength(0))
        ));
        assert!(matches!(
            RoleWord::parse(b"PA"),
            Err(Error::RoleWordLength(2))
        ));
    }

    #[test]
    fn refuses_too_long() {
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 101, 0]);
        assert!(matches!(
            d.next_frame(),
            Err(Error::FrameTooLong { len: 101, max: 100 })
        ));
        let mut d = Decoder::new(MAX_FRAME);
        d.feed(&[0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(d.next_frame().is_err());
    }
}
