//! Sector geometry and the checks every access goes through.

use crate::error::{Error, Result};

/// The sector size: every offset and length is a multiple of it.
pub const SECTOR_SIZE: u64 = 512;

/// Checks that `offset..offset + len` is a non-empty, sector-aligned span inside a disk
/// of `disk_len` bytes. Overflow-safe for any input.
///
/// # Errors
/// [`Error::Misaligned`] for an empty or unaligned span, [`Error::OutOfRange`] for one that
/// reaches past the end.
pub fn check_span(offset: u64, len: u64, disk_len: u64) -> Result<()> {
    if len == 0 || offset % SECTOR_SIZE != 0 || len % SECTOR_SIZE != 0 {
        return Err(Error::Misaligned { offset, len });
    }
    match offset.checked_add(len) {
        Some(end) if end <= disk_len => Ok(()),
        _ => Err(Error::OutOfRange {
            offset,
            len,
            disk_len,
        }),
    }
}

/// Checks a disk size: non-zero and a whole number of sectors.
///
/// # Errors
/// [`Error::DiskSize`] otherwise.
pub fn check_disk_len(len: u64) -> Result<()> {
    if len == 0 || len % SECTOR_SIZE != 0 {
        return Err(Error::DiskSize(len));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert!(check_span(0, 512, 1024).is_ok());
        assert!(check_span(512, 512, 1024).is_ok());
        assert!(matches!(
            check_span(512, 1024, 1024),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            check_span(1, 512, 1024),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(
            check_span(0, 100, 1024),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(
            check_span(0, 0, 1024),
            Err(Error::Misaligned { .. })
        ));
        assert!(matches!(
            check_span(u64::MAX - 511, 1024, u64::MAX - 511),
            Err(Error::OutOfRange { .. })
        ));
        assert!(check_disk_len(0).is_err());
        assert!(check_disk_len(513).is_err());
        assert!(check_disk_len(4096).is_ok());
    }
}
