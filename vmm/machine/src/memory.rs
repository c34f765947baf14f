//! Guest memory: one region from guest-physical 0, mapped with vm-memory with a dirty bitmap
//! that every VMM write through it marks, registered as a dirty-logged KVM slot, and shared
//! with the transport and the RAM cache as a [`Region`] that keeps the mapping alive.

use std::sync::Arc;

use colo_memory::{GuestLayout, GuestMemory, GuestRegion, Region};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::error::{Error, Result};

/// The page size of dirty tracking and of the push path.
pub const PAGE_SIZE: u64 = colo_memory::PAGE_SIZE;

/// Guest RAM.
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemory,
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
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), size as usize)])
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

    /// vm-memory's view, for virtio queues and loading. Every write through it marks its
    /// page in the memory's dirty bitmap, which the dirty tracker collects beside KVM's
    /// log.
    pub(crate) fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// The dirty-tracking layout (one slot, 0).
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// The host address of guest-physical 0.
    pub(crate) fn host_base(&self) -> *mut u8 {
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
    pub(crate) fn register(&self, vm: &VmFd) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_base() as u64,
        };
        // SAFETY: the host range is this mapping, valid and never moved. If the mapping
        // went while KVM still had the slot, guest accesses would fault inside KVM (an
        // error exit), not touch other memory of this process; and it does not go while a
        // vCPU can run: the Machine holding the vCPU holds this RAM, and the dirty tracker
        // that shares the VM fd holds a clone of the memory.
        unsafe { vm.set_user_memory_region(region) }.map_err(Error::kvm("add the RAM slot"))
    }

    /// The RAM as a [`Region`] (the push source, or a RAM cache commit target). The region
    /// holds the mapping: it stays mapped while the region lives, whenever the VM goes.
    pub fn region(&self) -> Arc<Region> {
        Arc::new(Region::of_guest(&self.mem).expect("guest RAM is one region"))
    }
}
