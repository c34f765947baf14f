//! Memory regions that the push path reads from (the sender's guest memory) and writes
//! into (the receiver's RAM cache).
//!
//! A region is treated like device memory: the transport reads and writes it through raw
//! pointers, never through Rust references, because the guest (or the RAM cache's commit)
//! may touch the same bytes concurrently. Such a race yields torn page contents, which the
//! epoch protocol repairs (a page written during an epoch is dirty again and is re-sent);
//! it never yields an access outside the region, because every access is bounds-checked
//! first.

use std::ptr::NonNull;

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};

/// A contiguous, fixed-size span of memory that the transport may read or write.
pub struct Region {
    ptr: NonNull<u8>,
    len: usize,
    huge_pages: bool,
    _backing: Option<MmapMut>,
}

// SAFETY: a Region is a pointer and a length into memory that lives as long as the Region
// (an owned mapping, or memory the `from_raw` caller promised outlives it). All access goes
// through raw-pointer copies, so sharing it between threads creates no Rust references that
// could alias.
unsafe impl Send for Region {}
// SAFETY: as for Send: the Region hands out no references into its memory.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("huge_pages", &self.huge_pages)
            .finish()
    }
}

impl Region {
    /// Maps `len` bytes of anonymous memory, asks for transparent huge pages where the
    /// system offers them, and pre-faults every page, so that the first write of a pushed
    /// page does not pay the first-touch cost (about 10x on these machines).
    ///
    /// # Errors
    /// [`Error::Map`] if the mapping fails. A refused huge-page or populate hint is not an
    /// error: the region falls back to small pages touched one by one.
    pub fn anonymous(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::Map {
                len,
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty region"),
            });
        }
        let mut map = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|source| Error::Map { len, source })?;
        let huge_pages = map.advise(memmap2::Advice::HugePage).is_ok();
        let ptr = NonNull::new(map.as_mut_ptr()).expect("mmap never returns null");
        // SAFETY: ptr..ptr+len is the mapping we just created and own.
        let populated =
            unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) } == 0;
        if !populated {
            // Older kernels: touch one byte per small page.
            for off in (0..len).step_by(4096) {
                // SAFETY: off < len, inside our own mapping.
                unsafe { ptr.as_ptr().add(off).write_volatile(0) };
            }
        }
        tracing::debug!(len, huge_pages, populated, "mapped region");
        Ok(Self {
            ptr,
            len,
            huge_pages,
            _backing: Some(map),
        })
    }

    /// Wraps memory owned by someone else (guest memory, a RAM cache mapping).
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as the returned
    /// Region (and any clone of an `Arc` holding it) lives, and must not be unmapped or
    /// remapped in that time. Others may read and write the memory concurrently; the
    /// transport never forms Rust references into it.
    pub unsafe fn from_raw(ptr: NonNull<u8>, len: usize) -> Self {
        Self {
            ptr,
            len,
            huge_pages: false,
            _backing: None,
        }
    }

    /// The region's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty (never true for a mapped region).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether transparent huge pages were requested successfully.
    pub fn huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// The base address, for registering the region with a device.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Checks that `offset..offset+len` lies inside the region.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] otherwise, including on arithmetic overflow.
    pub fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                region_len: self.len as u64,
            }),
        }
    }

    /// A raw pointer to `offset`, after checking that `len` bytes from there are inside.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the span is not inside the region.
    pub fn ptr_at(&self, offset: u64, len: u64) -> Result<*mut u8> {
        self.check(offset, len)?;
        // SAFETY: offset <= len of the region, checked above, so the result stays inside
        // (or one past the end of) the allocation.
        Ok(unsafe { self.ptr.as_ptr().add(offset as usize) })
    }

    /// Copies `buf.len()` bytes out of the region at `offset`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the span is not inside the region.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let src = self.ptr_at(offset, buf.len() as u64)?;
        // SAFETY: src..src+buf.len() is inside the region (checked); buf is a distinct
        // Rust allocation, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the span is not inside the region.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let dst = self.ptr_at(offset, data.len() as u64)?;
        // SAFETY: dst..dst+data.len() is inside the region (checked); data is a distinct
        // Rust allocation.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_offset` into this region at `dst_offset`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if either span is outside its region.
    pub fn copy_from(
        &self,
        dst_offset: u64,
        src: &Region,
        src_offset: u64,
        len: u64,
    ) -> Result<()> {
        let s = src.ptr_at(src_offset, len)?;
        let d = self.ptr_at(dst_offset, len)?;
        // SAFETY: both spans are inside their regions (checked). `copy` tolerates overlap
        // in case both are the same region.
        unsafe { std::ptr::copy(s, d, len as usize) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_before_any_copy() {
        let r = Region::anonymous(8192).unwrap();
        r.write_at(8190, &[1, 2]).unwrap();
        assert!(matches!(
            r.write_at(8191, &[1, 2]),
            Err(Error::OutOfBounds {
                offset: 8191,
                len: 2,
                ..
            })
        ));
        assert!(matches!(
            r.check(u64::MAX, 2),
            Err(Error::OutOfBounds { .. })
        ));
        let mut b = [0u8; 2];
        r.read_at(8190, &mut b).unwrap();
        assert_eq!(b, [1, 2]);
        assert!(r.read_at(8191, &mut b).is_err());
    }

    #[test]
    fn anonymous_region_is_zeroed_and_sized() {
        let r = Region::anonymous(3 * 4096).unwrap();
        assert_eq!(r.len(), 3 * 4096);
        let mut b = vec![1u8; 3 * 4096];
        r.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert!(Region::anonymous(0).is_err());
    }

    #[test]
    fn copy_between_regions() {
        let a = Region::anonymous(4096).unwrap();
        let b = Region::anonymous(4096).unwrap();
        a.write_at(100, b"hello").unwrap();
        b.copy_from(10, &a, 100, 5).unwrap();
        let mut out = [0u8; 5];
        b.read_at(10, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(b.copy_from(4095, &a, 0, 2).is_err());
    }
}
