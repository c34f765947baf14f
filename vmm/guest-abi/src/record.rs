//! The records of the disk log (pure logic: no device, no global state).
//!
//! The log is a byte stream from sector 0 of the disk. Records follow each other with no
//! gaps and may cross sector boundaries; the first byte after the last record is 0.
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0xC5
//! 1       1     kind (1: SET)
//! 2       2     key length k (little-endian, 1..=MAX_KEY)
//! 4       4     value length v (little-endian, 0..=MAX_VALUE)
//! 8       k     key
//! 8+k     v     value
//! 8+k+v   4     FNV-1a 32 of bytes 0..8+k+v (little-endian)
//! ```
//!
//! Reading stops at a 0 byte where a record would start (the clean end), and also at
//! anything that is not a whole, valid record (a torn write, foreign data): the log ends
//! there and new records overwrite from that point.

use alloc::vec::Vec;

/// First byte of every record.
pub const MAGIC: u8 = 0xc5;
/// Record kind: a SET.
pub const KIND_SET: u8 = 1;
/// Bytes before the key.
pub const HEADER: usize = 8;
/// Bytes after the value (the checksum).
pub const TRAILER: usize = 4;
/// Longest key.
pub const MAX_KEY: usize = 4096;
/// Longest value.
pub const MAX_VALUE: usize = 4096;

/// What a record header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The end of the log.
    End,
    /// A SET record of `len` bytes in all.
    Set {
        /// Key bytes.
        key_len: usize,
        /// Value bytes.
        value_len: usize,
    },
    /// Not a record.
    Bad,
}

impl Header {
    /// Parses the first [`HEADER`] bytes of a record.
    pub fn parse(h: &[u8; HEADER]) -> Self {
        if h[0] == 0 {
            return Self::End;
        }
        let key_len = usize::from(u16::from_le_bytes([h[2], h[3]]));
        let value_len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if h[0] != MAGIC
            || h[1] != KIND_SET
            || !(1..=MAX_KEY).contains(&key_len)
            || value_len > MAX_VALUE
        {
            return Self::Bad;
        }
        Self::Set { key_len, value_len }
    }
}

/// Bytes of the record for `key_len` and `value_len`.
pub fn record_len(key_len: usize, value_len: usize) -> usize {
    HEADER + key_len + value_len + TRAILER
}

/// Appends the SET record for `key` and `value` to `out`.
///
/// # Panics
/// If `key` is empty or longer than [`MAX_KEY`], or `value` longer than [`MAX_VALUE`].
pub fn encode(key: &[u8], value: &[u8], out: &mut Vec<u8>) {
    assert!((1..=MAX_KEY).contains(&key.len()) && value.len() <= MAX_VALUE);
    let start = out.len();
    out.push(MAGIC);
    out.push(KIND_SET);
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let sum = fnv1a(&out[start..]);
    out.extend_from_slice(&sum.to_le_bytes());
}

/// The key and value of a whole record (header included) whose header parsed as
/// [`Header::Set`]; `None` if the checksum does not match.
pub fn decode(rec: &[u8], key_len: usize, value_len: usize) -> Option<(&[u8], &[u8])> {
    let body = HEADER + key_len + value_len;
    if rec.len() != body + TRAILER {
        return None;
    }
    let sum = u32::from_le_bytes(rec[body..].try_into().ok()?);
    if sum != fnv1a(&rec[..body]) {
        return None;
    }
    Some((&rec[HEADER..HEADER + key_len], &rec[HEADER + key_len..body]))
}

/// 32-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use alloc::vec::Vec;

    use super::*;

    /// `SET k v1`: header, key, value, FNV-1a 32 of the rest.
    const GOLDEN: [u8; 15] = [
        0xc5, 1, 1, 0, 2, 0, 0, 0, b'k', b'v', b'1', 0xbc, 0x6a, 0x7c, 0xbc,
    ];

    #[test]
    fn a_set_record_encodes_to_its_golden_bytes() {
        let mut out = Vec::new();
        encode(b"k", b"v1", &mut out);
        assert_eq!(out, GOLDEN);
    }

    #[test]
    fn golden_bytes_decode_and_a_flipped_byte_does_not() {
        let h: &[u8; HEADER] = GOLDEN[..HEADER].try_into().unwrap();
        assert_eq!(
            Header::parse(h),
            Header::Set {
                key_len: 1,
                value_len: 2
            }
        );
        assert_eq!(record_len(1, 2), GOLDEN.len());
        assert_eq!(decode(&GOLDEN, 1, 2), Some((&b"k"[..], &b"v1"[..])));
        let mut bad = GOLDEN;
        bad[9] ^= 1;
        assert_eq!(decode(&bad, 1, 2), None);
        assert_eq!(Header::parse(&[0; HEADER]), Header::End);
        assert_eq!(Header::parse(&[0xc5, 2, 1, 0, 0, 0, 0, 0]), Header::Bad);
    }
}
