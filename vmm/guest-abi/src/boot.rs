//! The contract between the colo VMM and its built-in guest (version 6).
//!
//! It holds only plain constants and functions over them; the command line the VMM builds
//! and the guest parses is described here and tested on both sides.
//!
//! # Boot: PVH, like a Linux vmlinux
//! The guest is an ELF with the Xen `XEN_ELFNOTE_PHYS32_ENTRY` note. The VMM loads it with
//! the same loader as a Linux kernel (rust-vmm's linux-loader) and enters vCPU 0 at the
//! note's address in 32-bit protected mode with paging off, `ebx` = the `hvm_start_info`
//! (Xen's `docs/misc/pvh.pandoc`). From there the guest is on its own:
//! - its short CPL0 entry builds nothing the VMM knows of: identity page tables (4 GiB in
//!   2 MiB pages, U and W on every entry), a GDT with user segments, a TSS per vCPU whose
//!   I/O bitmap allows only the ports below, and an IDT whose handlers stop the VM with
//!   [`EXIT_EXCEPTION`] + the vector;
//! - it starts the other vCPUs the way a PC does: INIT and two SIPIs through its local
//!   APIC (xAPIC at 0xfee00000, "all excluding self") to a real-mode trampoline at
//!   [`TRAMPOLINE_GPA`]. The VMM leaves vCPUs 1 and up uninitialized (`KVM_MP_STATE_
//!   UNINITIALIZED`), so KVM's in-kernel LAPIC runs them only once that SIPI comes;
//! - every vCPU then drops to CPL3 (`sysexit`) and runs there with interrupts off: vCPU 0
//!   the service, the others a worker each. CPL3 code runs natively on this project's
//!   hosts, where CPL0 code is emulated instruction by instruction. The devices'
//!   interrupt lines (GSI 5 net, GSI 6 block, edge-triggered) are raised but never taken.
//! - The devices run on a VMM thread of their own, while the guest runs. When a device
//!   has put buffers into a used ring (a frame received or sent, a disk request done), the
//!   VMM ends vCPU 0's idle wait early. The other vCPUs' idle waits end on time alone.
//!
//! # The command line (`hvm_start_info.cmdline_paddr`)
//! Space-separated `key=value` words; the guest ignores words it does not know (the VMM
//! may add `clearcpuid=` and the like for Linux's sake):
//! - `colo.ip=A.B.C.D/N`: the address and prefix length;
//! - `colo.port=P`: the service's TCP port;
//! - `colo.nondeterministic`: put the TSC into replies ([`FLAG_NONDETERMINISTIC`]);
//! - `colo.selftest=ud` or `colo.selftest=io`: right at CPL3, execute `ud2`
//!   ([`FLAG_SELFTEST_UD`]) or `out` to a port the TSS does not allow, COM1's 0x3f8
//!   ([`FLAG_SELFTEST_IO`]), so that a test sees the exception reach the guest's handler
//!   (status [`EXIT_EXCEPTION`] + 6 or + 13);
//! - `colo.dirty=R`: pages per second to dirty, in all vCPUs together (0 if absent);
//! - `colo.dirty_pattern=sweep|hot|zipf`: which pages the dirty load writes
//!   ([`DirtyPattern`]; sweep if absent);
//! - `colo.tsc_khz=K`: the TSC frequency;
//! - `colo.vcpus=N`: how many vCPUs the machine has (1 if absent);
//! - `virtio_mmio.device=4K@0xADDR:IRQ`: a virtio-mmio device, as Linux's
//!   `VIRTIO_MMIO_CMDLINE_DEVICES` reads it; the guest finds net and block among them by
//!   their device id.
//!
//! RAM is what the PVH memory map (`memmap_paddr`) says is usable; the guest dirties the
//! usable RAM from [`SCRATCH_GPA`] to the end of the region that holds it.
//!
//! # Memory the guest keeps to a fixed place
//! - [`TRAMPOLINE_GPA`]: the APs' real-mode start (a PT_LOAD segment of the image);
//! - [`CONSOLE_GPA`]: the console buffer;
//! - [`IMAGE_GPA`]: the rest of the image.
//!
//! # Ports (`out` at CPL3 exits to the VMM; each exit costs about 20 us, so batch)
//! - [`PORT_CONSOLE`]: `out dx, eax` with eax = number of bytes the guest put at
//!   [`CONSOLE_GPA`] (at most [`CONSOLE_LEN`]). The VMM logs them (UTF-8, lossy).
//! - [`PORT_IDLE`]: `out dx, eax` with eax = most microseconds to wait. On vCPU 0 the VMM
//!   returns earlier when a device used buffers (and a wait may end early for no reason
//!   the guest can see, e.g. a checkpoint).
//! - [`PORT_EXIT`]: `out dx, eax` with eax = exit status. The VM stops.
//! - [`PORT_SLEEP_CONTROL`]: `out dx, al` with al = [`SLEEP_S5`]: the machine powers off
//!   (the sleep control register that the machine's ACPI FADT names, as Linux's
//!   `poweroff` uses it). The VM stops.
//!
//! # Devices: virtio-mmio version 2 (modern), polled
//! - net (device id 1, at [`NET_MMIO_GPA`] today): queue 0 receive, queue 1 transmit, at
//!   most [`NET_QUEUE_SIZE`] entries each. Offers VIRTIO_F_VERSION_1 and VIRTIO_NET_F_MAC
//!   (MAC in config space). Every buffer starts with the 12-byte `virtio_net_hdr_v1` (all
//!   zero on transmit).
//! - block (device id 2, at [`BLK_MMIO_GPA`] today): queue 0, at most [`BLK_QUEUE_SIZE`]
//!   entries. Offers VIRTIO_F_VERSION_1 and VIRTIO_BLK_F_FLUSH; capacity (in 512-byte
//!   sectors) in config space at 0x100. Requests: header {type u32, reserved u32, sector
//!   u64}, data, status byte.
//! - Notification: write the queue index to QueueNotify (0x50) as one 32-bit write. KVM
//!   completes the write itself (an ioeventfd: no exit) and the VMM's device thread
//!   processes the queue shortly after, while the guest runs on: used entries appear
//!   later, so a driver waits for them (polling the used ring, then [`PORT_IDLE`]). The
//!   guest polls; it never enables interrupts.
//! - Time: `rdtsc` (not trapped) and `colo.tsc_khz`.

/// Where the APs' real-mode trampoline is linked (SIPI vector 1).
pub const TRAMPOLINE_GPA: u64 = 0x1000;
/// The console buffer.
pub const CONSOLE_GPA: u64 = 0x8000;
/// Size of the console buffer.
pub const CONSOLE_LEN: u64 = 0x1000;
/// Where the guest image is linked and loaded.
pub const IMAGE_GPA: u64 = 0x20_0000;
/// Where the guest's scratch area (its dirty-rate load) starts.
pub const SCRATCH_GPA: u64 = 16 << 20;

/// Console output port.
pub const PORT_CONSOLE: u16 = 0x510;
/// Idle/wait port.
pub const PORT_IDLE: u16 = 0x511;
/// Exit port.
pub const PORT_EXIT: u16 = 0x512;

/// The machine's ACPI sleep control register (an I/O port; the FADT names it).
pub const PORT_SLEEP_CONTROL: u16 = 0x600;
/// The sleep type of S5 (soft off), as the DSDT's `_S5_` names it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Written to [`PORT_SLEEP_CONTROL`]: enter S5 (`SLP_TYP = 5`, `SLP_EN`).
pub const SLEEP_S5: u8 = S5_SLEEP_TYPE << 2 | 1 << 5;

/// The virtio-net device's MMIO window.
pub const NET_MMIO_GPA: u64 = 0xd000_0000;
/// The virtio-blk device's MMIO window.
pub const BLK_MMIO_GPA: u64 = 0xd000_1000;
/// Size of each device's MMIO window.
pub const MMIO_LEN: u64 = 0x1000;
/// Largest virtio-net queue.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Largest virtio-blk queue.
pub const BLK_QUEUE_SIZE: u16 = 64;
/// The virtio device id of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// The virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// This contract's version (6: `colo.dirty_pattern` and [`EXIT_MEMORY_LOST`]; 5: the ACPI power-off port; 4: a PVH ELF, its parameters on
/// the command line, the other vCPUs started by the guest with INIT/SIPI; 3 was the VMM's boot parameters with the
/// devices served on a VMM thread, 2 the same with several vCPUs).
pub const BOOT_VERSION: u32 = 6;
/// Most vCPUs a VM of this contract has (the guest keeps a stack and a TSS for each).
pub const MAX_VCPUS: u32 = 8;

/// Put the guest's TSC into every reply (`colo.nondeterministic`), so that two copies of
/// the guest answer differently (work for the COLO compare).
pub const FLAG_NONDETERMINISTIC: u32 = 1;
/// `colo.selftest=ud`: the guest executes `ud2` at CPL3 first thing.
pub const FLAG_SELFTEST_UD: u32 = 2;
/// `colo.selftest=io`: the guest writes a port its TSS denies at CPL3 first thing.
pub const FLAG_SELFTEST_IO: u32 = 4;

/// Exit status of a CPU exception: this plus the vector. The handler leaves the vector in
/// `rbx`, the faulting `rip` in `rdi`, the error code (or 0) in `rsi` and the faulting
/// `rsp` in `rcx`; CR2 holds the address of a page fault.
pub const EXIT_EXCEPTION: u32 = 0x100;

/// Exit status: the dirty load found one of its pages not holding what it last wrote there
/// (the hot and sweep patterns check each page before they write it again). Guest memory
/// was lost: a checkpoint missed a page, or a restore brought back an old one.
pub const EXIT_MEMORY_LOST: u32 = 7;

/// Which pages the dirty load writes, in each vCPU's slice of the scratch area.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyPattern {
    /// Every page in turn, wrapping around: each write is to a page not written for the
    /// longest time (no working set at all; every write is new to a checkpoint epoch).
    #[default]
    Sweep,
    /// A fixed set of [`HOT_SET_PAGES`] pages (or the whole slice if smaller), written in
    /// turn: the same pages again in every epoch, like a service's stacks and counters.
    Hot,
    /// Page ranks drawn from a Zipf distribution (exponent 1) over the whole slice, each
    /// rank a fixed page scattered over it: a few pages very often, most seldom.
    Zipf,
}

impl DirtyPattern {
    /// The word's value on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sweep => "sweep",
            Self::Hot => "hot",
            Self::Zipf => "zipf",
        }
    }

    /// The pattern a command-line value names.
    pub fn from_name(s: &str) -> Option<Self> {
        [Self::Sweep, Self::Hot, Self::Zipf]
            .into_iter()
            .find(|p| p.name() == s)
    }
}

/// Pages of each vCPU's hot set ([`DirtyPattern::Hot`]): 4 MiB.
pub const HOT_SET_PAGES: u64 = 1024;

/// The CPU exception an exit status reports ([`EXIT_EXCEPTION`] + vector), if it is one.
pub fn exception_of(status: u32) -> Option<u8> {
    status
        .checked_sub(EXIT_EXCEPTION)
        .filter(|v| *v < 32)
        .map(|v| v as u8)
}

/// One vCPU's part of the dirty load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyShare {
    /// Pages per second this vCPU writes.
    pub pages_per_sec: u64,
    /// Guest-physical start of its slice of the scratch area (page-aligned).
    pub gpa: u64,
    /// Bytes of its slice (whole pages).
    pub len: u64,
}

/// vCPU `index`'s share of a dirty load of `rate` pages per second over the scratch area
/// `[scratch_gpa, scratch_gpa + scratch_len)`: the rate split evenly over the `vcpus`
/// vCPUs (the first ones take the remainder), and the area cut into as many equal slices
/// of whole pages, one per vCPU in order. `vcpus` of 0 counts as 1.
pub fn dirty_share(
    rate: u64,
    scratch_gpa: u64,
    scratch_len: u64,
    vcpus: u32,
    index: u32,
) -> DirtyShare {
    const PAGE: u64 = 4096;
    let n = u64::from(vcpus.max(1));
    let i = u64::from(index);
    let slice = scratch_len / PAGE / n * PAGE;
    DirtyShare {
        pages_per_sec: rate / n + u64::from(i < rate % n),
        gpa: scratch_gpa + i * slice,
        len: slice,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dirty_load_is_shared_evenly_over_disjoint_slices() {
        let one = dirty_share(25_600, 16 << 20, 48 << 20, 1, 0);
        assert_eq!(
            (one.pages_per_sec, one.gpa, one.len),
            (25_600, 16 << 20, 48 << 20)
        );
        // 3 vCPUs: 10 pages/s and 10 pages of scratch (plus a partial page) split 4/3/3
        // and 3 pages each, back to back.
        let s = |i| dirty_share(10, 16 << 20, 10 * 4096 + 100, 3, i);
        let shares: [DirtyShare; 3] = [s(0), s(1), s(2)];
        assert_eq!(shares.map(|s| s.pages_per_sec), [4, 3, 3]);
        assert_eq!(shares.map(|s| s.len), [3 * 4096; 3]);
        assert_eq!(
            shares.map(|s| s.gpa),
            [16 << 20, (16 << 20) + 3 * 4096, (16 << 20) + 6 * 4096]
        );
        assert_eq!(dirty_share(7, 0, 4096, 0, 0).pages_per_sec, 7);
    }

    #[test]
    fn exception_statuses_name_their_vector() {
        assert_eq!(exception_of(EXIT_EXCEPTION + 14), Some(14));
        assert_eq!(exception_of(EXIT_EXCEPTION + 32), None);
        assert_eq!(exception_of(3), None);
    }
}
