//! The contract between the colo VMM and its built-in guest, as one crate both depend on,
//! so that both sides always agree.
//!
//! - [`boot`]: the machine the guest expects (memory layout, ports, devices, the command
//!   line).
//! - [`cmdline`]: the parameters on the guest's kernel command line.
//! - [`dirty`]: which pages the dirty load writes.
//! - [`record`]: the records of the guest's disk log, which the VMM reads back to check
//!   that every acknowledged write reached the disk.
//!
//! It is `no_std` (the guest is freestanding) and needs `alloc` only for
//! [`record::encode`].

#![no_std]

extern crate alloc;

pub mod boot;
pub mod cmdline;
pub mod dirty;
pub mod record;
