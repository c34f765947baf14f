//! Plain socket helpers: accepting with a deadline, and the raw-TCP baseline's `write` and
//! `read` calls of at most 1 MiB straight from and into a region, through raw pointers.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use colo_memory::Region;

/// Bytes per `write`/`read` call of the raw baseline.
pub const CHUNK: u64 = 1 << 20;

/// Accepts one connection on `l` within `timeout`. `check` runs between polls and may
/// give up early (the peer process died).
///
/// # Errors
/// `TimedOut` when the deadline passes, the OS error, or `check`'s error.
pub fn accept_within(
    l: &TcpListener,
    timeout: Duration,
    mut check: impl FnMut() -> io::Result<()>,
) -> io::Result<TcpStream> {
    let deadline = Instant::now() + timeout;
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                check()?;
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no connection within {timeout:?}"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `len` bytes of `region` from offset 0, in calls of at most [`CHUNK`] bytes.
///
/// # Errors
/// The OS error, or `WriteZero` if the socket takes nothing.
pub fn send_region(s: &TcpStream, region: &Region, len: u64) -> io::Result<()> {
    let mut off = 0;
    while off < len {
        let n = CHUNK.min(len - off);
        let p = region.ptr_at(off, n).map_err(io::Error::other)?;
        // SAFETY: ptr_at checked that p..p+n lies inside the region, which outlives the
        // call; the kernel only reads it.
        let r = unsafe { libc::write(s.as_raw_fd(), p.cast(), n as usize) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        off += r as u64;
    }
    Ok(())
}

/// Reads `len` bytes sequentially into `region` from offset 0, in calls of at most
/// [`CHUNK`] bytes.
///
/// # Errors
/// The OS error, or `UnexpectedEof` if the stream ends early.
pub fn recv_region(s: &TcpStream, region: &Region, len: u64) -> io::Result<()> {
    let mut off = 0;
    while off < len {
        let n = CHUNK.min(len - off);
        let p = region.ptr_at(off, n).map_err(io::Error::other)?;
        // SAFETY: ptr_at checked that p..p+n lies inside the region, which outlives the
        // call; nothing else touches the receiver's region during the raw baseline.
        let r = unsafe { libc::read(s.as_raw_fd(), p.cast(), n as usize) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the stream ended after {off} of {len} bytes"),
            ));
        }
        off += r as u64;
    }
    Ok(())
}
