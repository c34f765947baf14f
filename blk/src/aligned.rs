//! A zeroed byte buffer whose first byte is page-aligned.
//!
//! The kernel copies to and from user memory with `rep movsb`, which on some CPUs runs
//! at a quarter of its speed when the user address is not aligned: a `pread` of page-cache
//! data into a `Vec` (whose heap block starts 16 bytes past a page boundary) measured
//! 1.5 GiB/s against 6 GiB/s into a page-aligned buffer, on an AMD EPYC guest.

use std::ops::{Deref, DerefMut};

/// The alignment of [`AlignedBuf`]'s start.
pub(crate) const ALIGN: usize = 4096;

/// `len` zeroed bytes starting at a multiple of [`ALIGN`].
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        if len == 0 {
            return Self::default();
        }
        let raw = vec![0u8; len + ALIGN - 1];
        let start = raw.as_ptr().align_offset(ALIGN);
        debug_assert!(start < ALIGN);
        Self { raw, start, len }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_aligned_and_has_its_length() {
        for len in [0, 1, 4095, 4096, 1 << 20] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.len(), len);
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % ALIGN, 0);
                b[len - 1] = 1;
                assert!(b[..len - 1].iter().all(|&x| x == 0));
            }
        }
    }
}
