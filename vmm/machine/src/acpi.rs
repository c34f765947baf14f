//! The ACPI tables that describe the machine to a kernel, built with rust-vmm's
//! `acpi_tables`: how many vCPUs there are (MADT: a local APIC each, and the I/O APIC),
//! how the guest powers off and resets (a hardware-reduced FADT with a sleep control
//! register and a reset register, and `_S5_` in the DSDT), and the serial port (DSDT).
//! The virtio-mmio devices are announced on the command line (`virtio_mmio.device=`), not
//! here, so Linux does not find them twice.
//!
//! The tables lie in the legacy BIOS area at [`TABLES_GPA`] (reserved in the e820 map);
//! the RSDP's address goes to the kernel in the PVH start info or the zero page, and
//! Linux would also find it there by scanning 0xe0000-0xfffff.
//!
//! | at | what |
//! |---|---|
//! | 0xe0000 | RSDP |
//! | 0xe0040 | XSDT |
//! | 0xe0080 | FADT |
//! | 0xe0200 | MADT |
//! | 0xe0400 | DSDT |

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use colo_memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::serial::COM1_IRQ;

/// Where the tables start (the RSDP, 16-byte aligned as the spec wants it).
pub const TABLES_GPA: u64 = 0xe_0000;
const XSDT_GPA: u64 = TABLES_GPA + 0x40;
const FADT_GPA: u64 = TABLES_GPA + 0x80;
const MADT_GPA: u64 = TABLES_GPA + 0x200;
const DSDT_GPA: u64 = TABLES_GPA + 0x400;
/// The end of the room the tables have (the BIOS area ends at 1 MiB).
const TABLES_END: u64 = 0x10_0000;

/// The sleep control register (`SLEEP_CONTROL_REG` of a hardware-reduced FADT): the guest
/// writes `SLP_TYP << 2 | SLP_EN` to it to enter a sleep state; [`S5_SLEEP_TYPE`] is
/// power off.
pub const PORT_SLEEP_CONTROL: u16 = crate::abi::PORT_SLEEP_CONTROL;
/// The sleep status register (reads 0: the machine never wakes from S5).
pub const PORT_SLEEP_STATUS: u16 = 0x601;
/// The reset register (a PC's reset control port) and the value that resets.
pub const PORT_RESET: u16 = 0xcf9;
/// Written to [`PORT_RESET`]: a full reset (`SYS_RST | RST_CPU`).
pub const RESET_VALUE: u8 = 0x06;
/// The sleep type of S5 (soft off), as `_S5_` names it.
pub const S5_SLEEP_TYPE: u8 = crate::abi::S5_SLEEP_TYPE;
/// `SLP_EN` of the sleep control register.
const SLP_EN: u8 = 1 << 5;

/// The local APICs' and the I/O APIC's MMIO addresses (KVM's in-kernel irqchip).
const LAPIC_GPA: u32 = 0xfee0_0000;
const IOAPIC_GPA: u32 = 0xfec0_0000;

const OEM_ID: [u8; 6] = *b"COLO  ";
const OEM_TABLE_ID: [u8; 8] = *b"COLOVM  ";
const OEM_REVISION: u32 = 1;

/// What a sleep control write asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SleepRequest {
    /// Enter S5: power off.
    PowerOff,
    /// Another sleep state, which this machine does not have.
    Unsupported(u8),
}

/// Decodes a write of `value` to [`PORT_SLEEP_CONTROL`]: `None` without `SLP_EN`.
pub fn sleep_request(value: u8) -> Option<SleepRequest> {
    if value & SLP_EN == 0 {
        return None;
    }
    let kind = (value >> 2) & 0x7;
    Some(if kind == S5_SLEEP_TYPE {
        SleepRequest::PowerOff
    } else {
        SleepRequest::Unsupported(kind)
    })
}

/// The ACPI tables could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A table does not fit the room it has (too many vCPUs for the layout).
    #[error("the ACPI {table} ({len} bytes) does not fit its {room} bytes at {at:#x}")]
    TooLarge {
        /// The table's signature.
        table: &'static str,
        /// Its length.
        len: usize,
        /// The room it has.
        room: u64,
        /// Where it goes.
        at: u64,
    },
    /// Guest memory refused the bytes.
    #[error("cannot write the ACPI {table} into guest memory")]
    Write {
        /// The table's signature.
        table: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn put(
    mem: &GuestMemory,
    table: &'static str,
    at: u64,
    end: u64,
    bytes: &[u8],
) -> Result<(), Error> {
    if at + bytes.len() as u64 > end {
        return Err(Error::TooLarge {
            table,
            len: bytes.len(),
            room: end - at,
            at,
        });
    }
    mem.write_slice(bytes, GuestAddress(at))
        .map_err(|source| Error::Write { table, source })
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT of a hardware-reduced platform (no PM timer, no SCI, no legacy devices the
/// kernel should probe) with the sleep and reset registers.
fn fadt() -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(DSDT_GPA)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.reset_reg = io_register(PORT_RESET);
    b.reset_value = RESET_VALUE;
    b.sleep_control_reg = io_register(PORT_SLEEP_CONTROL);
    b.sleep_status_reg = io_register(PORT_SLEEP_STATUS);
    // IAPC_BOOT_ARCH: no VGA; bit 1 clear: no 8042, so the i8042 driver does not probe
    // one (colo only answers its reset command).
    b.iapc_boot_arch = (1u16 << 2).into();
    bytes_of(&b.finalize())
}

/// The MADT: a local APIC per vCPU (APIC id = vCPU index) and KVM's I/O APIC.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_GPA),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_GPA, 0));
    bytes_of(&m)
}

/// The DSDT: COM1 (a 16550, PNP0501) under `\_SB_`, and `_S5_`.
fn dsdt() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(0x3f8, 0x3f8, 0, 8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let resources = aml::ResourceTemplate::new(vec![&io, &irq]);
    let crs = aml::Name::new("_CRS".into(), &resources);
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    let sb = aml::Scope::new("_SB_".into(), vec![&com1]);
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE]);
    let s5 = aml::Name::new("_S5_".into(), &s5);
    let mut d = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    d.append_slice(&bytes_of(&sb));
    d.append_slice(&bytes_of(&s5));
    d.as_slice().to_vec()
}

/// Writes the tables of a machine with `vcpus` vCPUs into `mem` and returns the RSDP's
/// address.
///
/// # Errors
/// [`Error`] if a table does not fit or guest memory refuses it.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<u64, Error> {
    put(mem, "DSDT", DSDT_GPA, TABLES_END, &dsdt())?;
    put(mem, "APIC", MADT_GPA, DSDT_GPA, &madt(vcpus))?;
    put(mem, "FACP", FADT_GPA, MADT_GPA, &fadt())?;
    let mut x = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    x.add_entry(FADT_GPA);
    x.add_entry(MADT_GPA);
    put(mem, "XSDT", XSDT_GPA, FADT_GPA, &bytes_of(&x))?;
    put(
        mem,
        "RSDP",
        TABLES_GPA,
        XSDT_GPA,
        &bytes_of(&Rsdp::new(OEM_ID, XSDT_GPA)),
    )?;
    Ok(TABLES_GPA)
}

#[cfg(test)]
mod tests;
