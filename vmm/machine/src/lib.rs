//! The KVM virtual machine that COLO protects: guest RAM with dirty logging, 1 to 8 vCPUs
//! in long mode running the built-in guest at CPL3, the console, virtio-net and
//! virtio-blk, and the VM state snapshot.
//!
//! A [`Machine`] is built from a [`VmConfig`] and started with [`runner::VmHandle::start`],
//! which runs each vCPU on its own thread and can pause and resume them all in tens of
//! microseconds (a signal sets `immediate_exit`, see the shared ENVIRONMENT.md beside the repository).
//!
//! The built-in guest ([`guest_image::GUEST_ELF`]) is built from `vmm/guest` by this
//! crate's build script; the tests run it (and tiny hand-assembled guests) in real VMs
//! where `/dev/kvm` exists, and say so in one line where it does not.

use colo_guest_abi::boot as abi;
mod boot;
mod codec;
pub mod devices;
mod error;
pub mod guest_image;
pub mod memory;
pub mod peer;
pub mod runner;
pub mod sched;
mod snapshot;
mod vcpu;
mod vcpus;

use std::path::PathBuf;
use std::sync::Arc;

use colo_dirty_track::DirtyTracker;
use colo_memory::PageBitmap;
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, kvm_irqchip,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};

pub use error::{Error, Result};
pub use vcpus::check_count as check_vcpus;

use abi::{BootParams, NET_MMIO_GPA};
use codec::{Reader, Writer};
use devices::Devices;
use devices::backend::NetBackend;
use devices::blk::{Blk, BlkStats, open_raw};
use devices::console::{Console, ConsoleSink};
use devices::net::{Net, NetStats};
use devices::virtio_mmio::MmioTransport;
use memory::GuestRam;
use snapshot::VmState;
use vcpus::Vcpus;

/// Where the guest's scratch area (its dirty-rate load) starts.
pub const SCRATCH_GPA: u64 = 16 << 20;

/// How to build a VM.
pub struct VmConfig {
    /// A name for logs and the console prefix.
    pub name: String,
    /// Bytes of RAM (a multiple of 2 MiB, at least 32 MiB).
    pub ram: u64,
    /// Number of vCPUs (1 to 8): vCPU 0 runs the guest's service, the others its workers.
    pub vcpus: u32,
    /// The guest image (an x86-64 ELF executable linked at 0x200000).
    pub image: Vec<u8>,
    /// The disk image.
    pub disk: PathBuf,
    /// Replaces the plain image backend (block replication); `disk` is still checked.
    pub disk_backend: Option<Arc<dyn colo_blk::BlockBackend>>,
    /// The network backend.
    pub net: NetBackend,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address and prefix length.
    pub ip: ([u8; 4], u8),
    /// The service's TCP port.
    pub port: u16,
    /// Put the TSC into replies (nondeterministic output).
    pub nondeterministic: bool,
    /// Pages per second the guest dirties.
    pub dirty_pages_per_sec: u64,
    /// Where console lines go.
    pub console: ConsoleSink,
}

/// Checks a guest image the way [`Machine::new`] will load it, without a VM: for errors
/// before anything else (a tap device, a peer) is set up.
///
/// # Errors
/// [`Error::Image`] with what is wrong.
pub fn check_image(image: &[u8]) -> Result<()> {
    let scratch = colo_memory::GuestMemory::from_ranges(&[(GuestAddress(0), SCRATCH_GPA as usize)])
        .map_err(|e| Error::Memory(e.to_string()))?;
    boot::load_elf(&scratch, image, SCRATCH_GPA).map(|_| ())
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote this status to the exit port.
    Status(u32),
    /// The VMM stopped it.
    Stopped,
}

/// Collects a VM's dirty pages from any thread, running or paused.
#[derive(Clone)]
pub struct DirtyHandle {
    vm: Arc<VmFd>,
    tracker: Arc<DirtyTracker>,
}

impl std::fmt::Debug for DirtyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyHandle").finish_non_exhaustive()
    }
}

impl DirtyHandle {
    /// Adds every page written since the last collection to `out` and resets the log.
    ///
    /// # Errors
    /// [`Error::Dirty`] if KVM refuses.
    pub fn collect(&self, out: &mut PageBitmap) -> Result<u64> {
        let s = self.tracker.collect(&self.vm, out)?;
        Ok(s.kvm_pages + s.vmm_pages)
    }
}

/// One VM: KVM objects, RAM, devices and dirty tracking. No drop order matters: regions of
/// the RAM handed out ([`memory::GuestRam::region`]) and the dirty tracker each hold the
/// mapping themselves.
pub struct Machine {
    /// The vCPUs.
    pub(crate) vcpus: Vcpus,
    /// The MSRs a snapshot carries (every one KVM lists that the vCPU reads and writes).
    saved_msrs: Vec<u32>,
    /// The VM (shared: its dirty log may be read while the vCPU runs).
    pub(crate) vm: Arc<VmFd>,
    _kvm: Kvm,
    /// The devices.
    pub(crate) devices: Devices,
    /// Dirty tracking of RAM (KVM log plus device writes); shared like the VM.
    pub(crate) tracker: Arc<DirtyTracker>,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The VM's name.
    pub(crate) name: String,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Builds the VM: checks the image and disk, maps RAM, loads the guest and sets up the
    /// vCPUs. Nothing runs yet.
    ///
    /// # Errors
    /// [`Error::Image`], [`Error::Disk`] or [`Error::Config`] for bad input (before any
    /// KVM object exists), [`Error::Kvm`] if KVM refuses.
    pub fn new(cfg: VmConfig) -> Result<Self> {
        if cfg.ram < 32 << 20 {
            return Err(Error::Config(format!(
                "{} MiB of RAM is too little: at least 32 MiB",
                cfg.ram >> 20
            )));
        }
        vcpus::check_count(cfg.vcpus)?;
        if cfg.ip.1 == 0 || cfg.ip.1 > 30 {
            return Err(Error::Config(format!(
                "prefix length /{} is not usable",
                cfg.ip.1
            )));
        }
        let disk: Arc<dyn colo_blk::BlockBackend> = match cfg.disk_backend {
            Some(b) => b,
            None => Arc::new(colo_blk::PlainDisk::new(open_raw(&cfg.disk)?)),
        };
        let ram = GuestRam::new(cfg.ram, NET_MMIO_GPA)?;
        let image = boot::load_elf(ram.mem(), &cfg.image, SCRATCH_GPA)?;
        boot::write_tables(ram.mem())?;
        let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(Error::kvm("create the VM"))?;
        let manual = colo_dirty_track::enable_manual_protect(&vm)?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(Error::kvm("set the TSS address"))?;
        vm.create_irq_chip()
            .map_err(Error::kvm("create the irqchip"))?;
        // The PIT Linux calibrates against and ticks with; the built-in guest does not use it.
        vm.create_pit2(kvm_bindings::kvm_pit_config::default())
            .map_err(Error::kvm("create the PIT"))?;
        ram.register(&vm)?;
        let vcpus = Vcpus::create(&kvm, &vm, cfg.vcpus, image.entry)?;
        let vcpu = vcpus.lock(0);
        let tsc_khz = vcpu
            .get_tsc_khz()
            .map_err(Error::kvm("read the TSC frequency"))?;
        let params = BootParams {
            magic: abi::BOOT_MAGIC,
            version: abi::BOOT_VERSION,
            flags: if cfg.nondeterministic {
                abi::FLAG_NONDETERMINISTIC
            } else {
                0
            },
            ram_size: cfg.ram,
            tsc_khz: u64::from(tsc_khz),
            ip: cfg.ip.0,
            gateway: [0; 4],
            prefix_len: cfg.ip.1,
            _pad: 0,
            port: cfg.port,
            _pad2: 0,
            dirty_pages_per_sec: cfg.dirty_pages_per_sec,
            scratch_gpa: SCRATCH_GPA,
            scratch_len: cfg.ram - SCRATCH_GPA,
            vcpus: cfg.vcpus,
            _pad3: 0,
        };
        boot::write_boot_params(ram.mem(), &params)?;
        // After CPUID: which MSRs exist depends on the features the vCPU has (the same on
        // every vCPU).
        let saved_msrs = vcpu::saved_msrs(&kvm, &vcpu)?;
        drop(vcpu);
        tracing::info!(
            vm = %cfg.name,
            ram_mib = cfg.ram >> 20,
            vcpus = cfg.vcpus,
            entry = format_args!("{:#x}", image.entry),
            image_end = format_args!("{:#x}", image.end),
            tsc_khz,
            manual_protect = manual,
            net = %cfg.net.name,
            disk = %cfg.disk.display(),
            "VM built"
        );
        // Tracking starts here: the loader's writes (which marked their pages) are not
        // dirty pages of a checkpoint.
        let tracker = DirtyTracker::new(ram.mem().clone(), manual)?;
        tracing::debug!(msrs = saved_msrs.len(), "MSRs a snapshot carries");
        Ok(Self {
            vcpus,
            saved_msrs,
            vm: Arc::new(vm),
            _kvm: kvm,
            devices: Devices {
                console: Console::new(cfg.console),
                net: MmioTransport::new(Net::new(cfg.mac, cfg.net)),
                blk: MmioTransport::new(Blk::new(disk)),
            },
            tracker: Arc::new(tracker),
            ram,
            name: cfg.name,
        })
    }

    /// Marks a committed checkpoint in the network output: on a socket backend, an empty
    /// frame after every frame the guest sent so far, which a proxy with `commit_marker`
    /// turns into the commit of the held output, in order. Call it with the vCPU paused
    /// (transmission happens on the vCPU thread), before it resumes.
    ///
    /// # Errors
    /// `Unsupported` for a backend without markers (a tap), or the socket's error.
    pub fn net_commit_marker(&mut self) -> std::io::Result<()> {
        self.devices.net.device.commit_marker()
    }

    /// The network device's counters.
    pub fn net_stats(&self) -> NetStats {
        self.devices.net.device.stats
    }

    /// The block device's counters.
    pub fn blk_stats(&self) -> BlkStats {
        self.devices.blk.device.stats
    }

    /// The number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Saves the VM state (not RAM): every vCPU's, in order, and the VM's. The VM must be
    /// paused.
    ///
    /// # Errors
    /// [`Error::Kvm`] if KVM refuses a read.
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let chip = |chip_id| -> Result<kvm_irqchip> {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm
                .get_irqchip(&mut c)
                .map_err(Error::kvm("get irqchip"))?;
            Ok(c)
        };
        let mut w = Writer::default();
        self.devices.save(&mut w);
        let state = VmState {
            vcpus: self
                .vcpus
                .lock_all()
                .iter()
                .map(|v| vcpu::save(v, &self.saved_msrs))
                .collect::<Result<_>>()?,
            irqchip: [
                chip(KVM_IRQCHIP_PIC_MASTER)?,
                chip(KVM_IRQCHIP_PIC_SLAVE)?,
                chip(KVM_IRQCHIP_IOAPIC)?,
            ],
            clock: self.vm.get_clock().map_err(Error::kvm("get clock"))?,
            pit: self.vm.get_pit2().map_err(Error::kvm("get the PIT"))?,
            devices: w.into_bytes(),
        };
        Ok(state.encode())
    }

    /// Loads a VM state saved by [`Machine::save_state`]. The VM must be paused; RAM must
    /// already hold the matching pages.
    ///
    /// # Errors
    /// [`Error::Snapshot`] for bytes that do not decode or do not fit this VM (another
    /// vCPU count among them; nothing is applied then), [`Error::Kvm`] if KVM refuses a
    /// write.
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let s = VmState::decode(bytes)?;
        if s.vcpus.len() != self.vcpus.len() {
            return Err(Error::Snapshot(format!(
                "the snapshot holds {} vCPUs, this VM has {}: both sides need the same --vcpus",
                s.vcpus.len(),
                self.vcpus.len()
            )));
        }
        // The whole snapshot is decoded and checksummed above; the devices go first, so
        // one that does not fit this VM fails before the vCPU is touched.
        let mut r = Reader::new(&s.devices, "devices");
        self.devices.restore(&mut r)?;
        r.finish()?;
        for (v, state) in self.vcpus.lock_all().iter().zip(&s.vcpus) {
            vcpu::restore(v, state)?;
        }
        for c in &s.irqchip {
            self.vm.set_irqchip(c).map_err(Error::kvm("set irqchip"))?;
        }
        self.vm
            .set_pit2(&s.pit)
            .map_err(Error::kvm("set the PIT"))?;
        let mut clock = s.clock;
        clock.flags = 0;
        self.vm.set_clock(&clock).map_err(Error::kvm("set clock"))?;
        Ok(())
    }

    /// A handle that collects dirty pages while the vCPU runs (the background push).
    pub fn dirty_handle(&self) -> DirtyHandle {
        DirtyHandle {
            vm: Arc::clone(&self.vm),
            tracker: Arc::clone(&self.tracker),
        }
    }

    /// Copies `buf` into guest RAM at `gpa` (restoring RAM that travelled as pages).
    ///
    /// # Errors
    /// [`Error::Memory`] outside RAM.
    pub fn write_ram(&self, gpa: u64, buf: &[u8]) -> Result<()> {
        self.ram
            .mem()
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    /// Copies guest RAM `[gpa, gpa + buf.len())` out.
    ///
    /// # Errors
    /// [`Error::Memory`] outside RAM.
    pub fn read_ram(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.ram
            .mem()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|e| Error::Memory(e.to_string()))
    }
}

#[cfg(test)]
mod smp_tests;
#[cfg(test)]
mod tests;
