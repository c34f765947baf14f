//! Loading the guest: the ELF image, the GDT and TSS, identity page tables and the boot
//! parameters, all written into guest RAM before the vCPU starts.

use colo_memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::abi::{BOOT_PARAMS_GPA, BootParams, IMAGE_GPA};
use super::error::{Error, Result};

/// GDT: null, kernel code64, kernel data, user data, user code64, TSS (two slots).
pub const GDT_GPA: u64 = 0x1000;
/// The TSS: no ring switches happen, but VM entry needs a usable TR, and its I/O
/// permission bitmap (all ports allowed) is what lets CPL3 code execute `out`.
pub const TSS_GPA: u64 = 0x1800;
/// TSS limit: the 104-byte TSS, an 8 KiB I/O bitmap and its terminating 0xff byte.
pub const TSS_LIMIT: u64 = 0x68 + 8192;
/// PML4, then the PDPT, then four page directories (identity map of 4 GiB).
pub const PML4_GPA: u64 = 0x1_0000;
/// Selector of the user data segment (RPL 3).
pub const USER_DS: u16 = 0x1b;
/// Selector of the user 64-bit code segment (RPL 3).
pub const USER_CS: u16 = 0x23;
/// Selector of the TSS.
pub const TSS_SEL: u16 = 0x28;
/// GDT entries (8 bytes each).
pub const GDT_ENTRIES: u64 = 7;

const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff, // kernel code64
    0x00cf_9300_0000_ffff, // kernel data
    0x00cf_f300_0000_ffff, // user data, DPL 3
    0x00af_fb00_0000_ffff, // user code64, DPL 3
];

#[derive(FromBytes, KnownLayout, Immutable, Debug)]
#[repr(C)]
struct Ehdr {
    ident: [u8; 16],
    kind: u16,
    machine: u16,
    version: u32,
    entry: u64,
    phoff: u64,
    shoff: u64,
    flags: u32,
    ehsize: u16,
    phentsize: u16,
    phnum: u16,
    shentsize: u16,
    shnum: u16,
    shstrndx: u16,
}

#[derive(FromBytes, KnownLayout, Immutable, Debug, Clone, Copy)]
#[repr(C)]
struct Phdr {
    kind: u32,
    flags: u32,
    offset: u64,
    vaddr: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const MAX_PHDRS: u16 = 64;

/// What was loaded.
#[derive(Debug, Clone, Copy)]
pub struct Image {
    /// The entry point.
    pub entry: u64,
    /// One past the highest byte the image occupies (its .bss included).
    pub end: u64,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Image(msg.into())
}

/// Checks `elf` and copies its PT_LOAD segments into guest memory, zeroing each segment's
/// tail past the file bytes. Every segment must lie in `[IMAGE_GPA, limit)`.
///
/// # Errors
/// [`Error::Image`] with what is wrong: not ELF, not x86-64, not an executable, a segment
/// outside the allowed range or past the end of the file, an entry point outside
/// executable code.
pub fn load_elf(mem: &GuestMemory, elf: &[u8], limit: u64) -> Result<Image> {
    let (eh, _) = Ehdr::read_from_prefix(elf).map_err(|_| {
        bad(format!(
            "{} bytes is too short for an ELF header",
            elf.len()
        ))
    })?;
    if eh.ident[..4] != *b"\x7fELF" {
        return Err(bad("no ELF magic"));
    }
    if eh.ident[4] != 2 || eh.ident[5] != 1 {
        return Err(bad("not a little-endian 64-bit ELF"));
    }
    if eh.machine != 62 {
        return Err(bad(format!("machine {} is not x86-64", eh.machine)));
    }
    if eh.kind != 2 {
        return Err(bad(format!(
            "ELF type {} is not an executable (ET_EXEC)",
            eh.kind
        )));
    }
    if usize::from(eh.phentsize) != size_of::<Phdr>() || eh.phnum == 0 || eh.phnum > MAX_PHDRS {
        return Err(bad(format!(
            "{} program headers of {} bytes",
            eh.phnum, eh.phentsize
        )));
    }
    let table = usize::try_from(eh.phoff)
        .ok()
        .and_then(|off| elf.get(off..off.checked_add(usize::from(eh.phnum) * size_of::<Phdr>())?))
        .ok_or_else(|| bad("the program headers lie past the end of the file"))?;
    let phdrs = <[Phdr]>::ref_from_bytes(table).map_err(|_| bad("misaligned program headers"))?;
    let mut end = IMAGE_GPA;
    let mut entry_ok = false;
    let mut loaded = 0;
    for ph in phdrs.iter().filter(|p| p.kind == PT_LOAD && p.memsz > 0) {
        let seg_end = ph
            .paddr
            .checked_add(ph.memsz)
            .ok_or_else(|| bad("segment wraps"))?;
        if ph.paddr < IMAGE_GPA || seg_end > limit {
            return Err(bad(format!(
                "segment {:#x}..{seg_end:#x} is outside {IMAGE_GPA:#x}..{limit:#x}",
                ph.paddr
            )));
        }
        if ph.filesz > ph.memsz {
            return Err(bad("a segment has more file bytes than memory bytes"));
        }
        let bytes = usize::try_from(ph.offset)
            .ok()
            .zip(usize::try_from(ph.filesz).ok())
            .and_then(|(o, n)| elf.get(o..o.checked_add(n)?))
            .ok_or_else(|| bad("a segment lies past the end of the file"))?;
        mem.write_slice(bytes, GuestAddress(ph.paddr))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let zeros = vec![0u8; (ph.memsz - ph.filesz) as usize];
        mem.write_slice(&zeros, GuestAddress(ph.paddr + ph.filesz))
            .map_err(|e| Error::Memory(e.to_string()))?;
        if ph.flags & PF_X != 0 && (ph.paddr..seg_end).contains(&eh.entry) {
            entry_ok = true;
        }
        end = end.max(seg_end);
        loaded += 1;
    }
    if loaded == 0 {
        return Err(bad("no loadable segment"));
    }
    if !entry_ok {
        return Err(bad(format!(
            "entry {:#x} is not in executable code",
            eh.entry
        )));
    }
    Ok(Image {
        entry: eh.entry,
        end,
    })
}

/// Writes the GDT, the TSS and identity page tables for the first 4 GiB (2 MiB pages, user
/// accessible, writable).
///
/// # Errors
/// [`Error::Memory`] if guest RAM is too small to hold them.
pub fn write_tables(mem: &GuestMemory) -> Result<()> {
    let w = |v: &[u8], at: u64| {
        mem.write_slice(v, GuestAddress(at))
            .map_err(|e| Error::Memory(e.to_string()))
    };
    let mut gdt: Vec<u64> = GDT.to_vec();
    // 64-bit available TSS descriptor: base TSS_GPA, limit TSS_LIMIT, type 9, present.
    let base = TSS_GPA;
    let low = (TSS_LIMIT & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((TSS_LIMIT >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    gdt.push(low);
    gdt.push(base >> 32);
    debug_assert_eq!(gdt.len() as u64, GDT_ENTRIES);
    w(gdt.as_bytes(), GDT_GPA)?;
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    // I/O map base: the bitmap follows the TSS proper; every bit 0 allows its port.
    tss[0x66..0x68].copy_from_slice(&0x68u16.to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    w(&tss, TSS_GPA)?;
    const PRESENT_RW_USER: u64 = 0x7;
    const HUGE: u64 = 0x80;
    let pdpt = PML4_GPA + 0x1000;
    w((pdpt | PRESENT_RW_USER).as_bytes(), PML4_GPA)?;
    for gib in 0..4u64 {
        let pd = pdpt + 0x1000 * (gib + 1);
        w((pd | PRESENT_RW_USER).as_bytes(), pdpt + gib * 8)?;
        let entries: Vec<u64> = (0..512u64)
            .map(|i| ((gib << 30) + (i << 21)) | PRESENT_RW_USER | HUGE)
            .collect();
        w(entries.as_bytes(), pd)?;
    }
    Ok(())
}

/// Writes the boot parameters at [`BOOT_PARAMS_GPA`].
///
/// # Errors
/// [`Error::Memory`] if the write fails.
pub fn write_boot_params(mem: &GuestMemory, p: &BootParams) -> Result<()> {
    // SAFETY: BootParams is repr(C) with explicit padding fields only (every byte is part
    // of a field), so viewing it as bytes reads initialized memory.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (p as *const BootParams).cast::<u8>(),
            size_of::<BootParams>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(BOOT_PARAMS_GPA))
        .map_err(|e| Error::Memory(e.to_string()))
}

/// A one-segment ELF executable for tests: `code` at `paddr` in a segment of `memsz`
/// bytes with `flags`, entered at `entry`.
#[cfg(test)]
pub(crate) fn elf_image(entry: u64, paddr: u64, memsz: u64, flags: u32, code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 64 + 56];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut f[64..];
    ph[..4].copy_from_slice(&PT_LOAD.to_le_bytes());
    ph[4..8].copy_from_slice(&flags.to_le_bytes());
    ph[8..16].copy_from_slice(&120u64.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&memsz.to_le_bytes());
    f.extend_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    fn elf(entry: u64, paddr: u64, filesz: u64, memsz: u64, flags: u32) -> Vec<u8> {
        elf_image(entry, paddr, memsz, flags, &vec![0xcc; filesz as usize])
    }

    #[test]
    fn a_good_image_loads_and_bss_is_zeroed() {
        let m = mem();
        m.write_slice(&[0xff; 16], GuestAddress(IMAGE_GPA + 4))
            .unwrap();
        let img = load_elf(&m, &elf(IMAGE_GPA, IMAGE_GPA, 4, 4096, 5), 8 << 20).unwrap();
        assert_eq!((img.entry, img.end), (IMAGE_GPA, IMAGE_GPA + 4096));
        let mut b = [0u8; 8];
        m.read_slice(&mut b, GuestAddress(IMAGE_GPA)).unwrap();
        assert_eq!(b, [0xcc, 0xcc, 0xcc, 0xcc, 0, 0, 0, 0]);
    }

    #[test]
    fn bad_images_are_refused_with_a_reason() {
        let m = mem();
        let lim = 8 << 20;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "too short"),
            (vec![0; 200], "no ELF magic"),
            (elf(IMAGE_GPA, 0x1000, 4, 4, 5), "outside"),
            (elf(IMAGE_GPA, IMAGE_GPA, 4, 16 << 20, 5), "outside"),
            (elf(IMAGE_GPA, IMAGE_GPA, 8, 4, 5), "more file bytes"),
            (elf(IMAGE_GPA, IMAGE_GPA, 4, 4, 4), "not in executable code"),
            (
                elf(IMAGE_GPA + 100, IMAGE_GPA, 4, 4, 5),
                "not in executable code",
            ),
            (
                {
                    let mut e = elf(IMAGE_GPA, IMAGE_GPA, 4, 4, 5);
                    e.truncate(121);
                    e
                },
                "past the end",
            ),
            (
                {
                    let mut e = elf(IMAGE_GPA, IMAGE_GPA, 4, 4, 5);
                    e[18] = 3;
                    e
                },
                "not x86-64",
            ),
            (
                {
                    let mut e = elf(IMAGE_GPA, IMAGE_GPA, 4, 4, 5);
                    e[56] = 200;
                    e
                },
                "program headers",
            ),
            (
                {
                    let mut e = elf(IMAGE_GPA, IMAGE_GPA, 4, 4, 5);
                    e[16] = 3;
                    e
                },
                "not an executable",
            ),
        ];
        for (img, want) in cases {
            let e = load_elf(&m, &img, lim).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }
}
