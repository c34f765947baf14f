//! The built-in guest image.
//!
//! This crate's `build.rs` builds the freestanding guest in `vmm/guest/` (its contract with
//! the machine is the crate `colo-guest-abi` in `vmm/guest-abi/`) with a nested cargo and
//! leaves the ELF in `OUT_DIR`; it is embedded here so that the machine's tests and the
//! `colo` binary carry their own guest.

/// The guest ELF: a static x86-64 executable (ET_EXEC) with no relocations, linked at
/// `IMAGE_GPA` (0x200000, colo_guest_abi::boot) and loaded by its PT_LOAD segments.
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/colo-guest.elf"));
