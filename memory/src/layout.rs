//! Guest memory layouts: several regions, each at its guest-physical base, numbered as one
//! flat run of pages (the regions back to back, in order). The flat page numbering is what
//! the dirty bitmap, the RAM cache and the push path share.

use crate::{Error, Result};

/// One guest memory region as KVM sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    /// KVM memory slot number.
    pub slot: u32,
    /// Guest-physical base.
    pub gpa: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

/// The regions of one guest, with their place in the flat page numbering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLayout {
    page_size: u64,
    regions: Vec<GuestRegion>,
    /// First flat page of each region.
    starts: Vec<u64>,
    pages: u64,
}

impl GuestLayout {
    /// A layout of `regions` with pages of `page_size` bytes.
    ///
    /// # Errors
    /// [`Error::Layout`] if the page size is not a power of two, or a region is empty,
    /// unaligned, or overlaps another.
    pub fn new(page_size: u64, regions: Vec<GuestRegion>) -> Result<Self> {
        if !page_size.is_power_of_two() {
            return Err(Error::Layout(format!(
                "page size {page_size} is not a power of two"
            )));
        }
        let mut starts = Vec::with_capacity(regions.len());
        let mut pages = 0;
        for r in &regions {
            if r.len == 0 || r.gpa % page_size != 0 || r.len % page_size != 0 {
                return Err(Error::Layout(format!(
                    "region at {:#x} of {:#x} bytes is empty or unaligned",
                    r.gpa, r.len
                )));
            }
            if r.gpa.checked_add(r.len).is_none() {
                return Err(Error::Layout(format!("region at {:#x} wraps", r.gpa)));
            }
            if let Some(o) = regions
                .iter()
                .find(|o| !std::ptr::eq(*o, r) && o.gpa < r.gpa + r.len && r.gpa < o.gpa + o.len)
            {
                return Err(Error::Layout(format!(
                    "regions at {:#x} and {:#x} overlap",
                    r.gpa, o.gpa
                )));
            }
            starts.push(pages);
            pages += r.len / page_size;
        }
        Ok(Self {
            page_size,
            regions,
            starts,
            pages,
        })
    }

    /// A layout of `ranges` (`(guest-physical base, length)`, in flat order), region `i` as
    /// slot `i`.
    ///
    /// # Errors
    /// [`Error::Layout`] as [`GuestLayout::new`].
    pub fn from_ranges(page_size: u64, ranges: &[(u64, u64)]) -> Result<Self> {
        let regions = ranges
            .iter()
            .enumerate()
            .map(|(i, &(gpa, len))| GuestRegion {
                slot: i as u32,
                gpa,
                len,
            })
            .collect();
        Self::new(page_size, regions)
    }

    /// The layout of `mem`: its regions in guest-physical order, slot `i` for region `i`
    /// (the slots a VMM registers them as).
    ///
    /// # Errors
    /// [`Error::Layout`] as [`GuestLayout::new`].
    pub fn of_guest(mem: &crate::GuestMemory, page_size: u64) -> Result<Self> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let regions = mem
            .iter()
            .enumerate()
            .map(|(i, r)| GuestRegion {
                slot: i as u32,
                gpa: r.start_addr().0,
                len: r.len(),
            })
            .collect();
        Self::new(page_size, regions)
    }

    /// Page size in bytes.
    pub fn page_size(&self) -> u64 {
        self.page_size
    }

    /// Total pages of all regions.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Total bytes of all regions.
    pub fn bytes(&self) -> u64 {
        self.pages * self.page_size
    }

    /// The regions, in flat order.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// The first flat page of region `i`.
    pub fn flat_start(&self, i: usize) -> u64 {
        self.starts[i]
    }

    /// The flat byte offset of guest-physical address `gpa`, if guest memory holds it.
    pub fn flat_offset(&self, gpa: u64) -> Option<u64> {
        self.regions
            .iter()
            .zip(&self.starts)
            .find(|(r, _)| gpa >= r.gpa && gpa - r.gpa < r.len)
            .map(|(r, &s)| s * self.page_size + (gpa - r.gpa))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_numbering_follows_region_order() {
        let l = GuestLayout::new(
            4096,
            vec![
                GuestRegion {
                    slot: 0,
                    gpa: 0,
                    len: 0x10000,
                },
                GuestRegion {
                    slot: 1,
                    gpa: 1 << 32,
                    len: 0x3000,
                },
            ],
        )
        .unwrap();
        assert_eq!((l.pages(), l.flat_start(1)), (19, 16));
        assert_eq!(l.flat_offset(0x1234), Some(0x1234));
        assert_eq!(l.flat_offset((1 << 32) + 0x2001), Some(16 * 4096 + 0x2001));
        assert_eq!(l.flat_offset(0x10000), None);
    }

    #[test]
    fn bad_layouts_are_refused() {
        assert!(GuestLayout::new(3000, vec![]).is_err());
        assert!(
            GuestLayout::new(
                4096,
                vec![GuestRegion {
                    slot: 0,
                    gpa: 0,
                    len: 0
                }]
            )
            .is_err()
        );
        assert!(
            GuestLayout::new(
                4096,
                vec![GuestRegion {
                    slot: 0,
                    gpa: 1,
                    len: 4096
                }]
            )
            .is_err()
        );
        let overlap = vec![
            GuestRegion {
                slot: 0,
                gpa: 0,
                len: 8192,
            },
            GuestRegion {
                slot: 1,
                gpa: 4096,
                len: 4096,
            },
        ];
        assert!(GuestLayout::new(4096, overlap).is_err());
    }
}
