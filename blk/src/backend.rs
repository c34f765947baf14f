//! The interface a VMM's block device (virtio-blk) calls.

use crate::error::Result;

/// A block backend: a fixed-size disk read and written at 512-byte aligned offsets.
///
/// Three implementations swap behind it: [`PlainDisk`](crate::PlainDisk) (no COLO),
/// [`PrimaryDisk`](crate::PrimaryDisk) (the primary: writes forwarded to the secondary)
/// and [`SecondaryDisk`](crate::SecondaryDisk) (the secondary VM's view through the disk
/// buffer). A write that returns `Ok` is complete from the guest's point of view; a
/// [`flush`](Self::flush) that returns `Ok` makes every write completed before it durable.
pub trait BlockBackend: Send + Sync {
    /// The disk's size in bytes.
    fn len(&self) -> u64;

    /// Whether the disk has no sectors (never, for the disks of this crate).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// [`Error::Misaligned`](crate::Error::Misaligned) or
    /// [`Error::OutOfRange`](crate::Error::OutOfRange) for a bad span, or an I/O error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `data` at `offset`.
    ///
    /// # Errors
    /// [`Error::Misaligned`](crate::Error::Misaligned) or
    /// [`Error::OutOfRange`](crate::Error::OutOfRange) for a bad span, or an I/O error.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// An I/O error.
    fn flush(&self) -> Result<()>;
}
