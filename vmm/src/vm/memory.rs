//! Guest memory: one region from guest-physical 0, mapped with vm-memory, registered as a
//! dirty-logged KVM slot, and shared with the transport as a [`Region`].

use std::ptr::NonNull;
use std::sync::Arc;

use colo_dirty_track::{AtomicPageBitmap, GuestLayout, GuestRegion};
use colo_transport::Region;
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::error::{Error, Result};

/// The page size of dirty tracking and of the push path.
pub const PAGE_SIZE: u64 = 4096;

/// Guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    layout: GuestLayout,
    size: u64,
}

impl GuestRam {
    /// Maps `size` bytes of RAM at guest-physical 0 (not pre-faulted: the guest touches
    /// what it uses).
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
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|e| Error::Memory(format!("cannot map {size} bytes: {e}")))?;
        let layout = GuestLayout::new(
            PAGE_SIZE,
            vec![GuestRegion {
                slot: 0,
                gpa: 0,
                len: size,
            }],
        )?;
        Ok(Self { mem, layout, size })
    }

    /// vm-memory's view, for virtio queues and loading.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The dirty-tracking layout (one slot, 0).
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// Bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The host address of guest-physical 0.
    pub fn host_base(&self) -> *mut u8 {
        self.mem
            .get_host_address(GuestAddress(0))
            .expect("guest address 0 is mapped")
    }

    /// Touches every page now, so that later bulk copies into RAM (the secondary's commit
    /// of a whole checkpoint) do not pay the first-touch cost (about 10x here). Best
    /// effort: a kernel without MADV_POPULATE_WRITE leaves the pages to be touched lazily.
    pub fn prefault(&self) {
        // SAFETY: the range is exactly this mapping; populating does not change contents.
        let r = unsafe {
            libc::madvise(
                self.host_base().cast(),
                self.size as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "RAM not pre-faulted");
        }
    }

    /// Registers the RAM with KVM as slot 0 with dirty logging.
    ///
    /// # Errors
    /// [`Error::Kvm`] if KVM refuses the slot.
    pub fn register(&self, vm: &VmFd) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_base() as u64,
        };
        // SAFETY: the host range is this mapping, which lives as long as the GuestRam; the
        // Machine that owns both drops the VM fd before the RAM (field order).
        unsafe { vm.set_user_memory_region(region) }.map_err(Error::kvm("add the RAM slot"))
    }

    /// The RAM as a transport [`Region`] (the push source, or a RAM cache commit target).
    ///
    /// # Safety
    /// The Region must not outlive this GuestRam.
    pub unsafe fn region(&self) -> Arc<Region> {
        let ptr = NonNull::new(self.host_base()).expect("mapped memory is not null");
        // SAFETY: the caller keeps the mapping alive for the Region's life; the mapping is
        // `size` bytes and never remapped.
        Arc::new(unsafe { Region::from_raw(ptr, self.size as usize) })
    }
}

/// Marks a guest-physical range written by the VMM (device DMA), which KVM's log misses.
pub fn mark(bitmap: &AtomicPageBitmap, gpa: u64, len: u64) {
    // RAM starts at 0 in one slot, so the flat offset is the guest-physical address.
    bitmap.mark(gpa, len);
}
