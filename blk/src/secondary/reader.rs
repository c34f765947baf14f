//! The receiver's input: frames read from the stream into one page-aligned buffer, with
//! their payloads handed out in place.
//!
//! Reads land at 64-byte aligned addresses whenever the stream keeps up (the kernel's copy
//! into user memory runs at a fraction of its speed into unaligned memory; see
//! `aligned`), and a payload is never copied again in user space before it is applied.

use std::io::Read;
use std::ops::Range;

use colo_transport::framing::read_result;

use crate::aligned::AlignedBuf;
use crate::error::Result;
use crate::wire::{Frame, HEADER_LEN, MAX_REASON_BYTES, MAX_WRITE_BYTES};

/// Reads start at multiples of this (relative to the buffer) unless a short read left
/// the end elsewhere.
const READ_ALIGN: usize = 64;

/// Size of the input buffer: room for the largest frame wherever a compaction puts it,
/// and for reading well ahead of it.
pub(crate) const READ_BUFFER: usize = 2 << 20;

const _: () = assert!(READ_BUFFER >= READ_ALIGN + HEADER_LEN + MAX_WRITE_BYTES as usize);
const _: () = assert!(MAX_REASON_BYTES as u64 <= MAX_WRITE_BYTES);

/// A frame reader over `R`.
#[derive(Debug)]
pub(crate) struct FrameReader<R> {
    inner: R,
    buf: AlignedBuf,
    /// First byte not consumed.
    start: usize,
    /// End of the bytes read.
    end: usize,
    /// The payload of the frame last returned.
    payload: Range<usize>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: AlignedBuf::new(READ_BUFFER),
            start: 0,
            end: 0,
            payload: 0..0,
        }
    }

    /// Bytes read from the stream and not consumed yet (after the current frame).
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// The payload of the frame last returned by [`next`](Self::next).
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.payload.clone()]
    }

    /// Reads the next frame (consuming the previous one): header checked by
    /// [`Frame::parse`], payload available from [`payload`](Self::payload).
    ///
    /// # Errors
    /// Any error of [`read_result`] (as [`Error::Frame`](crate::Error::Frame)), counted
    /// within the whole frame, or of [`Frame::parse`].
    pub fn next(&mut self) -> Result<Frame> {
        self.payload = self.start..self.start;
        self.fill(HEADER_LEN, HEADER_LEN)?;
        let header: &[u8; HEADER_LEN] = self.buf[self.start..self.start + HEADER_LEN]
            .try_into()
            .expect("a header's length");
        let frame = Frame::parse(header)?;
        let n = frame.payload_len() as usize;
        debug_assert!(n as u64 <= MAX_WRITE_BYTES);
        self.fill(HEADER_LEN + n, HEADER_LEN + n)?;
        let p = self.start + HEADER_LEN;
        self.payload = p..p + n;
        self.start = p + n;
        Ok(frame)
    }

    /// Makes `need` bytes from `start` available (`want` is the whole frame's length, for
    /// errors).
    fn fill(&mut self, need: usize, want: usize) -> Result<()> {
        while self.end - self.start < need {
            if self.start + need > self.buf.len() {
                // Move the partial frame to the front, keeping its alignment.
                let to = self.start % READ_ALIGN;
                self.buf.copy_within(self.start..self.end, to);
                self.end -= self.start - to;
                self.start = to;
            }
            let got = self.end - self.start;
            let r = self.inner.read(&mut self.buf[self.end..]);
            self.end += read_result(r, got, want, need == HEADER_LEN)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use colo_transport::framing::Error as FrameError;

    use super::*;
    use crate::error::Error;
    use crate::frame_io::write_frame;

    /// A reader that returns at most `chunk` bytes per read.
    struct Dribble<'a>(&'a [u8], usize);

    impl Read for Dribble<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(self.1).min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_come_out_whole_across_reads_and_compactions() {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for i in 0..40u64 {
            let len = [512usize, 65536, 1 << 20, 4096][i as usize % 4];
            let data: Vec<u8> = (0..len).map(|b| (b as u64 * 7 + i) as u8).collect();
            let f = Frame::Write {
                seq: i + 1,
                offset: 0,
                len: len as u32,
            };
            write_frame(&mut stream, f, &data).unwrap();
            want.push((f, data));
        }
        for chunk in [1usize, 31, 4096, 100_000, usize::MAX] {
            let mut r = FrameReader::new(Dribble(&stream, chunk));
            for (f, data) in &want {
                assert_eq!(r.next().unwrap(), *f);
                assert_eq!(r.payload(), &data[..]);
            }
            assert_eq!(r.buffered(), 0);
            assert!(matches!(
                r.next(),
                Err(Error::Frame(FrameError::PeerClosed))
            ));
        }
        // Cut inside a header and inside a payload.
        for cut in [10, HEADER_LEN + 100] {
            let mut r = FrameReader::new(&stream[..cut]);
            assert!(
                matches!(r.next(), Err(Error::Frame(FrameError::Truncated { got, .. })) if got == cut)
            );
        }
    }
}
