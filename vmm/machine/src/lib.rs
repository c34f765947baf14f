//! The KVM virtual machine that COLO protects: guest RAM with dirty logging, 1 to 8 vCPUs
//! (each on its own thread) running a kernel booted through [`linux`] (PVH vmlinux or
//! bzImage through rust-vmm's linux-loader, an e820 map, a CPUID the host's emulator copes
//! with): a Linux kernel, or the built-in guest, an ordinary PVH kernel with its
//! parameters on its command line that starts its other vCPUs itself (INIT/SIPI), the
//! in-kernel irqchip and PIT, a 16550 serial port, the console, virtio-net and virtio-blk,
//! and the VM state snapshot.
//!
//! A [`Machine`] is built from a [`VmConfig`] and started with [`runner::VmHandle::start`],
//! which runs each vCPU on its own thread and can pause and resume them all in tens of
//! microseconds (a signal sets `immediate_exit`, see the shared ENVIRONMENT.md beside the repository).
//!
//! The built-in guest ([`guest_image::GUEST_ELF`]) is built from `vmm/guest` by this
//! crate's build script; the tests run it (and tiny hand-assembled guests) in real VMs
//! where `/dev/kvm` exists, and say so in one line where it does not.

use colo_guest_abi::boot as abi;
pub mod acpi;
mod assist;
mod codec;
pub mod cpuid;
pub mod devices;
mod error;
pub mod guest_image;
pub mod kvm_stats;
pub mod linux;
pub mod memory;
pub mod peer;
pub mod runner;
pub mod sched;
mod snapshot;
#[doc(hidden)]
pub mod testing;
mod vcpu;
mod vcpus;

use std::path::PathBuf;
use std::sync::Arc;

use colo_dirty_track::{Collection, DirtyTracker};
use colo_memory::PageBitmap;
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY, kvm_irqchip, kvm_pit_config,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

pub use colo_dirty_track::HotPolicy;
pub use colo_guest_abi::boot::DirtyPattern;
pub use error::{Error, Result};
pub use linux::LinuxGuest;
pub use vcpus::check_count as check_vcpus;

use abi::{BLK_MMIO_GPA, MMIO_LEN, NET_MMIO_GPA};
use codec::{Reader, Writer};
use colo_guest_abi::cmdline::{MAX_DEVICES, MmioDevice, Params};
use devices::backend::NetBackend;
use devices::blk::{Blk, BlkStats, open_raw};
use devices::console::{Console, ConsoleSink};
use devices::net::{Net, NetStats};
use devices::serial::{COM1_IRQ, IrqLine, SerialPort};
use devices::virtio_mmio::MmioTransport;
use devices::{BLK_GSI, Devices, NET_GSI};
use memory::GuestRam;
use snapshot::VmState;
use vcpus::Vcpus;

/// Where the built-in guest's scratch area (its dirty-rate load) starts.
pub const SCRATCH_GPA: u64 = abi::SCRATCH_GPA;

/// How to build a VM.
pub struct VmConfig {
    /// A name for logs and the console prefix.
    pub name: String,
    /// Bytes of RAM (a multiple of 2 MiB, at least 32 MiB).
    pub ram: u64,
    /// Number of vCPUs (1 to 8): the built-in guest's vCPU 0 runs its service, the others
    /// its workers; a Linux guest finds them in the ACPI MADT ([`acpi`]) and starts them.
    pub vcpus: u32,
    /// What runs in it.
    pub guest: Guest,
    /// The disk image.
    pub disk: PathBuf,
    /// Replaces the plain image backend (block replication); `disk` is still checked.
    pub disk_backend: Option<Arc<dyn colo_blk::BlockBackend>>,
    /// The network backend.
    pub net: NetBackend,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Where console lines go (the built-in guest's console port and the serial port).
    pub console: ConsoleSink,
}

/// What a VM runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Guest {
    /// The built-in guest, or another PVH image on its contract (`colo_guest_abi`).
    BuiltIn(BuiltInGuest),
    /// A Linux kernel ([`linux`]).
    Linux(LinuxGuest),
}

/// The built-in guest: a PVH kernel image and the parameters colo puts on its command line
/// (`colo_guest_abi::cmdline`). It boots like any PVH kernel of this machine.
#[derive(Debug, Clone)]
pub struct BuiltInGuest {
    /// The guest image (an x86-64 ELF with the PVH entry note).
    pub image: Vec<u8>,
    /// The guest's IPv4 address and prefix length.
    pub ip: ([u8; 4], u8),
    /// The service's TCP port.
    pub port: u16,
    /// Put the TSC into replies (nondeterministic output).
    pub nondeterministic: bool,
    /// Pages per second the guest dirties.
    pub dirty_pages_per_sec: u64,
    /// Which pages it dirties.
    pub dirty_pattern: DirtyPattern,
}

impl BuiltInGuest {
    /// The command line for a VM of `vcpus` vCPUs, without the TSC frequency (only a vCPU
    /// knows it; it is appended once vCPU 0 exists).
    fn cmdline(&self, vcpus: u32) -> String {
        let none = MmioDevice {
            base: 0,
            size: 0,
            irq: 0,
        };
        let mut devices = [none; MAX_DEVICES];
        devices[0] = MmioDevice {
            base: NET_MMIO_GPA,
            size: MMIO_LEN,
            irq: NET_GSI,
        };
        devices[1] = MmioDevice {
            base: BLK_MMIO_GPA,
            size: MMIO_LEN,
            irq: BLK_GSI,
        };
        Params {
            ip: self.ip.0,
            prefix_len: self.ip.1,
            port: self.port,
            flags: if self.nondeterministic {
                abi::FLAG_NONDETERMINISTIC
            } else {
                0
            },
            dirty_pages_per_sec: self.dirty_pages_per_sec,
            dirty_pattern: self.dirty_pattern,
            tsc_khz: 0,
            vcpus,
            devices,
            device_count: 2,
        }
        .to_string()
    }
}

/// The name of the built-in guest's image in errors.
const BUILT_IN_NAME: &str = "(built-in guest image)";

/// Checks a guest image the way [`Machine::new`] will load it, without a VM: for errors
/// before anything else (a tap device, a peer) is set up.
///
/// # Errors
/// [`Error::GuestImage`] with what is wrong.
pub fn check_image(image: &[u8]) -> Result<()> {
    let scratch = GuestRam::around_hole(32 << 20)?;
    linux::load_image(
        scratch.mem(),
        scratch.layout(),
        std::path::Path::new(BUILT_IN_NAME),
        image,
        "",
        None,
    )
    .map(|_| ())
    .map_err(Error::GuestImage)
}

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote this status to the exit port.
    Status(u32),
    /// The VMM stopped it.
    Stopped,
    /// The guest powered the machine off (ACPI S5, e.g. Linux's `poweroff`).
    PowerOff,
    /// The guest reset the machine (the ACPI reset register or the i8042's reset line,
    /// e.g. Linux's `reboot`, or a panic with `panic=-1`). colo does not reboot a VM: it
    /// ends.
    Reset,
}

impl GuestExit {
    /// Whether the guest ended as it meant to (not a failure to report): stopped by the
    /// VMM, exit status 0, or powered off.
    pub fn is_clean(self) -> bool {
        matches!(self, Self::Stopped | Self::Status(0) | Self::PowerOff)
    }
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
        self.collect_for(out, Collection::Checkpoint)
    }

    /// [`Self::collect`] for a push round while the VM runs: hot pages kept writable
    /// ([`Self::keep_hot`]) are left out of `out` (they stay dirty for the checkpoint).
    /// Returns the pages put into `out`.
    ///
    /// # Errors
    /// [`Error::Dirty`] if KVM refuses.
    pub fn collect_background(&self, out: &mut PageBitmap) -> Result<u64> {
        self.collect_for(out, Collection::Background)
    }

    /// [`Self::collect`] for the last push round before a checkpoint, while the VM runs:
    /// hot pages kept writable are cleared and put into `out` too (they stay hot), so the
    /// checkpoint carries only those the guest writes again before it. Returns the pages
    /// put into `out`.
    ///
    /// # Errors
    /// [`Error::Dirty`] if KVM refuses.
    pub fn collect_flush(&self, out: &mut PageBitmap) -> Result<u64> {
        self.collect_for(out, Collection::Flush)
    }

    fn collect_for(&self, out: &mut PageBitmap, kind: Collection) -> Result<u64> {
        let s = self.tracker.collect_for(&self.vm, out, kind)?;
        Ok(s.reported(kind))
    }

    /// Keeps pages the guest rewrites all the time writable under `policy` (`None`:
    /// stop). Returns whether the policy is on (it needs KVM's manual dirty-log
    /// protection).
    pub fn keep_hot(&self, policy: Option<HotPolicy>) -> bool {
        self.tracker.set_hot_policy(policy)
    }

    /// Pages kept writable now.
    pub fn kept_pages(&self) -> u64 {
        self.tracker.kept_pages()
    }

    /// Removes the pages kept writable from `out`.
    pub fn remove_kept(&self, out: &mut PageBitmap) {
        self.tracker.remove_kept(out);
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
    /// What the kernel got at boot.
    boot: linux::Loaded,
    /// Whether it is a Linux kernel (not the built-in guest).
    linux: bool,
    /// Instructions colo completed for the host's emulator.
    pub(crate) assists: Assists,
    /// Each vCPU's counts of the page faults KVM took and of its exits (empty where the
    /// kernel has no binary statistics). The runner takes them when it starts.
    pub(crate) exit_counters: Vec<kvm_stats::VcpuCounters>,
}

/// Counts of the instructions colo completed because the host's KVM could not emulate
/// them (`assist`); the first of each kind is logged.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Assists {
    /// `int3` delivered as #BP.
    pub int3: u64,
    /// `fwait` completed (skipped, or #MF delivered).
    pub fwait: u64,
    /// `ldmxcsr`/`stmxcsr` completed.
    pub mxcsr: u64,
}

impl Assists {
    fn note(&mut self, done: assist::Assisted) {
        let n = match done {
            assist::Assisted::Int3 => &mut self.int3,
            assist::Assisted::Fwait | assist::Assisted::FwaitFault => &mut self.fwait,
            assist::Assisted::Ldmxcsr | assist::Assisted::Stmxcsr => &mut self.mxcsr,
        };
        *n += 1;
        if *n == 1 {
            tracing::info!(instruction = ?done, "completed an instruction the host's KVM could not emulate (logged once per kind)");
        }
    }
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The command line entry that keeps a Linux guest off paravirtual spinlocks.
const NO_PV_SPINLOCKS: &str = "nopvspin";

/// vCPU `index` of a kernel: its CPUID; on vCPU 0 (the one the kernel enters; the others
/// wait for its INIT/SIPI), where the host shows features anyway, the `clearcpuid=` entry
/// that keeps the kernel off them, and the entry registers.
fn setup_kernel_vcpu(
    kvm: &Kvm,
    index: u32,
    vcpu: &VcpuFd,
    ram: &GuestRam,
    loaded: &mut linux::Loaded,
) -> Result<()> {
    let apic_id = u8::try_from(index).map_err(|_| Error::Config(format!("vCPU {index}")))?;
    vcpu.set_cpuid2(&cpuid::for_linux(kvm, apic_id)?)
        .map_err(Error::kvm("KVM_SET_CPUID2"))?;
    if index > 0 {
        return Ok(());
    }
    let seen = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_CPUID2"))?;
    let shown = cpuid::not_hidden(seen.as_slice());
    if let Some(entry) = cpuid::clearcpuid(&shown) {
        tracing::warn!(
            "this host's KVM does not hide CPU features from the guest; the kernel is told \
             to leave them alone with {entry}"
        );
        loaded.append_cmdline(ram.mem(), &entry)?;
        // Such a host emulates guest kernel code: there, a kernel with paravirtual
        // spinlocks on several vCPUs was seen to spin forever in its kick hypercall
        // (KVM_HC_KICK_CPU) after its initcalls; plain queued spinlocks work.
        loaded.append_cmdline(ram.mem(), NO_PV_SPINLOCKS)?;
    }
    linux::entry::setup_vcpu(vcpu, &loaded.entry)
}

impl Machine {
    /// Builds the VM: checks the image and disk, maps RAM, loads the guest and sets up the
    /// vCPUs. Nothing runs yet.
    ///
    /// # Errors
    /// [`Error::GuestImage`], [`Error::Kernel`], [`Error::Disk`] or [`Error::Config`] for bad
    /// input (before any KVM object exists), [`Error::Kvm`] if KVM refuses.
    pub fn new(cfg: VmConfig) -> Result<Self> {
        if cfg.ram < 32 << 20 {
            return Err(Error::Config(format!(
                "{} MiB of RAM is too little: at least 32 MiB",
                cfg.ram >> 20
            )));
        }
        vcpus::check_count(cfg.vcpus)?;
        let disk: Arc<dyn colo_blk::BlockBackend> = match cfg.disk_backend {
            Some(b) => b,
            None => Arc::new(colo_blk::PlainDisk::new(open_raw(&cfg.disk)?)),
        };
        let ram = GuestRam::around_hole(cfg.ram)?;
        // Every guest gets the ACPI tables (the built-in one finds its vCPU count on its
        // command line and ignores them).
        let vcpu_count = u8::try_from(cfg.vcpus).expect("checked above");
        let rsdp = Some(acpi::write(ram.mem(), vcpu_count)?);
        let mut loaded = match &cfg.guest {
            Guest::BuiltIn(g) => {
                if g.ip.1 == 0 || g.ip.1 > 30 {
                    return Err(Error::Config(format!(
                        "prefix length /{} is not usable",
                        g.ip.1
                    )));
                }
                linux::load_image(
                    ram.mem(),
                    ram.layout(),
                    std::path::Path::new(BUILT_IN_NAME),
                    &g.image,
                    &g.cmdline(cfg.vcpus),
                    rsdp,
                )
                .map_err(Error::GuestImage)?
            }
            Guest::Linux(g) => {
                let devices = devices::linux_cmdline_entries(cfg.net.connected());
                linux::load(ram.mem(), ram.layout(), g, &devices, rsdp)?
            }
        };
        let kvm = Kvm::new().map_err(Error::kvm("open /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(Error::kvm("create the VM"))?;
        let manual = colo_dirty_track::enable_manual_protect(&vm)?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(Error::kvm("set the TSS address"))?;
        vm.create_irq_chip()
            .map_err(Error::kvm("create the irqchip"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(Error::kvm("create the PIT"))?;
        ram.register(&vm)?;
        let serial = SerialPort::new(IrqLine::new(&vm, COM1_IRQ)?, Console::new(cfg.console))?;
        let vcpus = Vcpus::create(&vm, cfg.vcpus, |i, v| {
            setup_kernel_vcpu(&kvm, i, v, &ram, &mut loaded)
        })?;
        if let Guest::BuiltIn(_) = cfg.guest {
            // The guest times itself with the TSC; KVM knows its rate per vCPU.
            let tsc_khz = vcpus
                .lock(0)
                .get_tsc_khz()
                .map_err(Error::kvm("read the TSC frequency"))?;
            loaded
                .append_cmdline(ram.mem(), &format!("colo.tsc_khz={tsc_khz}"))
                .map_err(Error::GuestImage)?;
        }
        tracing::info!(
            vm = %cfg.name,
            ram_mib = cfg.ram >> 20,
            vcpus = cfg.vcpus,
            slots = ram.layout().regions().len(),
            entry = ?loaded.entry,
            initrd = ?loaded.initrd,
            cmdline = %loaded.cmdline,
            manual_protect = manual,
            net = %cfg.net.name,
            disk = %cfg.disk.display(),
            "VM built"
        );
        // After CPUID: which MSRs exist depends on the features the vCPU has (the same on
        // every vCPU).
        let saved_msrs = vcpu::saved_msrs(&kvm, &vcpus.lock(0))?;
        // Every vCPU's or none: a partial sum would be a wrong figure.
        let exit_counters = (0..vcpus.len())
            .map(|i| kvm_stats::VcpuCounters::open(&vcpus.lock(i)))
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        // Tracking starts here: the loader's writes (which marked their pages) are not
        // dirty pages of a checkpoint.
        let tracker = DirtyTracker::new(ram.mem().clone(), manual)?;
        tracing::debug!(msrs = saved_msrs.len(), "MSRs a snapshot carries");
        let devices = Devices::new(
            &vm,
            serial,
            MmioTransport::new(Net::new(cfg.mac, cfg.net)).with_irq(IrqLine::new(&vm, NET_GSI)?),
            MmioTransport::new(Blk::new(disk)).with_irq(IrqLine::new(&vm, BLK_GSI)?),
        )?;
        Ok(Self {
            vcpus,
            saved_msrs,
            exit_counters,
            vm: Arc::new(vm),
            _kvm: kvm,
            devices,
            tracker: Arc::new(tracker),
            ram,
            name: cfg.name,
            assists: Assists::default(),
            boot: loaded,
            linux: matches!(cfg.guest, Guest::Linux(_)),
        })
    }

    /// The instructions colo completed for the host's emulator so far.
    pub fn assists(&self) -> Assists {
        self.assists
    }

    /// What the kernel got at boot (its command line, memory map and entry), for a Linux
    /// guest.
    pub fn linux_boot(&self) -> Option<&linux::Loaded> {
        self.linux.then_some(&self.boot)
    }

    /// What the kernel got at boot, for any guest (the built-in one is a PVH kernel too).
    pub fn boot(&self) -> &linux::Loaded {
        &self.boot
    }

    /// Marks a committed checkpoint in the network output: on a socket backend, an empty
    /// frame after every frame the guest sent so far, which a proxy with `commit_marker`
    /// turns into the commit of the held output, in order. Call it with the VM paused
    /// (transmission happens on the device thread, which parks at a pause), before it
    /// resumes: frames the guest queued but the device has not sent yet go after the
    /// marker, into the next epoch, as the snapshot has them still in the ring.
    ///
    /// # Errors
    /// `Unsupported` for a backend without markers (a tap), or the socket's error.
    pub fn net_commit_marker(&mut self) -> std::io::Result<()> {
        self.devices.net.device.commit_marker()
    }

    /// Tells a proxy in cluster mode (`colo proxy --cluster`) what this VM is now: on a
    /// socket backend, a one-byte frame ([`RoleWord`](colo_netcmp::framing::RoleWord))
    /// after every frame the guest sent so far, through the same writer as the frames and
    /// [`net_commit_marker`](Self::net_commit_marker), so the proxy applies it exactly
    /// between them. Call it with the VM paused, as for the marker.
    ///
    /// # Errors
    /// `Unsupported` for a backend without words (a tap), or the socket's error.
    pub fn net_role_word(&mut self, word: colo_netcmp::framing::RoleWord) -> std::io::Result<()> {
        self.devices.net.device.role_word(word)
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
mod cmdline_tests {
    use super::*;

    /// What colo writes for the built-in guest is what the guest reads back, once the TSC
    /// frequency is appended (as `Machine::new` does).
    #[test]
    fn the_built_in_guests_command_line_carries_every_parameter() {
        let g = BuiltInGuest {
            image: Vec::new(),
            ip: ([10, 0, 2, 15], 24),
            port: 7000,
            nondeterministic: true,
            dirty_pages_per_sec: 25_600,
            dirty_pattern: DirtyPattern::Hot,
        };
        let line = format!("{} clearcpuid=xsave colo.tsc_khz=2600000", g.cmdline(3));
        let p = Params::parse(&line).unwrap();
        assert_eq!((p.ip, p.prefix_len, p.port), ([10, 0, 2, 15], 24, 7000));
        assert_eq!(p.flags, abi::FLAG_NONDETERMINISTIC);
        assert_eq!(
            (p.dirty_pages_per_sec, p.vcpus, p.tsc_khz),
            (25_600, 3, 2_600_000)
        );
        assert_eq!(p.dirty_pattern, DirtyPattern::Hot);
        let devs: Vec<(u64, u64, u32)> = p
            .devices()
            .iter()
            .map(|d| (d.base, d.size, d.irq))
            .collect();
        assert_eq!(
            devs,
            [
                (NET_MMIO_GPA, MMIO_LEN, NET_GSI),
                (BLK_MMIO_GPA, MMIO_LEN, BLK_GSI)
            ]
        );
    }
}
#[cfg(test)]
mod smp_tests;
#[cfg(test)]
mod tests;
