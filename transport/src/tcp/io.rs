//! Vectored socket I/O on raw iovecs, so that bytes move between the socket and a
//! [`Region`](colo_memory::Region) with no intermediate copy and no Rust references into
//! memory that others may be writing.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// The kernel's IOV_MAX on Linux.
const IOV_MAX: usize = 1024;

/// A byte stream that can scatter-read into and gather-write from raw iovecs.
pub trait ScatterIo: Read + Write {
    /// Reads until every iovec is full.
    ///
    /// # Errors
    /// `UnexpectedEof` if the stream ends first, or the OS error.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for writes of its length.
    unsafe fn read_all_iov(&mut self, iovs: &mut [libc::iovec]) -> io::Result<()>;

    /// Writes every iovec in full.
    ///
    /// # Errors
    /// The OS error.
    ///
    /// # Safety
    /// Every iovec must describe memory valid for reads of its length.
    unsafe fn write_all_iov(&mut self, iovs: &mut [libc::iovec]) -> io::Result<()>;
}

/// Drops `n` transferred bytes from the front of `iovs[*first..]`.
fn advance(iovs: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iovs.len() {
        let v = &mut iovs[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            v.iov_len = 0;
            *first += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the described buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    while *first < iovs.len() && iovs[*first].iov_len == 0 {
        *first += 1;
    }
}

fn fd_transfer(fd: i32, iovs: &mut [libc::iovec], write: bool) -> io::Result<()> {
    let mut first = 0;
    advance(iovs, &mut first, 0);
    while first < iovs.len() {
        let cnt = (iovs.len() - first).min(IOV_MAX) as libc::c_int;
        let ptr = iovs[first..].as_ptr();
        // SAFETY: ptr points at `cnt` initialized iovecs; the caller of the ScatterIo
        // method promised each describes valid memory for this direction.
        let n = unsafe {
            if write {
                libc::writev(fd, ptr, cnt)
            } else {
                libc::readv(fd, ptr, cnt)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                if write {
                    io::ErrorKind::WriteZero
                } else {
                    io::ErrorKind::UnexpectedEof
                },
                "connection ended inside a frame",
            ));
        }
        advance(iovs, &mut first, n as usize);
    }
    Ok(())
}

macro_rules! fd_scatter_io {
    ($t:ty) => {
        impl ScatterIo for $t {
            unsafe fn read_all_iov(&mut self, iovs: &mut [libc::iovec]) -> io::Result<()> {
                fd_transfer(self.as_raw_fd(), iovs, false)
            }
            unsafe fn write_all_iov(&mut self, iovs: &mut [libc::iovec]) -> io::Result<()> {
                fd_transfer(self.as_raw_fd(), iovs, true)
            }
        }
    };
}

fd_scatter_io!(TcpStream);
fd_scatter_io!(UnixStream);

/// A push stream encrypted with the pair's session keys (`--encrypt`). Bytes go through a
/// buffer of this side's own: the record layer works on slices, and no Rust reference is
/// ever made into the guest memory or cache the iovecs describe (others write them
/// meanwhile). A record is opened (its tag checked) before any of its bytes is copied out.
impl<S: Read + Write> ScatterIo for colo_auth::seal::Sealed<S> {
    unsafe fn read_all_iov(&mut self, iovs: &mut [libc::iovec]) -> io::Result<()> {
        for v in iovs.iter() {
            let mut done = 0;
            while done < v.iov_len {
                // Opened (authenticated) plaintext of the current record.
                let plain = io::BufRead::fill_buf(self)?;
                if plain.is_empty() {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let n = plain.len().min(v.iov_len - done);
                // SAFETY: the caller promised `v` is valid for writes of its length, and
                // `done + n` stays within it; `plain` is the record layer's own buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        plain.as_ptr(),
                        v.iov_base.cast::<u8>().add(done),
                        n,
                    );
                }
                io::BufRead::consume(self, n);
                done += n;
            }
        }
        Ok(())
    }

    unsafe fn write_all_iov(&mut self, iovs: &mut [libc::iovec]) -> io::Result<()> {
        let total: usize = iovs.iter().map(|v| v.iov_len).sum();
        let (mut at, mut off) = (0, 0);
        self.write_filled(total, |dst| {
            let mut done = 0;
            while done < dst.len() {
                let v = &iovs[at];
                let n = (v.iov_len - off).min(dst.len() - done);
                // SAFETY: the caller promised `v` is valid for reads of its length and
                // `off + n` stays within it; `dst` is the record layer's own buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        v.iov_base.cast::<u8>().add(off),
                        dst[done..].as_mut_ptr(),
                        n,
                    );
                }
                done += n;
                off += n;
                if off == v.iov_len {
                    (at, off) = (at + 1, 0);
                }
            }
        })
    }
}

/// An in-memory stream for fuzzing and tests: reads come from a byte slice, writes are
/// kept.
#[derive(Debug, Default)]
pub struct MemStream<'a> {
    input: &'a [u8],
    /// Everything written to the stream.
    pub output: Vec<u8>,
}

impl<'a> MemStream<'a> {
    /// A stream that yields `input`, then end of stream.
    pub fn new(input: &'a [u8]) -> Self {
        Self {
            input,
            output: Vec::new(),
        }
    }
}

impl Read for MemStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for MemStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ScatterIo for MemStream<'_> {
    unsafe fn read_all_iov(&mut self, iovs: &mut [libc::iovec]) -> io::Result<()> {
        for v in iovs.iter() {
            if self.input.len() < v.iov_len {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let (head, rest) = self.input.split_at(v.iov_len);
            // SAFETY: the caller promised iov_base is valid for iov_len bytes of writes;
            // head is exactly that long and lives in a distinct allocation.
            unsafe {
                std::ptr::copy_nonoverlapping(head.as_ptr(), v.iov_base.cast::<u8>(), v.iov_len)
            };
            self.input = rest;
        }
        Ok(())
    }
    unsafe fn write_all_iov(&mut self, iovs: &mut [libc::iovec]) -> io::Result<()> {
        for v in iovs.iter() {
            // SAFETY: the caller promised iov_base is valid for iov_len bytes of reads.
            let s = unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) };
            self.output.extend_from_slice(s);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(b: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        }
    }

    #[test]
    fn scatter_gather_over_a_socket_handles_partial_transfers() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut src: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let t = std::thread::spawn(move || {
            let (x, y) = src.split_at_mut(100_001);
            let mut v = [iov(x), iov(&mut []), iov(y)];
            // SAFETY: the iovecs point into `src`, alive and unaliased for the call.
            unsafe { a.write_all_iov(&mut v) }.unwrap();
            src
        });
        let mut dst = vec![0u8; 300_000];
        let (x, y) = dst.split_at_mut(7);
        let mut v = [iov(x), iov(y)];
        // SAFETY: the iovecs point into `dst`, alive and unaliased for the call.
        unsafe { b.read_all_iov(&mut v) }.unwrap();
        assert_eq!(t.join().unwrap(), dst);
    }

    #[test]
    fn early_end_is_unexpected_eof() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        let mut d = [0u8; 8];
        let mut v = [iov(&mut d)];
        // SAFETY: the iovec points into `d`.
        let e = unsafe { b.read_all_iov(&mut v) }.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
