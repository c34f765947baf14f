//! How the vCPU enters a Linux kernel: the GDT (and for the 64-bit boot protocol identity
//! page tables) in low guest memory, and the registers each protocol asks for.
//!
//! - PVH (Xen's `docs/misc/pvh.pandoc`): 32-bit protected mode, paging off, flat 4 GiB code
//!   and data segments, a usable TR, `ebx` = the `hvm_start_info`.
//! - The 64-bit Linux boot protocol (`Documentation/x86/boot.rst`, "64-bit BOOT
//!   PROTOCOL"): long mode on identity-mapped page tables, a GDT with flat `__BOOT_CS`
//!   (0x10) and `__BOOT_DS` (0x18), `rsi` = the zero page, entry at the loaded kernel +
//!   0x200.

use colo_memory::GuestMemory;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::Error as LoadError;
use crate::error::{Error, Result};

/// The GDT.
pub const GDT_GPA: u64 = 0x500;
/// The PML4 of the identity map (64-bit protocol); the PDPT and four page directories
/// follow it.
pub const PML4_GPA: u64 = 0x9000;
/// The boot stack of the 64-bit protocol (grows down, below the PML4).
pub const BOOT_STACK: u64 = 0x8ff0;

/// Selector of the code segment (`__BOOT_CS`).
const CODE_SEL: u16 = 0x10;
/// Selector of the data segments (`__BOOT_DS`).
const DATA_SEL: u16 = 0x18;
/// Selector of the TSS.
const TSS_SEL: u16 = 0x20;

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// PVH: 32-bit protected mode at `rip`, `ebx` = `start_info`.
    Pvh {
        /// The kernel's XEN_ELFNOTE_PHYS32_ENTRY.
        rip: u64,
        /// Guest-physical address of the `hvm_start_info`.
        start_info: u64,
    },
    /// The 64-bit Linux boot protocol at `rip`, `rsi` = `zero_page`.
    Linux64 {
        /// The loaded kernel + 0x200.
        rip: u64,
        /// Guest-physical address of the `boot_params`.
        zero_page: u64,
    },
}

/// A segment descriptor: access byte and flags nibble (`flags`, as in `0xc09b`), base and
/// 20-bit limit.
#[derive(Debug, Clone, Copy)]
struct Descriptor {
    flags: u16,
    base: u32,
    limit: u32,
}

impl Descriptor {
    const NULL: Self = Self::new(0, 0, 0);
    /// 64-bit code, present, DPL 0, execute/read, 4 KiB granular.
    const CODE64: Self = Self::new(0xa09b, 0, 0xfffff);
    /// 32-bit code, present, DPL 0, execute/read, 4 KiB granular.
    const CODE32: Self = Self::new(0xc09b, 0, 0xfffff);
    /// Data, present, DPL 0, read/write, 4 KiB granular, 32-bit.
    const DATA: Self = Self::new(0xc093, 0, 0xfffff);
    /// A busy 32-bit TSS of 0x68 bytes (VM entry needs a usable TR).
    const TSS: Self = Self::new(0x008b, 0, 0x67);

    const fn new(flags: u16, base: u32, limit: u32) -> Self {
        Self { flags, base, limit }
    }

    /// The 8 bytes in the GDT.
    fn encode(self) -> u64 {
        let (flags, base, limit) = (
            u64::from(self.flags),
            u64::from(self.base),
            u64::from(self.limit),
        );
        ((base & 0xff00_0000) << 32)
            | ((flags & 0xf0ff) << 40)
            | ((limit & 0xf_0000) << 32)
            | ((base & 0xff_ffff) << 16)
            | (limit & 0xffff)
    }

    /// The segment register KVM loads for `selector`.
    fn segment(self, selector: u16) -> kvm_segment {
        let f = self.flags;
        let g = ((f >> 15) & 1) as u8;
        let present = ((f >> 7) & 1) as u8;
        kvm_segment {
            base: u64::from(self.base),
            limit: if g == 1 {
                (self.limit << 12) | 0xfff
            } else {
                self.limit
            },
            selector,
            type_: (f & 0xf) as u8,
            present,
            dpl: ((f >> 5) & 3) as u8,
            db: ((f >> 14) & 1) as u8,
            s: ((f >> 4) & 1) as u8,
            l: ((f >> 13) & 1) as u8,
            g,
            avl: ((f >> 12) & 1) as u8,
            unusable: u8::from(present == 0),
            padding: 0,
        }
    }
}

fn gdt(entry: &Entry) -> [Descriptor; 5] {
    let code = match entry {
        Entry::Pvh { .. } => Descriptor::CODE32,
        Entry::Linux64 { .. } => Descriptor::CODE64,
    };
    [
        Descriptor::NULL,
        Descriptor::NULL,
        code,
        Descriptor::DATA,
        Descriptor::TSS,
    ]
}

/// Writes the GDT and, for the 64-bit protocol, page tables that identity-map the first
/// 4 GiB with 2 MiB pages (the kernel, its zero page, command line and initrd all lie
/// there).
///
/// # Errors
/// [`LoadError::Write`] if guest memory is too small for them.
pub fn write_tables(mem: &GuestMemory, entry: &Entry) -> std::result::Result<(), LoadError> {
    let w = |what: &'static str, bytes: &[u8], at: u64| {
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|source| LoadError::Write { what, source })
    };
    let table: Vec<u8> = gdt(entry)
        .iter()
        .flat_map(|d| d.encode().to_le_bytes())
        .collect();
    w("the GDT", &table, GDT_GPA)?;
    if let Entry::Linux64 { .. } = entry {
        const PRESENT_RW: u64 = 0x3;
        const HUGE: u64 = 0x80;
        let pdpt = PML4_GPA + 0x1000;
        w(
            "the page tables",
            &(pdpt | PRESENT_RW).to_le_bytes(),
            PML4_GPA,
        )?;
        for gib in 0..4u64 {
            let pd = pdpt + 0x1000 * (gib + 1);
            w(
                "the page tables",
                &(pd | PRESENT_RW).to_le_bytes(),
                pdpt + gib * 8,
            )?;
            let entries: Vec<u8> = (0..512u64)
                .flat_map(|i| (((gib << 30) + (i << 21)) | PRESENT_RW | HUGE).to_le_bytes())
                .collect();
            w("the page tables", &entries, pd)?;
        }
    }
    Ok(())
}

/// Sets the vCPU's registers for `entry` (after [`write_tables`]), a clean FPU, and the
/// local APIC's LINT0 as ExtINT and LINT1 as NMI (the virtual-wire mode a PC starts in, so
/// the PIC's interrupts reach the CPU before the kernel sets the APIC up).
///
/// # Errors
/// [`Error::Kvm`] if an ioctl fails.
pub fn setup_vcpu(vcpu: &VcpuFd, entry: &Entry) -> Result<()> {
    let table = gdt(entry);
    let mut sregs = vcpu.get_sregs().map_err(Error::kvm("get sregs"))?;
    sregs.cs = table[2].segment(CODE_SEL);
    let data = table[3].segment(DATA_SEL);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = table[4].segment(TSS_SEL);
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match *entry {
        Entry::Pvh { rip, start_info } => {
            // PE; ET is fixed to 1 on every CPU since the 486.
            sregs.cr0 = 0x11;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = start_info;
        }
        Entry::Linux64 { rip, zero_page } => {
            // PE | ET | PG.
            sregs.cr0 = 0x8000_0011;
            sregs.cr3 = PML4_GPA;
            // PAE.
            sregs.cr4 = 0x20;
            // LME | LMA.
            sregs.efer = 0x500;
            regs.rip = rip;
            regs.rsi = zero_page;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::kvm("set sregs"))?;
    vcpu.set_regs(&regs).map_err(Error::kvm("set regs"))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("set fpu"))?;
    set_lints(vcpu)
}

/// Local APIC register offsets of LVT LINT0 and LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
/// Delivery modes (bits 8..10 of an LVT entry).
const DM_EXTINT: u32 = 0x7;
const DM_NMI: u32 = 0x4;

fn set_lints(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(Error::kvm("get lapic"))?;
    for (reg, mode) in [(APIC_LVT0, DM_EXTINT), (APIC_LVT1, DM_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(Error::kvm("set lapic"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_as_the_well_known_flat_segments() {
        assert_eq!(Descriptor::CODE64.encode(), 0x00af_9b00_0000_ffff);
        assert_eq!(Descriptor::CODE32.encode(), 0x00cf_9b00_0000_ffff);
        assert_eq!(Descriptor::DATA.encode(), 0x00cf_9300_0000_ffff);
        assert_eq!(Descriptor::TSS.encode(), 0x0000_8b00_0000_0067);
        let cs = Descriptor::CODE64.segment(CODE_SEL);
        assert_eq!((cs.l, cs.db, cs.g, cs.limit, cs.type_), (1, 0, 1, !0, 0xb));
        let tr = Descriptor::TSS.segment(TSS_SEL);
        assert_eq!((tr.g, tr.limit, tr.s, tr.unusable), (0, 0x67, 0, 0));
    }

    #[test]
    fn the_64_bit_protocol_gets_an_identity_map_of_4_gib() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e = Entry::Linux64 {
            rip: 0x10_0200,
            zero_page: 0x7000,
        };
        write_tables(&mem, &e).unwrap();
        let r = |at: u64| mem.read_obj::<u64>(GuestAddress(at)).unwrap();
        assert_eq!(r(PML4_GPA), 0xa003);
        assert_eq!(r(0xa000 + 3 * 8), 0xe003);
        // The last 2 MiB page below 4 GiB.
        assert_eq!(r(0xe000 + 511 * 8), 0xffe0_0083);
        assert_eq!(r(GDT_GPA + 16), Descriptor::CODE64.encode());
    }
}
