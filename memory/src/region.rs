//! Memory regions that the push path reads from (the sender's guest memory) and writes
//! into (the receiver's RAM cache), and that the RAM cache commits into (the SVM's memory).
//!
//! A region is treated like device memory: it is read and written through raw pointers,
//! never through Rust references, because the guest (or the RAM cache's commit) may touch
//! the same bytes concurrently. Such a race yields torn page contents, which the epoch
//! protocol repairs (a page written during an epoch is dirty again and is re-sent); it
//! never yields an access outside the region, because every access is bounds-checked first.
//!
//! ## Lifetime by ownership
//! Every [`Region`] holds an owner of its mapping (an `Arc` of a [`Mapping`]), so the memory
//! stays mapped for as long as any region over it, any clone of an `Arc<Region>`, or any
//! thread holding one is alive. Nothing depends on the order in which a VM, a push sender or
//! a RAM cache is dropped: the mapping goes when its last owner goes.
//!
//! ```
//! use std::sync::Arc;
//! use colo_memory::{GuestMemory, Region};
//! use vm_memory::GuestAddress;
//!
//! let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! let ram = Region::of_guest(&mem)?;
//! drop(mem); // the VM goes first: the region keeps its memory mapped
//! ram.write_at(4096, b"still mapped")?;
//! assert_eq!(ram.owners(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ptr::NonNull;
use std::sync::Arc;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, MmapRegion};

use crate::GuestMemory;
use crate::error::{Error, Result};

/// Memory that stays mapped, at one address and size, for as long as the value lives.
///
/// # Safety
/// An implementation guarantees that `base()..base() + size()` is one mapping, valid for
/// reads and writes through raw pointers, that neither the address nor the size ever
/// changes, and that the mapping is not unmapped or remapped before the value is dropped.
pub unsafe trait Mapping: Send + Sync + 'static {
    /// The first byte of the mapping.
    fn base(&self) -> *mut u8;
    /// The mapping's size in bytes.
    fn size(&self) -> usize;
}

// SAFETY: an MmapRegion maps `size()` bytes at `as_ptr()` when it is built, never moves or
// resizes the mapping, and unmaps it only in its Drop (for a mapping it owns; a borrowed one
// is the responsibility of whoever built it with `build_raw`, which is unsafe and not used
// here).
unsafe impl<B: Bitmap + Send + Sync + 'static> Mapping for MmapRegion<B> {
    fn base(&self) -> *mut u8 {
        self.as_ptr()
    }
    fn size(&self) -> usize {
        MmapRegion::size(self)
    }
}

/// A contiguous, fixed-size span of memory that may be read or written concurrently, kept
/// mapped by the owner it holds.
#[derive(Clone)]
pub struct Region {
    owner: Arc<dyn Mapping>,
    ptr: NonNull<u8>,
    len: usize,
    huge_pages: bool,
}

// SAFETY: a Region is a pointer and a length into a mapping that its `owner` keeps alive
// for as long as the Region lives (the `Mapping` contract). All access goes through
// raw-pointer copies, so sharing it between threads creates no Rust references that could
// alias.
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
        let map = MmapRegion::<()>::new(len).map_err(|e| Error::Map {
            len,
            source: std::io::Error::other(e),
        })?;
        let base = map.as_ptr();
        // SAFETY: base..base+len is the mapping just created, owned by `map`; the advice
        // changes no contents.
        let huge_pages = unsafe { libc::madvise(base.cast(), len, libc::MADV_HUGEPAGE) } == 0;
        // SAFETY: as above; populating does not change contents.
        let populated = unsafe { libc::madvise(base.cast(), len, libc::MADV_POPULATE_WRITE) } == 0;
        if !populated {
            // Older kernels: touch one byte per small page.
            for off in (0..len).step_by(4096) {
                // SAFETY: off < len, inside the mapping `map` owns.
                unsafe { base.add(off).write_volatile(0) };
            }
        }
        tracing::debug!(len, huge_pages, populated, "mapped region");
        let mut r = Self::of(Arc::new(map));
        r.huge_pages = huge_pages;
        Ok(r)
    }

    /// The whole of `owner`'s mapping as a region. The region keeps `owner` alive.
    pub fn of<M: Mapping>(owner: Arc<M>) -> Self {
        let ptr = NonNull::new(owner.base()).unwrap_or(NonNull::dangling());
        let len = if owner.base().is_null() {
            0
        } else {
            owner.size()
        };
        Self {
            owner,
            ptr,
            len,
            huge_pages: false,
        }
    }

    /// Guest memory of one region as a region (the push source, or the target of a RAM
    /// cache commit). The region shares the guest memory's mapping and keeps it mapped.
    ///
    /// # Errors
    /// [`Error::Layout`] if `mem` has more than one region: the flat page numbering of a
    /// multi-region guest needs one region per guest region
    /// ([`Region::of_guest_regions`]).
    pub fn of_guest(mem: &GuestMemory) -> Result<Self> {
        let mut all = Self::of_guest_regions(mem);
        if all.len() != 1 {
            return Err(Error::Layout(format!(
                "guest memory of {} regions is not one region",
                all.len()
            )));
        }
        Ok(all.remove(0))
    }

    /// Every region of guest memory as a region, in guest-physical order (the flat order of
    /// a [`GuestLayout`](crate::GuestLayout) built from the same memory).
    pub fn of_guest_regions(mem: &GuestMemory) -> Vec<Self> {
        mem.iter().map(|r| Self::of(r.get_mmap())).collect()
    }

    /// The span `offset..offset+len` of this region as a region of its own, sharing (and
    /// keeping alive) the same mapping.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the span is not inside this region.
    pub fn sub(&self, offset: u64, len: u64) -> Result<Self> {
        let ptr = self.ptr_at(offset, len)?;
        Ok(Self {
            owner: Arc::clone(&self.owner),
            ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
            len: len as usize,
            huge_pages: self.huge_pages,
        })
    }

    /// How many owners the mapping has: every region over it (clones and sub-regions
    /// included) and whoever else holds its `Arc` (a VM's guest memory). The mapping is
    /// unmapped only when this reaches zero.
    pub fn owners(&self) -> usize {
        Arc::strong_count(&self.owner)
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

    /// The base address, for registering the region with a device. The pointer is valid
    /// while this region (or another owner of its mapping) lives.
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
    /// The pointer is valid while this region lives.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the span is not inside the region.
    pub fn ptr_at(&self, offset: u64, len: u64) -> Result<*mut u8> {
        self.check(offset, len)?;
        // SAFETY: offset <= len of the region, checked above, so the result stays inside
        // (or one past the end of) the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(offset as usize) })
    }

    /// Copies `buf.len()` bytes out of the region at `offset`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the span is not inside the region.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let src = self.ptr_at(offset, buf.len() as u64)?;
        // SAFETY: src..src+buf.len() is inside the region (checked), mapped while `self`
        // holds its owner; buf is a distinct Rust allocation, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    ///
    /// # Errors
    /// [`Error::OutOfBounds`] if the span is not inside the region.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let dst = self.ptr_at(offset, data.len() as u64)?;
        // SAFETY: dst..dst+data.len() is inside the region (checked) and mapped while
        // `self` holds its owner; data is a distinct Rust allocation.
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
        // SAFETY: both spans are inside their regions (checked), each mapped while its
        // region holds its owner. `copy` tolerates overlap in case both share a mapping.
        unsafe { std::ptr::copy(s, d, len as usize) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

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

    #[test]
    fn a_sub_region_is_bounded_and_keeps_the_mapping() {
        let whole = Region::anonymous(4 * 4096).unwrap();
        let inner = whole.sub(4096, 2 * 4096).unwrap();
        assert_eq!(whole.owners(), 2);
        inner.write_at(0, b"x").unwrap();
        assert!(
            inner.write_at(2 * 4096, b"y").is_err(),
            "past the sub-region"
        );
        assert!(whole.sub(3 * 4096, 2 * 4096).is_err());
        drop(whole);
        assert_eq!(inner.owners(), 1);
        let mut b = [0u8; 1];
        inner.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"x");
    }

    /// The hazard this type exists for: guest memory dropped (the VM gone) while a region
    /// over it is still in use (a push in flight, a RAM cache commit). The region must keep
    /// the mapping; a region that only borrowed the pointer would read unmapped memory here.
    #[test]
    fn guest_memory_stays_mapped_while_a_region_over_it_lives() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 * 4096)]).unwrap();
        let ram = Region::of_guest(&mem).unwrap();
        assert_eq!(ram.owners(), 2, "the guest memory and the region");
        ram.write_at(5 * 4096, b"pushed later").unwrap();
        drop(mem);
        assert_eq!(ram.owners(), 1, "the region alone keeps the mapping");
        let mut b = [0u8; 12];
        ram.read_at(5 * 4096, &mut b).unwrap();
        assert_eq!(&b, b"pushed later");
    }

    #[test]
    fn a_multi_region_guest_is_not_one_region() {
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 4096), (GuestAddress(1 << 32), 8192)])
                .unwrap();
        assert!(matches!(Region::of_guest(&mem), Err(Error::Layout(_))));
        let all = Region::of_guest_regions(&mem);
        assert_eq!(
            all.iter().map(Region::len).collect::<Vec<_>>(),
            [4096, 8192]
        );
    }
}
