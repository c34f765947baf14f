//! A disk image file accessed at offsets, and the plain (unreplicated) block backend.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::backend::BlockBackend;
use crate::error::{Error, Result};
use crate::sector::{check_disk_len, check_span};

/// A disk image: a file of a fixed size, a whole number of 512-byte sectors, read and
/// written at sector-aligned offsets with `pread`/`pwrite`.
#[derive(Debug)]
pub struct Disk {
    file: File,
    len: u64,
}

impl Disk {
    /// Opens an existing image for reading and writing. Its size is the disk's size.
    ///
    /// # Errors
    /// [`Error::Open`] if it cannot be opened, [`Error::DiskSize`] if its size is not a
    /// non-zero multiple of 512.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| Error::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_file(file)
    }

    /// Wraps an open file; its current size is the disk's size.
    ///
    /// # Errors
    /// [`Error::Open`] if its size cannot be read, [`Error::DiskSize`] if the size is not a
    /// non-zero multiple of 512.
    pub fn from_file(file: File) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(|source| Error::Open {
                path: "<open file>".into(),
                source,
            })?
            .len();
        check_disk_len(len)?;
        Ok(Self { file, len })
    }

    /// The disk's size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the disk is empty (never true: sizes are checked on open).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks a span against this disk.
    ///
    /// # Errors
    /// [`Error::Misaligned`] or [`Error::OutOfRange`].
    pub fn check(&self, offset: u64, len: u64) -> Result<()> {
        check_span(offset, len, self.len)
    }

    /// Reads `buf.len()` bytes at `offset`, after checking the span.
    ///
    /// # Errors
    /// A span error, or [`Error::DiskRead`].
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.read_unchecked(offset, buf)
    }

    /// Writes `data` at `offset`, after checking the span.
    ///
    /// # Errors
    /// A span error, or [`Error::DiskWrite`].
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.write_unchecked(offset, data)
    }

    /// Reads a span the caller has already checked.
    pub(crate) fn read_unchecked(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| Error::DiskRead {
                offset,
                len: buf.len() as u64,
                source,
            })
    }

    /// Writes a span the caller has already checked.
    pub(crate) fn write_unchecked(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, offset)
            .map_err(|source| Error::DiskWrite {
                offset,
                len: data.len() as u64,
                source,
            })
    }

    /// Sends `len` bytes of the disk at `offset` to `sock` with `sendfile`: from the page
    /// cache into the socket, without copying through user memory. The bytes are those in
    /// the file while the call runs (a later write may already show in them).
    ///
    /// # Errors
    /// The `sendfile` error (a send timeout shows as `WouldBlock`); `UnexpectedEof` if
    /// the file ends first.
    #[allow(unsafe_code)]
    pub(crate) fn send_to(&self, sock: &TcpStream, offset: u64, len: usize) -> io::Result<()> {
        let mut off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut left = len;
        while left > 0 {
            // SAFETY: both descriptors stay open across the call (borrowed from `sock`
            // and `self.file`); `off` is a live local the kernel reads and advances; no
            // other memory of this process is touched.
            let n =
                unsafe { libc::sendfile(sock.as_raw_fd(), self.file.as_raw_fd(), &mut off, left) };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n > 0 => left -= n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts writing back the file's dirty pages without waiting for them
    /// (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`), so that a later
    /// [`sync`](Self::sync) has less left to do. Only `sync` makes anything durable.
    ///
    /// # Errors
    /// The `sync_file_range` error.
    #[allow(unsafe_code)]
    pub(crate) fn start_writeback(&self) -> io::Result<()> {
        // SAFETY: the descriptor stays open across the call (borrowed from `self.file`);
        // the call takes plain integers and touches no memory of this process.
        let r = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    ///
    /// # Errors
    /// [`Error::DiskFlush`].
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(Error::DiskFlush)
    }
}

/// The unreplicated backend: a [`Disk`] behind the [`BlockBackend`] interface. What the
/// VMM uses when COLO is off, and the baseline of the benchmarks.
#[derive(Debug)]
pub struct PlainDisk(Disk);

impl PlainDisk {
    /// Wraps a disk.
    pub fn new(disk: Disk) -> Self {
        Self(disk)
    }

    /// The disk underneath.
    pub fn disk(&self) -> &Disk {
        &self.0
    }
}

impl BlockBackend for PlainDisk {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.0.write_at(offset, data)
    }
    fn flush(&self) -> Result<()> {
        self.0.sync()
    }
}
