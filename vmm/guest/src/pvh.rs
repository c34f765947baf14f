//! What the guest learns at boot, like a Linux kernel booted through PVH: the
//! `hvm_start_info` (Xen's `arch/x86/hvm/start_info.h`), the command line it points to
//! (parsed into [`Params`]) and the memory map (which gives the scratch area). Nothing here
//! allocates or prints: every vCPU reads it, the workers included.

use colo_guest_abi::boot::SCRATCH_GPA;
use colo_guest_abi::cmdline::{ParamError, Params};

/// `hvm_start_info.magic`.
const START_MAGIC: u32 = 0x336e_c578;
/// The longest command line read (x86 Linux's `COMMAND_LINE_SIZE`, with its NUL).
const CMDLINE_MAX: usize = 2048;
/// Most memory map entries looked at.
const MEMMAP_MAX: u32 = 128;
/// Memory map type of usable RAM.
const RAM: u32 = 1;

/// `struct hvm_start_info` (version 1).
#[repr(C)]
#[derive(Clone, Copy)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// What the guest was booted with.
#[derive(Clone, Copy, Debug)]
pub struct Boot {
    /// The parameters on the command line.
    pub params: Params,
    /// The command line itself.
    pub cmdline: &'static str,
    /// The scratch area: usable RAM from [`SCRATCH_GPA`] to the end of its region (empty
    /// if no RAM is there).
    pub scratch: (u64, u64),
    /// Bytes of usable RAM in all.
    pub ram: u64,
}

/// Why the guest cannot boot.
#[derive(Clone, Copy, Debug)]
pub enum BootError {
    /// No start info at the address (its magic is wrong).
    Magic(u32),
    /// The command line is not NUL-terminated within [`CMDLINE_MAX`] bytes, or not UTF-8.
    Cmdline,
    /// A parameter is missing or wrong.
    Param(ParamError),
}

impl core::fmt::Display for BootError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Magic(m) => write!(f, "no PVH start info (magic {m:#x})"),
            Self::Cmdline => write!(f, "the command line is not a short UTF-8 C string"),
            Self::Param(e) => write!(f, "{e}"),
        }
    }
}

/// Reads an identity-mapped `T` at `gpa`.
///
/// # Safety
/// `gpa` must be RAM the VMM wrote a `T` to (the loader's structures are never written
/// after boot), aligned for `T`.
unsafe fn read<T: Copy>(gpa: u64) -> T {
    // SAFETY: the caller's contract; the map is the identity, so the address is the
    // pointer.
    unsafe { core::ptr::with_exposed_provenance::<T>(gpa as usize).read_volatile() }
}

/// Reads the start info at `start_info`, its command line and memory map.
///
/// # Errors
/// [`BootError`] with what is missing or wrong.
pub fn read_boot(start_info: u64) -> Result<Boot, BootError> {
    if start_info == 0 || start_info % 8 != 0 {
        return Err(BootError::Magic(0));
    }
    // SAFETY: the PVH start info the loader wrote (aligned, checked above); any bytes are
    // a valid StartInfo, and the magic is checked before anything else is believed.
    let info: StartInfo = unsafe { read(start_info) };
    if info.magic != START_MAGIC {
        return Err(BootError::Magic(info.magic));
    }
    let cmdline = if info.cmdline_paddr == 0 {
        ""
    } else {
        // SAFETY: the loader wrote a NUL-terminated command line there; it is never
        // written again, so a shared 'static view is sound. At most CMDLINE_MAX bytes are
        // looked at.
        let bytes = unsafe {
            core::slice::from_raw_parts(
                core::ptr::with_exposed_provenance::<u8>(info.cmdline_paddr as usize),
                CMDLINE_MAX,
            )
        };
        let len = bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(BootError::Cmdline)?;
        core::str::from_utf8(&bytes[..len]).map_err(|_| BootError::Cmdline)?
    };
    let params = Params::parse(cmdline).map_err(BootError::Param)?;
    let mut ram = 0;
    let mut scratch = (SCRATCH_GPA, 0);
    for i in 0..info.memmap_entries.min(MEMMAP_MAX) {
        let at = info.memmap_paddr + u64::from(i) * size_of::<MemmapEntry>() as u64;
        // SAFETY: entry i of the memory map the loader wrote (8-byte aligned, i below its
        // count); any bytes are a valid entry.
        let e: MemmapEntry = unsafe { read(at) };
        if e.kind != RAM {
            continue;
        }
        ram += e.size;
        let end = e.addr.saturating_add(e.size);
        if (e.addr..end).contains(&SCRATCH_GPA) {
            scratch.1 = end - SCRATCH_GPA;
        }
    }
    Ok(Boot {
        params,
        cmdline,
        scratch,
        ram,
    })
}
