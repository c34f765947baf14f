//! Sending pages by reference: `vmsplice` puts the source pages into a pipe, `splice` moves
//! them from the pipe into the socket, so the kernel never copies them on the sending side.
//!
//! A `writev` copies every byte from the source into socket buffers, and on loopback the
//! receiver's `readv` copies it again: two copies per byte, which is raw TCP's own cost.
//! Spliced pages go out as references to the source pages themselves, so only the
//! receiver's copy is left (on loopback it reads straight from the sender's pages).
//!
//! What that changes: a page is read by the kernel until the receiver has taken it in, not
//! only during the call. A page changed in between goes out with its new bytes. The push
//! model already allows that (a page written during an epoch is dirty again and is sent
//! again; the pages of an epoch stay unchanged until its commit is acknowledged, which
//! happens only after the receiver has read every byte). The pipe and the socket hold
//! references to the pages, so they stay valid even if the source were unmapped.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::io::advance;

/// The pipe size asked for (the default limit of `/proc/sys/fs/pipe-max-size`); fewer
/// bytes are fine.
const PIPE_BYTES: libc::c_int = 1 << 20;

/// Most iovecs one `vmsplice` takes.
const IOV_MAX: usize = 1024;

/// A pipe through which one stream's pages pass into its socket.
#[derive(Debug)]
pub(crate) struct PagePipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe holds when full.
    capacity: usize,
}

impl PagePipe {
    /// A new pipe, as large as the system allows up to 1 MiB.
    ///
    /// # Errors
    /// The OS error if no pipe can be made.
    pub(crate) fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: fds is a writable array of two ints, as pipe2 requires.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ and F_GETPIPE_SZ on an open pipe only change or read its
        // size. A refused size (a user over the pipe quota) keeps the default one.
        let capacity = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            read,
            write,
            capacity: capacity as usize,
        })
    }

    /// Sends every byte the iovecs describe on `sock`, in order, by reference.
    ///
    /// # Errors
    /// The OS error of `vmsplice` or `splice` (a peer that closed the stream: `EPIPE`).
    /// The pipe may then hold pages still; the stream is broken and is dropped with it.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads of its length, and that memory may
    /// be read until the peer has received it (see the module docs).
    pub(crate) unsafe fn send(&self, sock: &TcpStream, iovs: &mut [libc::iovec]) -> io::Result<()> {
        let total: usize = iovs.iter().map(|v| v.iov_len).sum();
        let mut sent = 0;
        let mut first = 0;
        advance(iovs, &mut first, 0);
        while first < iovs.len() {
            // Fill the pipe with as many whole iovecs as fit, then at least part of one.
            let mut want = 0;
            let mut last = first;
            while last < iovs.len() && last - first < IOV_MAX {
                let len = iovs[last].iov_len;
                if want + len > self.capacity && last > first {
                    break;
                }
                want += len;
                last += 1;
            }
            // SAFETY: iovs[first..last] are initialized iovecs the caller vouched for; the
            // pipe references their pages (no SPLICE_F_GIFT), it does not write them.
            let n = unsafe {
                libc::vmsplice(
                    self.write.as_raw_fd(),
                    iovs[first..].as_ptr(),
                    last - first,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let n = n as usize;
            advance(iovs, &mut first, n);
            sent += n;
            self.drain(sock, n, sent < total)?;
        }
        Ok(())
    }

    /// Moves `n` bytes from the pipe into the socket; `more` says that more of the same
    /// batch follows (so the stack need not push a short segment).
    fn drain(&self, sock: &TcpStream, mut n: usize, more: bool) -> io::Result<()> {
        let flags = libc::SPLICE_F_MOVE | if more { libc::SPLICE_F_MORE } else { 0 };
        while n > 0 {
            // SAFETY: both descriptors are open for the call; null offsets are required
            // for a pipe and a socket.
            let r = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    n,
                    flags,
                )
            };
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
            n -= r as usize;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn spliced_iovecs_arrive_whole_and_in_order() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        // Page-aligned and odd pieces, more than one pipe's worth.
        let src: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let expected = src.clone();
        let t = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            let pipe = PagePipe::new().unwrap();
            let mut iovs: Vec<libc::iovec> =
                [(0, 4096), (10_000, 1), (10_001, 0), (10_001, 2_989_999)]
                    .iter()
                    .map(|&(at, len)| libc::iovec {
                        iov_base: src[at..].as_ptr().cast_mut().cast(),
                        iov_len: len,
                    })
                    .collect();
            // SAFETY: the iovecs point into `src`, which outlives the receiver's read below
            // (the thread returns it only after the peer closed).
            unsafe { pipe.send(&s, &mut iovs) }.unwrap();
            drop(s);
            src
        });
        let (mut r, _) = l.accept().unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        let mut want = expected[..4096].to_vec();
        want.extend_from_slice(&expected[10_000..]);
        assert_eq!(got.len(), want.len());
        assert!(got == want);
        drop(t.join().unwrap());
    }
}
