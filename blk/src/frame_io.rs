//! Reading and writing whole frames on a byte stream.

use std::io::{self, IoSlice, Read, Write};

use colo_transport::framing::{self, read_full};

use crate::error::{Error, Result};
use crate::wire::{Frame, HEADER_LEN, MAX_REASON_BYTES, MAX_WRITE_BYTES};

/// Reads one frame header and its payload into `payload` (resized to the payload's
/// length, which the header check bounds by [`MAX_WRITE_BYTES`]: a length field never
/// makes this allocate more).
///
/// # Errors
/// Any error of [`read_full`] (its counts are the whole frame's) or [`Frame::parse`].
pub(crate) fn read_frame(s: &mut impl Read, payload: &mut Vec<u8>) -> Result<Frame> {
    let mut h = [0u8; HEADER_LEN];
    read_full(s, &mut h, true)?;
    let frame = Frame::parse(&h)?;
    let n = frame.payload_len() as usize;
    debug_assert!(n as u64 <= MAX_WRITE_BYTES.max(MAX_REASON_BYTES.into()));
    payload.resize(n, 0);
    if n > 0 {
        read_full(s, payload, false).map_err(|e| match e {
            framing::Error::Truncated { got, want } => framing::Error::Truncated {
                got: got + HEADER_LEN,
                want: want + HEADER_LEN,
            },
            e => e,
        })?;
    }
    Ok(frame)
}

/// Writes a frame header and its payload in one gather write.
///
/// # Errors
/// [`Error::Send`].
pub(crate) fn write_frame(s: &mut impl Write, frame: Frame, payload: &[u8]) -> Result<()> {
    debug_assert_eq!(frame.payload_len() as usize, payload.len());
    let h = frame.to_bytes();
    let mut bufs = [IoSlice::new(&h), IoSlice::new(payload)];
    write_all_vectored(s, &mut bufs).map_err(Error::Send)
}

/// Writes every slice in full (the stable stand-in for `Write::write_all_vectored`).
pub(crate) fn write_all_vectored(
    s: &mut impl Write,
    mut bufs: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match s.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends a Reject frame with `reason` (cut to [`MAX_REASON_BYTES`] at a char boundary).
pub(crate) fn send_reject(s: &mut impl Write, reason: &str) -> Result<()> {
    let mut end = reason.len().min(MAX_REASON_BYTES as usize);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let r = &reason.as_bytes()[..end];
    write_frame(
        s,
        Frame::Reject {
            len: r.len() as u32,
        },
        r,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use colo_transport::framing::Error as FrameError;

    #[test]
    fn frames_round_trip_through_a_stream() {
        let mut out = Vec::new();
        write_frame(
            &mut out,
            Frame::Write {
                seq: 1,
                offset: 512,
                len: 1024,
            },
            &[7; 1024],
        )
        .unwrap();
        write_frame(&mut out, Frame::Flush { seq: 2 }, &[]).unwrap();
        send_reject(&mut out, &"é".repeat(200)).unwrap();
        let mut r = &out[..];
        let mut p = Vec::new();
        assert_eq!(
            read_frame(&mut r, &mut p).unwrap(),
            Frame::Write {
                seq: 1,
                offset: 512,
                len: 1024
            }
        );
        assert_eq!(p, vec![7; 1024]);
        assert_eq!(read_frame(&mut r, &mut p).unwrap(), Frame::Flush { seq: 2 });
        let Frame::Reject { len } = read_frame(&mut r, &mut p).unwrap() else {
            panic!("expected a reject")
        };
        assert!(len <= MAX_REASON_BYTES);
        assert!(std::str::from_utf8(&p).is_ok());
        assert!(matches!(
            read_frame(&mut r, &mut p),
            Err(Error::Frame(FrameError::PeerClosed))
        ));
    }

    #[test]
    fn truncation_is_typed() {
        let mut out = Vec::new();
        write_frame(
            &mut out,
            Frame::Write {
                seq: 1,
                offset: 0,
                len: 512,
            },
            &[1; 512],
        )
        .unwrap();
        let mut r = &out[..100];
        assert!(matches!(
            read_frame(&mut r, &mut Vec::new()),
            Err(Error::Frame(FrameError::Truncated {
                got: 100,
                want: 544
            }))
        ));
        let mut r = &out[..10];
        assert!(matches!(
            read_frame(&mut r, &mut Vec::new()),
            Err(Error::Frame(FrameError::Truncated { got: 10, want: 32 }))
        ));
    }
}
