//! Reading whole frames from a byte stream.

use std::io::{self, Read};
use std::time::Duration;

use crate::error::{Error, Result};

/// Reads exactly `buf.len()` bytes, telling a clean end of stream (allowed only before the
/// first byte of a frame, when `frame_start` is set) from a truncated frame.
///
/// # Errors
/// [`Error::PeerClosed`] on a clean end, [`Error::Truncated`] mid-frame,
/// [`Error::Timeout`] if a read timeout fires before the frame starts, [`Error::Recv`]
/// otherwise.
pub(crate) fn read_full(s: &mut impl Read, buf: &mut [u8], frame_start: bool) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 && frame_start => return Err(Error::PeerClosed),
            Ok(0) => {
                return Err(Error::Truncated {
                    got,
                    want: buf.len(),
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if got == 0
                    && frame_start
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                return Err(Error::Timeout(Duration::ZERO, "a frame"));
            }
            Err(e) => return Err(Error::Recv(e)),
        }
    }
    Ok(())
}
