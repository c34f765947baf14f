//! Reading whole frames from a byte stream.

use std::io::{self, Read};

use super::error::{Error, Result};

/// Reads exactly `buf.len()` bytes, telling a clean end of stream (allowed only before the
/// first byte of a frame, when `frame_start` is set) from a truncated frame.
///
/// # Errors
/// As [`read_result`], with `got` and `want` counted within `buf`.
pub fn read_full(s: &mut impl Read, buf: &mut [u8], frame_start: bool) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let r = s.read(&mut buf[got..]);
        got += read_result(r, got, buf.len(), frame_start)?;
    }
    Ok(())
}

/// Classifies one `read` of a frame that has `got` of its `want` bytes: the bytes read
/// (0 after an interrupted read, to be retried), or the error that ends the frame.
///
/// # Errors
/// [`Error::PeerClosed`] for a clean end before the first byte of a frame
/// (`frame_start`), [`Error::Truncated`] mid-frame, [`Error::Timeout`] if a read timeout
/// fires before the frame starts, [`Error::Recv`] otherwise.
pub fn read_result(
    r: io::Result<usize>,
    got: usize,
    want: usize,
    frame_start: bool,
) -> Result<usize> {
    let at_start = got == 0 && frame_start;
    match r {
        Ok(0) if at_start => Err(Error::PeerClosed),
        Ok(0) => Err(Error::Truncated { got, want }),
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e)
            if at_start
                && matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
        {
            Err(Error::Timeout)
        }
        Err(e) => Err(Error::Recv(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays back a script of read results, then end of stream.
    struct Script(Vec<io::Result<Vec<u8>>>);

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Ok(0);
            }
            let bytes = self.0.remove(0)?;
            buf[..bytes.len()].copy_from_slice(&bytes);
            Ok(bytes.len())
        }
    }

    fn err(kind: io::ErrorKind) -> io::Result<Vec<u8>> {
        Err(kind.into())
    }

    #[test]
    fn whole_frames_across_short_and_interrupted_reads() {
        let mut s = Script(vec![
            Ok(vec![1]),
            err(io::ErrorKind::Interrupted),
            Ok(vec![2, 3]),
        ]);
        let mut b = [0u8; 3];
        read_full(&mut s, &mut b, true).unwrap();
        assert_eq!(b, [1, 2, 3]);
    }

    #[test]
    fn clean_end_only_before_a_frame() {
        let mut b = [0u8; 4];
        assert!(matches!(
            read_full(&mut Script(vec![]), &mut b, true),
            Err(Error::PeerClosed)
        ));
        // Inside a frame (its payload), even the first byte missing is truncation.
        assert!(matches!(
            read_full(&mut Script(vec![]), &mut b, false),
            Err(Error::Truncated { got: 0, want: 4 })
        ));
        assert!(matches!(
            read_full(&mut Script(vec![Ok(vec![1, 2])]), &mut b, true),
            Err(Error::Truncated { got: 2, want: 4 })
        ));
    }

    #[test]
    fn a_timeout_counts_only_before_a_frame() {
        let mut b = [0u8; 4];
        for kind in [io::ErrorKind::WouldBlock, io::ErrorKind::TimedOut] {
            assert!(matches!(
                read_full(&mut Script(vec![err(kind)]), &mut b, true),
                Err(Error::Timeout)
            ));
            // Mid-frame a timeout is a failed receive, not a quiet peer.
            let r = read_full(&mut Script(vec![Ok(vec![1]), err(kind)]), &mut b, true);
            assert!(
                matches!(r, Err(Error::Recv(ref e)) if e.kind() == kind),
                "{r:?}"
            );
        }
        let r = read_full(
            &mut Script(vec![err(io::ErrorKind::ConnectionReset)]),
            &mut b,
            true,
        );
        assert!(matches!(r, Err(Error::Recv(_))), "{r:?}");
    }
}
