//! A small length-checked binary codec for VM state: every item is a `u32` length and
//! its bytes, and decoding checks each length against what the item must be.

use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::error::{Error, Result};

/// Appends items to a byte buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Appends a length-prefixed byte string.
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(b);
    }

    /// Appends a plain-data value as its bytes.
    pub fn pod<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }

    /// Appends a u64.
    pub fn u64(&mut self, v: u64) {
        self.pod(&v);
    }
}

/// Reads items back, refusing anything short, long or left over.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; `what` names the section in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    /// The next length-prefixed byte string.
    ///
    /// # Errors
    /// [`Error::Snapshot`] if the buffer ends first.
    pub fn bytes(&mut self, item: &str) -> Result<&'a [u8]> {
        let short = || Error::Snapshot(format!("{}: truncated at {item}", self.what));
        let len = self.buf.get(..4).ok_or_else(short)?;
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        let b = self.buf.get(4..4 + len).ok_or_else(short)?;
        self.buf = &self.buf[4 + len..];
        Ok(b)
    }

    /// The next plain-data value, whose length must be exactly its size.
    ///
    /// # Errors
    /// [`Error::Snapshot`] if truncated or of another length.
    pub fn pod<T: FromBytes>(&mut self, item: &str) -> Result<T> {
        let b = self.bytes(item)?;
        T::read_from_bytes(b).map_err(|_| {
            Error::Snapshot(format!(
                "{}: {item} is {} bytes, expected {}",
                self.what,
                b.len(),
                size_of::<T>()
            ))
        })
    }

    /// The next u64.
    ///
    /// # Errors
    /// As [`Reader::pod`].
    pub fn u64(&mut self, item: &str) -> Result<u64> {
        self.pod(item)
    }

    /// Checks that nothing is left.
    ///
    /// # Errors
    /// [`Error::Snapshot`] if bytes remain.
    pub fn finish(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::Snapshot(format!(
                "{}: {} unexpected trailing bytes",
                self.what,
                self.buf.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let mut w = Writer::default();
        w.u64(7);
        w.bytes(b"abc");
        w.pod(&[1u32, 2]);
        let b = w.into_bytes();
        let mut r = Reader::new(&b, "t");
        assert_eq!(r.u64("a").unwrap(), 7);
        assert_eq!(r.bytes("b").unwrap(), b"abc");
        assert_eq!(r.pod::<[u32; 2]>("c").unwrap(), [1, 2]);
        r.finish().unwrap();
        // Wrong size, truncation, trailing bytes.
        assert!(
            Reader::new(&b, "t")
                .pod::<u32>("a")
                .unwrap_err()
                .to_string()
                .contains("8 bytes")
        );
        assert!(Reader::new(&b[..10], "t").u64("a").is_err());
        let mut r = Reader::new(&b, "t");
        r.u64("a").unwrap();
        assert!(r.finish().unwrap_err().to_string().contains("trailing"));
        assert!(Reader::new(&[0xff; 4], "t").bytes("x").is_err());
    }
}
