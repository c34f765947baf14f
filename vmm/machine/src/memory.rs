//! Guest memory: one region from guest-physical 0 (two around the 32-bit hole for a large
//! Linux guest), mapped with vm-memory with a dirty bitmap that every VMM write through it
//! marks, registered as dirty-logged KVM slots, and shared with the transport and the RAM
//! cache as a [`Region`] that keeps the mapping alive.

use std::sync::Arc;

use colo_memory::{GuestLayout, GuestMemory, Region};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::error::{Error, Result};

/// The page size of dirty tracking and of the push path.
pub const PAGE_SIZE: u64 = colo_memory::PAGE_SIZE;

/// Where the 32-bit hole starts: a guest with more RAM than this gets the rest above
/// 4 GiB ([`HIGH_RAM_START`]), and the hole holds the devices' MMIO window.
pub const HOLE_START: u64 = 3 << 30;
/// Where RAM resumes above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 4 << 30;

/// Guest RAM: one region from guest-physical 0 or, above [`HOLE_START`], two regions around
/// the 32-bit hole. Region `i` is KVM slot `i`, dirty-logged, and region `i` of the
/// [`GuestLayout`] (the dirty tracker's flat page numbering).
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemory,
    layout: GuestLayout,
    /// All of RAM in the flat page numbering: the guest memory's own mapping for one
    /// region, a view of the memory file the regions share for two.
    flat: Arc<Region>,
}

impl GuestRam {
    /// Maps `size` bytes of RAM at guest-physical 0 as one region (not pre-faulted: the
    /// guest touches what it uses). The built-in guest's layout.
    ///
    /// # Errors
    /// [`Error::Config`] for a size that is not a non-zero multiple of 2 MiB or reaches the
    /// MMIO window, [`Error::Memory`] if the mapping fails.
    pub fn new(size: u64, mmio_base: u64) -> Result<Self> {
        if size == 0 || size % (2 << 20) != 0 || size > mmio_base {
            return Err(Error::Config(format!(
                "guest RAM of {size} bytes: use a multiple of 2 MiB below {mmio_base:#x}"
            )));
        }
        Self::map(&[(0, size)])
    }

    /// Maps `size` bytes of RAM split around the 32-bit hole: up to [`HOLE_START`] from
    /// guest-physical 0, the rest from [`HIGH_RAM_START`] as a second region (and a second
    /// KVM slot). The layout of a Linux guest.
    ///
    /// # Errors
    /// [`Error::Config`] for a size that is not a non-zero multiple of 2 MiB,
    /// [`Error::Memory`] if the mapping fails.
    pub fn around_hole(size: u64) -> Result<Self> {
        if size == 0 || size % (2 << 20) != 0 {
            return Err(Error::Config(format!(
                "guest RAM of {size} bytes: use a non-zero multiple of 2 MiB"
            )));
        }
        if size <= HOLE_START {
            Self::map(&[(0, size)])
        } else {
            Self::map(&[(0, HOLE_START), (HIGH_RAM_START, size - HOLE_START)])
        }
    }

    /// Maps RAM at the given (guest-physical base, length) ranges, in order: what
    /// [`Self::around_hole`] does for a size, for layouts of other shapes (tests of the
    /// flat numbering with small regions).
    ///
    /// # Errors
    /// [`Error::Config`] for a range that is empty or not a multiple of 2 MiB in base or
    /// length, [`Error::Memory`] for ranges that overlap or if the mapping fails.
    pub fn with_ranges(ranges: &[(u64, u64)]) -> Result<Self> {
        const ALIGN: u64 = 2 << 20;
        if ranges.is_empty()
            || ranges
                .iter()
                .any(|&(gpa, len)| len == 0 || gpa % ALIGN != 0 || len % ALIGN != 0)
        {
            return Err(Error::Config(format!(
                "guest RAM ranges {ranges:x?}: each must be non-empty and 2 MiB aligned"
            )));
        }
        Self::map(ranges)
    }

    /// One region: an anonymous mapping (with transparent huge pages where the system
    /// offers them), already flat. Several: consecutive spans of one memory file, so that
    /// a view of the file is the flat RAM the push path reads and the cache commits into.
    fn map(ranges: &[(u64, u64)]) -> Result<Self> {
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        let failed =
            |e: &dyn std::fmt::Display| Error::Memory(format!("cannot map {total} bytes: {e}"));
        let layout = GuestLayout::from_ranges(PAGE_SIZE, ranges)?;
        let (mem, flat) = if let [(gpa, len)] = ranges {
            let mem = GuestMemory::from_ranges(&[(GuestAddress(*gpa), *len as usize)])
                .map_err(|e| failed(&e))?;
            let flat = Region::of_guest(&mem).map_err(|e| failed(&e))?;
            (mem, flat)
        } else {
            colo_memory::flat::in_one_file(ranges).map_err(|e| failed(&e))?
        };
        Ok(Self {
            mem,
            layout,
            flat: Arc::new(flat),
        })
    }

    /// vm-memory's view, for virtio queues and loading. Every write through it marks its
    /// page in the memory's dirty bitmap, which the dirty tracker collects beside KVM's
    /// log.
    pub(crate) fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// The dirty-tracking layout (region `i` is slot `i`).
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Bytes of RAM in all regions.
    pub fn size(&self) -> u64 {
        self.layout.bytes()
    }

    /// Each region's guest-physical base, length and host address, in layout order.
    fn regions(&self) -> impl Iterator<Item = (u64, u64, *mut u8)> + '_ {
        self.mem.iter().map(|r| {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .expect("a region's first byte is mapped");
            (r.start_addr().0, r.len(), host)
        })
    }

    /// Touches every page now, so that later bulk copies into RAM (the secondary's commit
    /// of a whole checkpoint) do not pay the first-touch cost (about 10x here). Best
    /// effort: a kernel without MADV_POPULATE_WRITE leaves the pages to be touched lazily.
    pub fn prefault(&self) {
        for (_, len, host) in self.regions() {
            // SAFETY: the range is exactly one region's mapping; populating does not change
            // its contents.
            let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_POPULATE_WRITE) };
            if r != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "RAM not pre-faulted");
            }
        }
    }

    /// Registers region `i` of the RAM with KVM as slot `i`, with dirty logging.
    ///
    /// # Errors
    /// [`Error::Kvm`] if KVM refuses a slot.
    pub(crate) fn register(&self, vm: &VmFd) -> Result<()> {
        for (slot, (gpa, len, host)) in self.regions().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is this region's mapping, valid and never moved. If
            // the mapping went while KVM still had the slot, guest accesses would fault
            // inside KVM (an error exit), not touch other memory of this process; and it
            // does not go while a vCPU can run: the Machine holding the vCPU holds this RAM,
            // and the dirty tracker that shares the VM fd holds a clone of the memory.
            unsafe { vm.set_user_memory_region(region) }.map_err(Error::kvm("add a RAM slot"))?;
        }
        Ok(())
    }

    /// All of RAM as one [`Region`] in the layout's flat numbering: the push source, or a
    /// RAM cache's commit target. RAM split around the 32-bit hole is seen through one
    /// view of the memory file both regions live in ([`colo_memory::flat`]). The region
    /// holds the mapping: it stays mapped while the region lives, whenever the VM goes.
    pub fn region(&self) -> Arc<Region> {
        Arc::clone(&self.flat)
    }

    /// Each region of RAM as a [`Region`], in layout order (the spans of [`Self::region`]
    /// that regions of the layout cover): the SVM memory a RAM cache commits into.
    pub fn regions_by_slot(&self) -> Vec<Arc<Region>> {
        let mut start = 0;
        self.layout
            .regions()
            .iter()
            .map(|r| {
                let sub = self
                    .flat
                    .sub(start, r.len)
                    .expect("the layout's regions tile the flat view");
                start += r.len;
                Arc::new(sub)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use colo_dirty_track::DirtyTracker;
    use colo_memory::PageBitmap;
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn ram_above_3_gib_is_two_regions_seen_flat_by_the_push_path() {
        let r = GuestRam::around_hole(3584 << 20).unwrap();
        let regions: Vec<_> = r
            .layout()
            .regions()
            .iter()
            .map(|g| (g.slot, g.gpa, g.len))
            .collect();
        assert_eq!(regions, [(0, 0, 3 << 30), (1, 4 << 30, 512 << 20)]);
        assert_eq!(r.size(), 3584 << 20);
        // The push path's view: the byte at a high guest address sits at its flat offset.
        let flat = r.region();
        assert_eq!(flat.len() as u64, r.size());
        r.mem()
            .write_slice(b"above the hole", GuestAddress(HIGH_RAM_START + 7))
            .unwrap();
        let mut b = [0u8; 14];
        flat.read_at(HOLE_START + 7, &mut b).unwrap();
        assert_eq!(&b, b"above the hole");
        let small = GuestRam::around_hole(64 << 20).unwrap();
        assert_eq!(small.layout().regions().len(), 1);
        assert_eq!(small.region().len(), 64 << 20);
        assert!(
            GuestRam::around_hole(3 << 20).is_err(),
            "not a multiple of 2 MiB"
        );
    }

    #[test]
    fn both_regions_are_kvm_slots_and_dirty_tracking_covers_them() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is absent");
            return;
        }
        let ram = GuestRam::around_hole(3584 << 20).unwrap();
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let manual = colo_dirty_track::enable_manual_protect(&vm).unwrap();
        ram.register(&vm).unwrap();
        let tracker = DirtyTracker::new(ram.mem().clone(), manual).unwrap();
        // A device write high above the hole, and one in low RAM.
        ram.mem()
            .write_slice(&[1; 8], GuestAddress(HIGH_RAM_START + 2 * PAGE_SIZE))
            .unwrap();
        ram.mem()
            .write_slice(&[1; 8], GuestAddress(5 * PAGE_SIZE))
            .unwrap();
        let mut b = PageBitmap::new(ram.layout().pages());
        tracker.collect(&vm, &mut b).unwrap();
        let high = ram.layout().flat_offset(HIGH_RAM_START).unwrap() / PAGE_SIZE;
        assert_eq!(high, HOLE_START / PAGE_SIZE);
        assert_eq!(b.runs().collect::<Vec<_>>(), [(5, 1), (high + 2, 1)]);
    }
}
