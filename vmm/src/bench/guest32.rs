//! A minimal KVM guest for the dirty-log benchmark: 32-bit protected mode without paging,
//! running eleven bytes of code that write one byte into each of `count` pages, `stride`
//! bytes apart, and halt.
//!
//! Guest kernel code is emulated on these hosts (about 1.3M instructions/s), which is fast
//! enough for a loop of four instructions per page.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use memmap2::{MmapMut, MmapOptions};

use super::error::{Error, Result};

/// Where the code sits in guest memory (page 1; it is read, never written).
const CODE_GPA: u64 = 0x1000;
/// First page written (page 16).
pub const FIRST_GPA: u64 = 0x1_0000;

/// A VM with one dirty-logged slot at guest-physical 0 and a vCPU ready to dirty pages.
pub struct DirtyGuest {
    // Field order matters: the VM must go before the memory it maps.
    vcpu: VcpuFd,
    vm: VmFd,
    mem: MmapMut,
    manual_protect: bool,
}

impl DirtyGuest {
    /// A guest of `bytes` of memory (mapped on demand, never pre-faulted).
    ///
    /// # Errors
    /// [`Error::Kvm`] if /dev/kvm or an ioctl fails, [`Error::Io`] if the mapping fails.
    pub fn new(bytes: u64) -> Result<Self> {
        let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(Error::kvm("create a VM"))?;
        let manual_protect = colo_dirty_track::enable_manual_protect(&vm)
            .map_err(|e| Error::InvalidArgs(format!("manual dirty-log protection: {e}")))?;
        let mem = MmapOptions::new()
            .len(bytes as usize)
            .map_anon()
            .map_err(Error::io("map guest memory"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: bytes,
            userspace_addr: mem.as_ptr() as u64,
        };
        // SAFETY: the host range is `mem`, which this struct owns and keeps mapped for as
        // long as the VM (declared before it, so dropped first) exists.
        unsafe { vm.set_user_memory_region(region) }.map_err(Error::kvm("add a memory slot"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(Error::kvm("set the TSS address"))?;
        let vcpu = vm.create_vcpu(0).map_err(Error::kvm("create a vCPU"))?;
        let mut sregs = vcpu.get_sregs().map_err(Error::kvm("get sregs"))?;
        let flat = |selector: u16, type_: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = flat(0x08, 0xb);
        for s in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            *s = flat(0x10, 0x3);
        }
        sregs.cr0 |= 1; // PE, no paging
        vcpu.set_sregs(&sregs).map_err(Error::kvm("set sregs"))?;
        Ok(Self {
            vcpu,
            vm,
            mem,
            manual_protect,
        })
    }

    /// The VM, for reading its dirty log.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// Whether KVM_CLEAR_DIRTY_LOG is in use.
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Runs the guest until it has written one byte into each of `count` pages from
    /// [`FIRST_GPA`], `stride` bytes apart.
    ///
    /// # Errors
    /// [`Error::Kvm`] if KVM fails, [`Error::Guest`] on an exit other than the final halt.
    pub fn dirty(&mut self, count: u32, stride: u32) -> Result<()> {
        let mut code = Vec::with_capacity(20);
        code.push(0xbf); // mov edi, FIRST_GPA
        code.extend_from_slice(&(FIRST_GPA as u32).to_le_bytes());
        code.push(0xb9); // mov ecx, count
        code.extend_from_slice(&count.to_le_bytes());
        code.extend_from_slice(&[0x88, 0x07]); // loop: mov [edi], al
        code.extend_from_slice(&[0x81, 0xc7]); // add edi, stride
        code.extend_from_slice(&stride.to_le_bytes());
        code.extend_from_slice(&[0x49, 0x75, 0xf5]); // dec ecx; jnz loop
        code.push(0xf4); // hlt
        let at = CODE_GPA as usize;
        self.mem[at..at + code.len()].copy_from_slice(&code);
        self.vcpu
            .set_regs(&kvm_regs {
                rip: CODE_GPA,
                rax: 0x5a,
                rflags: 2,
                ..Default::default()
            })
            .map_err(Error::kvm("set regs"))?;
        match self.vcpu.run().map_err(Error::kvm("run the vCPU"))? {
            VcpuExit::Hlt => Ok(()),
            other => Err(Error::Guest(format!("unexpected exit {other:?}"))),
        }
    }
}
