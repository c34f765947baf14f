//! The built-in guest image.
//!
//! This crate's `build.rs` builds the freestanding guest in `vmm/guest/` (its contract with
//! the machine is the crate `colo-guest-abi` in `vmm/guest-abi/`) with a nested cargo and
//! leaves the ELF in `OUT_DIR`; it is embedded here so that the machine's tests and the
//! `colo` binary carry their own guest.

/// The guest ELF: a PVH kernel (a static x86-64 ET_EXEC with the Xen PVH entry note and
/// no relocations, linked at `IMAGE_GPA` = 0x200000 with its APs' trampoline at 0x1000,
/// colo_guest_abi::boot), loaded like any PVH vmlinux by [`crate::linux`].
pub const GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/colo-guest.elf"));
