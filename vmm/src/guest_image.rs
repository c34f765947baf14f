//! The built-in guest image (temporary until build.rs lands).

/// The guest ELF.
pub const GUEST_ELF: &[u8] = &[];
