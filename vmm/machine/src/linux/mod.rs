//! Booting a Linux kernel: an ELF vmlinux with the Xen PVH entry note (PVH start info and
//! memory map) or a bzImage (zero page, 64-bit entry), loaded with rust-vmm's
//! `linux-loader`, with an initrd, a command line and the e820 map colo builds.
//!
//! Everything here runs before any KVM object exists: a kernel, initrd or command line
//! that cannot work is a typed [`Error`] with what is wrong, and no VM is made.
//!
//! Low guest memory as the loader leaves it (all below the EBDA at 0x9fc00, which the
//! kernel keeps clear of its own allocations):
//!
//! | at | what |
//! |---|---|
//! | 0x500 | GDT ([`entry`]) |
//! | 0x6000 | PVH `hvm_start_info`, its module list at 0x6040 |
//! | 0x7000 | PVH memory map, or the bzImage zero page |
//! | 0x8ff0 | boot stack (bzImage), growing down |
//! | 0x9000 | PML4, PDPT and 4 page directories (bzImage) |
//! | 0x20000 | the command line |
//! | 1 MiB or the ELF's addresses | the kernel |
//! | top of RAM below 3 GiB | the initrd |

pub mod cmdline;
pub mod e820;
pub mod entry;

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use colo_memory::{GuestLayout, GuestMemory};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

pub use entry::Entry;

/// Where the PVH start info goes.
pub const START_INFO_GPA: u64 = 0x6000;
/// Where the PVH module list (the initrd) goes.
pub const MODLIST_GPA: u64 = 0x6040;
/// Where the PVH memory map goes.
pub const MEMMAP_GPA: u64 = 0x7000;
/// Where the bzImage zero page goes.
pub const ZERO_PAGE_GPA: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE_GPA: u64 = 0x2_0000;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The boot header's `boot_flag`, `header` ("HdrS") and loader type ("other").
const BOOT_FLAG: u16 = 0xaa55;
const HDRS: u32 = 0x5372_6448;
const LOADER_OTHER: u8 = 0xff;
/// `xloadflags`: the kernel has the 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
const PAGE: u64 = 4096;

/// The Linux kernel to boot instead of the built-in guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxGuest {
    /// An ELF vmlinux with the PVH note, or a bzImage.
    pub kernel: PathBuf,
    /// An initramfs.
    pub initrd: Option<PathBuf>,
    /// The command line; [`cmdline::DEFAULT`] if none. colo appends the entries it owns.
    pub cmdline: Option<String>,
}

/// Why a kernel cannot be booted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file cannot be read.
    #[error("cannot read the {what} {path}")]
    Read {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error(
        "the kernel {path} is neither an ELF vmlinux nor a bzImage (no ELF magic, no \"HdrS\" \
         boot header at 0x202)"
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
    },
    /// An ELF that is not a 64-bit x86 executable.
    #[error("the kernel {path} is an ELF, but not a 64-bit x86 one ({what})")]
    NotX86_64 {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        what: String,
    },
    /// An ELF without the PVH entry.
    #[error(
        "the kernel {path} is an ELF without the Xen PVH entry note \
         (XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y, or give its bzImage"
    )]
    NoPvhNote {
        /// The file.
        path: PathBuf,
    },
    /// A bzImage too old for the 64-bit boot protocol.
    #[error(
        "the bzImage {path} has no 64-bit entry point (boot protocol {version:#06x}, \
         xloadflags {xloadflags:#x}): colo needs boot protocol 2.12 or later with \
         XLF_KERNEL_64"
    )]
    No64BitEntry {
        /// The file.
        path: PathBuf,
        /// Its boot protocol version.
        version: u16,
        /// Its xloadflags.
        xloadflags: u16,
    },
    /// linux-loader could not load it (a segment outside RAM, a truncated file).
    #[error("cannot load the kernel {path} into {ram_mib} MiB of RAM (is --ram large enough?)")]
    Load {
        /// The file.
        path: PathBuf,
        /// The guest's RAM.
        ram_mib: u64,
        /// linux-loader's error.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error(
        "the initrd {path} ({size} bytes) does not fit: {room} bytes are free between the \
         kernel's end at {kernel_end:#x} and {limit:#x}; give the guest more RAM"
    )]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Bytes free for it.
        room: u64,
        /// Where the kernel (with the room it needs to start) ends.
        kernel_end: u64,
        /// The highest address an initrd may reach.
        limit: u64,
    },
    /// The command line is longer than the kernel takes.
    #[error("the kernel command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong {
        /// Its length with colo's entries.
        len: usize,
        /// The kernel's limit, without the NUL.
        max: usize,
    },
    /// A command line linux-loader refuses.
    #[error("bad kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The RAM does not hold the boot structures.
    #[error("cannot write {what} into guest memory")]
    Write {
        /// What was written.
        what: &'static str,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// linux-loader could not write the zero page or the start info.
    #[error("cannot write the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// A loaded kernel, ready for the vCPU.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// How the vCPU enters it.
    pub entry: Entry,
    /// The command line it gets.
    pub cmdline: String,
    /// The memory map it gets.
    pub e820: Vec<e820::Entry>,
    /// Where the initrd lies (address, bytes).
    pub initrd: Option<(u64, u64)>,
    /// The kernel's command line limit, with the NUL.
    cmdline_max: usize,
}

impl Loaded {
    /// Appends `entry` to the command line in guest memory (before the vCPU runs): for
    /// what colo learns only once the VM exists.
    ///
    /// # Errors
    /// [`Error::CmdlineTooLong`] past the kernel's limit, [`Error::Write`] if guest memory
    /// refuses it.
    pub fn append_cmdline(&mut self, mem: &GuestMemory, entry: &str) -> Result<(), Error> {
        let c = cmdline::build(Some(&self.cmdline), &[entry.to_string()], self.cmdline_max)?;
        let text = cmdline::text(&c)?;
        let mut bytes = text.clone().into_bytes();
        bytes.push(0);
        mem.write_slice(&bytes, GuestAddress(CMDLINE_GPA))
            .map_err(|source| Error::Write {
                what: "the command line",
                source,
            })?;
        self.cmdline = text;
        Ok(())
    }
}

/// What the kernel file is.
enum Format {
    Elf,
    BzImage,
}

fn format_of(path: &Path, file: &mut impl Read) -> Result<Format, Error> {
    let mut head = Vec::with_capacity(0x210);
    file.by_ref()
        .take(0x210)
        .read_to_end(&mut head)
        .map_err(|source| Error::Read {
            what: "kernel",
            path: path.into(),
            source,
        })?;
    if head.starts_with(b"\x7fELF") {
        let class = head.get(4).copied();
        let machine = head.get(18..20).map(|b| u16::from_le_bytes([b[0], b[1]]));
        return match (class, machine) {
            (Some(2), Some(62)) => Ok(Format::Elf),
            (c, m) => Err(Error::NotX86_64 {
                path: path.into(),
                what: format!("class {c:?}, machine {m:?}"),
            }),
        };
    }
    if head.get(0x202..0x206) == Some(&HDRS.to_le_bytes()[..]) {
        return Ok(Format::BzImage);
    }
    Err(Error::UnknownFormat { path: path.into() })
}

/// Loads `guest` into `mem` (whose regions are `layout`), with `owned` appended to its
/// command line, and writes the boot parameters (with `rsdp`, the address of the ACPI
/// tables, if there are any) and the vCPU's tables.
///
/// # Errors
/// Every [`Error`] but nothing else: no KVM object is involved.
pub fn load(
    mem: &GuestMemory,
    layout: &GuestLayout,
    guest: &LinuxGuest,
    owned: &[String],
    rsdp: Option<u64>,
) -> Result<Loaded, Error> {
    let path = &guest.kernel;
    let mut file = File::open(path).map_err(|source| Error::Read {
        what: "kernel",
        path: path.into(),
        source,
    })?;
    let format = format_of(path, &mut file)?;
    load_kernel(mem, layout, &mut file, format, guest, owned, rsdp)
}

/// Loads a kernel image held in memory (the built-in guest, named `name` in errors) with
/// the command line `cmdline`, like [`load`] loads a file.
///
/// # Errors
/// As [`load`].
pub fn load_image(
    mem: &GuestMemory,
    layout: &GuestLayout,
    name: &Path,
    image: &[u8],
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<Loaded, Error> {
    let mut reader = Cursor::new(image);
    let format = format_of(name, &mut reader)?;
    let guest = LinuxGuest {
        kernel: name.into(),
        initrd: None,
        cmdline: Some(cmdline.into()),
    };
    load_kernel(mem, layout, &mut reader, format, &guest, &[], rsdp)
}

fn load_kernel<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemory,
    layout: &GuestLayout,
    file: &mut F,
    format: Format,
    guest: &LinuxGuest,
    owned: &[String],
    rsdp: Option<u64>,
) -> Result<Loaded, Error> {
    let path = &guest.kernel;
    let ram_mib = layout.bytes() >> 20;
    let load_err = |source| Error::Load {
        path: path.clone(),
        ram_mib,
        source,
    };
    let highmem = Some(GuestAddress(e820::HIGH_MEMORY_START));
    let low_end = layout
        .regions()
        .first()
        .map_or(0, |r| r.gpa + r.len)
        .min(crate::memory::HOLE_START);
    let e820 = e820::build(layout);
    match format {
        Format::Elf => {
            let r = Elf::load(mem, None, file, highmem).map_err(load_err)?;
            let PvhBootCapability::PvhEntryPresent(rip) = r.pvh_boot_cap else {
                return Err(Error::NoPvhNote { path: path.clone() });
            };
            let c = cmdline::build(guest.cmdline.as_deref(), owned, cmdline::PVH_MAX)?;
            load_cmdline(mem, GuestAddress(CMDLINE_GPA), &c).map_err(load_err)?;
            let initrd = place_initrd(mem, guest, r.kernel_end, low_end)?;
            write_start_info(mem, &e820, initrd, rsdp)?;
            let entry = Entry::Pvh {
                rip: rip.0,
                start_info: START_INFO_GPA,
            };
            entry::write_tables(mem, &entry)?;
            Ok(Loaded {
                entry,
                cmdline: cmdline::text(&c)?,
                e820,
                initrd,
                cmdline_max: cmdline::PVH_MAX,
            })
        }
        Format::BzImage => {
            let r = BzImage::load(mem, None, file, highmem).map_err(load_err)?;
            let hdr = r.setup_header.unwrap_or_default();
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::No64BitEntry {
                    path: path.clone(),
                    version,
                    xloadflags,
                });
            }
            let max = cmdline::bzimage_max(version, hdr.cmdline_size);
            let c = cmdline::build(guest.cmdline.as_deref(), owned, max)?;
            load_cmdline(mem, GuestAddress(CMDLINE_GPA), &c).map_err(load_err)?;
            // The kernel decompresses itself in place: it needs init_size bytes from where
            // it was loaded.
            let kernel_end = r.kernel_end.max(r.kernel_load.0 + u64::from(hdr.init_size));
            let limit = low_end.min(u64::from(hdr.initrd_addr_max) + 1);
            let initrd = place_initrd(mem, guest, kernel_end, limit)?;
            write_zero_page(mem, hdr, &e820, initrd, rsdp)?;
            let entry = Entry::Linux64 {
                rip: r.kernel_load.0 + 0x200,
                zero_page: ZERO_PAGE_GPA,
            };
            entry::write_tables(mem, &entry)?;
            Ok(Loaded {
                entry,
                cmdline: cmdline::text(&c)?,
                e820,
                initrd,
                cmdline_max: max,
            })
        }
    }
}

/// Puts the initrd at the top of `[kernel_end, limit)`, page-aligned.
fn place_initrd(
    mem: &GuestMemory,
    guest: &LinuxGuest,
    kernel_end: u64,
    limit: u64,
) -> Result<Option<(u64, u64)>, Error> {
    let Some(path) = &guest.initrd else {
        return Ok(None);
    };
    let read_err = |source| Error::Read {
        what: "initrd",
        path: path.clone(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let floor = kernel_end.next_multiple_of(PAGE);
    let addr = limit.checked_sub(size).map(|a| a & !(PAGE - 1));
    let Some(addr) = addr.filter(|&a| a >= floor && size > 0) else {
        return Err(Error::InitrdTooLarge {
            path: path.clone(),
            size,
            room: limit.saturating_sub(floor),
            kernel_end: floor,
            limit,
        });
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|source| Error::Write {
            what: "the initrd",
            source,
        })?;
    Ok(Some((addr, size)))
}

fn write_start_info(
    mem: &GuestMemory,
    e820: &[e820::Entry],
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), Error> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.code(),
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_GPA,
        memmap_paddr: MEMMAP_GPA,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { MODLIST_GPA } else { 0 },
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(START_INFO_GPA));
    params.set_sections(&memmap, GuestAddress(MEMMAP_GPA));
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(MODLIST_GPA));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem).map_err(Error::BootParams)
}

fn write_zero_page(
    mem: &GuestMemory,
    hdr: setup_header,
    e820: &[e820::Entry],
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), Error> {
    let mut p = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    p.hdr.type_of_loader = LOADER_OTHER;
    p.hdr.boot_flag = BOOT_FLAG;
    p.hdr.header = HDRS;
    // cmdline_size stays the kernel's limit: the kernel reads up to the NUL.
    p.hdr.cmd_line_ptr = CMDLINE_GPA as u32;
    if let Some((addr, size)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    for (slot, e) in p.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.code(),
        };
    }
    p.e820_entries = e820.len().min(p.e820_table.len()) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&p, GuestAddress(ZERO_PAGE_GPA)),
        mem,
    )
    .map_err(Error::BootParams)
}

#[cfg(test)]
mod tests;
