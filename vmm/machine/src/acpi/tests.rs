//! The tables as a kernel reads them: every checksum, the RSDP → XSDT → FADT/MADT chain,
//! one local APIC per vCPU, the FADT's registers, and `_S5_` and COM1 in the DSDT.

use colo_memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::GuestRam;

fn read(mem: &GuestMemory, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn sums_to_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
}

/// The table at `at` (its length from its header), checked: signature and checksum.
fn table(mem: &GuestMemory, at: u64, signature: &[u8; 4]) -> Vec<u8> {
    let head = read(mem, at, 36);
    assert_eq!(&head[..4], signature, "signature at {at:#x}");
    let t = read(mem, at, u32_at(&head, 4) as usize);
    assert!(
        sums_to_zero(&t),
        "{} checksum",
        String::from_utf8_lossy(signature)
    );
    t
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_kernel_finds_every_vcpu_and_the_power_registers() {
    for vcpus in [1u8, 2, 8] {
        let ram = GuestRam::around_hole(32 << 20).unwrap();
        let mem = ram.mem();
        let rsdp_at = write(mem, vcpus).unwrap();
        assert_eq!(rsdp_at, TABLES_GPA);
        assert_eq!(rsdp_at % 16, 0);

        let rsdp = read(mem, rsdp_at, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(sums_to_zero(&rsdp[..20]), "RSDP checksum");
        assert!(sums_to_zero(&rsdp), "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP (has an XSDT)");

        let xsdt = table(mem, u64_at(&rsdp, 24), b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        assert_eq!(entries.len(), 2);

        let fadt = table(mem, entries[0], b"FACP");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: a byte in system I/O space at 0xcf9, value 6.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 120), u64::from(PORT_RESET));
        assert_eq!(fadt[128], RESET_VALUE);
        // SLEEP_CONTROL_REG and SLEEP_STATUS_REG.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(&fadt, 248), u64::from(PORT_SLEEP_CONTROL));
        assert_eq!(fadt[256], 1);
        assert_eq!(u64_at(&fadt, 260), u64::from(PORT_SLEEP_STATUS));
        let dsdt_at = u64_at(&fadt, 140);

        let madt = table(mem, entries[1], b"APIC");
        assert_eq!(u32_at(&madt, 36), LAPIC_GPA);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut o = 44;
        while o < madt.len() {
            let (kind, len) = (madt[o], usize::from(madt[o + 1]));
            match kind {
                0 => lapics.push((madt[o + 2], madt[o + 3], u32_at(&madt, o + 4))),
                1 => ioapics.push(u32_at(&madt, o + 4)),
                other => panic!("unexpected MADT entry type {other}"),
            }
            o += len;
        }
        let want: Vec<_> = (0..vcpus).map(|i| (i, i, 1)).collect();
        assert_eq!(
            lapics, want,
            "one enabled local APIC per vCPU, APIC id = index"
        );
        assert_eq!(ioapics, [IOAPIC_GPA]);

        let dsdt = table(mem, dsdt_at, b"DSDT");
        assert!(contains(&dsdt, b"_S5_"), "_S5_ in the DSDT");
        assert!(contains(&dsdt, b"COM1"), "COM1 in the DSDT");
        // EISAID("PNP0501") as AML: a DWord prefix and the compressed id.
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), "PNP0501");
    }
}

#[test]
fn only_a_write_with_slp_en_and_the_s5_type_powers_off() {
    assert_eq!(sleep_request(5 << 2 | 1 << 5), Some(SleepRequest::PowerOff));
    assert_eq!(sleep_request(5 << 2), None);
    assert_eq!(sleep_request(0), None);
    assert_eq!(
        sleep_request(3 << 2 | 1 << 5),
        Some(SleepRequest::Unsupported(3))
    );
}
